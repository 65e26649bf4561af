"""Long clips as several model windows: features averaged over windows (`long="windows"`).

By default `load_input` truncates a clip to the model's window (`max_seconds`, 30 s for Whisper
and Qwen2-Audio) with a logged warning. `WindowedExtractor` instead cuts the clip into windows of
exactly `max_seconds` (the last one ends at the clip's end, see `calm.audio.split_windows`), runs
every window through the wrapped extractor and averages the per-head features over the windows.
It exposes the `Extractor` contract, `inner`, and the LALM attributes zero-shot reads (`model`,
`processor`, `tokenizer`, `build_inputs`, `forward_kwargs`, `positions_from_mask`); nothing else
of the wrapped extractor is forwarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from calm.models.base import Extractor, ExtractorError


class WindowedExtractor(Extractor):
    """Wraps an audio extractor so that each clip's features are the mean over its windows."""

    def __init__(self, inner: Extractor):
        if inner.max_seconds is None:
            raise ExtractorError(f"{inner.model_id} has no fixed window: long='windows' does not apply")
        if type(inner).load_input is not Extractor.load_input:
            raise ExtractorError(
                f"{type(inner).__name__} reads its own inputs (e.g. video): long='windows' needs plain audio"
            )
        self.inner = inner
        self.model_id = inner.model_id
        self.sample_rate = inner.sample_rate
        self.max_seconds = inner.max_seconds
        self.head_names = inner.head_names

    @property
    def key(self) -> dict[str, Any]:
        return {**self.inner.key, "long": "windows"}

    def load_input(self, path) -> np.ndarray:
        from calm.audio import load_audio

        return load_audio(path, self.sample_rate, max_seconds=self.max_seconds, long="windows")

    def extract(self, inputs: Sequence[Any]) -> np.ndarray:
        windows = [np.atleast_2d(x) for x in inputs]  # (w_i, n) each; a short clip is one window
        feats = np.asarray(self.inner.extract([w for clip in windows for w in clip]), dtype=np.float32)
        bounds = np.cumsum([0] + [len(w) for w in windows])
        return np.stack([feats[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])

    # ------------------------------------------------------- the wrapped LALM, for zero-shot
    # (`calm.answering.zeroshot.as_chat_lm` reads these; on a Whisper inner extractor, which has no
    # `build_inputs`, reading one raises AttributeError as it would there)

    @property
    def model(self) -> Any:
        return cast(Any, self.inner).model

    @property
    def processor(self) -> Any:
        return cast(Any, self.inner).processor

    @property
    def tokenizer(self) -> Any:
        return cast(Any, self.inner).tokenizer

    @property
    def build_inputs(self) -> Any:
        return cast(Any, self.inner).build_inputs

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        return cast(Any, self.inner).forward_kwargs

    @property
    def positions_from_mask(self) -> bool:
        return cast(Any, self.inner).positions_from_mask
