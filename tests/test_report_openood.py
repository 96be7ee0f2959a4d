"""``openood-diffguard report`` on a real OpenOOD main.py result folder (vendored OpenOOD v1.5; skipped
without it): DiffGuard with a tiny class-conditional UNet through our launcher on the tiny image-list
benchmark of openood_bench.py. The postprocessor stores the galleries next to main.py's score files; the
report reads them without running any model, and its numbers equal OpenOOD's ood.csv."""
import sys

import numpy as np
import pytest
import torch
import yaml

pytestmark = [pytest.mark.openood, pytest.mark.usefixtures("single_thread")]  # skipped (conftest) without OpenOOD

from openood_bench import OOD_SETS, build_bench, imglist_images, load_net, main_py_argv, train_bench_unet  # noqa: E402
from openood_diffguard.report import gallery as G  # noqa: E402

SETS = {"cifar10": "test_cifar10", **{n: f"test_{n}" for g in ("near", "far") for n in OOD_SETS[g]}}
SCORE_NAMES = {**{k: k for k in SETS}, "places365": "place365"}  # main.py's config spells place365
OVERRIDES = {"num_steps": 4, "dtype": "fp32", "gallery": 3}  # DDIM-4 in fp32 on CPU; 3 samples per kind


@pytest.fixture(scope="module")
def main_py_run(tmp_path_factory):
    """(benchmark root, main.py output dir, postprocessor section) of one DiffGuard main.py run."""
    from openood_diffguard.openood.registration import PACKAGE_CONFIGS, read_postprocessor_section

    root = build_bench(tmp_path_factory.mktemp("report_openood"))
    train_bench_unet(root)
    pp = read_postprocessor_section(PACKAGE_CONFIGS / "diffguard_cifar10.yml")
    pp["postprocessor_args"].update(OVERRIDES, model_path=str(root / "unet"), cache_dir=str(root / "cache"))
    out = _main_py(root, pp, "report")
    return root, out, pp


def _main_py(root, pp, mark, results="results"):
    """One main.py run of postprocessor section ``pp`` on the tiny benchmark, its output below
    ``root/results``; returns its output directory."""
    from openood.utils import logger

    from openood_diffguard.openood.main import main

    yml = root / "configs" / "postprocessors" / f"diffguard_{mark}.yml"
    yml.write_text(yaml.safe_dump({"postprocessor": pp}, sort_keys=False))
    stdout = sys.stdout
    with pytest.MonkeyPatch.context() as mp:  # the CPU shim of openood_bench, for one run
        mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        mp.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
        mp.setattr(logger.Logger, "__del__", lambda self: None)
        mp.chdir(root)
        try:
            assert main(main_py_argv(root, yml, "--mark", mark, "--output_dir", f"./{results}/")) == 0
        finally:
            sys.stdout = stdout
    return next((root / results).rglob("ood.csv")).parent


def test_galleries_sit_next_to_main_py_scores_and_match_them(main_py_run):
    root, out, _ = main_py_run
    folder = out / "gallery" / "diffguard"
    assert sorted(p.stem for p in folder.glob("*.npz")) == sorted(SCORE_NAMES.values())  # test sets only, no val
    for name in SCORE_NAMES.values():
        g = G.Gallery.load(folder / f"{name}.npz")
        scores = np.load(out / "scores" / f"{name}.npz")
        # the gallery's rows are main.py's rows: same confidence and prediction at the stored positions
        np.testing.assert_array_equal(g.conf, scores["conf"][g.positions])
        np.testing.assert_array_equal(g.preds, scores["pred"][g.positions])
        assert g.role == ("id" if name == "cifar10" else "ood")
        assert set(g.images) == {"input", "inversion", "synthesis"}
        assert g.conf[g.picked("high")[0]] == scores["conf"].max()
        assert g.conf[g.picked("low")[0]] == scores["conf"].min()
        assert len(g) <= 4 * 3 and g.meta["params"]["num_steps"] == 4


def test_gallery_pictures_are_the_detectors_own(main_py_run):
    """The stored synthesis is DiffGuard's synthesis of that very image, computed here without OpenOOD."""
    from openood_diffguard.openood.sections import detector_from_section

    root, out, pp = main_py_run
    g = G.Gallery.load(out / "gallery" / "diffguard" / "svhn.npz")
    x, _ = imglist_images(root, "test_svhn")
    x = x[torch.as_tensor(g.positions)]
    det = detector_from_section(pp, {"name": "cifar10"})[0]
    syn = det.synthesise(load_net(root), x)
    np.testing.assert_array_equal(g.images["input"], G.input_pixels(det, x))
    diff = np.abs(g.images["synthesis"].astype(int) - G.to_uint8(syn["synthesis"]).astype(int))
    assert diff.max() <= 1  # uint8 rounding of float32 results of other batch compositions
    assert g.keys[0].endswith(".png") and "svhn/test/" in g.keys[0]


def test_report_of_main_py_folder_runs_no_model(main_py_run, monkeypatch):
    from openood_diffguard.detectors.diffguard import DiffGuard
    from openood_diffguard.report import load_run, write_report

    root, out, _ = main_py_run
    for name in ("synthesise", "statistics"):  # a report must never run the detector
        monkeypatch.setattr(DiffGuard, name, lambda *a, **k: pytest.fail("the report ran the detector"))
    path = write_report(root / "results")  # the one result folder below is found
    assert path == out / "report.html"
    run = load_run(out)
    assert run.kind == "openood" and list(run.methods) == ["diffguard"]
    assert any(c.startswith("ood.csv equals") for c in run.checks)  # our table = OpenOOD's csv
    m = run.methods["diffguard"]
    assert set(m.galleries) == set(SCORE_NAMES.values())
    assert list(m.metrics()) == ["cifar100", "tin", "mnist", "svhn", "texture", "place365", "nearood", "farood"]
    page = path.read_text()
    for text in ("OOD scored as ID", "ID scored as OOD", "FPR@95 (ID+, papers)", "num_steps: 4"):
        assert text in page
    from openood_diffguard.report.browser import check_page, find_chromium

    if find_chromium() is not None:
        seen = check_page(path)
        assert seen.problems() == [] and seen.cards >= 6 and seen.metrics_rows == 8


def test_scores_are_the_same_without_galleries(main_py_run):
    """Storing the galleries (which runs DiffGuard again on the chosen samples between the splits) changes
    no score: a run with gallery: 0 and no score cache writes identical scores/*.npz."""
    root, out, pp = main_py_run
    off = {**pp, "postprocessor_args": {**pp["postprocessor_args"], "gallery": 0, "cache": False}}
    out_off = _main_py(root, off, "nogallery", "results_nogallery")
    assert out_off != out and not (out_off / "gallery").exists()
    for name in SCORE_NAMES.values():
        a, b = np.load(out / "scores" / f"{name}.npz"), np.load(out_off / "scores" / f"{name}.npz")
        for k in ("pred", "conf", "label"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}/{k}")
