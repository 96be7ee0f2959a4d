"""DiffGuard end to end on tiny random models (plumbing, determinism, batching) and on an analytic
Gaussian mixture with its Bayes classifier (the signal: held-out component vs known classes)."""
import pickle

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from diffguard_toys import (IMAGENET, TinyNet, _images, _mixture, schedule, tiny_dit, tiny_ldm,  # noqa: F401
                            tiny_unet)
from openood_diffguard.detectors.diffguard import DiffGuard

pytestmark = pytest.mark.usefixtures("single_thread")

GDM = dict(num_steps=10, max_inversion_steps=8, diffusion_size=16, score_size=32, cutouts=2, aes_psnr_db=14.0,
           aes_dists_sim=0.2, classifier_scale=300.0, similarities=("dists", "lpips", "logits_l1"), pretrained_metrics=False)


def test_gdm_path_end_to_end_deterministic_and_batched_equals_single(tiny_unet):
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = _images(3)
    det = DiffGuard(model=tiny_unet, **GDM)
    stats = det.statistics(net, x)
    assert set(stats) >= {"pred", "guide_label", "stop_index", "sim_dists", "sim_lpips", "sim_logits_l1"}
    conf = det.confidence(stats)
    assert conf.shape == (3,) and torch.isfinite(conf).all()
    assert ((conf >= 0) & (conf <= 1)).all()  # 1 - DISTS
    assert (stats["sim_logits_l1"] <= 0).all() and (stats["sim_lpips"] <= 0).all()
    assert len(set(stats["stop_index"].tolist())) > 1  # samples really stop at different steps
    assert (stats["stop_index"] >= 1).all() and (stats["stop_index"] <= 8).all()
    assert (conf < 0.999).all()  # the guidance moved the synthesis away from the unguided twin
    again = det.statistics(net, x)
    for k in stats:
        torch.testing.assert_close(again[k], stats[k], rtol=0, atol=0)
    for b in range(3):  # per-sample early stop / start indices: a batch equals one-at-a-time runs
        alone = det.statistics(net, x[b:b + 1])
        assert alone["stop_index"].item() == stats["stop_index"][b].item()
        for k in ("sim_dists", "sim_lpips", "sim_logits_l1"):
            torch.testing.assert_close(alone[k], stats[k][b:b + 1], rtol=1e-4, atol=1e-4)
    pred, conf2 = det.predict(net, x)
    torch.testing.assert_close(conf2, conf)
    det.set_params(similarity="logits_l1")
    torch.testing.assert_close(det.confidence(stats), stats["sim_logits_l1"])


def test_gdm_early_stop_rules(tiny_unet):
    net = TinyNet().eval()
    x = _images(2, seed=1)
    base = dict(GDM, similarities=("dists",))
    never = DiffGuard(model=tiny_unet, **dict(base, aes_psnr_db=-100.0, aes_dists_sim=None)).statistics(net, x)
    assert never["stop_index"].tolist() == [8, 8]  # the cap
    first = DiffGuard(model=tiny_unet, **dict(base, aes_psnr_db=1000.0)).statistics(net, x)
    assert first["stop_index"].tolist() == [1, 1]  # fires on the first noisy state
    # the legacy 255-peak threshold is the dB threshold + 42.11
    legacy = DiffGuard(model=tiny_unet, **dict(base, aes_psnr_db=None, aes_psnr_legacy=14.0 + 42.1442, aes_dists_sim=False)).statistics(net, x)
    modern = DiffGuard(model=tiny_unet, **dict(base, aes_dists_sim=None)).statistics(net, x)
    assert legacy["stop_index"].tolist() == modern["stop_index"].tolist()
    dists_first = DiffGuard(model=tiny_unet, **dict(base, aes_psnr_db=None, aes_dists_sim=1.01)).statistics(net, x)
    assert dists_first["stop_index"].tolist() == [1, 1]  # 1 - DISTS <= 1 < 1.01: the DISTS rule fires at once
    dists_never = DiffGuard(model=tiny_unet, **dict(base, aes_psnr_db=None, aes_dists_sim=-1.0)).statistics(net, x)
    assert dists_never["stop_index"].tolist() == [8, 8]
    ref_input = DiffGuard(model=tiny_unet, **dict(base, reference="input")).statistics(net, x)
    assert ref_input["sim_dists"].shape == (2,)


@pytest.mark.parametrize("which", ["tiny_dit", "tiny_ldm"])
def test_latent_path_with_gradcam_mask(which, request):
    model = request.getfixturevalue(which)
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = _images(2)
    det = DiffGuard(model=model, guidance="cfg", num_steps=4, steps_offset=1, inversion_convention="target",
                    cfg_scale=10.0, cam_cut=0.3, diffusion_size=16, score_size=16,
                    similarities=("dists", "logits_l1"), pretrained_metrics=False, num_classes=5)
    stats = det.statistics(net, x)
    conf = det.confidence(stats)
    assert conf.shape == (2,) and ((conf >= 0) & (conf <= 1)).all()
    assert stats["stop_index"].tolist() == [4, 4]  # full inversion
    torch.testing.assert_close(det.statistics(net, x)["sim_dists"], stats["sim_dists"], rtol=0, atol=0)
    # the mask matters: global CFG gives a different synthesis
    glob = DiffGuard(model=model, **dict(det.params, cam_cut=False)).statistics(net, x)
    assert not torch.allclose(glob["sim_dists"], stats["sim_dists"])
    clone = pickle.loads(pickle.dumps(det))
    assert clone.model is None and clone.params == det.params


def test_bad_inputs_raise_clear_errors(tiny_unet):
    net = TinyNet().eval()
    det = DiffGuard(model=tiny_unet, **GDM)
    x = _images(2)
    with pytest.raises(ValueError, match="NaN"):
        det.statistics(net, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="normalised"):
        det.statistics(net, IMAGENET.to_unit(x) * 255)
    with pytest.raises(ValueError, match="classes"):
        DiffGuard(model=tiny_unet, **dict(GDM, num_classes=10)).statistics(net, x)
    with pytest.raises(ValueError, match="model_path"):
        DiffGuard(**GDM).statistics(net, x)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        DiffGuard(**dict(GDM, model_path="/nonexistent/adm")).statistics(net, x)
    with pytest.raises(ValueError, match="similarities"):
        DiffGuard(similarities=("psnr",))
    with pytest.raises(ValueError, match="guidance"):
        DiffGuard(guidance="both")
    with pytest.raises(ValueError, match="null class"):
        DiffGuard(model=tiny_unet, guidance="cfg", num_steps=10, diffusion_size=16, score_size=32,
                  pretrained_metrics=False).statistics(net, x)
    with pytest.raises(KeyError, match="not computed"):
        DiffGuard(model=tiny_unet, **dict(GDM, similarity="logits_cos")).predict(net, x)
    with pytest.raises(ValueError, match="labels"):
        with pytest.warns(UserWarning, match="analysis only"):
            det_o = DiffGuard(model=tiny_unet, **dict(GDM, label_mode="oracle"))
        det_o.statistics(net, x)


# ---------------------------------------------------------------- synthetic separation (known answer)
COMMON = dict(normalization=None, diffusion_size=None, score_size=None, num_steps=20, similarities=("logits_l1",),
              similarity="logits_l1")
IS_ID = [1] * 90 + [0] * 90


def test_synthetic_separation_classifier_guidance(schedule):
    known, clf, x, _ = _mixture(schedule)
    det = DiffGuard(model=known, guidance="classifier", classifier_scale=0.05, cutouts=0, aes=False,
                    max_inversion_steps=12, reference="uncond", clip_denoised=False, **COMMON)
    _, conf = det.predict(clf, x)
    auroc = roc_auc_score(IS_ID, conf.numpy())
    assert auroc > 0.9, auroc
    # without guidance the synthesis IS the unguided reference: no signal at all
    _, conf0 = DiffGuard(model=known, **dict(det.params, classifier_scale=0.0)).predict(clf, x)
    assert conf0.abs().max() == 0


def test_synthetic_separation_cfg_and_label_dependence(schedule):
    known, clf, x, y_id = _mixture(schedule)
    det = DiffGuard(model=known, guidance="cfg", cfg_scale=3.0, cam_cut=False, inversion_convention="target", **COMMON)
    _, conf = det.predict(clf, x)
    auroc = roc_auc_score(IS_ID, conf.numpy())
    assert auroc > 0.9, auroc
    # the label drives it: ID samples guided toward a wrong class (oracle mode fed wrong labels) look OOD
    with pytest.warns(UserWarning, match="analysis only"):
        wrong = DiffGuard(model=known, **dict(det.params, label_mode="oracle"))
    conf_wrong = wrong.confidence(wrong.statistics(clf, x[:90], (y_id + 1) % 3))
    mixed = wrong.statistics(clf, x[:4], torch.tensor([0, -1, 2, -1]))["guide_label"]  # GT for ID, random for OOD
    assert mixed[0] == 0 and mixed[2] == 2 and ((mixed >= 0) & (mixed < 3)).all()
    assert roc_auc_score([1] * 90 + [0] * 90, torch.cat([conf[:90], conf_wrong]).numpy()) > 0.9


@pytest.mark.parametrize("preset", ["gdm_imagenet", "ldm_imagenet", "dit_imagenet", "cifar10"])
def test_presets_are_complete_openood_ymls(preset):
    import warnings
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "openood_diffguard" / "configs" / "postprocessors" / f"diffguard_{preset}.yml").read_text())
    pp = cfg["postprocessor"]
    assert pp["name"] == DiffGuard.name and pp["APS_mode"] is False
    args = pp["postprocessor_args"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = DiffGuard(**args)  # valid combination
    # every parameter of the preset's path spelled out, and none of the other path's (they have no effect)
    assert set(args) == set(type(det).DEFAULTS), set(args) ^ set(type(det).DEFAULTS)
    assert set(pp["postprocessor_sweep"]["similarity_list"]) <= set(det.params["similarities"])
