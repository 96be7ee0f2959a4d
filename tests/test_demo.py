"""The README's first command, in --quick mode: runs end to end from nothing and its numbers make sense."""
import csv
import json

import numpy as np
import pytest

from openood_diffguard.cli import main
from openood_diffguard.data import DigitsOpenSet
from openood_diffguard.demo.run import OOD_SET, score_file_stem
from openood_diffguard.fusion.scores_io import load_scores
from openood_diffguard.metrics import METRIC_COLUMNS


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):  # two OpenMP threads spin against other jobs on a shared 2-core box
    yield


@pytest.fixture(scope="module")
def demo_out(quick_demo):
    return quick_demo  # one run per session (conftest), shared with the report's browser test


def test_demo_writes_table_scores_and_plots(demo_out):
    out, _ = demo_out
    for name in ("metrics.csv", "summary.json", "roc.png", "histograms.png", "diffguard_grid.png", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "metrics.csv") as fh:
        header = next(csv.reader(fh))
    assert header == ["method", *METRIC_COLUMNS]  # the names and order of every other table
    rows = {r["method"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    expected = ["EBO", "MLS", "KNN", "ViM", "DiffGuard", "DiffNB", "LFDN", "DiffGuard+EBO (rank)", "DiffGuard+EBO (cascade)"]
    assert list(rows) == expected
    for r in rows.values():
        for col in METRIC_COLUMNS:
            assert 0.0 <= float(r[col]) <= 100.0
    assert sorted(p.stem for p in (out / "scores").glob("*.npz")) == sorted(map(score_file_stem, expected))


def test_demo_score_files_feed_fuse(demo_out, tmp_path):
    """fuse on the demo's EBO and DiffGuard files, with the demo's calibration (ID-val), gives the demo's own
    DiffGuard+EBO (cascade) row: the files are complete and aligned."""
    out, _ = demo_out
    scores = load_scores(out / "scores" / "DiffGuard.npz")
    assert set(scores) == {"id_val", "id_test", f"near/{OOD_SET}"} and (scores[f"near/{OOD_SET}"]["label"] == -1).all()
    assert main(["fuse", "--scores", str(out / "scores" / "EBO.npz"), str(out / "scores" / "DiffGuard.npz"),
                 "--rule", "cascade", "--json", str(tmp_path / "fused.json")]) == 0
    fused = next(r for r in json.loads((tmp_path / "fused.json").read_text())["rows"]
                 if r["score"] == "fused" and r["dataset"] == f"near/{OOD_SET}")
    row = {r["method"]: r for r in csv.DictReader(open(out / "metrics.csv"))}["DiffGuard+EBO (cascade)"]
    assert 100 * fused["AUROC"] == pytest.approx(float(row["AUROC"]), abs=0.006)
    assert 100 * fused["FPR@95_IDpos"] == pytest.approx(float(row["FPR@95_IDpos"]), abs=0.006)


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
    assert main(["demo", "--quick", "--out", str(tmp_path), "--cache-dir", str(cache), "--no-progress", "--device", "cpu"]) == 0
    first = json.loads((out / "summary.json").read_text())
    second = json.loads((tmp_path / "summary.json").read_text())
    # nothing recomputed: models loaded, every detector row read back from the score cache
    assert second["computed"] == {"classifier_epochs": 0, "diffusion_steps": 0,
                                  "score_rows": {"DiffGuard": 0, "DiffNB": 0, "LFDN": 0}}
    assert second["auroc"] == pytest.approx(first["auroc"])
    for name in ("DiffGuard", "DiffNB", "LFDN"):  # cached rows are the first run's rows: identical, not close
        a, b = np.load(out / "scores" / f"{name}.npz"), np.load(tmp_path / "scores" / f"{name}.npz")
        np.testing.assert_array_equal(a["split"], b["split"])
        np.testing.assert_array_equal(a["conf"], b["conf"])
