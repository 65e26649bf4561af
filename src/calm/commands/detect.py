"""`calm detect`: find the events of a saved classifier's classes in long recordings.

A thin command over `calm.detection.detect` (the library streams each file, slides the windows,
smooths and merges): it parses the options, prints one line per event (`FILE onset offset label
score`), a progress line on stderr (audio time done and the real-time factor), and writes --csv /
--json after every file, so a later failure loses nothing finished. A file that fails gets one
error line naming it; the others go on, and the exit status is then 1.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time

import click

from calm.commands.options import trust_file_model_option
from calm.detection import DEFAULT_HOP, DEFAULT_MEDIAN, DEFAULT_THRESHOLD, DEFAULT_WINDOW
from calm.errors import CalmError, ParameterError

FIELDS = ["path", "onset", "offset", "label", "score", "error"]


def parse_thresholds(values: tuple[str, ...]) -> tuple[float | None, dict[str, float]]:
    """`--threshold 0.6 --threshold dog=0.8` -> (0.6, {"dog": 0.8}); the default is None if not given."""
    default, per_class = None, {}
    for text in values:
        label, sep, value = text.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise click.BadParameter(
                f"{text!r}: use a number or LABEL=NUMBER", param_hint="--threshold"
            ) from None
        if sep:
            per_class[label] = number
        else:
            default = number
    return default, per_class


def _rows(result) -> list[dict]:
    return [
        {
            "path": result.source,
            "onset": round(e.onset, 3),
            "offset": round(e.offset, 3),
            "label": str(e.label),
            "score": round(e.score, 4),
            "error": None,
        }
        for e in result.events
    ]


def write_outputs(results: list[dict], csv_out: str | None, json_out: str | None) -> None:
    """Every file's events as CSV rows (one per event, or one error row) and as JSON (one object per file)."""
    from calm._files import atomic_write_text

    if csv_out:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=FIELDS)
        writer.writeheader()
        for r in results:
            if r.get("error"):
                writer.writerow({"path": r["source"], "error": r["error"]})
            else:
                writer.writerows(r["rows"])
        atomic_write_text(csv_out, buffer.getvalue())
    if json_out:
        doc = [{k: v for k, v in r.items() if k != "rows"} for r in results]
        atomic_write_text(json_out, json.dumps(doc, indent=1, default=str) + "\n")


class ProgressLine:
    """Prints `FILE: 120.0 s of audio, 35.1x real time` to stderr at most every `every` seconds."""

    def __init__(self, every: float = 2.0):
        self.every, self.last = every, 0.0

    def __call__(self, p) -> None:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            click.echo(
                f"calm detect: {p.source}: {p.audio_seconds:.1f} s of audio, "
                f"{p.realtime_factor:.1f}x real time",
                err=True,
            )


@click.command()
@click.argument("model_path", metavar="MODEL.safetensors", type=click.Path(dir_okay=False, exists=True))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--window", type=float, default=DEFAULT_WINDOW, show_default=True, help="Window length in seconds."
)
@click.option(
    "--hop", type=float, default=DEFAULT_HOP, show_default=True, help="Seconds between window starts."
)
@click.option(
    "--threshold",
    "threshold_args",
    multiple=True,
    help="Score a window's top class needs to count as an event: NUMBER for every class, LABEL=NUMBER "
    f"for one (repeatable).  [default: {DEFAULT_THRESHOLD}]",
)
@click.option(
    "--median",
    type=int,
    default=DEFAULT_MEDIAN,
    show_default=True,
    help="Median filter length in windows (odd; 1: none).",
)
@click.option(
    "--background",
    multiple=True,
    help="A class that is never an event, e.g. a fitted 'noise' class (repeatable).",
)
@click.option(
    "--csv", "csv_out", default=None, type=click.Path(dir_okay=False), help="Write the events as CSV here."
)
@click.option(
    "--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the events as JSON here."
)
@click.option(
    "--plot",
    "plot_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Write a timeline PNG per file here.",
)
@click.option("--model", default=None, help="Load this model instead of the one the classifier names.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress line.")
@trust_file_model_option
def detect(
    model_path,
    files,
    window,
    hop,
    threshold_args,
    median,
    background,
    csv_out,
    json_out,
    plot_dir,
    model,
    device,
    batch_size,
    quiet,
    trust_file_model,
):
    """Print the events (onset, offset, label, score) found in each long recording."""
    from calm._files import printable
    from calm.inference import load_predictor

    default, per_class = parse_thresholds(threshold_args)
    options = {
        "window": window,
        "hop": hop,
        "median": median,
        "threshold": DEFAULT_THRESHOLD if default is None else default,
    }
    try:
        predictor = load_predictor(
            model_path,
            model=model,
            device=device,
            announce=lambda line: click.echo(f"calm detect: loading {line}", err=True),
            trust_file_model=trust_file_model,
        )
    except (CalmError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    results: list[dict] = []
    for path in files:
        results.append(_one(predictor, path, options, per_class, background, batch_size, plot_dir, quiet))
        write_outputs(results, csv_out, json_out)
        r = results[-1]
        if r.get("error"):
            click.echo(f"{printable(path)}\tERROR\t{printable(r['error'])}")
            continue
        for row in r["rows"]:
            click.echo(
                f"{printable(path)}\t{row['onset']:.2f}\t{row['offset']:.2f}\t{row['label']}\t{row['score']:.3f}"
            )
        click.echo(
            f"calm detect: {printable(path)}: {len(r['rows'])} events in {r['duration']:.1f} s of audio, "
            f"{r['realtime_factor']:.1f}x real time",
            err=True,
        )
    failed = sum(1 for r in results if r.get("error"))
    if failed:
        click.echo(f"calm detect: {failed} of {len(results)} files failed", err=True)
        sys.exit(1)


def _one(predictor, path, options, per_class, background, batch_size, plot_dir, quiet) -> dict:
    """One file's result as a JSON-ready dict with its CSV rows, or its error."""
    from calm.detection import detect as run_detection

    try:
        result = run_detection(
            predictor,
            path,
            thresholds=per_class or None,
            background=background,
            batch_size=batch_size,
            progress=None if quiet else ProgressLine(),
            **options,
        )
    except ParameterError:
        raise  # the options, not the file: stop with one error line
    except (CalmError, OSError) as exc:
        return {"source": path, "error": getattr(exc, "reason", None) or str(exc)}
    if plot_dir:
        from calm.timeline import timeline_png

        timeline_png(result, plot_dir)
    return {**result.as_dict(), "rows": _rows(result), "error": None}
