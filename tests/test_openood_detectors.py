"""The real detectors inside a real OpenOOD checkout (marked ``openood``: skipped when it is not installed, see
conftest.py): DiffGuard (CIFAR preset, CFG with a tiny class-conditional UNet2DModel trained here for two
steps with train_diffusion), DiffNB, LFDN (trained on the fly in setup) and DiffGuard + OpenOOD's EBO (cascade
fusion, APS), each through the Evaluator by its packaged yml stem and through main.py via our launcher. The
configs are the packaged presets with only model paths, sizes and step counts overridden. Every OpenOOD table
must equal ``openood_diffguard.metrics`` of scores computed here without OpenOOD (own image loading, the
detector's ``predict``, pytorch-ood's EBO for the fusion).
"""
import pytest
import torch
import yaml

import numpy as np
from openood_bench import (CIFAR10_MEAN, CIFAR10_STD, OOD_SETS, build_bench, check_evaluator_rows,  # noqa: F401
                           check_main_py_csv, cpu_shim, imglist_images, load_net, main_py_argv)

from openood_diffguard.openood.registration import PACKAGE_CONFIGS, read_postprocessor_section
from openood_diffguard.openood.sections import detector_from_section, fusion_detector_section

pytestmark = [pytest.mark.openood, pytest.mark.usefixtures("single_thread")]

SETS = ["test_cifar10", *(f"test_{n}" for g in ("near", "far") for n in OOD_SETS[g])]
FAST = {"num_steps": 4, "dtype": "fp32"}  # DiffGuard: DDIM-4 instead of 50, fp32 on CPU


def _overrides(root, unet):
    cache = str(root / "cache")
    return {
        "diffguard_cifar10": {"model_path": str(unet), **FAST, "cache_dir": cache},
        "diffnb_cifar10": {"model_path": str(unet), "timesteps": [40], "repeats": 2, "cache_dir": cache},
        "lfdn_cifar10": {"train": {"width": 32, "blocks": 1, "epochs": 3, "batch_size": 10, "lr": 1e-3},
                         "cache_dir": cache},
        "fusion_diffguard_ebo_cifar10": {"detector_args": {"model_path": str(unet), **FAST}, "cache_dir": cache},
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Benchmark + tiny UNet + our presets copied under config_root with the same stems (so the Evaluator
    finds them by stem; a user's config_root yml wins over the packaged one)."""
    from openood_diffguard.training.data import TensorImages
    from openood_diffguard.training.diffusion import TINY_UNET, train_diffusion

    root = build_bench(tmp_path_factory.mktemp("openood_real"))
    x, y = imglist_images(root, "train_cifar10")
    pixels = x * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    unet = root / "unet"
    train_diffusion(TensorImages((2 * pixels - 1).clamp(-1, 1), y),
                    {"num_classes": 10, "unet": {**TINY_UNET, "sample_size": 32, "in_channels": 3}, "steps": 2,
                     "batch_size": 10, "warmup": 1, "ema": 0.5, "save_every": 2, "hflip": False},
                    unet, progress=False, device="cpu")
    for stem, over in _overrides(root, unet).items():
        cfg = {"postprocessor": read_postprocessor_section(PACKAGE_CONFIGS / f"{stem}.yml")}
        cfg["postprocessor"]["postprocessor_args"].update(over)
        (root / "configs" / "postprocessors" / f"{stem}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        if stem.startswith("fusion_"):  # main.py keeps its APS choice inside the pipeline: a fixed-rule copy
            cfg["postprocessor"]["APS_mode"] = False
            (root / "configs" / "postprocessors" / f"{stem}_fixed.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def _section(bench, stem):
    return read_postprocessor_section(bench / "configs" / "postprocessors" / f"{stem}.yml")


_REFERENCE: dict = {}


def reference(bench, stem, rule_params=None, checkpoint=None):
    """Scores of every test set computed without OpenOOD: {set: (pred, conf, label)} (numpy). LFDN: the
    ``checkpoint`` that OpenOOD's setup trained on the fly (each path trains on its own train loader)."""
    key = (str(bench), stem, tuple(sorted((rule_params or {}).items())), checkpoint)
    if key in _REFERENCE:
        return _REFERENCE[key]
    net = load_net(bench)
    pp = _section(bench, stem)
    fusion_cfg, det_pp = fusion_detector_section(pp) if stem.startswith("fusion_") else (None, pp)
    det = detector_from_section(det_pp, {"name": "cifar10"})[0]
    if checkpoint is not None:
        det.set_params(checkpoint=str(checkpoint))
    det.setup(net, None, None)
    out = {}
    if fusion_cfg is None:
        for name in SETS:
            x, label = imglist_images(bench, name)
            pred, conf = det.predict(net, x)
            out[name] = (pred.numpy(), conf.detach().numpy().astype(np.float64), label.numpy())
    else:  # standalone fusion: pytorch-ood EBO + DiffGuard, ScoreFusion fitted on ID val, APS's parameters
        from openood_diffguard.features import classifier_outputs

        baselines = fusion_cfg.build_baselines()

        def components(name):
            x, label = imglist_images(bench, name)
            with torch.no_grad():
                logits, feats, _ = classifier_outputs(net, x, "penultimate")
            ebo = baselines.predict_features(logits, feats)[fusion_cfg.baseline].numpy()
            return {"baseline": ebo, "diffusion": det.predict(net, x)[1].detach().numpy()}, logits.argmax(1), label

        fusion = fusion_cfg.build_fusion().fit(components("val_cifar10")[0])
        fusion.set_params(**rule_params)
        for name in SETS:
            comp, pred, label = components(name)
            out[name] = (pred.numpy(), np.asarray(fusion(comp), dtype=np.float64), label.numpy())
    _REFERENCE[key] = out
    return out


def _split(ref):
    ood = {n[5:]: ref[n] for n in SETS[1:]}
    return ref["test_cifar10"], ood


def _tol(stem):
    # the cascade scores only the routed samples, i.e. DiffGuard sees other batch compositions than here:
    # float32 differences of ~1e-6 in the DiffGuard score, scaled up by the ECDF calibration
    return {"rtol": 1e-3, "atol": 1e-5} if stem.startswith("fusion_") else {"rtol": 1e-5, "atol": 1e-6}


STEMS = ["diffguard_cifar10", "diffnb_cifar10", "lfdn_cifar10", "fusion_diffguard_ebo_cifar10"]


@pytest.mark.parametrize("stem", STEMS)
def test_evaluator_by_stem_equals_standalone(bench, stem, no_download):
    from openood.evaluation_api import Evaluator
    from openood_diffguard.openood import register

    register()
    net = load_net(bench)
    ev = Evaluator(net, id_name="cifar10", data_root=str(bench / "data"), config_root=str(bench / "configs"),
                   postprocessor_name=stem, batch_size=16, num_workers=0)
    pp = ev.postprocessor
    assert type(pp).__name__ == {"diffguard_cifar10": "DiffGuardPostprocessor", "diffnb_cifar10": "DiffNBPostprocessor",
                                 "lfdn_cifar10": "LFDNPostprocessor"}.get(stem, "FusionPostprocessor")
    table = ev.eval_ood()
    hyper = dict(zip(pp._sweep, pp.get_hyperparam())) if stem.startswith("fusion_") else None  # APS's choice
    ckpt = pp.detector._loaded_from if stem == "lfdn_cifar10" else None
    id_ref, ood_ref = _split(reference(bench, stem, hyper, ckpt))
    np.testing.assert_allclose(ev.scores["id"]["test"][1], id_ref[1], **_tol(stem))
    for group in ("near", "far"):
        for name, (pred, conf, _) in ev.scores["ood"][group].items():
            np.testing.assert_allclose(conf, ood_ref[name][1], err_msg=name, **_tol(stem))
    check_evaluator_rows(ev, table, reference=(id_ref, ood_ref))  # rows = our metrics of standalone scores
    assert np.isfinite(table.to_numpy(dtype=float)).all()
    if stem.startswith("fusion_"):
        assert pp.hyperparam_search_done and len(hyper) == 2
        routed = pp.diffusion.store(net)  # the cascade sent only part of the test samples to DiffGuard
        assert 0 < len(routed) < 6 + 10 + 24 + 6


@pytest.mark.slow
@pytest.mark.parametrize("stem", STEMS)
def test_main_py_pipeline_equals_standalone(bench, stem, monkeypatch):
    from openood_diffguard.openood.main import main

    monkeypatch.chdir(bench)
    fusion = stem.startswith("fusion_")
    yml = bench / "configs" / "postprocessors" / (f"{stem}_fixed.yml" if fusion else f"{stem}.yml")
    before = set((bench / "cache").glob("lfdn_*.pt"))
    assert main(main_py_argv(bench, yml, "--mark", stem)) == 0
    # LFDN trains on main.py's own (augmented) train loader: a model file of its own, not the Evaluator's
    new = sorted(set((bench / "cache").glob("lfdn_*.pt")) - before)
    assert len(new) == (1 if stem == "lfdn_cifar10" else 0), new
    out = next(p for p in (bench / "results").rglob("ood.csv") if f"_{stem}/" in str(p))
    scores = check_main_py_csv(out)  # csv rows = our metrics of main.py's saved scores
    rule_args = _section(bench, stem)["postprocessor_args"].get("rule_args", {})
    ref = reference(bench, stem, rule_args if fusion else None, new[0] if new else None)
    for name, s in scores.items():  # main.py spells places365 "place365"; its ID set is "cifar10"
        key = {"place365": "places365"}.get(name, name)
        np.testing.assert_allclose(s["conf"], ref[f"test_{key}"][1], err_msg=name, **_tol(stem))
        np.testing.assert_array_equal(s["label"], ref[f"test_{key}"][2] if name == "cifar10" else -1)
