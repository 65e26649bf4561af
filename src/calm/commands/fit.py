"""`calm fit`: fit SAV / CALM-global / CALM on a feature store and save it with what `predict` needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from calm.commands.options import classifier_options, classifier_spec
from calm.errors import CalmError
from calm.methods import DEFAULT_METHOD, fit_methods

FIT_METHODS = fit_methods()


def extractor_metadata(meta) -> dict:
    """What `calm predict` needs to rebuild the extractor: model, prompt, heads, key, head names."""
    key = dict(meta.attrs.get("key") or {})
    ext = dict(key.get("extractor", key))
    # stored as {"extractor": ..., "dtype": storage dtype}, the form calm.inference checks
    stored = {"extractor": ext, **({"dtype": key["dtype"]} if "extractor" in key and "dtype" in key else {})}
    return {
        "model": ext.get("model") or ext.get("model_id"),
        "prompt": ext.get("prompt"),
        "heads": ext.get("heads"),
        "layers": ext.get("layers"),
        "options": ext.get("options") or {},
        "extraction_key": stored,
        "head_names": [list(h) for h in meta.attrs.get("head_names", [])],
    }


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
@classifier_options
def fit(**params: Any) -> None:
    """Fit a classifier on the features in STORE and save it to --out (safetensors + JSON header)."""
    import numpy as np

    from calm.store import load_features

    store, method, shots, seed = params["store"], params["method"], params["shots"], params["seed"]
    try:
        X, y, meta = load_features(store, key=params["key"])
    except CalmError as exc:
        raise click.ClickException(str(exc)) from None
    rows, support_y = _support(np.asarray(y).astype(str), meta, params)
    m = classifier_spec(params).registry()[method]
    try:
        clf = m.build(**m.defaults).fit(np.asarray(X[rows], dtype=np.float32), support_y)
    except CalmError as exc:  # e.g. a store with one class (FeatureError)
        raise click.ClickException(f"{store}: cannot fit {method}: {exc}") from exc
    metadata = {
        **extractor_metadata(meta),
        "method": method,
        "params": dict(m.defaults),
        "shots": shots,
        "seed": seed,
        "holdout": params["holdout"],
        "n_support": int(len(rows)),
        "store": str(Path(store).absolute()),
    }
    clf.save(params["out"], metadata=metadata)
    click.echo(
        f"{method} on {len(rows)} clips, {len(clf.classes_)} classes, {X.shape[1]} heads -> {params['out']}"
    )


def _support(y, meta, params: dict[str, Any]):
    """The rows fitted on and their labels: every clip, or the training part (--holdout), or --shots
    per class drawn with --seed."""
    import numpy as np

    from calm import evaluate as ev

    rows = np.arange(len(y))
    if params["holdout"]:
        parts, _ = ev.make_parts(meta, params["test_fold"])
        rows = parts[0].train
    support_y = y[rows]
    if params["shots"] is not None:
        try:
            episode = ev.sample_episode(
                ev.row_labels(y), ev.Part("fit", rows, None), params["shots"], params["seed"]
            )
        except ev.ProtocolError as exc:
            raise click.ClickException(str(exc)) from None
        rows, support_y = episode.support, episode.support_y
    try:
        task = ev.task_of(support_y)
    except ev.ProtocolError as exc:
        raise click.ClickException(f"{params['store']}: {exc}") from None
    if task == "multilabel":
        raise click.ClickException("multi-label rows: use --shots so each support clip stands for one class")
    return rows, support_y
