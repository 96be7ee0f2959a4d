"""DiffNB's per-timestep rows inside a real OpenOOD checkout (skipped without it): the released code reports one
AUROC per t; here ``aggregate: <t>`` (cheap) selects one t, and a second / third t re-score the cached statistics
(no diffusion call) through OpenOOD's Evaluator and main.py. The rows equal ``openood_diffguard.metrics`` of the
detector's own per-t confidences computed without OpenOOD."""
import pytest

pytestmark = [pytest.mark.openood, pytest.mark.usefixtures("single_thread")]

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from openood_bench import (OOD_SETS, build_bench, check_evaluator_rows, check_main_py_csv,  # noqa: E402,F401
                           cpu_shim, imglist_images, load_net, main_py_argv, train_bench_unet)
from openood_diffguard.openood.registration import PACKAGE_CONFIGS, read_postprocessor_section  # noqa: E402

TIMESTEPS = [20, 40]
SETS = ["test_cifar10", *(f"test_{n}" for g in ("near", "far") for n in OOD_SETS[g])]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Tiny benchmark + a class-conditional UNet trained for two steps + the packaged diffnb_cifar10 preset
    (variant: code) with the model, two timesteps and R = 1, under config_root."""

    root = build_bench(tmp_path_factory.mktemp("diffnb_per_t"))
    train_bench_unet(root)
    pp = read_postprocessor_section(PACKAGE_CONFIGS / "diffnb_cifar10.yml")
    assert pp["postprocessor_args"]["variant"] == "code"
    pp["postprocessor_args"].update(model_path=str(root / "unet"), timesteps=TIMESTEPS, repeats=1,
                                    cache_dir=str(root / "cache"))
    (root / "configs" / "postprocessors" / "diffnb_cifar10.yml").write_text(yaml.safe_dump({"postprocessor": pp}))
    return root


def _standalone(bench):
    """{set: {t: conf}} and labels from the detector's per-t confidences, without OpenOOD."""
    from openood_diffguard.openood.sections import detector_from_section

    det = detector_from_section(read_postprocessor_section(bench / "configs" / "postprocessors" / "diffnb_cifar10.yml"),
                                {"name": "cifar10"})[0]
    net = load_net(bench)
    out = {}
    for name in SETS:
        x, label = imglist_images(bench, name)
        stats = det.statistics(net, x)
        out[name] = ({t: c.numpy().astype(np.float64) for t, c in det.confidences(stats).items()},
                     stats["pred"].numpy(), label.numpy())
    return out


def test_evaluator_per_timestep_rows_reuse_the_cache(bench, no_download):
    from openood.evaluation_api import Evaluator
    from openood.utils import Config

    from openood_diffguard.openood.postprocessors import DiffNBPostprocessor

    net = load_net(bench)
    section = read_postprocessor_section(bench / "configs" / "postprocessors" / "diffnb_cifar10.yml")
    pp = DiffNBPostprocessor(Config({"postprocessor": section, "dataset": {"name": "cifar10"}}))
    ref = _standalone(bench)
    calls = []
    for i, t in enumerate(TIMESTEPS):
        pp.detector.set_params(aggregate=f"t{t}")
        if i == 1:  # from the second t on, only the cached statistics are re-scored
            model = pp.detector.model
            raw = model._raw
            model._raw = lambda x, tt, y: (calls.append(len(x)), raw(x, tt, y))[1]
        ev = Evaluator(net, id_name="cifar10", data_root=str(bench / "data"), config_root=str(bench / "configs"),
                       postprocessor=pp, batch_size=16, num_workers=0)
        table = ev.eval_ood()
        id_ref = (ref["test_cifar10"][1], ref["test_cifar10"][0][t], ref["test_cifar10"][2])
        ood_ref = {n[5:]: (ref[n][1], ref[n][0][t], ref[n][2]) for n in SETS[1:]}
        np.testing.assert_allclose(ev.scores["id"]["test"][1], id_ref[1], rtol=1e-5, atol=1e-6)
        check_evaluator_rows(ev, table, reference=(id_ref, ood_ref))
    assert calls == []
    assert not np.allclose(ref["test_cifar10"][0][20], ref["test_cifar10"][0][40])  # the rows really differ


@pytest.mark.slow
def test_main_py_per_timestep_row_from_the_command_line(bench, monkeypatch):
    """main.py casts a CLI override to the yml value's type (a string): ``aggregate t40`` selects t = 40."""
    from openood_diffguard.openood.main import main

    monkeypatch.chdir(bench)
    yml = bench / "configs" / "postprocessors" / "diffnb_cifar10.yml"
    argv = main_py_argv(bench, yml, "--mark", "t40", "--postprocessor.postprocessor_args.aggregate", "t40")
    assert main(argv) == 0
    out = next(p for p in (bench / "results").rglob("ood.csv") if "_t40/" in str(p))
    scores = check_main_py_csv(out)
    ref = _standalone(bench)
    for name, s in scores.items():
        key = {"place365": "places365"}.get(name, name)
        np.testing.assert_allclose(s["conf"], ref[f"test_{key}"][0][40], err_msg=name, rtol=1e-5, atol=1e-6)
