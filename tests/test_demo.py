"""The README's first command, in --quick mode: runs end to end from nothing and its numbers make sense."""
import csv
import json

import numpy as np
import pytest

from openood_diffguard.cli import main


@pytest.fixture(scope="module")
def demo_out(quick_demo):
    return quick_demo  # one run per session (conftest), shared with the report's browser test


def test_demo_writes_table_scores_and_plots(demo_out):
    out, _ = demo_out
    for name in ("metrics.csv", "scores.npz", "summary.json", "roc.png", "histograms.png", "diffguard_grid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = {r["method"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    expected = {"EBO", "MLS", "KNN", "VIM", "DiffGuard", "DiffNB", "LFDN", "DiffGuard+EBO (rank)", "DiffGuard+EBO (cascade)"}
    assert expected <= set(rows)
    for r in rows.values():
        for col in ("AUROC", "AUPR-In", "AUPR-Out", "FPR@95 (OOD-positive, OpenOOD)", "FPR@95 (ID-positive, papers)", "ACC"):
            assert 0.0 <= float(r[col]) <= 100.0
    scores = np.load(out / "scores.npz")
    labels = scores["DiffGuard/label"]
    assert (labels == -1).sum() > 0 and (labels >= 0).sum() > 0


def test_demo_detectors_beat_random(demo_out):
    out, _ = demo_out
    auroc = json.loads((out / "summary.json").read_text())["auroc"]
    for name in ("DiffGuard", "DiffNB", "LFDN", "EBO"):
        assert auroc[name] > 0.6, (name, auroc[name])  # quick mode: small models; the full demo is held to 0.75


def test_demo_second_run_uses_cache(demo_out, tmp_path):
    import time

    out, cache = demo_out
    t0 = time.time()
    assert main(["demo", "--quick", "--out", str(tmp_path), "--cache-dir", str(cache), "--no-progress"]) == 0
    first = json.loads((out / "summary.json").read_text())
    second = json.loads((tmp_path / "summary.json").read_text())
    assert second["auroc"] == pytest.approx(first["auroc"])  # same models, cached scores
    assert time.time() - t0 < 60
