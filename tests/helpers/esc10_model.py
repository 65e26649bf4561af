"""A small CALM fitted on whisper-tiny.en features of a few real ESC-10 clips (for predict / serve tests).

Built the way a user builds one: `calm extract` on a folder of clips, then `calm fit`. The encoder
runs on each clip's own length (`-o encoder_length=clip`) to keep the tests fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

CLASSES = ("001 - Dog bark", "002 - Rain", "010 - Fire crackling")
SUPPORT = 2  # clips per class the classifier is fitted on
QUERIES = 2  # further clips per class left for prediction


def esc10_clips(root: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """(support clips per class, query clips) from the first clips of `CLASSES`."""
    support, queries = {}, []
    for name in CLASSES:
        files = sorted((root / name).glob("*.ogg"))[: SUPPORT + QUERIES]
        support[name], queries = files[:SUPPORT], queries + files[SUPPORT:]
    return support, queries


def fit_esc10_model(root: Path, work: Path) -> tuple[Path, list[Path]]:
    """`calm extract` + `calm fit` on the support clips: (MODEL.safetensors, query clips)."""
    from calm.cli import main

    support, queries = esc10_clips(root)
    data = work / "support"
    for name, files in support.items():
        (data / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, data / name / f.name)
    runner = CliRunner()
    store, model = work / "store", work / "model.safetensors"
    args = ["extract", "--data", f"folder:{data}", "--out", str(store), "-o", "encoder_length=clip"]
    res = runner.invoke(main, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["fit", str(store), "--out", str(model), "--k", "8"])
    assert res.exit_code == 0, res.output
    return model, queries
