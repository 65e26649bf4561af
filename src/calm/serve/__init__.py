"""`calm serve`: a fitted classifier as an HTTP service (FastAPI + uvicorn; see docs/serve.md).

`create_app(predictor, ServeConfig(...))` gives the ASGI app; `serve(predictor, config, host=, port=)`
runs it under uvicorn until SIGTERM / Ctrl-C and drains. Modules: `app` (endpoints, admission),
`batcher` (dynamic batching, one model thread), `uploads` (bodies within the size limit),
`api_errors` (the JSON error answers), `accesslog` (one JSON line per request), `server` (uvicorn,
signals). Needs the `serve` extra: `pip install 'calm-audio[serve]'`.
"""

from __future__ import annotations

from calm.serve.app import ServeConfig, create_app
from calm.serve.server import serve

__all__ = ["ServeConfig", "create_app", "serve"]
