"""benchmarks/ holds only the speed / memory benchmarks (bench_*.py) and research/ the research
scripts; every script is named in its folder's README, imports against the current package, and
answers --help."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

FOLDERS = ("benchmarks", "research")
SCRIPTS = [path for folder in FOLDERS for path in sorted((ROOT / folder).glob("*.py"))]


def test_benchmarks_holds_only_benchmarks():
    names = [p.name for p in (ROOT / "benchmarks").glob("*.py")]
    assert names and all(name.startswith("bench_") for name in names), names
    assert not [p.name for p in (ROOT / "research").glob("bench_*.py")]


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_script_is_documented_imports_and_answers_help(script: Path, monkeypatch, capsys):
    readme = (script.parent / "README.md").read_text(encoding="utf-8")
    assert f"`{script.name}" in readme, f"{script.parent.name}/README.md does not name {script.name}"
    monkeypatch.syspath_prepend(str(script.parent))  # research scripts import each other
    spec = importlib.util.spec_from_file_location(f"_script_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
