"""One self-contained HTML page per run: metrics in both FPR@95 conventions, ROC / PR curves, score
histograms, galleries of the samples each diffusion detector gets most wrong (and typical right), with the
images behind their scores, and the run's configuration and timings (``openood-diffguard report RUN_DIR``).

``runs`` reads the three kinds of run folders, ``gallery`` chooses and stores the gallery samples while
scoring, ``plots`` draws the figures, ``page`` writes the HTML, ``browser`` drives headless Chromium
(screenshots, the browser test).
"""
from .page import render, write_report
from .runs import Run, load_run

__all__ = ["Run", "load_run", "render", "write_report"]
