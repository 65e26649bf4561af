"""docs/extending.md runs as written: every ```python block of a `##` section, in order, as one module,
after the sections above it, in a folder holding `recordings/` (FSDD-named WAV files).

A section appended to the page is tested without touching this file; the sections listed in
`EXPECTED` must stay on the page.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from calm.data import LOADERS
from calm.evaluate.report_html import SECTIONS as REPORT_SECTIONS
from calm.methods import REGISTRY
from calm.models import MODELS
from tests.helpers import ROOT

PAGE = ROOT / "docs" / "extending.md"
EXPECTED = (
    "A new backbone (model backend)",
    "A new dataset loader",
    "A new classifier",
    "A new report section",
)
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def sections(text: str) -> list[tuple[str, str]]:
    """(title, the python code of its blocks) for every `##` section of the page, in order."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return [
        (title.strip(), "\n".join(BLOCK.findall(body)))
        for title, body in zip(parts[1::2], parts[2::2], strict=True)
    ]


SECTIONS = sections(PAGE.read_text(encoding="utf-8"))
EXPECTED_INDEX = {title: i for i, (title, _) in enumerate(SECTIONS)}


def test_page_has_the_expected_sections_with_code():
    titles = [title for title, _ in SECTIONS]
    for title in EXPECTED:
        assert title in titles, f"docs/extending.md lost its section {title!r}"
    for title, code in SECTIONS:
        assert code.strip(), f"docs/extending.md: section {title!r} has no ```python block"


def test_sections_split_on_level_two_headings_only():
    text = (
        "# Page\nintro\n## One\n```python\nx = 1\n```\n### sub\n```python\ny = 2\n```\n"
        "## Two\n```bash\nls\n```\n"
    )
    assert sections(text) == [("One", "x = 1\n\ny = 2\n"), ("Two", "")]


def make_recordings(folder: Path) -> None:
    """3 digits x 2 speakers x 3 takes of 0.5 s: a tone per digit, a little noise per clip."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    for digit, freq in (("0", 300.0), ("1", 1200.0), ("2", 3000.0)):
        for speaker, shift in (("ann", 1.0), ("bob", 1.04)):
            for take in range(3):
                wave = 0.3 * np.sin(2 * np.pi * freq * shift * t) + 0.01 * rng.standard_normal(t.size)
                sf.write(folder / f"{digit}_{speaker}_{take}.wav", wave.astype(np.float32), 16000)


@pytest.fixture
def page_folder(tmp_path, monkeypatch):
    """A working folder with recordings/; the registries are restored afterwards (the method
    registry and the report's sections in place: other modules hold them by reference)."""
    torch.set_num_threads(1)
    make_recordings(tmp_path / "recordings")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("calm.models.MODELS", dict(MODELS))
    monkeypatch.setattr("calm.data.LOADERS", dict(LOADERS))
    methods, sections = dict(REGISTRY), list(REPORT_SECTIONS)
    yield tmp_path
    REGISTRY.clear()
    REGISTRY.update(methods)
    REPORT_SECTIONS[:] = sections


def run_sections(upto: int, name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Sections 0..upto of the page executed as the module `name`, importable (as a user's plugin
    module is) until the test ends."""
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    for title, code in SECTIONS[: upto + 1]:
        exec(compile(code, f"{PAGE} ({title})", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("index", range(len(SECTIONS)), ids=[title for title, _ in SECTIONS])
def test_section_runs_as_written(index, page_folder, monkeypatch):
    run_sections(index, f"calm_extending_page_{index}", monkeypatch)


def test_backbone_example_registers_a_working_model(page_folder, monkeypatch, capsys):
    import calm
    from calm.models.base import ExtractorError

    run_sections(EXPECTED_INDEX["A new backbone (model backend)"], "calm_extending_backbone", monkeypatch)
    assert "['low']" in capsys.readouterr().out
    with pytest.raises(ExtractorError, match="bands, bins"):
        calm.load_extractor("band-energies", octaves=3)


def test_dataset_example_reads_the_folder_and_refuses_bad_names(page_folder, monkeypatch, capsys):
    from calm.data import DatasetError, load_dataset

    run_sections(EXPECTED_INDEX["A new dataset loader"], "calm_extending_dataset", monkeypatch)
    out = capsys.readouterr().out
    assert "18 clips of ['0', '1', '2']" in out
    assert (page_folder / "runs" / "digits" / "results.json").is_file()
    dataset = load_dataset("spoken-digits:recordings")  # default: takes 0-4 are the test split
    assert {clip.split for clip in dataset.clips} == {"test"}
    (page_folder / "recordings" / "notes.wav").write_bytes(b"")
    with pytest.raises(DatasetError, match="notes.wav: expected <digit>_<speaker>_<take>.wav"):
        load_dataset("spoken-digits:recordings")


def test_classifier_example_is_a_method_of_the_evaluation(page_folder, monkeypatch, capsys):
    import json

    from calm.methods import info

    module = run_sections(EXPECTED_INDEX["A new classifier"], "calm_extending_classifier", monkeypatch)
    assert info("mean-cosine").title == "Mean cosine"
    results = json.loads((page_folder / "runs" / "digits-mean-cosine" / "results.json").read_text())
    accuracy = [r["metrics"]["accuracy"] for r in results["runs"] if r["method"] == "mean-cosine"]
    assert len(accuracy) == 6 and min(accuracy) > 50  # 3 tones, 1-2 shots: far above chance (33 %)
    assert "Mean cosine" in capsys.readouterr().out
    X = np.stack([np.eye(2, 3), -np.eye(2, 3)]).astype(np.float32)  # two clips, 2 heads x 3
    clf = module.MeanCosine().fit(X, ["a", "b"])
    assert list(clf.predict(X)) == ["a", "b"]


def test_report_section_example_adds_a_section_in_place(page_folder, monkeypatch):
    from calm.evaluate.report_html import ReportSection, register_section

    run_sections(EXPECTED_INDEX["A new report section"], "calm_extending_report", monkeypatch)
    anchors = [s.anchor for s in REPORT_SECTIONS]
    assert anchors.index("seeds") == anchors.index("figures") - 1
    with pytest.raises(ValueError, match="already has a section 'seeds'"):
        register_section(ReportSection("seeds", "again", lambda c: ""))
    with pytest.raises(ValueError, match="no report section 'nowhere'"):
        register_section(ReportSection("other", "other", lambda c: ""), before="nowhere")
