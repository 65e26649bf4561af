"""`calm serve`: a saved classifier as an HTTP service (FastAPI + uvicorn, `calm.serve`)."""

from __future__ import annotations

import logging
import os
import sys

import click

from calm.commands.options import trust_file_model_option
from calm.errors import CalmError

INSTALL_HINT = "calm serve needs FastAPI and uvicorn: pip install 'calm-audio[serve]'"


@click.command()
@click.argument("model_path", metavar="MODEL.safetensors", type=click.Path(dir_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--model", default=None, help="Load this model instead of the one the classifier names.")
@click.option(
    "--max-batch", type=click.IntRange(min=1), default=16, show_default=True, help="Clips per model batch."
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="How long the first clip of a batch waits for others.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Clips in the service at once; more are answered 503 with Retry-After.",
)
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True)
@click.option(
    "--max-files", type=click.IntRange(min=1), default=64, show_default=True, help="Per /predict/batch."
)
@click.option("--decode-workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch intra-op threads [default: one per core, divided between the replicas].",
)
@click.option(
    "--replicas",
    default="auto",
    show_default=True,
    help="Copies of the model; a batch is cut into one part per copy, run at once. auto: on a CPU "
    "one per core while all copies' weights fit in 2 GiB, else 1.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds the requests in flight get after SIGTERM; then they answer 503 and the process exits.",
)
@click.option(
    "--body-timeout",
    "body_timeout_s",  # the `ServeConfig` field, which carries the unit
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a request body may take to arrive (408 past it).",
)
@click.option(
    "--request-timeout",
    "request_timeout_s",  # the `ServeConfig` field, which carries the unit
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Seconds a request may take in all (503 past it).",
)
@click.option(
    "--decode-timeout",
    "decode_timeout_s",  # the `ServeConfig` field, which carries the unit
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds of wall clock one clip may take to decode (422 past it).",
)
@click.option(
    "--max-audio-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Most seconds of audio decoded from one upload (longer: 422; the model's window truncates first).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="HTTP requests in flight at once; more get 503.",
)
@click.option(
    "--max-per-client",
    type=click.IntRange(min=1),
    default=None,
    help="HTTP requests in flight from one client address [default: no cap].",
)
@click.option(
    "--rate-limit",
    default=None,
    help="Requests per client address, e.g. 60/minute (429 past it) [default: no limit].",
)
@click.option(
    "--api-key",
    envvar="CALM_API_KEY",
    show_envvar=True,
    default=None,
    help="Require Authorization: Bearer KEY on every path but /health.",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@trust_file_model_option
def serve(
    model_path,
    host,
    port,
    device,
    model,
    threads,
    replicas,
    drain_timeout,
    log_level,
    trust_file_model,
    **limits,
):
    """Serve MODEL.safetensors over HTTP: POST /predict, POST /predict/batch, GET /health, GET /info.

    OpenAPI docs at /docs. SIGTERM or Ctrl-C finishes the requests in flight (at most
    --drain-timeout seconds), then exits 0. Limits and the security model: docs/serve.md.
    """
    try:
        from calm.serve.app import ServeConfig
        from calm.serve.server import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"{INSTALL_HINT} ({exc})") from None
    from calm.inference import load_predictor

    if replicas != "auto" and not (replicas.isdigit() and int(replicas) >= 1):
        raise click.BadParameter(f"{replicas!r}: give a number >= 1 or auto", param_hint="--replicas")

    def announce(line: str) -> None:
        click.echo(f"calm serve: loading {line}", err=True)

    try:
        predictor = load_predictor(
            model_path, model=model, device=device, announce=announce, trust_file_model=trust_file_model
        )
    except (CalmError, OSError) as exc:  # a bad classifier file, a model not found or not matching
        raise click.ClickException(str(exc)) from None
    replicas = _replica_count(predictor, replicas, threads, device)
    limits["api_key"] = limits["api_key"] or None
    try:
        config = ServeConfig(**limits, replicas=replicas, model_file=model_path)
    except ValueError as exc:  # the one checked field: the rate limit's notation
        raise click.BadParameter(str(exc), param_hint="--rate-limit") from None
    click.echo(f"calm serve: {len(predictor.classes)} classes; http://{host}:{port}/docs", err=True)
    code = run_server(
        predictor, config, host=host, port=port, drain_timeout=drain_timeout, log_level=log_level
    )
    # drained and logged: end the process now rather than after the interpreter's teardown of the
    # model (seconds of garbage collection), so SIGTERM exits within --drain-timeout
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _replica_count(predictor, replicas: str, threads: int | None, device: str) -> int:
    """`--replicas` as a number (auto: `calm.serve.batcher.auto_replicas`), with torch's threads
    split between the copies unless `--threads` is given; says what it chose on stderr."""
    import torch

    from calm.serve.batcher import auto_replicas

    cores = torch.get_num_threads()
    n = auto_replicas(predictor.weight_bytes(), device, cores) if replicas == "auto" else int(replicas)
    if threads or n > 1:
        # the copies run at once: the cores are split between them unless --threads says otherwise
        torch.set_num_threads(threads or max(1, cores // n))
    copies = f"{n} cop{'y' if n == 1 else 'ies'} of the model"
    click.echo(f"calm serve: {copies}, {torch.get_num_threads()} torch threads each", err=True)
    return n
