"""The method registry: every method `calm evaluate`, `calm fit` and `calm.AudioClassifier` know, one
registration each, and the one default of every classifier parameter.

A registration (`MethodInfo`) carries the method's name (its only spelling in `src/`), its title in
tables, reports and figure legends, its kind (a few-shot estimator, the model's own answers, an
estimator fitted on pseudo-labels or self-trained), the estimator factory (``"module:Class"``,
imported when built, so this module imports nothing of calm and any layer may read it), fixed
constructor arguments, which parameters it takes, its tuning grid, its figure style and the roles
the evaluation gives it. Adding a classifier is one module (the estimator) plus one
`register(MethodInfo(...))` call below.

Defaults (`DEFAULTS`): the values the README's tables and docs/results.md measured, so that
`calm.CALM()`, `calm.SAV()`, `calm.AudioClassifier`, `calm fit`, `calm evaluate` and `EvalConfig`
build the same model: k = 0.25 (a quarter of the heads, for SAV too: every reported run used it;
the paper's accuracy plateau spans about 20-50 % of the heads), tau_p = 0.03 and tau_w = 0.5 (the
paper), softmax weights and in-sample reliabilities (the paper), CALM's class scores by the paper's
equations except tau_p and the reliability pooling, chosen per support set by leave-one-out
(``scores="loo"``: chosen on validation episodes inside the training parts of EmoDB, ESC-10, FSDD
and speech_commands_mini, docs/results.md's EmoDB section; ``"paper"`` keeps the paper's
equations exactly), SAV ties to the
lower head index (the paper), no reject option (``unknown=None``: every clip gets a class, as in
the paper; when it is on, its known score is "centroid-z+top": ``unknown_score``, chosen on
validation episodes inside ESC-10's training folds by research/reject_scores.py and
research/reject_scores_z.py; docs/results.md, "The reject option"), no kept support set
(``keep_support=False``: files hold the fitted state only), and the linear probe's logistic
regression with scikit-learn's C = 1 and up to 2000 L-BFGS iterations (every reported probe run).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "AUTO_CANDIDATES",
    "AUTO_CV_REPEATS",
    "AUTO_FALLBACK",
    "DEFAULTS",
    "DEFAULT_METHOD",
    "UNKNOWN_SCORES",
    "EXPLAIN_HEADS",
    "REGISTRY",
    "FigureStyle",
    "MethodInfo",
    "audio_methods",
    "build",
    "fit_methods",
    "info",
    "method_of",
    "names",
    "principal",
    "register",
]

#: Heads listed per class when `explain` is given no number (`HeadClassifier.explain`,
#: `calm predict --explain`, serve's `top`)
EXPLAIN_HEADS = 5

#: The one default of each classifier parameter (see the module docstring for the choice).
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "k": 0.25,
        "tau_p": 0.03,
        "tau_w": 0.5,
        "tie_break": "index",
        "normalization": "softmax",
        "reliability": "in-sample",
        "scores": "loo",
        "calibration": "loo-temperature",
        "unknown": None,
        "unknown_score": "centroid-z+top",
        "unknown_label": "unknown",
        "keep_support": False,
        "C": 1.0,
        "max_iter": 2000,
    }
)

#: The known-vs-unknown scores of the reject option (``unknown_score=``, `calm fit --unknown-score`),
#: name -> description; the math is `calm._calibration` (research/reject_scores.py and
#: research/reject_scores_z.py chose the default).
UNKNOWN_SCORES: Mapping[str, str] = MappingProxyType(
    {
        "centroid-z+top": "centroid-z plus the top log-odds, each on the support clips' scale",
        "centroid-z": "z-scored cosines to the predicted class's centroid (its kept heads and all heads)",
        "top-proba": "log-odds of the calibrated top probability",
    }
)

#: The kinds of method: a few-shot estimator, the model's own answers, an estimator fitted on the
#: model's pseudo-labels, a self-trained estimator (inductive or transductive pool).
KINDS = ("few-shot", "answers", "pseudo-labels", "self-training")


@dataclass(frozen=True)
class FigureStyle:
    """How a method is drawn in Fig. 4 (heads-kept sweep): matplotlib line format and legend label."""

    line: str
    label: str


@dataclass(frozen=True)
class MethodInfo:
    """One method.

    Attributes:
        name: the name users type (`--methods`, `--method`, `AudioClassifier(method=)`).
        title: its title in tables, report.html and figure legends.
        kind: one of `KINDS`.
        factory: ``"module:Class"`` of the estimator (few-shot methods), built by `build`.
        fixed: constructor arguments that make the method (e.g. ``weighting="global"``).
        params: the estimator parameters the evaluation sets; each maps to its `ClassifierSpec`
            field (when that is None: the field named like the parameter, then `DEFAULTS` under the
            parameter's name, else `fixed_defaults`).
        fixed_defaults: defaults of parameters outside `DEFAULTS` (e.g. a plug-in method's own).
        grid: what `--tune` searches.
        base: the few-shot method fitted on pseudo-labels / self-trained (other kinds).
        transductive: self-training on the episode's own queries.
        saveable: `calm fit` and `calm.AudioClassifier` offer it (the estimator saves to a file).
        sweep: drawn in the heads-kept sweep (Fig. 4) with this style.
        principal: the paper's method: its fits draw Fig. 3 and 6, its sweep Fig. 5, and report.html
            lists the classes it gains or loses against the `contrast` methods.
        contrast: see `principal`.
        by_default: run by `calm evaluate` / `EvalConfig` when no methods are named (``auto``,
            which refits its candidates for cross-validation, runs only when named).
    """

    name: str
    title: str
    kind: str
    factory: str = ""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    fixed_defaults: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    base: str | None = None
    transductive: bool = False
    saveable: bool = False
    sweep: FigureStyle | None = None
    principal: bool = False
    contrast: bool = False
    by_default: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "few-shot") != bool(self.factory):
            raise ValueError(f"{self.name}: a few-shot method has a factory, the others a base")

    def estimator_class(self) -> Any:
        """The estimator class `factory` names (imported now)."""
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)

    def defaults(self, spec: Any = None) -> dict[str, Any]:
        """The parameters of one fit: each of `params` from `spec` (a `ClassifierSpec`; its field
        named in `params`) or else from `DEFAULTS` / `fixed_defaults`."""
        out = {}
        for param, spec_field in self.params.items():
            # a field left None (e.g. sav_k) falls back to the field named like the parameter
            value = getattr(spec, spec_field, None) if spec is not None else None
            value = getattr(spec, param, None) if value is None and spec is not None else value
            if value is None:
                value = DEFAULTS[param] if param in DEFAULTS else self.fixed_defaults[param]
            out[param] = value
        return out


REGISTRY: dict[str, MethodInfo] = {}


def register(method: MethodInfo) -> MethodInfo:
    """Add `method` to `REGISTRY` (its name must be new)."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.base is not None and REGISTRY.get(method.base, None) is None:
        raise ValueError(f"{method.name}: its base {method.base!r} must be registered first")
    REGISTRY[method.name] = method
    return method


def info(name: str) -> MethodInfo:
    """The registration of `name` (ValueError naming the known methods)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names(*kinds: str) -> tuple[str, ...]:
    """Registered names of these kinds (all kinds when none given), in registration order."""
    return tuple(m.name for m in REGISTRY.values() if not kinds or m.kind in kinds)


def principal() -> MethodInfo:
    """The paper's method (the one registration with `principal=True`)."""
    return next(m for m in REGISTRY.values() if m.principal)


def fit_methods() -> tuple[str, ...]:
    """The methods `calm fit` offers (few-shot estimators that save to a file)."""
    return tuple(m.name for m in REGISTRY.values() if m.saveable)


#: `calm.AudioClassifier`'s suffix for self-training on the clips given to fit
SELF_TRAINED = "+st"


def audio_methods() -> tuple[str, ...]:
    """The methods `calm.AudioClassifier` takes: the saveable ones, then each self-trained."""
    return fit_methods() + tuple(m + SELF_TRAINED for m in fit_methods())


def build(name: str, params: Mapping[str, Any] | None = None) -> Any:
    """An unfitted estimator of few-shot method `name` with `params` (ValueError names bad ones)."""
    method = info(name)
    if not method.factory:
        raise ValueError(f"{name} is not a few-shot estimator; use one of {', '.join(names('few-shot'))}")
    cls = method.estimator_class()
    params = dict(params or {})
    unknown = sorted(set(params) - _param_names(cls) | set(params) & set(method.fixed))
    if unknown:
        accepted = sorted(_param_names(cls) - set(method.fixed))
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; accepted: {accepted}")
    return cls(**method.fixed, **params)


@functools.cache
def _param_names(cls: Any) -> frozenset[str]:
    """The constructor parameters of a scikit-learn estimator class."""
    return frozenset(cls._get_param_names())


def method_of(estimator: Any) -> str:
    """The saveable method whose factory and fixed arguments built `estimator`."""
    for m in REGISTRY.values():
        if m.saveable and type(estimator) is m.estimator_class():
            if all(getattr(estimator, k, None) == v for k, v in m.fixed.items()):
                return m.name
    raise ValueError(f"no registered method builds a {type(estimator).__name__} like this one")


_CALM_PARAMS = {p: p for p in ("k", "tau_p", "tau_w", "normalization", "reliability", "scores")}
_CALM_GRID = {"k": [0.1, 0.25, 0.5], "tau_p": [0.01, 0.03, 0.1], "tau_w": [0.1, 0.5, 2.0]}

register(
    MethodInfo(
        "sav",
        "SAV",
        "few-shot",
        factory="calm.classifiers:SAV",
        params={"k": "sav_k", "tie_break": "sav_tie_break"},
        grid={"k": [0.05, 0.1, 0.25, 0.5]},
        saveable=True,
        contrast=True,
    )
)
register(
    MethodInfo(
        "calm-global",
        "CALM-global",
        "few-shot",
        factory="calm.classifiers:CALM",
        fixed={"weighting": "global"},
        params=_CALM_PARAMS,
        grid=_CALM_GRID,
        saveable=True,
        sweep=FigureStyle("--s", "global (CALM-global)"),
    )
)
register(
    MethodInfo(
        "calm",
        "CALM",
        "few-shot",
        factory="calm.classifiers:CALM",
        params=_CALM_PARAMS,
        grid=_CALM_GRID,
        saveable=True,
        sweep=FigureStyle("-o", "class-conditional (CALM)"),
        principal=True,
    )
)
#: what ``auto`` (`calm.classifiers.auto.AutoHead`) chooses among by cross-validation on the support
#: set (the linear probe too: on EmoDB it beats the three head methods at 5 and 10 shots), and what it
#: fits when no cross-validation is possible (a class of one support clip): CALM-global
#: (SAV collapses on spoken words at one shot: docs/results.md)
AUTO_CANDIDATES = ("sav", "calm-global", "calm", "linear-probe")
AUTO_FALLBACK = "calm-global"
#: shuffles of ``auto``'s folds whose cross-validated accuracies it averages: one shuffle of 5 folds
#: of 35 clips is noisy (EmoDB validation, research/auto_choice_rules.py: 3 shuffles -1.14 / -0.46
#: from the best method at 5 / 10 shots against one shuffle's -1.77 / -1.21, never more than 0.07
#: worse on ESC-10, FSDD or speech_commands_mini)
AUTO_CV_REPEATS = 3

register(
    MethodInfo(
        "auto",
        "auto",
        "few-shot",
        factory="calm.classifiers.auto:AutoHead",
        saveable=True,
        by_default=False,
    )
)
register(
    MethodInfo(
        "linear-probe",
        "linear probe",
        "few-shot",
        factory="calm.classifiers:LinearProbe",
        params={"C": "C"},
        grid={"C": [0.01, 0.1, 1.0, 10.0]},
        saveable=True,
        contrast=True,
    )
)
register(MethodInfo("zero-shot", "zero-shot", "answers"))
register(MethodInfo("sav+pl", "SAV+PL", "pseudo-labels", base="sav"))
register(MethodInfo("calm+pl", "CALM+PL", "pseudo-labels", base="calm"))
register(MethodInfo("calm+st", "CALM+ST", "self-training", base="calm"))
register(MethodInfo("sav+st", "SAV+ST", "self-training", base="sav"))
register(
    MethodInfo("calm+st-trans", "CALM+ST (transductive)", "self-training", base="calm", transductive=True)
)
register(MethodInfo("sav+st-trans", "SAV+ST (transductive)", "self-training", base="sav", transductive=True))

#: the method `calm fit` and `calm.AudioClassifier` use when none is named
DEFAULT_METHOD = principal().name
