"""`calm fit`: fit SAV / CALM-global / CALM on a feature store and save it with what `predict` needs
(the library call is `calm.evaluate.fitting.fit_store`); `calm fit --add MODEL --data KIND:ROOT`
adds clips to a classifier that kept its support set (`calm.evaluate.fitting.add_to_file`)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import click

from calm.commands.options import (
    classifier_options,
    classifier_spec,
    given_options,
    trust_file_model_option,
)
from calm.errors import CalmError
from calm.evaluate.config import ClassifierSpec
from calm.methods import DEFAULT_METHOD, DEFAULTS, UNKNOWN_SCORES, fit_methods

FIT_METHODS = fit_methods()


#: Options that choose how a new classifier is fitted: `--add` takes them from the file.
_FIT_ONLY = ("method", "key", "shots", "seed", "holdout", "test_fold", "unknown", "unknown_score")


@click.command()
@click.argument("store", type=click.Path(file_okay=False, exists=True), required=False)
@click.option("--method", type=click.Choice(FIT_METHODS), default=DEFAULT_METHOD, show_default=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="MODEL.safetensors")
@click.option("--key", default=None, help="Extraction key digest, when the store holds several.")
@click.option(
    "--shots",
    type=click.IntRange(min=1),
    default=None,
    help="Fit on N clips per class drawn with --seed [default: every clip].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--holdout/--no-holdout",
    default=False,
    show_default=True,
    help="Leave out the test part (official split or --test-fold) as `calm evaluate` does.",
)
@click.option("--test-fold", default="5", show_default=True)
@click.option(
    "--unknown",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Reject option: accept this fraction of clips of the known classes (e.g. 0.95); "
    '`calm predict` and `calm serve` label the others "unknown" [default: off].',
)
@click.option(
    "--unknown-score",
    type=click.Choice(list(UNKNOWN_SCORES)),
    default=DEFAULTS["unknown_score"],
    show_default=True,
    help='The reject option\'s known score (docs/results.md, "The reject option").',
)
@click.option(
    "--keep-support",
    is_flag=True,
    help="Keep the support features in the file (larger) so that `calm fit --add` can add clips later.",
)
@click.option(
    "--add",
    "add",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="MODEL.safetensors saved with --keep-support: add the clips of --data to it (instead of STORE).",
)
@click.option(
    "--data", "data", default=None, help="With --add: the clips to add, KIND:ROOT (e.g. folder:PATH)."
)
@click.option("--device", default="cpu", show_default=True, help="With --add: where the model extracts.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="With --add.")
@trust_file_model_option
@classifier_options
def fit(**params: Any) -> None:
    """Fit a classifier on the features in STORE and save it to --out (safetensors + JSON header).

    With --add MODEL --data KIND:ROOT (no STORE): extract only the clips of --data, with the model
    and options MODEL was fitted on, add them to MODEL's kept support set and save the refitted
    classifier to --out (MODEL itself only when --out names it)."""
    from calm.classifiers.rejection import reject_line

    if params["add"] is not None:
        _add(params)
        return
    if params["store"] is None or params["data"] is not None:
        raise click.UsageError(
            "give STORE, or --add MODEL.safetensors --data KIND:ROOT (--data goes with --add)"
        )
    from calm.evaluate.fitting import fit_store

    chosen = {
        k: v for k, v in (("unknown", params["unknown"]), ("keep_support", params["keep_support"])) if v
    }
    if params["unknown"] is not None:
        chosen["unknown_score"] = params["unknown_score"]
    elif given_options(["unknown_score"]):
        raise click.UsageError("--unknown-score chooses the reject option's score: give --unknown too")
    try:
        result = fit_store(
            params["store"],
            method=params["method"],
            key=params["key"],
            shots=params["shots"],
            seed=params["seed"],
            holdout=params["holdout"],
            test_fold=params["test_fold"],
            classifier=classifier_spec(params),
            params=chosen or None,
        )
    except CalmError as exc:  # a bad store or key, a store with one class, too few clips per class
        raise click.ClickException(str(exc)) from None
    clf = result.classifier
    clf.save(params["out"], metadata=result.metadata)
    click.echo(
        f"{params['method']} on {len(result.rows)} clips, {len(clf.classes_)} classes, "
        f"{clf.n_heads_} heads -> {params['out']}"
    )
    line = reject_line(clf)
    if line:
        click.echo(line)


def _add(params: dict[str, Any]) -> None:
    """`calm fit --add MODEL --data KIND:ROOT --out NEW`: the method and its parameters are MODEL's."""
    from calm.evaluate.fitting import add_to_file

    spec = (f.name for f in fields(ClassifierSpec) if f.name in params)  # the classifier_options
    names = (*_FIT_ONLY, *spec)
    given = given_options(names)
    if params["store"] is not None or params["data"] is None or given:
        extra = (
            f"; the method and its options come from {params['add']}: drop {_flags(given)}" if given else ""
        )
        raise click.UsageError(f"--add MODEL.safetensors takes --data KIND:ROOT and no STORE{extra}")
    try:
        result = add_to_file(
            params["add"],
            params["data"],
            device=params["device"],
            batch_size=params["batch_size"],
            progress=False,
            trust_file_model=params["trust_file_model"],
            announce=lambda line: click.echo(f"model: {line}", err=True),
        )
    except (CalmError, OSError) as exc:  # no kept support, another model's key, an unreadable clip
        raise click.ClickException(str(exc)) from None
    clf = result.classifier
    clf.save(params["out"], metadata=result.metadata)
    click.echo(
        f"added {len(result.rows)} clips to {params['add']}: {int(clf.class_counts_.sum())} clips, "
        f"{len(clf.classes_)} classes -> {params['out']}"
    )


def _flags(names: list[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)
