"""Issue 22: `import calm` shows type checkers the real classes (not `Any`) while loading them
lazily at run time; the lazy table, the `if TYPE_CHECKING:` imports and `__all__` name the same things.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import calm

INIT = Path(calm.__file__)


def type_checking_imports() -> dict[str, str]:
    """Name -> module of the imports under `if TYPE_CHECKING:` in calm/__init__.py."""
    found = {}
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module
                found.update({alias.name: imp.module for alias in imp.names})
    return found


def test_the_lazy_table_and_the_type_checking_imports_agree():
    assert type_checking_imports() == calm._LAZY
    assert set(calm.__all__) == {"__version__", "CalmError", *calm._LAZY}
    for name in calm.__all__:
        assert getattr(calm, name) is not None


def test_import_calm_stays_light():
    code = (
        "import sys, calm; print(sorted(m for m in sys.modules if m.startswith(('calm', 'torch', 'sklea'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['calm', 'calm._version', 'calm.errors']"


@pytest.mark.slow  # mypy reads torch's and scikit-learn's stubs: about 12 s with a cold cache
def test_mypy_sees_the_public_classes(tmp_path, monkeypatch):
    from mypy import api

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import calm\n\n"
        "reveal_type(calm.CALM)\nreveal_type(calm.SAV)\nreveal_type(calm.SelfTraining)\n"
        "reveal_type(calm.AudioClassifier)\nreveal_type(calm.CalmError)\nreveal_type(calm.load)\n"
        "reveal_type(calm.load_features)\n"
    )
    import os

    os.environ["MYPYPATH"] = str(INIT.parents[1])
    try:
        out, err, _ = api.run(
            [
                str(probe),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--follow-imports=silent",
                "--no-error-summary",
            ]
        )
    finally:
        del os.environ["MYPYPATH"]
    revealed = [ln.split("Revealed type is ", 1)[1] for ln in out.splitlines() if "Revealed type is" in ln]
    assert len(revealed) == 7, out + err
    assert all("Any" != r.strip('"') for r in revealed), out
    for line, cls in zip(
        revealed,
        [
            "calm.classifiers.calm.CALM",
            "calm.classifiers.sav.SAV",
            "calm.selftraining.SelfTraining",
            "calm.audio_classifier.AudioClassifier",
            "calm.errors.CalmError",
            "calm.classifiers.base.HeadClassifier",
        ],
        strict=False,
    ):
        assert line.endswith(f'-> {cls}"'), line
    assert "tuple[" in revealed[6], revealed[6]
