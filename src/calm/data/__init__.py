"""Dataset loaders: `load_dataset("KIND:ROOT")` -> `Dataset` of `Clip`s (labels, folds/splits, meta).

Kinds: `folder`, `csv`, `esc50`, `esc10`, `vggsound`, `audioset`, `asvspoof2019-la`, `hf` (Hugging
Face datasets); one module per corpus. Loader options (e.g. AudioSet's file-name template,
`missing=skip`) are keyword arguments, or, from the command line, a query after the root:
`audioset:/data/as?template=Y{ytid}.wav&missing=skip`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from calm.data.base import LABEL_SEP, Clip, Dataset, DatasetError

# kind -> "module:function"; every loader takes the root (or None) and keyword options.
LOADERS = {
    "folder": "calm.data.folder:load_folder",
    "csv": "calm.data.manifest:load_manifest",
    "esc50": "calm.data.esc:load_esc50",
    "esc10": "calm.data.esc:load_esc10",
    "vggsound": "calm.data.vggsound:load_vggsound",
    "audioset": "calm.data.audioset:load_audioset",
    "asvspoof2019-la": "calm.data.asvspoof:load_asvspoof2019_la",
    "hf": "calm.data.hf:load_hf",
}
# kinds that may be given without a root (they download into the user cache)
ROOT_OPTIONAL = {"esc50"}

__all__ = ["LABEL_SEP", "LOADERS", "Clip", "Dataset", "DatasetError", "load_dataset", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """`"esc10:/data/esc10"` -> ("esc10", "/data/esc10", {}); `"esc50"` -> ("esc50", None, {});
    `"audioset:/d?template=Y{ytid}.wav"` -> ("audioset", "/d", {"template": "Y{ytid}.wav"})."""
    options: dict[str, str] = {}
    head, qmark, query = spec.rpartition("?")
    if qmark and query and all("=" in part for part in query.split("&")):
        spec = head
        for part in query.split("&"):
            key, _, value = part.partition("=")
            options[key.strip()] = value.strip()
    kind, sep, root = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in LOADERS:
        raise DatasetError(f"unknown dataset kind {kind!r} in {spec!r}; known: {', '.join(LOADERS)}")
    root = root.strip() if sep else ""
    if not root:
        if kind not in ROOT_OPTIONAL:
            raise DatasetError(f"{spec!r}: {kind} needs a root, e.g. {kind}:/path/to/{kind}")
        return kind, None, options
    return kind, root, options


def load_dataset(spec: str, **options) -> Dataset:
    """Load a dataset from `KIND:ROOT` (see the module docstring); options go to the loader."""
    kind, root, spec_options = parse_spec(spec)
    module, attr = LOADERS[kind].split(":")
    loader = getattr(importlib.import_module(module), attr)
    options = {**spec_options, **options}
    try:
        dataset = loader(Path(root) if root is not None else None, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise DatasetError(f"{spec}: {kind} does not take option(s) {sorted(options)} ({exc})") from None
        raise
    if not dataset.clips:
        raise DatasetError(f"{spec}: no clips")
    return dataset
