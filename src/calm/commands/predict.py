"""`calm predict`: label audio files with a classifier saved by `calm fit` (or `clf.save`).

A thin command over `calm.inference`: every file gets a row (label and probability, or its error),
the --csv / --json files are always written, and the exit status is 1 when any file failed.
"""

from __future__ import annotations

import csv
import json
import sys

import click

from calm.commands.options import trust_file_model_option
from calm.errors import CalmError
from calm.methods import EXPLAIN_HEADS

FIELDS = ["path", "label", "probability", "duration", "error"]


def _row(p) -> dict:
    label = None if p.label is None else str(p.label)
    row = {
        "path": p.source,
        "label": label,
        "probability": p.probability,
        "duration": p.duration,
        "error": p.error,
    }
    if p.prediction_set is not None:
        row["set"] = [str(c) for c in p.prediction_set]
    if p.explanation is not None:
        row["explanation"] = p.explanation
    return row


def _shown_set(classes: list[str] | None) -> str:
    """A prediction set as one field: the classes joined by "|", "{}" when empty (none fits)."""
    return "|".join(classes) if classes else "{}"


def write_outputs(rows: list[dict], csv_out: str | None, json_out: str | None) -> None:
    """The rows as CSV and/or JSON (file names that are not UTF-8 are kept byte for byte in the CSV;
    a prediction set, when asked for, as one "|"-joined field)."""
    from calm._files import atomic_write_text

    if csv_out:
        sets = any("set" in r for r in rows)
        with open(csv_out, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS + ["set"] * sets)
            writer.writeheader()
            writer.writerows({**r, "set": _shown_set(r["set"])} if "set" in r else r for r in rows)
    if json_out:
        atomic_write_text(json_out, json.dumps(rows, indent=1) + "\n")


@click.command()
@click.argument("model_path", metavar="MODEL.safetensors", type=click.Path(dir_okay=False, exists=True))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--csv", "csv_out", default=None, type=click.Path(dir_okay=False), help="Also write a CSV here."
)
@click.option(
    "--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write JSON here."
)
@click.option(
    "--model",
    default=None,
    help="Load this model instead of the one the classifier names (its extraction key must match).",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--sets",
    "alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    metavar="ALPHA",
    help="Also give each file's conformal prediction set at level ALPHA (e.g. 0.1: the true class "
    'is in it about 90 % of the time); "{}" when no class fits.',
)
@click.option(
    "--explain",
    type=click.IntRange(min=1),
    is_flag=False,
    flag_value=EXPLAIN_HEADS,
    default=None,
    metavar="[N]",
    help=f"In the --json file, say why each file got its label: the top --top-k classes' scores and the N "
    f"heads (default {EXPLAIN_HEADS}) that carried each (layer, head, weight, similarity).",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many classes --explain explains, most probable first.",
)
@trust_file_model_option
def predict(
    model_path, files, csv_out, json_out, model, device, batch_size, alpha, explain, top_k, trust_file_model
):
    """Print the predicted label and its probability for each audio file ("unknown" where the
    classifier's reject option, `calm fit --unknown`, rejects it).

    Exit status 1 when any file could not be labelled (its row then holds the error).
    """
    from calm._files import printable
    from calm.classifiers.rejection import reject_line
    from calm.inference import load_predictor

    if explain is not None and not json_out:
        raise click.UsageError("--explain writes its explanations to the --json file: give --json FILE")

    def announce(line: str) -> None:
        click.echo(f"calm predict: loading {line}", err=True)

    try:
        predictor = load_predictor(
            model_path, model=model, device=device, announce=announce, trust_file_model=trust_file_model
        )
    except (CalmError, OSError) as exc:  # a bad classifier file, a model not found or not matching
        raise click.ClickException(str(exc)) from None
    line = reject_line(predictor.classifier)
    if line:
        click.echo(f"calm predict: {line}", err=True)
    try:
        preds = predictor(list(files), batch_size=batch_size, alpha=alpha, top_k=top_k, explain=explain)
    except CalmError as exc:  # a classifier that cannot explain
        raise click.ClickException(str(exc)) from None
    rows = [_row(p) for p in preds]
    for r in rows:
        shown = printable(r["path"])  # a name that is not UTF-8: caf\xe9.ogg, as docs/reliability.md says
        if r["error"]:
            click.echo(f"{shown}\tERROR\t{printable(r['error'])}")
        else:
            extra = f"\t{_shown_set(r['set'])}" if "set" in r else ""
            click.echo(f"{shown}\t{r['label']}\t{r['probability']:.4f}{extra}")
    write_outputs(rows, csv_out, json_out)
    failed = sum(1 for r in rows if r["error"])
    if failed:
        click.echo(f"calm predict: {failed} of {len(rows)} files failed", err=True)
        sys.exit(1)
