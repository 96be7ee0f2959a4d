"""Budgeted fusion through an OpenOOD fusion yml (real OpenOOD checkout; skipped without it): the detector
runs only on the samples inside the band, on ID-val as on test, per batch as per loader, and the fused
scores equal those computed from every sample's detector score."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.openood

from openood_bench import build_bench, cpu_shim, load_net  # noqa: E402,F401
from ood_toys import ToyDetector  # noqa: E402
from openood_diffguard.runtime import registry  # noqa: E402

BUDGET_YML = """postprocessor:
  name: diffguard_fusion
  APS_mode: True
  postprocessor_args:
    detector: toy
    detector_args: {{steps: 6}}
    baseline: ebo
    baseline_args: {{temperature: 1}}
    rule: {rule}
    rule_args: {{budget: 0.5, alpha_out: 0.0}}
    cache: False
  postprocessor_sweep:
    alpha_out_list: [0.0, 0.1]
"""


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    monkeypatch.setattr(registry, "DETECTORS", {**registry.DETECTORS, "toy": ToyDetector})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_bench(tmp_path_factory.mktemp("budget_bench"))


@pytest.mark.parametrize("rule", ["rank", pytest.param("cascade", marks=pytest.mark.slow)])
def test_fusion_yml_budget_runs_the_detector_on_the_band_only(bench, rule, no_download):
    from openood.evaluation_api import Evaluator
    from openood_diffguard.fusion import ScoreFusion
    from openood_diffguard.openood import register

    register()
    (bench / "configs" / "postprocessors" / f"budget_{rule}.yml").write_text(BUDGET_YML.format(rule=rule))
    net = load_net(bench)
    ev = Evaluator(net, id_name="cifar10", data_root=str(bench / "data"), config_root=str(bench / "configs"),
                   postprocessor_name=f"budget_{rule}", batch_size=4, num_workers=0)
    pp = ev.postprocessor
    det = pp.diffusion.detector
    assert pp.hyperparam_search_done and pp.fusion.get_params()["budget"] == 0.5
    alpha_out = pp.get_hyperparam()[0]
    scored_before_test = det.scored
    ev.eval_ood()
    loaders = ev.dataloader_dict
    ebo = lambda loader: pp.baseline.inference(net, loader, progress=False)[1]  # noqa: E731
    ref = ScoreFusion(rule, budget=0.5, alpha_out=alpha_out).fit_band(ebo(loaders["id"]["val"]))
    # setup + APS: only the ID-val / OOD-val samples inside the band of either grid point were ever scored
    grid = [ScoreFusion(rule, budget=0.5, alpha_out=a).fit_band(ebo(loaders["id"]["val"])) for a in (0.0, 0.1)]
    in_any_band = lambda loader: int(np.logical_or(*[f.route(ebo(loader)) for f in grid]).sum())  # noqa: E731
    assert scored_before_test == in_any_band(loaders["id"]["val"]) + in_any_band(loaders["ood"]["val"])
    tests = [loaders["id"]["test"], *loaders["ood"]["near"].values(), *loaders["ood"]["far"].values()]
    routed = [int(ref.route(ebo(loader)).sum()) for loader in tests]
    # each test sample scored at most once (in-memory store); exactly the routed ones
    assert det.scored - scored_before_test == sum(routed) < sum(len(loader.dataset) for loader in tests)
    assert [k for k, _ in pp.routing[-len(tests):]] == routed
    # fast path = slow path: detector scores of every sample fused offline give the same confidences
    toy = lambda loader: pp.diffusion.inference(net, loader, progress=False)[1]  # noqa: E731
    full = ScoreFusion(rule, budget=0.5, alpha_out=alpha_out).fit(
        {"baseline": ebo(loaders["id"]["val"]), "diffusion": toy(loaders["id"]["val"])})
    np.testing.assert_allclose(ev.scores["id"]["test"][1],
                               full({"baseline": ebo(loaders["id"]["test"]), "diffusion": toy(loaders["id"]["test"])}))
    # the per-batch path routes too: a batch below the band never reaches the detector
    batch = next(iter(loaders["ood"]["far"]["texture"]))["data"]
    det.scored = 0
    pred, conf = pp.postprocess(net, batch)
    need = pp.fusion.route(pp._baseline_batch(net, batch)[1].numpy())
    assert det.scored == need.sum() and conf.shape == (batch.shape[0],) and torch.isfinite(conf).all()
