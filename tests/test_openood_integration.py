"""Against a real OpenOOD checkout (marked ``openood``: skipped when it is not installed, see conftest.py): tiny
image-list benchmark on disk (scikit-learn digits as PNGs, OpenOOD's folder/imglist layout), a tiny
ResNet18_32x32 checkpoint, OpenOOD's main.py pipeline through our launcher and the Evaluator, with a toy
detector (registration, cache, APS, pickling, torchrun mechanics) and a fusion of it + OpenOOD's EBO; the real
detectors run in test_openood_detectors.py. Fixtures and the CPU shim: openood_bench.py.
"""
import csv
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from openood_bench import (build_bench, check_evaluator_rows as _check_evaluator_rows, check_main_py_csv,  # noqa: F401
                          cpu_shim, load_net as _net, main_py_argv)
from ood_toys import ToyDetector
from openood_diffguard.runtime import registry

pytestmark = pytest.mark.openood


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    monkeypatch.setattr(registry, "DETECTORS", {**registry.DETECTORS, "toy": ToyDetector})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = build_bench(tmp_path_factory.mktemp("openood_bench"))
    (root / "configs" / "postprocessors" / "toy.yml").write_text(
        "postprocessor:\n  name: toy\n  APS_mode: True\n  postprocessor_args:\n    steps: 3\n"
        f"    cache_dir: {root / 'cache'}\n  postprocessor_sweep:\n    sign_list: [-1.0, 1.0]\n")
    return root


def _fusion_config(bench, rule="rank", baseline="ebo", baseline_args=None):
    from openood.utils import Config

    return Config({"dataset": {"name": "cifar10"}, "postprocessor": {
        "name": "fusion", "APS_mode": True,
        "postprocessor_args": {"detector": "toy", "detector_args": {"steps": 4}, "baseline": baseline,
                               "baseline_args": baseline_args or {}, "rule": rule, "cache_dir": str(bench / "cache")},
        "postprocessor_sweep": {"w_list": [0.3, 0.7]} if rule == "rank" else {"alpha_out_list": [0.1, 0.2]}}})


def test_register_patches_every_binding_idempotently():
    from openood_diffguard.openood import register

    first = register()
    again = register()
    assert sorted(first) == sorted(again)
    import openood.evaluation_api.evaluator as ev_mod
    import openood.pipelines.test_ood_pipeline as p1
    import openood.pipelines.test_ood_pipeline_aps as p2
    import openood.postprocessors as P
    import openood.postprocessors.utils as U
    from openood.pipelines import test_ad_pipeline, train_ad_pipeline, train_opengan_pipeline

    bindings = [P, U, p1, p2, test_ad_pipeline, train_ad_pipeline, train_opengan_pipeline]
    assert len({id(m.get_postprocessor) for m in bindings}) == 1
    assert U.get_postprocessor.openood_original.__module__ == "openood.postprocessors.utils"
    import openood.evaluation_api.postprocessor as E

    assert ev_mod.get_postprocessor is E.get_postprocessor and "diffguard" in E.postprocessors
    # OpenOOD's own names still work through the patched factory
    from openood.utils import Config
    from openood.postprocessors import EBOPostprocessor

    cfg = Config({"postprocessor": {"name": "ebo", "postprocessor_args": {"temperature": 1},
                                    "postprocessor_sweep": {"temperature_list": [1]}}})
    assert isinstance(U.get_postprocessor(cfg), EBOPostprocessor)


def test_evaluator_by_name_offline_with_aps_and_cache(bench, no_download):
    from openood.evaluation_api import Evaluator
    from openood_diffguard.openood import register

    register()
    net = _net(bench)
    ev = Evaluator(net, id_name="cifar10", data_root=str(bench / "data"), config_root=str(bench / "configs"),
                   postprocessor_name="toy", batch_size=16, num_workers=0)
    pp = ev.postprocessor
    assert pp.hyperparam_search_done and pp.get_hyperparam() in ([1.0], [-1.0])
    scored_after_aps = pp.detector.scored
    assert scored_after_aps == 12  # APS: 2 grid points x (ID val + OOD val) scored once, then re-scored from cache
    table = ev.eval_ood()
    _check_evaluator_rows(ev, table)
    assert pp.detector.scored == 12 + 10 + 24  # test sets once each
    # a second postprocessor instance (e.g. a rerun) re-uses the disk cache completely
    ev2 = Evaluator(net, id_name="cifar10", data_root=str(bench / "data"), config_root=str(bench / "configs"),
                    postprocessor_name="toy", batch_size=7, num_workers=0)
    ev2.eval_ood()
    assert ev2.postprocessor.detector.scored == 0
    # pickling as scripts/eval_ood.py does; the clone runs setup again and scores from the cache
    clone = pickle.loads(pickle.dumps(pp))
    clone.setup(net, ev.dataloader_dict["id"], ev.dataloader_dict["ood"])
    _, conf, _ = clone.inference(net, ev.dataloader_dict["id"]["test"], progress=False)
    np.testing.assert_allclose(conf, ev.scores["id"]["test"][1])


def test_packaged_yml_is_found_without_download(bench, monkeypatch, no_download):
    from openood_diffguard.openood import register
    from openood_diffguard.openood.registration import PACKAGE_CONFIGS, postprocessor_config

    register()
    assert postprocessor_config("diffguard", bench / "configs") == PACKAGE_CONFIGS / "diffguard_gdm_imagenet.yml"
    assert postprocessor_config("toy", bench / "configs") == bench / "configs" / "postprocessors" / "toy.yml"
    import openood.evaluation_api.postprocessor as E

    from openood_diffguard.runtime.registry import POSTPROCESSORS

    monkeypatch.setitem(POSTPROCESSORS, "diffguard", "openood_diffguard.openood.postprocessors:DetectorPostprocessor")
    monkeypatch.setitem(registry.DETECTORS, "diffguard", ToyDetector)  # stand-in: the real one lives elsewhere
    with pytest.raises(TypeError, match="unknown parameter"):  # our yml was read (DiffGuard's model_path)
        E.get_postprocessor(str(bench / "configs"), "diffguard", "cifar10")


def test_evaluator_with_fusion_instance_ours_plus_ebo(bench):
    from openood.evaluation_api import Evaluator
    from openood_diffguard.openood import FusionPostprocessor, register

    register()
    net = _net(bench)
    pp = FusionPostprocessor(_fusion_config(bench))
    ev = Evaluator(net, id_name="cifar10", data_root=str(bench / "data"), postprocessor=pp, batch_size=16,
                   num_workers=0)
    assert pp.hyperparam_search_done and pp.get_hyperparam()[0] in (0.3, 0.7)
    table = ev.eval_ood()
    _check_evaluator_rows(ev, table)
    # the fused confidence is the rank rule on EBO and the toy score (both calibrated on ID val)
    from openood_diffguard.fusion import ScoreFusion

    loaders = ev.dataloader_dict
    ebo = pp.baseline.inference(net, loaders["id"]["test"], progress=False)[1]
    toy = pp.diffusion.inference(net, loaders["id"]["test"], progress=False)[1]
    ebo_val = pp.baseline.inference(net, loaders["id"]["val"], progress=False)[1]
    toy_val = pp.diffusion.inference(net, loaders["id"]["val"], progress=False)[1]
    ref = ScoreFusion("rank", w=pp.get_hyperparam()[0]).fit({"baseline": ebo_val, "diffusion": toy_val})
    np.testing.assert_allclose(ev.scores["id"]["test"][1], ref({"baseline": ebo, "diffusion": toy}))
    clone = pickle.loads(pickle.dumps(pp))
    assert clone.get_hyperparam() == pp.get_hyperparam()


@pytest.mark.slow
def test_cascade_fusion_routes_only_uncertain_samples(bench):
    from openood.evaluation_api import Evaluator
    from openood_diffguard.openood import FusionPostprocessor

    cfg = _fusion_config(bench, rule="cascade")
    cfg.postprocessor.postprocessor_args.cache = False
    cfg.postprocessor.APS_mode = False
    pp = FusionPostprocessor(cfg)
    ev = Evaluator(_net(bench), id_name="cifar10", data_root=str(bench / "data"), postprocessor=pp,
                   batch_size=16, num_workers=0)
    scored_in_setup = pp.diffusion.detector.scored
    ebo_val = pp.baseline.inference(_net(bench), ev.dataloader_dict["id"]["val"], progress=False)[1]
    assert scored_in_setup == pp.fusion.route(ebo_val).sum() < 6  # calibration: the ID val samples in the band
    ev.eval_ood()
    assert scored_in_setup < pp.diffusion.detector.scored - scored_in_setup < 10 + 24  # only the routed band


def test_vim_dim_larger_than_features_is_a_clear_error(bench):
    from openood_diffguard.openood import FusionPostprocessor

    pp = FusionPostprocessor(_fusion_config(bench, baseline="vim", baseline_args={"dim": 1000}))
    with pytest.raises(ValueError, match=r"ViM dim=1000 must be in \[1, 511\] for 512-d features"):
        pp.setup(_net(bench), {"train": [], "val": []}, {"val": []})
    safe = FusionPostprocessor(_fusion_config(bench, baseline="vim"))  # dim: null -> from the feature size
    assert safe.baseline is None
    safe._build_vim(_net(bench))
    assert safe.baseline.dim == 256 and type(safe.baseline).__name__ == "VIMPostprocessor"


FUSION_YML = """postprocessor:
  name: fusion
  APS_mode: True
  postprocessor_args: {{detector: toy, detector_args: {{steps: 5}}, baseline: ebo, rule: rank, cache_dir: {cache}}}
  postprocessor_sweep: {{w_list: [0.2, 0.8]}}
"""


@pytest.mark.parametrize("pp_name", ["toy", "fusion"])
def test_main_py_pipeline_through_launcher(bench, monkeypatch, pp_name):
    if pp_name == "fusion":
        (bench / "configs" / "postprocessors" / "fusion.yml").write_text(FUSION_YML.format(cache=bench / "cache"))
    from openood_diffguard.openood.main import main

    monkeypatch.chdir(bench)
    assert main(main_py_argv(bench, bench / "configs" / "postprocessors" / f"{pp_name}.yml")) == 0
    check_main_py_csv(next(p for p in (bench / "results").rglob("ood.csv") if f"_{pp_name}_" in str(p)))


def test_knn_fusion_caches_train_features_and_pickles(bench):
    from openood.evaluation_api import Evaluator
    from openood_diffguard.openood import FusionPostprocessor

    cfg = _fusion_config(bench, baseline="knn", baseline_args={"K": 3})
    cfg.postprocessor.APS_mode = False
    net = _net(bench)
    ev = Evaluator(net, id_name="cifar10", data_root=str(bench / "data"), postprocessor=FusionPostprocessor(cfg),
                   batch_size=16, num_workers=0)
    loaders = ev.dataloader_dict
    second = FusionPostprocessor(cfg)
    nets, setup = [], second.baseline.setup
    second.baseline.setup = lambda n, *a: (nets.append(n), setup(n, *a))[1]
    second.setup(net, loaders["id"], loaders["ood"])
    # OpenOOD's own KNN setup ran, on the cached train features instead of the classifier
    assert nets and net not in nets and second.baseline.setup_flag
    np.testing.assert_array_equal(second.baseline.activation_log, ev.postprocessor.baseline.activation_log)
    first_conf = ev.postprocessor.baseline.inference(net, loaders["id"]["test"], False)[1]
    np.testing.assert_array_equal(second.baseline.inference(net, loaders["id"]["test"], False)[1], first_conf)
    clone = pickle.loads(pickle.dumps(ev.postprocessor))  # the faiss index travels in faiss's byte form
    _, conf, _ = clone.baseline.inference(net, loaders["id"]["test"], progress=False)
    np.testing.assert_array_equal(conf, first_conf)
    assert clone.baseline.activation_log is None  # not pickled: the index holds the same vectors
    assert clone.baseline.index.ntotal == ev.postprocessor.baseline.index.ntotal == len(ev.postprocessor.baseline.activation_log)


@pytest.mark.slow
def test_torchrun_two_ranks_main_py(bench, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU; the launcher's --device auto routes OpenOOD's .cuda() calls):
    samples sharded, rank 0 writes the same csv as one process."""
    import subprocess

    (bench / "configs" / "postprocessors" / "toy_tr.yml").write_text(
        (bench / "configs" / "postprocessors" / "toy.yml").read_text()  # the Detector given as module:Class
        .replace("name: toy", "name: toy_tr").replace("steps: 3", "steps: 3\n    detector: ood_toys:ToyDetector")
        .replace(str(bench / "cache"), str(tmp_path / "cache")))
    argv = main_py_argv(bench, bench / "configs" / "postprocessors" / "toy_tr.yml", "--mark", "torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "openood_diffguard.openood.main", *argv], cwd=bench, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    out = next(p for p in (bench / "results").rglob("ood.csv") if "_torchrun/" in str(p))
    rows = list(csv.DictReader(out.open()))
    assert [r["dataset"] for r in rows] == ["cifar100", "tin", "nearood", "mnist", "svhn", "texture", "place365",
                                            "farood"]  # written once (rank 0 only)
    from openood_diffguard.runtime.cache import ScoreCache

    ns = next((tmp_path / "cache").iterdir())
    files = list(ns.glob("chunk-*.npz"))
    assert len({f.name.split("-")[1] for f in files}) == 2  # chunks written by two processes (pids)
    assert len(ScoreCache(tmp_path / "cache", ns.name)) == 6 + 6 + 10 + 24  # every sample exactly once
