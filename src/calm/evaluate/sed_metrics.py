"""Sound event detection metrics: event-based and segment-based F1 of detected events against the
reference events, computed by sed_eval (Mesaros et al. 2016; `pip install 'calm-audio[detect-eval]'`).

`SedScores(labels)` accumulates soundscapes (`add(reference, estimated, duration)`) and gives the
micro-averaged (over all events / segments of everything added) scores in % (`scores()`):

- `event_f1`: event-based F1 with an onset collar of `T_COLLAR` (0.2 s) and an offset collar of
  0.2 s or `OFFSET_LENGTH` (50 %) of the reference event's length, whichever is larger: sed_eval's
  defaults, the DCASE 2016-2017 detection tasks' setting;
- `event_onset_f1`: the same with onsets only (the offset not evaluated);
- `segment_f1`: segment-based F1 on `SEGMENT` (1 s) segments over the whole soundscape;
- `segment_error_rate`: the segment-based error rate (substitutions + deletions + insertions over
  the active reference segments, in %).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from calm.errors import CalmError

__all__ = ["METRICS", "OFFSET_LENGTH", "SEGMENT", "T_COLLAR", "MetricsUnavailable", "SedScores"]

T_COLLAR = 0.2  # seconds, onset (and minimum offset) collar
OFFSET_LENGTH = 0.5  # offset collar as a fraction of the reference event's length
SEGMENT = 1.0  # seconds per segment of the segment-based metrics
#: metric -> its title in tables (in table order)
METRICS = {
    "event_f1": "event-based F1 (%)",
    "event_onset_f1": "event-based F1, onsets only (%)",
    "segment_f1": "segment-based F1 (%)",
    "segment_error_rate": "segment-based error rate (%, lower is better)",
}


class MetricsUnavailable(CalmError, ImportError):
    """sed_eval (the `detect-eval` extra) is not installed."""


def _sed_eval() -> Any:
    try:
        with warnings.catch_warnings():  # dcase_util imports pkg_resources, which warns on import
            warnings.simplefilter("ignore")
            import dcase_util  # noqa: F401
            import sed_eval
    except ImportError as exc:
        raise MetricsUnavailable(
            f"the detection metrics need sed_eval ({exc}): pip install 'calm-audio[detect-eval]'"
        ) from None
    return sed_eval


def _events(name: str, events: Iterable[Sequence[Any]]) -> Any:
    from dcase_util.containers import MetaDataContainer

    return MetaDataContainer(
        [
            {"filename": name, "event_label": str(label), "onset": float(on), "offset": float(off)}
            for on, off, label, *_ in events
        ]
    )


class SedScores:
    """sed_eval's event- and segment-based metrics over a set of soundscapes (module docstring)."""

    def __init__(self, labels: Sequence[str]):
        sed_eval = _sed_eval()
        self.labels = [str(x) for x in labels]
        self.event = sed_eval.sound_event.EventBasedMetrics(
            event_label_list=self.labels, t_collar=T_COLLAR, percentage_of_length=OFFSET_LENGTH
        )
        self.onset = sed_eval.sound_event.EventBasedMetrics(
            event_label_list=self.labels, t_collar=T_COLLAR, evaluate_offset=False
        )
        self.segment = sed_eval.sound_event.SegmentBasedMetrics(
            event_label_list=self.labels, time_resolution=SEGMENT
        )
        self.count = 0

    def add(
        self, reference: Iterable[Sequence[Any]], estimated: Iterable[Sequence[Any]], duration: float
    ) -> None:
        """One soundscape: its reference and estimated events as (onset, offset, label, ...) and its
        length in seconds (segments with no event count too)."""
        name = f"soundscape-{self.count}"
        ref, est = _events(name, reference), _events(name, estimated)
        self.event.evaluate(ref, est)
        self.onset.evaluate(ref, est)
        self.segment.evaluate(ref, est, evaluated_length_seconds=duration)
        self.count += 1

    def scores(self) -> dict[str, float]:
        """The micro-averaged scores in % (`METRICS`). F1 is 2 TP / (reference + detected), so
        nothing detected scores 0 (sed_eval's own F1 is NaN then: precision 0 / 0); NaN only when
        there is neither a reference nor a detected event."""
        segment = self.segment.results_overall_metrics()
        return {
            "event_f1": _f1(self.event.overall),
            "event_onset_f1": _f1(self.onset.overall),
            "segment_f1": _f1(self.segment.overall),
            "segment_error_rate": 100 * float(segment["error_rate"]["error_rate"]),
        }


def _f1(counts: dict[str, float]) -> float:
    """F1 in % from sed_eval's overall counts (`Ntp`, `Nref`, `Nsys`)."""
    total = float(counts["Nref"]) + float(counts["Nsys"])
    return 100 * 2 * float(counts["Ntp"]) / total if total else float("nan")
