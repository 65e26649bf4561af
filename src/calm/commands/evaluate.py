"""`calm evaluate`: few-shot episodes over a dataset (or an existing feature store), tables and figures.

The command only turns its options into an `EvalConfig`, calls `calm.evaluate.run_evaluation` and
prints; the progress bars (rich) live here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from calm.commands.options import (
    classifier_options,
    classifier_spec,
    engine_options,
    model_options,
    model_spec,
    parse_int_list,
    parse_seeds,
    ray_options,
    stack,
)
from calm.errors import CalmError
from calm.evaluate import EvalConfig, LALMSpec
from calm.evaluate.self_training_runs import STSpec
from calm.methods import names


class RichProgress:
    """`progress(stage, done, total)` of `run_evaluation` shown as the CLI's rich bar
    (`commands._progress.progress_bar`), one task per stage; started at the first report."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.bar is None:
            from calm.commands._progress import progress_bar

            self.bar = progress_bar(self.enabled)
            self.bar.start()
        if stage not in self.tasks:
            unit = "clips" if stage == "extracting" else None
            self.tasks[stage] = self.bar.add_task(stage, total=total, unit=unit)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def eval_config(params: dict[str, Any]) -> EvalConfig:
    """The `EvalConfig` of `calm evaluate`'s option values."""
    methods = [m.strip() for m in params["methods"].split(",") if m.strip()]
    unknown = [m for m in methods if m not in names()]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {unknown}", param_hint="--methods")
    if (params["features"] is None) == (params["data_spec"] is None):
        raise click.UsageError("give exactly one of --data (extract, then evaluate) or --features STORE")
    return EvalConfig(
        out=Path(params["out"]),
        data=params["data_spec"],
        features=params["features"],
        key=params["key"],
        store=params["store"],
        model=model_spec(params),
        shots=parse_int_list(params["shots"], "--shots"),
        seeds=parse_seeds(params["seeds"]),
        methods=methods,
        test_fold=params["test_fold"],
        holdout=params["holdout"],
        tune=params["tune"],
        open_set=params["open_set"],
        unknowns_features=params["unknowns_features"],
        classifier=classifier_spec(params),
        lalm=LALMSpec(
            zero_shot_mode=params["zero_shot_mode"],
            pl_rollouts=params["pl_rollouts"],
            pl_pool=params["pl_pool"],
            pl_seed=params["pl_seed"],
        ),
        self_training=STSpec(
            rounds=params["st_rounds"],
            per_round=params["st_per_round"],
            confidence=params["st_confidence"],
            labelled_weight=params["st_labelled_weight"],
            max_labelled=params["st_max_labelled"],
            spread=params["st_spread"],
            pool_per_class=params["st_pool_per_class"],
            pool=params["st_pool"],
            guard=params["st_guard"],
        ),
        batch_size=params["batch_size"],
        figures=params["figures"],
        sweep_seeds=params["sweep_seeds"],
        ray=ray_options(params),
    )


# `calm evaluate`'s own options (beside the model and classifier ones)
_options = stack(
    [
        click.option(
            "--data",
            "data_spec",
            default=None,
            help="Dataset KIND:ROOT (e.g. esc10:PATH, csv:MANIFEST, esc50).",
        ),
        click.option(
            "--features",
            "features",
            default=None,
            type=click.Path(file_okay=False, exists=True),
            help="Evaluate an existing feature store instead of extracting (--model/--data unused).",
        ),
        click.option("--key", default=None, help="Extraction key digest, when --features holds several."),
        click.option(
            "--store",
            default=None,
            type=click.Path(file_okay=False),
            help="Feature store (cache) to extract into [default: RUN_DIR/features].",
        ),
        click.option(
            "--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory RUN_DIR."
        ),
        click.option(
            "--shots",
            default=",".join(map(str, EvalConfig.shots)),
            show_default=True,
            help="Shots per class, comma-separated.",
        ),
        click.option(
            "--seeds",
            default=str(len(EvalConfig.seeds)),
            show_default=True,
            help="N (seeds 0..N-1) or a list like 0,4,7.",
        ),
        click.option(
            "--methods",
            default=",".join(EvalConfig.methods),
            show_default=True,
            help=f"Comma-separated: {', '.join(names())}.",
        ),
        click.option(
            "--test-fold",
            default=str(EvalConfig.test_fold),
            show_default=True,
            help="Folded data (ESC): test fold, or 'all' to rotate.",
        ),
        click.option(
            "--holdout",
            type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
            default=None,
            help="Data without a split or folds: hold out this fraction of each class (seeded) as the "
            "test part for every method; the rest gives the support sets and the calm+st / sav+st pool.",
        ),
        click.option(
            "--tune",
            is_flag=True,
            help="Choose hyper-parameters by cross-validation inside each support set.",
        ),
        click.option(
            "--open-set",
            type=click.IntRange(min=0),
            default=EvalConfig.open_set,
            help="Also evaluate open-set recognition: hold out N classes per seed (their test clips are "
            "unknown queries); AUROC, FAR at 95 % acceptance, open-set accuracy, conformal coverage.",
        ),
        click.option(
            "--unknowns-features",
            default=None,
            type=click.Path(file_okay=False),
            help="Open set: a feature store of the same extraction key whose clips are unknown queries.",
        ),
        classifier_options,
        click.option("--sav-k", default=None, help="Heads kept by SAV [default: --k]."),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=EvalConfig.batch_size, show_default=True
        ),
        click.option(
            "--figures/--no-figures", default=True, show_default=True, help="Write figures/ (Fig. 3-6)."
        ),
        click.option(
            "--sweep-seeds",
            type=click.IntRange(min=1),
            default=EvalConfig.sweep_seeds,
            show_default=True,
            help="Seeds of the heads-kept sweep behind Fig. 4 and 5.",
        ),
    ]
)


class _IntOr(click.ParamType):
    """An integer >= 1, or the word `word` (case-insensitive), which stands for `value`:
    --st-labelled-weight (N or `shots`), --st-max-labelled and --st-pool-per-class (N or `none`)."""

    def __init__(self, word: str, value: Any):
        self.word, self.value = word, value
        self.name = f"N|{word}"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or value == self.value or isinstance(value, int):
            return value
        if str(value).lower() == self.word:
            return self.value
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is neither an integer >= 1 nor '{self.word}'", param, ctx)


# the options of the self-training methods
_st_options = stack(
    [
        click.option(
            "--st-pool",
            type=click.IntRange(min=1),
            default=None,
            help="calm+st / sav+st: unlabelled clips per episode, drawn with its seed from the training "
            "part outside the support set [default: all of them].",
        ),
        click.option(
            "--st-rounds",
            type=click.IntRange(min=0),
            default=STSpec.rounds,
            show_default=True,
            help="Self-training rounds (predict the pool, add, refit).",
        ),
        click.option(
            "--st-per-round",
            type=click.IntRange(min=1),
            default=STSpec.per_round,
            show_default=True,
            help="Pseudo-labelled clips a class gains per round at most.",
        ),
        click.option(
            "--st-confidence",
            type=click.Choice(["margin", "probability"]),
            default=STSpec.confidence,
            show_default=True,
            help="How pool clips are ranked within their predicted class.",
        ),
        click.option(
            "--st-labelled-weight",
            type=_IntOr("shots", "shots"),
            default=STSpec.labelled_weight,
            show_default=True,
            help="Times a labelled clip counts against a pseudo-labelled one: N, or 'shots' (its "
            "class's labelled clips).",
        ),
        click.option(
            "--st-max-labelled",
            type=_IntOr("none", None),
            default=str(STSpec.max_labelled),
            show_default=True,
            help="Classes with more labelled clips gain no pseudo-labels ('none': no limit).",
        ),
        click.option(
            "--st-pool-per-class",
            type=_IntOr("none", None),
            default=str(STSpec.pool_per_class),
            show_default=True,
            help="Self-train on at most N pool clips per class, drawn with the episode's seed ('none': "
            "the whole pool).",
        ),
        click.option(
            "--st-spread",
            type=click.IntRange(min=1),
            default=STSpec.spread,
            show_default=True,
            help="Take a class's clips from its spread x quota most confident, least similar to it first "
            "(1: the most confident).",
        ),
        click.option(
            "--st-guard",
            type=click.Choice(["cv", "none"]),
            default=str(STSpec.guard),
            show_default=True,
            callback=lambda ctx, param, v: None if v == "none" else v,
            help="Rounds limited by cross-validation on the support set ('cv'), or all of them ('none').",
        ),
    ]
)

# the options of the baselines that need the model to answer
_lalm_options = stack(
    [
        click.option(
            "--zero-shot-mode",
            type=click.Choice(["letters", "likelihood", "generate"]),
            default=LALMSpec.zero_shot_mode,
            show_default=True,
            help="zero-shot: option-letter logits, class-name likelihood, or a generated answer.",
        ),
        click.option(
            "--pl-rollouts",
            type=click.IntRange(min=1),
            default=LALMSpec.pl_rollouts,
            show_default=True,
            help="sav+pl / calm+pl: sampled answers M per unlabelled clip (temperatures U(1, 2.5)).",
        ),
        click.option(
            "--pl-pool",
            type=click.IntRange(min=1),
            default=None,
            help="sav+pl / calm+pl: unlabelled clips drawn per episode [default: shots x classes].",
        ),
        click.option(
            "--pl-seed",
            type=int,
            default=LALMSpec.pl_seed,
            show_default=True,
            help="Seed of the pseudo-label sampling.",
        ),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]
)


@click.command()
@model_options
@_options
@_st_options
@_lalm_options
@engine_options
def evaluate(**params: Any) -> None:
    """Few-shot evaluation: episodes of n shots per class, several seeds, every method on the same
    support sets; writes RUN_DIR/results.json, results.md and figures/, and prints the table.

    \b
    Methods that need the audio-language model to answer (skipped with the
    reason for models that cannot, e.g. Whisper, and with --features):
      zero-shot  the model answers the multiple-choice question itself
                 (--zero-shot-mode); each seed scores its own queries;
                 answers cached in RUN_DIR/zero_shot.json.
      sav+pl,    per episode, --pl-pool unlabelled training clips are
      calm+pl    pseudo-labelled (--pl-rollouts sampled answers at
                 temperatures U(1, 2.5), majority vote, kept at >= 50 %
                 agreement) and SAV / CALM is fitted on the kept clips; a
                 class with no kept clip cannot be predicted and its
                 queries count as wrong. Cached in RUN_DIR/pseudo_labels.json.

    \b
    Self-training (any backbone, no model calls; beyond the paper):
      calm+st,   fit on the support set, pseudo-label the most confident
      sav+st     clips of each class in an unlabelled pool drawn from the
                 training part (labels hidden, never a test clip;
                 --st-pool), refit; --st-rounds x --st-per-round;
                 labelled clips count --st-labelled-weight times; classes
                 with more than --st-max-labelled labelled clips gain none.
                 Data without a split: --holdout F holds out a test part.
      calm+st-trans, sav+st-trans: the same with the episode's queries as
                 the pool (transductive), reported under their own names.
    """
    from calm.evaluate import run_evaluation

    t0 = time.perf_counter()
    config = eval_config(params)
    progress = RichProgress(params["progress"])
    try:
        result = run_evaluation(
            config,
            progress=progress if params["progress"] else None,
            log=lambda msg: click.echo(msg, err=True),
        )
    except (CalmError, OSError) as exc:  # ProtocolError, DatasetError, StoreError, ...
        raise click.ClickException(str(exc)) from None
    finally:
        progress.close()
    if result.figures:
        click.echo(f"figures: {', '.join(str(p) for p in result.figures.values())}", err=True)
    click.echo(result.markdown)
    click.echo(
        f"wrote {result.results_json} and {result.results_md} in {time.perf_counter() - t0:.0f} s", err=True
    )
