"""`calm extract`: per-head features of a dataset's clips into a resumable feature store."""

from __future__ import annotations

import json
import logging
import sys

import click

from calm.store import DTYPES


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


def model_options(command):
    """The frozen model that extracts the features, and how it runs (shared by extract and evaluate)."""
    for option in reversed(
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
                help="Compute dtype (default: float32 on CPU, bf16/fp16 on GPU).",
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
    ):
        command = option(command)
    return command


def extractor_kwargs(heads, prompt, device, model_dtype, layers, attn_implementation, options) -> dict:
    """`load_extractor` keyword arguments from the `model_options` values."""
    return dict(
        heads=heads,
        prompt=prompt,
        device=device,
        dtype=model_dtype,
        layers=parse_layers(layers),
        attn_implementation=attn_implementation,
        **parse_options(options),
    )


def _load_extractor(model: str, **kwargs):
    from calm.models import load_extractor

    return load_extractor(model, **kwargs)


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
@click.option("--progress/--no-progress", default=True, show_default=True)
def extract(
    model,
    data_spec,
    out,
    heads,
    prompt,
    batch_size,
    device,
    dtype,
    model_dtype,
    layers,
    attn_implementation,
    limit,
    allow_failures,
    workers,
    options,
    compact_store,
    progress,
):
    """Extract per-head features of every clip of --data into the store --out.

    Re-running the same command resumes: clips already stored (same path and content) are
    skipped. Exits with status 1 if any clip failed, unless --allow-failures.
    """
    from calm.commands._progress import extraction_progress
    from calm.data.base import DatasetError
    from calm.store import StoreError, compact, extract_to_store

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        dataset = _load_dataset(data_spec)
    except (DatasetError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"dataset {data_spec}: {len(dataset.clips)} clips, {len(dataset.classes)} classes", err=True)
    try:
        extractor = _load_extractor(
            model,
            **extractor_kwargs(heads, prompt, device, model_dtype, layers, attn_implementation, options),
        )
    except (ValueError, OSError) as exc:  # ExtractorError is a ValueError
        raise click.ClickException(f"cannot load model {model!r}: {exc}") from None
    click.echo(f"model {model}: {len(extractor.head_names)} heads", err=True)
    try:
        with extraction_progress(progress) as bar:
            report = extract_to_store(
                extractor,
                dataset,
                out,
                batch_size=batch_size,
                dtype=dtype,
                limit=limit,
                progress=bar,
                workers=workers,
            )
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: finished batches are kept in {out}; run the same command again to resume", err=True
        )
        sys.exit(130)
    click.echo(report.summary())
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
