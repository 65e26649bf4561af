"""`EvalConfig.to_cli_args()` (the command report.html and results.json record) parsed back through the
real `calm evaluate` command gives the same `EvalConfig`, for a non-default value of every field."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import pytest

from calm.commands.evaluate import eval_config, evaluate
from calm.evaluate import EvalConfig
from calm.evaluate.config import CLI_OPTIONS
from calm.methods import names
from calm.models.spec import LoadSpec
from calm.store.distributed import RayOptions

NESTED = {"model", "classifier", "lalm", "self_training", "ray"}
# a value other than the default for every (dotted) field of EvalConfig
NON_DEFAULT: dict[str, list[Any]] = {
    "data": ["esc10:/data/esc 10"],
    "features": ["<features>"],
    "key": ["0123abcd"],
    "store": [Path("/tmp/a store")],
    "out": [Path("run dir/x")],
    "model.model_id": ["qwen2-audio"],
    "model.heads": ["encoder"],
    "model.prompt": ["a 'quoted' prompt"],
    "model.device": ["cuda:1"],
    "model.dtype": ["bfloat16"],
    "model.attn_implementation": ["sdpa"],
    "model.layers": [4, [0, 2, 5]],
    "model.long": ["windows"],
    "model.options": [{"encoder_length": "clip", "min_encoder_seconds": 10, "video": True, "tag": "10"}],
    "shots": [(2, 4)],
    "seeds": [(3,), (1, 4, 9), (0, 1)],
    "methods": [names(), ("calm+st", "calm", "sav+st", "sav", "calm+st-trans", "sav+st-trans")],
    "test_fold": ["all", 2],
    "holdout": [0.3],
    "tune": [True],
    "open_set": [3],
    "unknowns_features": [Path("/tmp/other store")],
    "classifier.k": [18, 0.1],
    "classifier.tau_p": [0.05],
    "classifier.tau_w": [2.0],
    "classifier.sav_k": [0.1, 5],
    "classifier.sav_tie_break": ["margin"],
    "classifier.normalization": ["power"],
    "classifier.reliability": ["leave-one-out"],
    "classifier.scores": ["paper"],
    "batch_size": [3],
    "figures": [False],
    "sweep_seeds": [5],
    "lalm.zero_shot_mode": ["generate"],
    "lalm.pl_rollouts": [4],
    "lalm.pl_pool": [7],
    "lalm.pl_seed": [2],
    "self_training.rounds": [0],
    "self_training.per_round": [2],
    "self_training.confidence": ["probability"],
    "self_training.labelled_weight": [3],
    "self_training.max_labelled": [4],
    "self_training.spread": [2],
    "self_training.guard": [None],
    "self_training.pool_per_class": [None, 12],
    "self_training.pool": [50],
    "ray": [RayOptions()],
    "ray.address": ["auto"],
    "ray.actors": [2],
    "ray.gpus_per_actor": [0.5],
    "ray.cpus_per_actor": [2.0],
    "ray.stall_minutes": [1.5],
}
NOT_ON_THE_CLI = {"ray.decode_cpus", "model.name", "model.revision"}  # Python only: `cli_unexpressed`


def leaf_fields() -> set[str]:
    """Every field of EvalConfig, nested ones dotted (`ray` itself too: None or the Ray engine)."""
    base = EvalConfig(out=".", data="x", ray=RayOptions())
    out = {"ray"}
    for f in dataclasses.fields(EvalConfig):
        value = getattr(base, f.name)
        if f.name in NESTED:
            out |= {f"{f.name}.{g.name}" for g in dataclasses.fields(value)}
        else:
            out.add(f.name)
    return out


def test_every_field_has_an_option_and_a_test_value():
    fields = leaf_fields()
    assert fields - NOT_ON_THE_CLI == {o.field for o in CLI_OPTIONS}
    assert fields - NOT_ON_THE_CLI == set(NON_DEFAULT)


def _config(path: str, value: Any, features: Path) -> EvalConfig:
    """The base config (extraction from `data`) with `path` set to `value`."""
    base = EvalConfig(out="run", data="esc10:/data/esc10")
    if path == "features":
        return dataclasses.replace(base, data=None, features=features)
    head, _, leaf = path.partition(".")
    if not leaf:
        return dataclasses.replace(base, **{head: value})
    inner = getattr(base, head) if head != "ray" else RayOptions()
    return dataclasses.replace(base, **{head: dataclasses.replace(inner, **{leaf: value})})


def parse(args: list[str]) -> EvalConfig:
    """The `EvalConfig` `calm evaluate ARGS` builds (click's parser, the command's own conversion)."""
    ctx = evaluate.make_context("evaluate", list(args))
    return eval_config(ctx.params)


@pytest.mark.parametrize(
    ("path", "value"), [(p, v) for p, values in NON_DEFAULT.items() for v in values], ids=str
)
def test_the_generated_command_parses_back_into_the_same_config(path, value, tmp_path):
    config = _config(path, value, tmp_path)
    assert config != EvalConfig(out="run", data="esc10:/data/esc10") or path == "test_fold"
    args = config.to_cli_args()
    assert parse(args) == config
    assert shlex.split(config.command()) == ["calm", "evaluate", *args]


def test_every_setting_at_once_and_the_readme_self_training_run(tmp_path):
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {h: {} for h in NESTED}
    for path, values in NON_DEFAULT.items():
        head, _, leaf = path.partition(".")
        if path not in ("data", "features", "ray"):
            (nested[head] if leaf else top)[leaf or head] = values[-1]
    base = EvalConfig(out="run", data="esc10:/data/esc10", ray=RayOptions())
    parts = {h: dataclasses.replace(getattr(base, h), **kv) for h, kv in nested.items()}
    config = dataclasses.replace(base, **top, **parts)
    assert parse(config.to_cli_args()) == config
    readme = (
        f"--features {tmp_path} --holdout 0.3 --shots 1,3,5 --seeds 20 --methods "
        "calm+st,calm,sav+st,sav,calm+st-trans,sav+st-trans --no-figures --out runs/speech-st --st-rounds 4"
    )
    config = parse(shlex.split(readme))
    command = config.command()
    assert "--holdout 0.3" in command and "--st-rounds 4" in command and "--st-pool-per-class 30" in command
    assert parse(shlex.split(command)[2:]) == config


def test_a_setting_no_option_expresses_is_named():
    config = EvalConfig(out="run", data="esc10:/x", ray=RayOptions(decode_cpus=2.0))
    with pytest.raises(ValueError, match="ray.decode_cpus"):
        config.to_cli_args()
    assert config.command().endswith("# and, from Python only: ray.decode_cpus=2.0")


@pytest.mark.parametrize(
    ("model", "note"),
    [
        (LoadSpec("whisper-tiny.en", revision="abc"), "model.revision=abc"),
        (LoadSpec("some/dir", name="tiny"), "model.name=tiny"),
    ],
)
def test_model_settings_from_python_only_are_named_not_fatal(model, note):
    config = EvalConfig(out="run", data="esc10:/x", model=model)
    with pytest.raises(ValueError, match=note):
        config.to_cli_args()
    command = config.command()  # run_evaluation records it after the episodes: it must not raise
    assert command.endswith(f"# and, from Python only: {note}") and "--model" in command
