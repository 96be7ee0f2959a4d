"""The README's first command, in --quick mode: runs end to end from nothing and its numbers make sense."""
import csv
import json

import numpy as np
import pytest

from openood_diffguard.cli import main
from openood_diffguard.data import DigitsOpenSet


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


def test_demo_first_run_computes_every_row(demo_out):
    """The counters the cache test relies on are real: a run from nothing trains and scores every sample."""
    out, _ = demo_out
    summary = json.loads((out / "summary.json").read_text())
    cfg, done = summary["config"], summary["computed"]
    assert done["classifier_epochs"] == cfg["classifier_epochs"] and done["diffusion_steps"] == cfg["diffusion_steps"]
    n_val = len(DigitsOpenSet(size=cfg["size"], seed=cfg["seed"]).dataset("id", "val"))
    rows = summary["n_id"] + summary["n_ood"] + n_val  # ID test + OOD test + ID val, once each
    assert done["score_rows"] == {"DiffGuard": rows, "DiffNB": rows, "LFDN": rows}


def test_demo_second_run_uses_cache(demo_out, tmp_path):
    out, cache = demo_out
    assert main(["demo", "--quick", "--out", str(tmp_path), "--cache-dir", str(cache), "--no-progress"]) == 0
    first = json.loads((out / "summary.json").read_text())
    second = json.loads((tmp_path / "summary.json").read_text())
    # nothing recomputed: models loaded, every detector row read back from the score cache
    assert second["computed"] == {"classifier_epochs": 0, "diffusion_steps": 0,
                                  "score_rows": {"DiffGuard": 0, "DiffNB": 0, "LFDN": 0}}
    assert second["auroc"] == pytest.approx(first["auroc"])
    a, b = np.load(out / "scores.npz"), np.load(tmp_path / "scores.npz")
    for name in ("DiffGuard", "DiffNB", "LFDN"):  # cached rows are the first run's rows: identical, not close
        np.testing.assert_array_equal(a[f"{name}/conf"], b[f"{name}/conf"])
