"""What `run_evaluation` is asked to do: `EvalConfig` and its parts (the model, a
`calm.models.spec.LoadSpec`; the classifiers' hyper-parameters; the model-answer baselines), typed,
frozen and checked when built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from calm.evaluate.methods import FEWSHOT_METHODS, LALM_METHODS, Method, fewshot_methods
from calm.evaluate.selftraining import ST_METHODS, STSpec
from calm.models import DEFAULT_MODEL
from calm.models.spec import LoadSpec
from calm.store.distributed import RayOptions

__all__ = ["ClassifierSpec", "EvalConfig", "LALMSpec"]


@dataclass(frozen=True)
class ClassifierSpec:
    """The few-shot methods' default hyper-parameters (`fewshot_methods`; paper values by default).

    Attributes:
        k: heads kept by CALM / CALM-global, a fraction in (0, 1] or a head count.
        tau_p: head posterior temperature (Eq. 5).
        tau_w: head weight temperature (Eq. 8 / 12).
        sav_k: heads kept by SAV (None: `k`).
        sav_tie_break: SAV heads of equal support accuracy: `index` (paper) or `margin`.
        normalization: CALM weights: `softmax` (paper) or `power` (authors' code).
        reliability: CALM margins: `in-sample` (paper) or `leave-one-out`.
    """

    k: float | int = 0.25
    tau_p: float = 0.03
    tau_w: float = 0.5
    sav_k: float | int | None = None
    sav_tie_break: str = "index"
    normalization: str = "softmax"
    reliability: str = "in-sample"

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
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    lalm: LALMSpec = field(default_factory=LALMSpec)
    self_training: STSpec = field(default_factory=STSpec)
    batch_size: int = 8
    figures: bool = True
    sweep_seeds: int = 3
    ray: RayOptions | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.features is None):
            raise ValueError("give exactly one of data (extract, then evaluate) or features (a store)")
        unknown = [m for m in self.methods if m not in FEWSHOT_METHODS + LALM_METHODS + ST_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}")
        if not self.shots or not self.seeds:
            raise ValueError("need at least one number of shots and one seed")
        if self.holdout is not None and not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must lie in (0, 1), got {self.holdout}")
        if self.batch_size < 1 or self.sweep_seeds < 1:
            raise ValueError("batch_size and sweep_seeds must be >= 1")
