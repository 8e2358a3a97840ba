"""The run report: matplotlib figures (PNG bytes) and one self-contained HTML page."""
from lmstack.report.figures import loss_curve_png, probe_accuracy_png, read_metrics, training_curves_png
from lmstack.report.html import render_report

__all__ = ["loss_curve_png", "probe_accuracy_png", "read_metrics", "render_report", "training_curves_png"]
