"""`calm fit`: fit SAV / CALM-global / CALM on a feature store and save it with what `predict` needs
(the library call is `calm.evaluate.fitting.fit_store`)."""

from __future__ import annotations

from typing import Any

import click

from calm.commands.options import classifier_options, classifier_spec
from calm.errors import CalmError
from calm.methods import DEFAULT_METHOD, DEFAULTS, UNKNOWN_SCORES, fit_methods

FIT_METHODS = fit_methods()


@click.command()
@click.argument("store", type=click.Path(file_okay=False, exists=True))
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
@classifier_options
def fit(**params: Any) -> None:
    """Fit a classifier on the features in STORE and save it to --out (safetensors + JSON header)."""
    from calm.classifiers.calibration import reject_line
    from calm.evaluate.fitting import fit_store

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
            params=None
            if params["unknown"] is None
            else {"unknown": params["unknown"], "unknown_score": params["unknown_score"]},
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
