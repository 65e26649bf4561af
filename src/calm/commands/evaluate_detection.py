"""`calm evaluate-detection`: few-shot sound event detection scored on soundscapes built from
held-out clips, the full method against the naive baseline (`calm.evaluate.detection_eval`).

Parses the options, prints one line per seed and the summary; the library writes results.json,
results.md and report.html into --out after every seed.
"""

from __future__ import annotations

from pathlib import Path

import click

from calm.commands.options import given_command, parse_int_list, parse_options, parse_seeds
from calm.detection import DEFAULT_HOP, DEFAULT_MEDIAN, DEFAULT_THRESHOLD, DEFAULT_WINDOW
from calm.evaluate.detection_eval import DEFAULT_BACKGROUNDS, DEFAULT_EVENTS, DetectionEvalConfig
from calm.evaluate.soundscapes import SoundscapeSpec
from calm.methods import DEFAULT_METHOD, audio_methods
from calm.models import DEFAULT_MODEL

SPEC = SoundscapeSpec()
DEFAULTS = DetectionEvalConfig  # its field defaults are the options' defaults


def _classes(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


@click.command("evaluate-detection")
@click.option("--data", required=True, help="Dataset with folds, e.g. esc10:PATH (or esc50:PATH).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--model", default=DEFAULT_MODEL, show_default=True, help="Registered name, hub id or directory."
)
@click.option(
    "-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Backend option, repeatable."
)
@click.option("--method", type=click.Choice(audio_methods()), default=DEFAULT_METHOD, show_default=True)
@click.option("--device", default=DEFAULTS.device, show_default=True)
@click.option("--shots", type=click.IntRange(min=1), default=DEFAULTS.shots, show_default=True)
@click.option(
    "--seeds",
    default=str(len(DEFAULTS.seeds)),
    show_default=True,
    help="N (seeds 0..N-1) or a list like 3,7,11.",
)
@click.option("--events", default=",".join(DEFAULT_EVENTS), show_default=True, help="Event classes.")
@click.option(
    "--backgrounds", default=",".join(DEFAULT_BACKGROUNDS), show_default=True, help="Background classes."
)
@click.option(
    "--test-fold",
    type=int,
    default=DEFAULTS.test_fold,
    show_default=True,
    help="Fold of the soundscape events.",
)
@click.option(
    "--background-fold",
    type=int,
    default=DEFAULTS.background_fold,
    show_default=True,
    help="Fold of the soundscape backgrounds.",
)
@click.option(
    "--support-folds",
    default=",".join(map(str, DEFAULTS.support_folds)),
    show_default=True,
    help="Folds of the support clips.",
)
@click.option(
    "--soundscapes",
    type=click.IntRange(min=1),
    default=DEFAULTS.soundscapes,
    show_default=True,
    help="Soundscapes per seed.",
)
@click.option(
    "--duration", type=float, default=SPEC.duration, show_default=True, help="Seconds per soundscape."
)
@click.option("--window", type=float, default=DEFAULT_WINDOW, show_default=True)
@click.option("--hop", type=float, default=DEFAULT_HOP, show_default=True)
@click.option(
    "--median", type=int, default=DEFAULT_MEDIAN, show_default=True, help="Median filter length (odd)."
)
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True)
def evaluate_detection(**params):
    """Score few-shot event detection on soundscapes: event- and segment-based F1, full vs naive."""
    from dataclasses import replace

    from calm.evaluate.detection_eval import DetectionEvalConfig, run_detection_evaluation

    config = DetectionEvalConfig(
        data=params["data"],
        out=Path(params["out"]),
        model=params["model"],
        model_options=parse_options(params["options"]),
        method=params["method"],
        device=params["device"],
        shots=params["shots"],
        seeds=tuple(parse_seeds(params["seeds"])),
        events=_classes(params["events"]),
        backgrounds=_classes(params["backgrounds"]),
        test_fold=params["test_fold"],
        background_fold=params["background_fold"],
        support_folds=tuple(parse_int_list(params["support_folds"], "--support-folds")),
        soundscapes=params["soundscapes"],
        spec=replace(SPEC, duration=params["duration"]),
        window=params["window"],
        hop=params["hop"],
        median=params["median"],
        threshold=params["threshold"],
        batch_size=params["batch_size"],
    )
    command = given_command(click.get_current_context())
    results = run_detection_evaluation(
        config,
        progress=lambda line: click.echo(f"calm evaluate-detection: {line}", err=True),
        command=command,
    )
    for s in results["summary"]:
        click.echo(f"{s['metric']}\t{s['method']}\t{s['mean']:.2f} ± {s['std']:.2f}")
    for p in results["paired"]:
        ci = "–" if p["ci95_low"] is None else f"[{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}]"
        click.echo(f"{p['metric']}\t{p['a']} - {p['b']}\t{p['mean_diff']:+.2f}\t{ci}")
    click.echo(f"calm evaluate-detection: wrote {config.out}/results.json, results.md, report.html", err=True)
