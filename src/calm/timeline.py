"""The detection timeline figure: per-class scores over time with the detected events shaded.

`timeline_figure(detection)` draws a `calm.detection.Detection` as a matplotlib `Figure` (built
without pyplot, like `calm.figures`): one line per class (its smoothed probability at each window's
centre; a `background` class grey and dashed), dotted lines at the thresholds, and each event as a
band in its class's colour, labelled with the class (up to `MAX_LABELS` events).
`timeline_png(detection, folder)` writes `<recording stem>.timeline.png`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calm.figures import _new_figure, _save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from calm.detection import Detection


#: events labelled with their class above the plot (more would overlap)
MAX_LABELS = 40


def timeline_figure(detection: Detection, *, max_classes: int = 10) -> Figure:
    """Classes over time (the `max_classes` with the highest peak score), events shaded."""
    fig = _new_figure((max(8.0, min(24.0, detection.duration / 10)), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    centres = detection.starts + detection.window / 2
    peaks = np.nanmax(detection.smoothed, axis=0) if len(centres) else np.zeros(len(detection.classes))
    shown = sorted(np.argsort(-peaks, kind="stable")[:max_classes])
    colours = {c: f"C{n % 10}" for n, c in enumerate(shown)}
    background = {str(b) for b in detection.background}
    same = bool(np.all(detection.thresholds == detection.thresholds[0]))
    for c in shown:
        label = str(detection.classes[c])
        dim = label in background  # never an event: grey, dashed
        colour = "0.6" if dim else colours[c]
        ax.plot(centres, detection.smoothed[:, c], color=colour, lw=1.0, ls="--" if dim else "-", label=label)
        if not (same or dim):
            ax.axhline(detection.thresholds[c], color=colour, ls=":", lw=0.8)
    if same:
        ax.axhline(detection.thresholds[0], color="0.3", ls=":", lw=0.8, label="threshold")
    names = [str(c) for c in detection.classes]
    for event in detection.events:
        c = names.index(str(event.label))
        ax.axvspan(event.onset, event.offset, color=colours.get(c, "0.5"), alpha=0.2, lw=0)
        if len(detection.events) <= MAX_LABELS:
            middle = (event.onset + event.offset) / 2
            ax.text(middle, 1.02, str(event.label), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, detection.duration)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("smoothed probability")
    ax.set_title(f"{Path(detection.source).name}: {len(detection.events)} events", fontsize=9)
    if shown:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def timeline_png(detection: Detection, folder: str | Path) -> Path:
    """Write the timeline of `detection` as `folder/<stem>.timeline.png` and return the path."""
    return _save(timeline_figure(detection), Path(folder) / f"{Path(detection.source).stem}.timeline.png")
