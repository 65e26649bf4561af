"""What `run_evaluation` is asked to do: `EvalConfig` and its parts (the model, a
`calm.models.spec.LoadSpec`; the classifiers' hyper-parameters; the model-answer baselines), typed,
frozen and checked when built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calm.errors import ParameterError
from calm.evaluate.estimators import FEWSHOT_METHODS, Method, fewshot_methods
from calm.evaluate.self_training_runs import STSpec
from calm.methods import DEFAULTS, info, names
from calm.models import DEFAULT_MODEL
from calm.models.spec import LoadSpec
from calm.store.distributed import RayOptions

__all__ = ["CLI_OPTIONS", "ClassifierSpec", "CliOption", "EvalConfig", "LALMSpec"]


@dataclass(frozen=True)
class ClassifierSpec:
    """The few-shot methods' default hyper-parameters (`fewshot_methods`; by default
    `calm.methods.DEFAULTS`, those of `calm.SAV()` / `calm.CALM()`).

    Attributes:
        k: heads kept by CALM / CALM-global, a fraction in (0, 1] or a head count.
        tau_p: head posterior temperature (Eq. 5).
        tau_w: head weight temperature (Eq. 8 / 12).
        sav_k: heads kept by SAV (None: `k`).
        sav_tie_break: SAV heads of equal support accuracy: `index` (paper) or `margin`.
        normalization: CALM weights: `softmax` (paper) or `power` (authors' code).
        reliability: CALM margins: `in-sample` (paper) or `leave-one-out`.
        scores: CALM's tau_p and reliability pooling chosen per support set by leave-one-out
            (`loo`) or the paper's equations exactly (`paper`).
    """

    k: float | int = DEFAULTS["k"]
    tau_p: float = DEFAULTS["tau_p"]
    tau_w: float = DEFAULTS["tau_w"]
    sav_k: float | int | None = None
    sav_tie_break: str = DEFAULTS["tie_break"]
    normalization: str = DEFAULTS["normalization"]
    reliability: str = DEFAULTS["reliability"]
    scores: str = DEFAULTS["scores"]

    def registry(self) -> dict[str, Method]:
        """The few-shot methods with these defaults."""
        return fewshot_methods(
            k=self.k,
            tau_p=self.tau_p,
            tau_w=self.tau_w,
            sav_k=self.sav_k,
            sav_tie_break=self.sav_tie_break,
            normalization=self.normalization,
            reliability=self.reliability,
            scores=self.scores,
        )


@dataclass(frozen=True)
class LALMSpec:
    """The baselines that need the model to answer (`zero-shot`, `sav+pl`, `calm+pl`).

    Attributes:
        zero_shot_mode: `letters` (option-letter logits), `likelihood` (class-name likelihood) or
            `generate` (a generated answer).
        pl_rollouts: sampled answers per unlabelled clip (temperatures U(1, 2.5)).
        pl_pool: unlabelled clips drawn per episode (None: shots x classes).
        pl_seed: seed of the pseudo-label sampling.
    """

    zero_shot_mode: str = "letters"
    pl_rollouts: int = 10
    pl_pool: int | None = None
    pl_seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: where the features come from, the protocol, the methods, what is written.

    Attributes:
        out: run directory (results.json, results.md, figures/, answer caches).
        data: dataset `KIND:ROOT` to extract and evaluate (exactly one of `data` and `features`).
        features: an existing feature store to evaluate (the model is then not loaded).
        key: extraction key digest, when `features` holds several.
        store: feature store to extract `data` into (None: `out/features`).
        model: the extracting model and its options (used with `data`): a `LoadSpec`, e.g.
            `LoadSpec("qwen2-audio", device="cuda", prompt=...)` (default: the embedded Whisper).
        shots: shots per class.
        seeds: episode seeds.
        methods: few-shot methods (`FEWSHOT_METHODS`) and model-answer baselines (`LALM_METHODS`).
        test_fold: folded data: the test fold, or `"all"` to rotate.
        holdout: data without a split or folds: hold this fraction of each class out as the test
            part (`calm.evaluate.episodes.holdout_split`, seed 0); None: queries = every clip outside
            the support set.
        tune: choose hyper-parameters by cross-validation inside each support set.
        open_set: classes held out per seed for the open-set evaluation (`calm.evaluate.openset`);
            0 with no `unknowns_features`: no open-set evaluation.
        unknowns_features: a feature store of the same extraction key whose clips are unknown
            queries of every open-set episode (None: none).
        classifier: the methods' default hyper-parameters.
        lalm: settings of the model-answer baselines.
        self_training: schedule and pool of `calm+st` / `sav+st` (and their `-trans` forms).
        batch_size: clips per model forward (extraction, answers).
        figures: write figures/ (and run the heads-kept sweep they need).
        sweep_seeds: seeds of the heads-kept sweep (the first ones of `seeds`).
        ray: extract `data` on a Ray cluster with these options (None: in this process).
    """

    out: str | Path
    data: str | None = None
    features: str | Path | None = None
    key: str | None = None
    store: str | Path | None = None
    model: LoadSpec = field(default_factory=lambda: LoadSpec(DEFAULT_MODEL))
    shots: Sequence[int] = (1, 5, 10)
    seeds: Sequence[int] = tuple(range(10))
    methods: Sequence[str] = FEWSHOT_METHODS
    test_fold: int | str | None = 5
    holdout: float | None = None
    tune: bool = False
    open_set: int = 0
    unknowns_features: str | Path | None = None
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    lalm: LALMSpec = field(default_factory=LALMSpec)
    self_training: STSpec = field(default_factory=STSpec)
    batch_size: int = 8
    figures: bool = True
    sweep_seeds: int = 3
    ray: RayOptions | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.features is None):
            raise ParameterError("give exactly one of data (extract, then evaluate) or features (a store)")
        unknown = [m for m in self.methods if m not in names()]
        if unknown:
            raise ParameterError(f"unknown method(s) {unknown}")
        if not self.shots or not self.seeds:
            raise ParameterError("need at least one number of shots and one seed")
        if self.holdout is not None and not 0.0 < self.holdout < 1.0:
            raise ParameterError(f"holdout must lie in (0, 1), got {self.holdout}")
        if self.open_set < 0:
            raise ParameterError(f"open_set must be >= 0 classes, got {self.open_set}")
        if self.batch_size < 1 or self.sweep_seeds < 1:
            raise ParameterError("batch_size and sweep_seeds must be >= 1")
        self._normalise()

    def _normalise(self) -> None:
        """One form per value, so equal settings compare equal (whatever the caller or the CLI gave):
        tuples for the lists, Paths for the folders, an integer test fold, `all` for None."""
        fold = self.test_fold
        fold = "all" if fold is None else int(fold) if str(fold).strip().isdigit() else fold
        values: dict[str, Any] = {
            "shots": tuple(self.shots),
            "seeds": tuple(self.seeds),
            "methods": tuple(self.methods),
        }
        values |= {"test_fold": fold, "out": Path(self.out)}
        values |= {
            name: Path(v)
            for name in ("features", "store", "unknowns_features")
            if (v := getattr(self, name)) is not None
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def to_cli_args(self) -> list[str]:
        """The `calm evaluate` arguments that build this config (`CLI_OPTIONS`): the protocol and the
        classifier options always, the others where they differ from their defaults. ValueError names
        a setting no option expresses (see `cli_unexpressed`)."""
        left = self.cli_unexpressed()
        if left:
            raise ParameterError(f"no calm evaluate option sets {', '.join(left)}")
        return self._cli_args()

    def _cli_args(self) -> list[str]:
        """The arguments of every setting an option expresses (the others left out)."""
        args: list[str] = []
        for option in CLI_OPTIONS:
            value = _get(self, option.field)
            default = option.default(self) if option.default else _get(DEFAULT_FIELDS, option.field)
            if option.always(self) or value != default:
                args += option.args(value)
        return args

    def command(self) -> str:
        """The arguments as one shell command line, `calm evaluate ...`, with a note naming the
        settings no option expresses (they come from Python only)."""
        import shlex

        left = self.cli_unexpressed()
        line = shlex.join(["calm", "evaluate", *self._cli_args()])
        return line + (f"  # and, from Python only: {', '.join(left)}" if left else "")

    def cli_unexpressed(self) -> list[str]:
        """`field=value` of the settings no `calm evaluate` option expresses (Ray's decode_cpus, the
        model's hub revision and the name its features are labelled with)."""
        left = []
        if self.ray is not None and self.ray.decode_cpus != RayOptions.decode_cpus:
            left.append(f"ray.decode_cpus={self.ray.decode_cpus}")
        if self.model.revision is not None:
            left.append(f"model.revision={self.model.revision}")
        if self.model.name is not None and self.model.name != self.model.model_id:
            left.append(f"model.name={self.model.name}")
        return left


# -- `calm evaluate`'s options of each field ----------------------------------------------------


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name) if obj is not None else None
    return obj


def _text(value: Any) -> str:
    return str(value)


def _seeds(seeds: Sequence[int]) -> str:
    """N for seeds 0..N-1, else the list (one seed with a trailing comma: `3,` is seed 3)."""
    seeds = list(seeds)
    if seeds == list(range(len(seeds))):
        return str(len(seeds))
    return ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")


def _option(key: str, value: Any) -> str:
    """`-o KEY=VALUE` text: strings that would read as JSON are quoted, other values are JSON."""
    import json

    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return f"{key}={value}"
    return f"{key}={json.dumps(value, default=str)}"


@dataclass(frozen=True)
class CliOption:
    """One `EvalConfig` field (dotted path) as `calm evaluate` options.

    Attributes:
        field: the field, e.g. `classifier.k` or `self_training.rounds`.
        flag: its option (`--k`); for flags without a value, `--tune` / `--figures/--no-figures`.
        text: the option's value text from the field's value (None: a flag without a value).
        always: whether the option is spelled out even at its default (the protocol, the classifier
            options, the options of the methods chosen).
        spells_none: None has a word (`text(None)`, e.g. `none`) instead of leaving the option out.
        default: the field's default for this config, where it depends on another field (the
            model's dtype on its device); None: the field's value in `EvalConfig()`.
    """

    field: str
    flag: str
    text: Callable[[Any], str] | None = _text
    always: Callable[[EvalConfig], bool] = lambda config: False
    spells_none: bool = False
    default: Callable[[EvalConfig], Any] | None = None

    def args(self, value: Any) -> list[str]:
        if self.field == "ray":
            return [] if value is None else ["--engine", "ray"]
        if self.field == "model.options":
            return [a for key, v in value.items() for a in ("-o", _option(key, v))]
        if self.text is None:  # a switch: `--on` or `--on/--off`
            on, _, off = self.flag.partition("/")
            return [on] if value else ([off] if off else [])
        return [] if value is None and not self.spells_none else [self.flag, self.text(value)]


def _yes(config: EvalConfig) -> bool:
    return True


def _uses(kinds: tuple[str, ...]) -> Callable[[EvalConfig], bool]:
    return lambda config: any(info(m).kind in kinds for m in config.methods)


def _word_for_none(value: Any) -> str:
    """An option's text with None spelled `none` (`--st-max-labelled none`, `--st-guard none`)."""
    return "none" if value is None else str(value)


def _dtype(value: Any) -> str:
    from calm.models.base import dtype_name

    return dtype_name(value) if not isinstance(value, str) else value


def _device_dtype(config: EvalConfig) -> Any:
    from calm.models.base import default_dtype

    return default_dtype(config.model.device)


def _layers(value: Any) -> str:
    return str(value) if isinstance(value, int) else ",".join(map(str, value))


_ST, _LALM = _uses(("self-training",)), _uses(("answers", "pseudo-labels"))

#: The one map from `EvalConfig` fields to `calm evaluate` options (`to_cli_args`; a test parses
#: the arguments back through the command into the same config, every field included).
CLI_OPTIONS: tuple[CliOption, ...] = (
    CliOption("data", "--data", always=_yes),
    CliOption("features", "--features", always=_yes),
    CliOption("key", "--key"),
    CliOption("model.model_id", "--model", always=lambda c: c.data is not None),
    CliOption("model.heads", "--heads"),
    CliOption("model.prompt", "--prompt"),
    CliOption("model.device", "--device"),
    CliOption("model.dtype", "--model-dtype", _dtype, default=_device_dtype),
    CliOption("model.layers", "--layers", _layers),
    CliOption("model.attn_implementation", "--attn-implementation"),
    CliOption("model.long", "-o", lambda v: f"long={v}"),
    CliOption("model.options", "-o"),
    CliOption("store", "--store"),
    CliOption("out", "--out", always=_yes),
    CliOption("shots", "--shots", lambda v: ",".join(map(str, v)), always=_yes),
    CliOption("seeds", "--seeds", _seeds, always=_yes),
    CliOption("methods", "--methods", ",".join, always=_yes),
    CliOption("test_fold", "--test-fold", always=_yes),
    CliOption("holdout", "--holdout"),
    CliOption("tune", "--tune", None),
    CliOption("open_set", "--open-set"),
    CliOption("unknowns_features", "--unknowns-features"),
    CliOption("classifier.k", "--k", always=_yes),
    CliOption("classifier.tau_p", "--tau-p", always=_yes),
    CliOption("classifier.tau_w", "--tau-w", always=_yes),
    CliOption("classifier.sav_k", "--sav-k"),
    CliOption("classifier.sav_tie_break", "--sav-tie-break", always=_yes),
    CliOption("classifier.normalization", "--normalization", always=_yes),
    CliOption("classifier.reliability", "--reliability", always=_yes),
    CliOption("classifier.scores", "--scores", always=_yes),
    CliOption("batch_size", "--batch-size", always=_yes),
    CliOption("figures", "--figures/--no-figures", None),
    CliOption("sweep_seeds", "--sweep-seeds", always=lambda c: c.figures),
    CliOption("self_training.pool", "--st-pool"),
    CliOption("self_training.rounds", "--st-rounds", always=_ST),
    CliOption("self_training.per_round", "--st-per-round", always=_ST),
    CliOption("self_training.confidence", "--st-confidence", always=_ST),
    CliOption("self_training.labelled_weight", "--st-labelled-weight", always=_ST),
    CliOption(
        "self_training.max_labelled", "--st-max-labelled", _word_for_none, always=_ST, spells_none=True
    ),
    CliOption(
        "self_training.pool_per_class", "--st-pool-per-class", _word_for_none, always=_ST, spells_none=True
    ),
    CliOption("self_training.spread", "--st-spread", always=_ST),
    CliOption("self_training.guard", "--st-guard", _word_for_none, always=_ST, spells_none=True),
    CliOption("lalm.zero_shot_mode", "--zero-shot-mode", always=_LALM),
    CliOption("lalm.pl_rollouts", "--pl-rollouts", always=_LALM),
    CliOption("lalm.pl_pool", "--pl-pool"),
    CliOption("lalm.pl_seed", "--pl-seed", always=_LALM),
    CliOption("ray", "--engine", always=lambda c: c.ray is not None),
    CliOption("ray.address", "--ray-address"),
    CliOption("ray.actors", "--actors"),
    CliOption("ray.gpus_per_actor", "--gpus-per-actor"),
    CliOption("ray.cpus_per_actor", "--cpus-per-actor", always=lambda c: c.ray is not None),
    CliOption("ray.stall_minutes", "--ray-stall-minutes"),
)

#: the defaults `to_cli_args` leaves out (a config of defaults; `data` only makes it valid)
DEFAULT_FIELDS = EvalConfig(out=".", data="-", ray=RayOptions())
