"""What a run directory shows a person: report.html and the per-episode predictions behind it.

`ReportData` (results.json + prediction records + clip paths + figures) -> `write_report(data, run_dir)`.
Prediction records and their aggregation (confusion matrices, per-class accuracy, classes gained or
lost, misclassified clips): `calm.report.predictions`.
"""

from calm.report.html import ReportData, render_report, reproduce_command, write_report
from calm.report.predictions import Confusion, class_changes, confusions, misclassified, per_class_accuracy

__all__ = [
    "ReportData",
    "render_report",
    "reproduce_command",
    "write_report",
    "Confusion",
    "confusions",
    "per_class_accuracy",
    "class_changes",
    "misclassified",
]
