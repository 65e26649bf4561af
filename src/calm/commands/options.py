"""The click options and value parsers shared by `calm extract`, `calm evaluate` and `calm fit`, and
their translation into the library's spec objects (`calm.models.spec.LoadSpec`, `ClassifierSpec`)."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable, Sequence
from typing import Any

import click
from click.core import ParameterSource

from calm.evaluate.config import ClassifierSpec
from calm.models.spec import LoadSpec
from calm.store.distributed import RayOptions

__all__ = [
    "classifier_options",
    "classifier_spec",
    "engine_options",
    "given_command",
    "given_options",
    "model_options",
    "model_spec",
    "parse_int_list",
    "parse_k",
    "parse_layers",
    "parse_options",
    "parse_seeds",
    "ray_options",
    "stack",
]


def parse_layers(text: str | None) -> int | list[int] | None:
    """`"4"` -> 4 (the first 4 layers); `"0,2,5-7"` -> [0, 2, 5, 6, 7]; None -> None (all)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise click.BadParameter(f"{text!r}: use N (first N layers) or a list like 0,2,5-7") from None
    return out


def parse_options(items: tuple[str, ...]) -> dict[str, object]:
    """`KEY=VALUE` pairs; a value is read as JSON when it parses (numbers, true/false), else text."""
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--option")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def parse_int_list(text: str, what: str) -> list[int]:
    """`"1,5,10"` -> [1, 5, 10] (non-negative integers; `what` names the option in errors)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers", param_hint=what) from None
    if not values or any(v < 0 for v in values):
        raise click.BadParameter(f"{text!r}: expected non-negative integers", param_hint=what)
    return values


def parse_seeds(text: str) -> list[int]:
    """`10` -> seeds 0..9; `3,7,11` -> those seeds."""
    values = parse_int_list(text, "--seeds")
    if "," not in text:
        if values[0] < 1:
            raise click.BadParameter("need at least one seed", param_hint="--seeds")
        return list(range(values[0]))
    return values


def parse_k(text: str) -> float | int:
    """`0.25` -> a fraction of the heads in (0, 1]; `18` (or `18.0`) -> a head count >= 1. Anything
    else (`nan`, `inf`, `0`, `1.5`, a word) is refused in one line naming the value."""
    bad = click.BadParameter(
        f"{text!r} is neither a fraction in (0, 1] nor a whole head count >= 1", param_hint="--k"
    )
    try:
        return _positive_count(int(text))
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise bad from None
    if 0 < value <= 1:
        return value
    if math.isfinite(value) and value.is_integer() and value > 1:
        return int(value)
    raise bad


def _positive_count(n: int) -> int:
    if n < 1:
        raise click.BadParameter(f"{n} heads: a head count must be at least 1", param_hint="--k")
    return n


def stack(options: list[Callable]) -> Callable:
    """One decorator applying click `options` in order (the first one shows first in --help)."""

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


model_options = stack(
    [
        click.option(
            "--model",
            default="whisper-tiny.en",
            show_default=True,
            help="Registered name, hub id or local directory.",
        ),
        click.option(
            "--heads", type=click.Choice(["all", "encoder", "decoder"]), default="all", show_default=True
        ),
        click.option("--prompt", default=None, help="Text prompt (Whisper: previous-text context)."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option(
            "--model-dtype",
            default=None,
            help=(
                "Compute dtype (default auto: bf16 on CPUs with native bf16 matrix units, "
                "else float32; bf16/fp16 on GPU)."
            ),
        ),
        click.option(
            "--layers", default=None, help="N (first N layers) or a list like 0,2,5-7 (default: all)."
        ),
        click.option(
            "--attn-implementation", default=None, help="eager, sdpa, flash_attention_2 (transformers)."
        ),
        click.option(
            "-o",
            "--option",
            "options",
            multiple=True,
            metavar="KEY=VALUE",
            help="Backend option, repeatable (e.g. -o encoder_length=clip -o min_encoder_seconds=10, "
            "-o long=windows, -o video=true).",
        ),
    ]
)
model_options.__doc__ = "The frozen model that extracts the features, and how it runs (extract, evaluate)."


def model_spec(params: dict[str, Any]) -> LoadSpec:
    """The `LoadSpec` of the `model_options` values in a command's parameters (`-o long=windows`
    and the other spec fields given with -o become its fields, the rest backend options)."""
    return LoadSpec.from_options(
        params["model"],
        parse_options(params["options"]),
        heads=params["heads"],
        prompt=params["prompt"],
        device=params["device"],
        dtype=params["model_dtype"],
        layers=parse_layers(params["layers"]),
        attn_implementation=params["attn_implementation"],
    )


engine_options = stack(
    [
        click.option(
            "--engine",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="Extract in this process, or on a Ray cluster (pip install 'calm-audio[ray]').",
        ),
        click.option(
            "--ray-address",
            default=None,
            help="Ray cluster: 'auto' (an existing one), HOST:PORT [default: join or start a local one].",
        ),
        click.option(
            "--actors",
            type=click.IntRange(min=1),
            default=None,
            help="Extractor actors [default: one per GPU, one on a CPU-only cluster].",
        ),
        click.option(
            "--gpus-per-actor",
            type=click.FloatRange(min=0),
            default=None,
            help="GPUs per actor [default: 1 when the cluster has GPUs, else 0].",
        ),
        click.option(
            "--cpus-per-actor",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="CPUs per actor [default: 1, or less so that the actors leave a decoding task room].",
        ),
        click.option(
            "--ray-stall-minutes",
            type=click.FloatRange(min=0, min_open=True),
            default=RayOptions.stall_minutes,
            show_default=True,
            help="Say so when Ray has finished no clip for this long (the run goes on).",
        ),
    ]
)
engine_options.__doc__ = (
    "Where the features are extracted: this process or a Ray cluster (extract, evaluate)."
)


def ray_options(params: dict[str, Any]) -> RayOptions | None:
    """The `RayOptions` of the `engine_options` values, None for the local engine."""
    if params["engine"] != "ray":
        return None
    return RayOptions(
        address=params["ray_address"],
        actors=params["actors"],
        gpus_per_actor=params["gpus_per_actor"],
        cpus_per_actor=params["cpus_per_actor"],
        stall_minutes=params.get("ray_stall_minutes", RayOptions.stall_minutes),
    )


classifier_options = stack(
    [
        click.option(
            "--k",
            "k",
            default=str(ClassifierSpec.k),
            show_default=True,
            help="Heads kept by CALM/CALM-global: fraction or count.",
        ),
        click.option(
            "--tau-p",
            type=float,
            default=ClassifierSpec.tau_p,
            show_default=True,
            help="Head posterior temperature (Eq. 5).",
        ),
        click.option(
            "--tau-w",
            type=float,
            default=ClassifierSpec.tau_w,
            show_default=True,
            help="Head weight temperature (Eq. 8 / 12).",
        ),
        click.option(
            "--sav-tie-break",
            type=click.Choice(["index", "margin"]),
            default=ClassifierSpec.sav_tie_break,
            show_default=True,
            help="SAV heads of equal support accuracy: lower index (paper) or larger mean margin.",
        ),
        click.option(
            "--normalization",
            type=click.Choice(["softmax", "power"]),
            default=ClassifierSpec.normalization,
            show_default=True,
            help="CALM weights: softmax(r / tau_w) (paper) or r^(1/tau_w) / sum (authors' code).",
        ),
        click.option(
            "--reliability",
            type=click.Choice(["in-sample", "leave-one-out"]),
            default=ClassifierSpec.reliability,
            show_default=True,
            help="CALM margins on the support clips (paper) or each clip against its "
            "class centroid without it.",
        ),
        click.option(
            "--scores",
            type=click.Choice(["loo", "paper"]),
            default=ClassifierSpec.scores,
            show_default=True,
            help="CALM's tau_p and reliability pooling chosen per support set by leave-one-out, "
            "or the paper's equations exactly.",
        ),
    ]
)
classifier_options.__doc__ = (
    "The classifiers' hyper-parameters and their options beyond the paper (evaluate, fit)."
)


def classifier_spec(params: dict[str, Any]) -> ClassifierSpec:
    """The `ClassifierSpec` of the `classifier_options` values (and `--sav-k` when the command has it)."""
    sav_k = params.get("sav_k")
    return ClassifierSpec(
        k=parse_k(params["k"]),
        tau_p=params["tau_p"],
        tau_w=params["tau_w"],
        sav_k=parse_k(sav_k) if sav_k is not None else None,
        sav_tie_break=params["sav_tie_break"],
        normalization=params["normalization"],
        reliability=params["reliability"],
        scores=params["scores"],
    )


trust_file_model_option = click.option(
    "--trust-file-model",
    is_flag=True,
    default=False,
    help="Load the model the classifier file names even when it is a hub id or a local directory "
    "(a registered model needs no confirmation; --model NAME confirms one by name).",
)


def given_options(names: Sequence[str], ctx: click.Context | None = None) -> list[str]:
    """The options among ``names`` given on the command line of ``ctx`` (default: the current
    context), not left at their defaults."""
    ctx = click.get_current_context() if ctx is None else ctx
    return [n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]


def given_command(ctx: click.Context) -> str:
    """The command ``ctx`` runs, with the options given on its command line (defaults left out)."""
    words = [str(ctx.info_name)]
    given = set(given_options([p.name for p in ctx.command.params if p.name is not None], ctx))
    for param in ctx.command.params:
        if param.name not in given:
            continue
        value = ctx.params[param.name]
        for item in value if isinstance(value, tuple) else (value,):
            words += [max(param.opts, key=len), str(item)]
    return "calm " + " ".join(shlex.quote(w) for w in words)
