"""One self-contained HTML page per run: metrics in both FPR@95 conventions, ROC / PR curves, score
histograms, galleries of the samples each diffusion detector gets most wrong (and typical right), with the
images behind their scores, and the run's configuration and timings (``openood-diffguard report RUN_DIR``).

``runs`` reads the three kinds of run folders, ``gallery`` chooses and stores the gallery samples while
scoring, ``plots`` draws the figures, ``page`` writes the HTML, ``browser`` drives headless Chromium
(screenshots, the browser test).
"""
import importlib
from typing import Any

__all__ = ["Run", "load_run", "render", "write_report"]
_HOMES = {"Run": "runs", "load_run": "runs", "render": "page", "write_report": "page"}


def __getattr__(name: str) -> Any:  # lazy: ``report --help`` must not import matplotlib / torch
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
