"""`calm extract`: per-head features of a dataset's clips into a resumable feature store."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from calm.commands.options import engine_options, model_options, model_spec, ray_options
from calm.errors import CalmError
from calm.models.spec import LoadSpec
from calm.store import DTYPES


def _load_extractor(spec: LoadSpec):
    from calm.models import load_extractor

    return load_extractor(spec)


def _load_dataset(spec: str):
    from calm.data import load_dataset

    return load_dataset(spec)


@click.command()
@model_options
@click.option(
    "--data", "data_spec", required=True, help="Dataset KIND:ROOT, e.g. folder:PATH or csv:MANIFEST."
)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Feature store directory."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(sorted(DTYPES)),
    default="float16",
    show_default=True,
    help="Storage dtype of the features.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N clips.")
@click.option("--allow-failures", is_flag=True, help="Exit 0 even if some clips could not be read.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Audio decoding threads.")
@click.option(
    "--compact", "compact_store", is_flag=True, help="Merge the key's shards into few large ones at the end."
)
@engine_options
@click.option("--progress/--no-progress", default=True, show_default=True)
def extract(**params: Any) -> None:
    """Extract per-head features of every clip of --data into the store --out.

    Re-running the same command resumes: clips already stored (same path and content) are
    skipped. Exits with status 1 if any clip failed, unless --allow-failures.
    """
    from calm.commands._progress import extraction_progress
    from calm.data.base import DatasetError
    from calm.store import StoreError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = params["out"]
    try:
        dataset = _load_dataset(params["data_spec"])
    except (DatasetError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"dataset {params['data_spec']}: {len(dataset.clips)} clips, {len(dataset.classes)} classes", err=True
    )
    try:
        with extraction_progress(params["progress"]) as bar:
            report = _run(params, dataset, bar)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: finished batches are kept in {out}; run the same command again to resume", err=True
        )
        sys.exit(130)
    click.echo(report.summary())
    _finish(report, out, params["compact_store"], params["allow_failures"])


def _run(params: dict[str, Any], dataset: Any, bar: Any) -> Any:
    """Extract with the chosen engine: the local one loads the model here, Ray's actors load it."""
    from calm.store import extract_to_store
    from calm.store.distributed import extract_with_ray

    spec, out = model_spec(params), params["out"]
    common = dict(batch_size=params["batch_size"], dtype=params["dtype"], limit=params["limit"], progress=bar)
    ray = ray_options(params)
    if ray is not None:
        click.echo(f"model {spec.label}: extracting on Ray ({ray.address or 'local cluster'})", err=True)
        notify = lambda line: click.echo(line, err=True)  # noqa: E731
        return extract_with_ray(spec, dataset, out, options=ray, notify=notify, **common)
    try:
        extractor = _load_extractor(spec)
    except (CalmError, OSError) as exc:  # ExtractorError, a model not found
        raise click.ClickException(f"cannot load model {spec.label!r}: {exc}") from None
    click.echo(f"model {spec.label}: {len(extractor.head_names)} heads", err=True)
    return extract_to_store(extractor, dataset, out, workers=params["workers"], **common)


def _finish(report: Any, out: str, compact_store: bool, allow_failures: bool) -> None:
    """Compact when asked, say how to load the features, list failed clips (exit 1 unless allowed)."""
    from calm.store import StoreError, compact

    if compact_store and report.stored + report.skipped:
        try:
            before, after = compact(report.store)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"compacted {before} shards into {after}")
    click.echo(f"key {report.digest}: load with calm.load_features({str(out)!r}, key={report.digest!r})")
    if report.failed:
        click.echo(f"{len(report.failed)} clips failed:")
        for path, reason in report.failed:
            click.echo(f"  {path}: {reason}")
        if not allow_failures:
            click.echo("exit status 1: some clips failed (--allow-failures to accept)", err=True)
            sys.exit(1)
