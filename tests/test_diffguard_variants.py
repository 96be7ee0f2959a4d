"""DiffGuard's ``variant`` parameter (released code vs paper), the official DDIM grids and clean levels
(known answers transcribed from cure-lab/DiffGuard 6125295 and its vendored latent-diffusion), parameter and
input validation, the CFG null-class guard, and batch independence on both guidance paths."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffguard_toys import IMAGENET, TinyNet, _images, _mixture, schedule, tiny_ldm, tiny_unet  # noqa: F401 (fixtures)
from openood_diffguard.runtime.cache import ScoreCache, cached_statistics
from openood_diffguard.detectors.base import ParameterError
from openood_diffguard.detectors.diffguard import VARIANTS, DiffGuard, content_labels, official_grid
from openood_diffguard.detectors.diffguard_gdm import DiffGuardGDM

pytestmark = pytest.mark.usefixtures("single_thread")

GDM = dict(num_steps=10, max_inversion_steps=8, diffusion_size=16, score_size=32, cutouts=2, aes_psnr_db=14.0,
           aes_dists_sim=0.2, classifier_scale=300.0, similarities=("dists",), pretrained_metrics=False)
LATENT = dict(guidance="cfg", num_steps=4, cfg_scale=10.0, diffusion_size=16, score_size=16, similarities=("dists",),
              pretrained_metrics=False, num_classes=5)


# ---------------------------------------------------------------- official grids (known answers)
def test_guided_diffusion_grid_is_space_timesteps_ddimN():
    # respace.space_timesteps(1000, "ddimN"): the smallest stride i with len(range(0, 1000, i)) == N
    assert official_grid("guided_diffusion", 1000, 100).tolist() == list(range(0, 1000, 10))
    assert official_grid("guided_diffusion", 1000, 30).tolist() == list(range(0, 1000, 34))  # 30 steps, last 986
    assert official_grid("guided_diffusion", 1000, 7).tolist() == list(range(0, 1000, 143))
    with pytest.raises(ParameterError, match="num_steps.*60"):  # no stride gives 60 (59 at 17, 63 at 16)
        official_grid("guided_diffusion", 1000, 60)


def test_ldm_grid_is_make_ddim_timesteps_as_diffguard_vendors_it():
    # ldm/modules/diffusionmodules/util.py: range(0, T, T // N) + 1, and DiffGuard drops a final 1000
    assert official_grid("ldm", 1000, 25).tolist() == list(range(1, 1000, 40))
    assert official_grid("ldm", 1000, 30).tolist() == list(range(1, 992, 33))  # 31 steps: 30 does not divide 1000
    assert official_grid("ldm", 1000, 3).tolist() == [1, 334, 667]  # 1000 dropped


def test_paths_per_clean_level(schedule):
    model = _mixture(schedule)[0]
    code = DiffGuard(model=model, guidance="cfg", num_steps=25, normalization=None, similarities=("logits_l1",),
                     similarity="logits_l1")
    inv, den = code.paths()
    assert inv.tolist() == den.tolist() == [0] + list(range(1, 1000, 40))  # alpha_bar[0] at both ends (LDM)
    first = DiffGuard(model=model, **dict(code.params, clean_level="first_step")).paths()
    assert first[0].tolist() == list(range(1, 1000, 40)) and first[1].tolist() == [-1] + list(range(1, 1000, 40))
    one = DiffGuard(model=model, **dict(code.params, clean_level="one")).paths()
    assert one[0].tolist() == one[1].tolist() == [-1] + list(range(1, 1000, 40))
    gdm = DiffGuard(model=model, num_steps=30, normalization=None, similarities=("logits_l1",), similarity="logits_l1")
    inv, den = gdm.paths()  # guided-diffusion: image at the grid's first level, denoising to alpha_bar = 1
    assert inv.tolist() == list(range(0, 1000, 34)) and den.tolist() == [-1] + list(range(0, 1000, 34))
    paper = DiffGuard(model=model, **dict(gdm.params, variant="paper")).paths()
    assert paper[0].tolist() == list(range(0, 1000, 33))[:30]  # diffusers leading: 0, 33, ..., 957


# ---------------------------------------------------------------- variant resolution
def test_variant_resolution_and_explicit_overrides():
    code = DiffGuard().effective_params()
    assert (code["reference"], code["aes_psnr"], code["aes_dists_sim"], code["forback_skip"], code["guidance_target"],
            code["timestep_spacing"], code["inversion_convention"], code["clean_level"]) == \
        ("uncond", ("legacy", 48.5), 0.38, 3, "x0_blend", "guided_diffusion", "source", "first_step")
    paper = DiffGuard(variant="paper").effective_params()
    assert (paper["reference"], paper["aes_psnr"], paper["aes_dists_sim"], paper["forback_skip"],
            paper["guidance_target"], paper["timestep_spacing"]) == ("input", ("db", 6.39), 0.37, 2, "x0", "leading")
    ldm = DiffGuard(guidance="cfg").effective_params()
    assert (ldm["cam_cut"], ldm["clean_level"], ldm["inversion_convention"], ldm["timestep_spacing"]) == \
        (0.3, "alpha0", "target", "ldm")
    ldm_paper = DiffGuard(guidance="cfg", variant="paper").effective_params()
    assert (ldm_paper["cam_cut"], ldm_paper["clean_level"], ldm_paper["inversion_convention"]) == \
        (0.2, "first_step", "source")
    # explicit values win; false switches a rule off
    over = DiffGuard(aes_psnr_db=6.0, aes_dists_sim=False, reference="input", forback_skip=2).effective_params()
    assert (over["aes_psnr"], over["aes_dists_sim"], over["reference"], over["forback_skip"]) == (("db", 6.0), None, "input", 2)
    assert DiffGuard(aes_psnr_legacy=50.0).effective_params()["aes_psnr"] == ("legacy", 50.0)
    assert DiffGuard(aes_psnr_db=False).effective_params()["aes_psnr"] is None
    assert DiffGuard(guidance="cfg", cam_cut=False).effective_params()["cam_cut"] is None
    assert set(VARIANTS) == {"code", "paper"} and all(set(v) == {"classifier", "cfg"} for v in VARIANTS.values())


def test_variant_paper_is_its_explicit_values_end_to_end(tiny_unet):
    net = TinyNet().eval()
    x = _images(2)
    base = dict(GDM, aes_psnr_db=None, aes_dists_sim=None)
    dets = {"paper": DiffGuard(model=tiny_unet, **dict(base, variant="paper")),
            "spelled": DiffGuard(model=tiny_unet, **dict(base, variant="code", timestep_spacing="leading", aes_psnr_db=6.39,
                                                         aes_dists_sim=0.37, forback_skip=2, guidance_target="x0",
                                                         reference="input")),
            "code": DiffGuard(model=tiny_unet, **dict(base, variant="code"))}
    metric = dets["paper"]._metric("dists")  # random-weight DISTS: one network for all three
    for det in dets.values():
        det._perceptual = {"dists": metric}
    paper, spelled, code = (dets[k].statistics(net, x) for k in ("paper", "spelled", "code"))
    torch.testing.assert_close(paper["sim_dists"], spelled["sim_dists"], rtol=0, atol=0)
    assert not torch.allclose(paper["sim_dists"], code["sim_dists"])  # the variant really changes the score


@pytest.mark.parametrize("preset, expect", [
    ("gdm_imagenet", dict(variant="code", reference="uncond", aes_psnr=("legacy", 48.5), aes_dists_sim=0.38,
                          forback_skip=3, guidance_target="x0_blend")),
    ("ldm_imagenet", dict(variant="code", cam_cut=0.3, clean_level="alpha0",
                          inversion_convention="target", timestep_spacing="ldm")),
    ("cifar10", dict(variant="paper", cam_cut=None, clean_level="first_step",
                     inversion_convention="source", timestep_spacing="leading")),
])
def test_presets_resolve_to_the_documented_behaviour(preset, expect):
    import yaml

    from openood_diffguard.fusion.presets import preset_dir

    cfg = yaml.safe_load((preset_dir() / f"diffguard_{preset}.yml").read_text())  # the package's presets
    eff = DiffGuard(**cfg["postprocessor"]["postprocessor_args"]).effective_params()
    assert {k: eff[k] for k in expect} == expect


# ---------------------------------------------------------------- the LDM sampler, transcribed (known answer)
def _ldm_reference(model, x, y, ts, w):
    """DiffGuard's LDMWrapper.diffuse + denoise on a pixel model, transcribed from its vendored latent-diffusion:
    DDIMForward (eps at tau_i, from alphas_prev[i] to alphas[i]) then DDIMSampler (global CFG), in float64,
    with make_ddim_sampling_parameters' alphas / alphas_prev (alphas_prev[0] = alpha_bar[0])."""
    a = model.schedule.alphas_cumprod.double()
    alphas = a[ts]
    alphas_prev = torch.cat([a[:1], a[ts[:-1]]])
    null = torch.full((len(x),), model.null_class)
    x = x.double()
    for i, t in enumerate(ts.tolist()):
        e = model.eps(x, torch.full((len(x),), t), null).double()
        x0 = (x - (1 - alphas_prev[i]).sqrt() * e) / alphas_prev[i].sqrt()
        x = alphas[i].sqrt() * x0 + (1 - alphas[i]).sqrt() * e
    latent = x.clone()
    for i in reversed(range(len(ts))):
        t = torch.full((len(x),), int(ts[i]))
        e_u, e_c = model.eps(x, t, null).double(), model.eps(x, t, y).double()
        e = e_u + w * (e_c - e_u)
        x0 = (x - (1 - alphas[i]).sqrt() * e) / alphas[i].sqrt()
        x = alphas_prev[i].sqrt() * x0 + (1 - alphas_prev[i]).sqrt() * e
    return latent, x


@pytest.mark.parametrize("steps, grid", [(25, list(range(1, 1000, 40))), (30, list(range(1, 992, 33)))])
def test_cfg_code_variant_equals_the_ldm_sampler(steps, grid):
    from openood_diffguard.diffusion import NoiseSchedule

    ldm_schedule = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195})
    known, clf, x, _ = _mixture(ldm_schedule)
    x = x[::15][:12]  # ID and OOD samples
    det = DiffGuard(model=known, guidance="cfg", variant="code", num_steps=steps, cfg_scale=3.0, cam_cut=False,
                    normalization=None, diffusion_size=None, score_size=None, similarities=("logits_l1",),
                    similarity="logits_l1")
    syn = det.synthesise(clf, x)
    latent, ref = _ldm_reference(known, x, syn["pred"], torch.tensor(grid), 3.0)
    torch.testing.assert_close(syn["latents"].double(), latent, rtol=0, atol=2e-4)
    torch.testing.assert_close(syn["synthesis"].double(), ref.clamp(-1, 1), rtol=0, atol=2e-4)
    # the reference discriminates: a textbook clean level (alpha_bar = 1 instead of LDM's 0.9985) is 10x off
    one = DiffGuard(model=known, **dict(det.params, clean_level="one")).synthesise(clf, x)
    assert (one["synthesis"].double() - ref.clamp(-1, 1)).abs().max() > 2e-3


# ---------------------------------------------------------------- resize antialias (torchvision versions)
@pytest.mark.parametrize("antialias", [False, True])
def test_score_resize_is_torchvisions_tensor_resize(antialias):
    import torchvision.transforms as T

    det = DiffGuard(score_size=24, score_antialias=antialias)
    px = torch.rand(2, 3, 32, 32) * 2.4 - 1.2  # the official code resizes first, then clamps
    ours = det._score_pixels(px)
    official = T.Resize(24, antialias=antialias)(px).clamp(-1, 1) * 0.5 + 0.5  # postprocess, then minus_1_1_to_01
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-6)
    other = DiffGuard(score_size=24, score_antialias=not antialias)._score_pixels(px)
    assert (other - ours).abs().max() > 1e-2  # the torchvision version matters when downsizing


# ---------------------------------------------------------------- validation
BAD_PARAMS = [
    ("num_steps", 0), ("steps_offset", -1), ("inversion_refine", -1), ("max_inversion_steps", 0), ("forback_skip", 0),
    ("cutouts", -1), ("cutout_min_fraction", 0.0), ("cutout_min_fraction", 1.5), ("cutout_seed", -1),
    ("classifier_scale", -1.0), ("cfg_scale", -0.5), ("cam_cut", 1.5), ("cam_cut", True), ("aes_dists_sim", True),
    ("aes_psnr_db", True), ("aes_psnr_db", math.nan), ("score_size", 0), ("diffusion_size", 0), ("num_classes", 0),
    ("oracle_seed", -1), ("variant", "codes"), ("timestep_spacing", "lead"), ("clean_level", "zero"),
    ("inversion_convention", "middle"), ("guidance_target", "x1"), ("reference", "both"), ("similarity", "psnr"),
    ("guidance", "both"), ("label_mode", "gt"), ("model_type", "vae"), ("dtype", "fp16"), ("cam_layer", ""),
    ("num_steps", "25"), ("score_antialias", "yes"),
]


@pytest.mark.parametrize("name, value", BAD_PARAMS)
def test_every_parameter_is_validated_at_construction(name, value):
    path = {} if name in DiffGuardGDM.DEFAULTS else {"guidance": "cfg"}  # built on the path that has it
    with pytest.raises(ParameterError, match=f"parameter '{name}' must"):
        DiffGuard(**{name: value, **path})


def test_contradictory_parameters_are_rejected():
    with pytest.raises(ParameterError, match="aes_psnr_db.*aes_psnr_legacy"):
        DiffGuard(aes_psnr_db=6.0, aes_psnr_legacy=48.5)
    with pytest.raises(ParameterError, match="clean_level 'one'"):
        DiffGuard(clean_level="one", inversion_convention="source")
    with pytest.raises(ParameterError, match="'reference' belongs to DiffGuard's 'classifier' path"):
        DiffGuard(guidance="cfg", reference="uncond")  # the classifier-free path always compares with the input
    det = DiffGuard(guidance="cfg")
    with pytest.raises(ParameterError, match="cam_cut"):
        det.set_params(cam_cut=2.0)
    assert det.params["cam_cut"] is None  # a rejected change leaves the detector as it was


def test_bad_batches_raise_before_anything_is_cached(tiny_unet, tmp_path):
    net = TinyNet().eval()
    det = DiffGuard(model=tiny_unet, **GDM)
    x = _images(2)
    with pytest.raises(ValueError, match="empty batch"):
        det.statistics(net, x[:0])
    with pytest.raises(ValueError, match="NaN"):
        det.statistics(net, torch.where(torch.arange(2).view(2, 1, 1, 1) == 1, torch.nan, x))
    with pytest.raises(ValueError, match="normalised"):
        det.statistics(net, IMAGENET.to_unit(x) * 255)  # [0, 255] pixels
    store = ScoreCache(tmp_path, "ns")
    batches = [{"data": torch.full_like(x, float("nan")), "label": torch.zeros(2, dtype=torch.long), "index": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match="NaN"):
        cached_statistics(det, net, batches, store, progress=False)
    assert len(ScoreCache(tmp_path, "ns")) == 0


def test_cfg_guard_against_guiding_toward_the_null_class(schedule):
    known, clf, x, _ = _mixture(schedule)  # 3 real classes, null class 3
    four = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()  # one class more than the model has
    with torch.no_grad():
        four[1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # it predicts class 3 = the model's null row
    det = DiffGuard(model=known, guidance="cfg", cam_cut=False, normalization=None, diffusion_size=None, score_size=None,
                    num_steps=5, similarities=("logits_l1",), similarity="logits_l1")
    with pytest.raises(ValueError, match="4 classes.*3 real classes.*null class"):
        det.statistics(four, x[:2])
    with pytest.raises(ValueError, match="null class"):
        DiffGuard(model=known, **dict(det.params, num_classes=4)).setup(four)
    assert det.statistics(clf, x[:2])["pred"].max() < 3  # the matching classifier is fine


# ---------------------------------------------------------------- batch independence
def test_cfg_path_score_does_not_depend_on_the_batch(tiny_ldm):
    net = TinyNet().eval()
    x = _images(4, seed=3)
    det = DiffGuard(model=tiny_ldm, **LATENT)  # variant code: LDM grid, alpha_bar[0], Grad-CAM mask 0.3
    whole = det.statistics(net, x)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = det.statistics(net, x[perm])
    torch.testing.assert_close(shuffled["sim_dists"], whole["sim_dists"][perm], rtol=1e-4, atol=1e-4)
    for b in (0, 3):
        alone = det.statistics(net, x[b:b + 1])
        torch.testing.assert_close(alone["sim_dists"], whole["sim_dists"][b:b + 1], rtol=1e-4, atol=1e-4)


def test_oracle_labels_come_from_the_sample_not_its_position(tiny_unet):
    x = _images(5, seed=4)
    labels = content_labels(x, 5, seed=0)
    assert content_labels(x.flip(0), 5, seed=0).tolist() == labels.flip(0).tolist()
    assert content_labels(x[2:3], 5, seed=0).item() == labels[2].item()
    assert content_labels(x, 5, seed=1).tolist() != labels.tolist() or content_labels(x, 5, seed=2).tolist() != labels.tolist()
    many = content_labels(_images(400, side=4, seed=5), 5, seed=0)
    assert np.bincount(many.numpy(), minlength=5).min() > 50  # spread over all classes
    with pytest.warns(UserWarning, match="analysis only"):
        det = DiffGuard(model=tiny_unet, **dict(GDM, label_mode="oracle"))
    ood = torch.full((5,), -1)
    g1 = det._guide_labels(x, torch.zeros(5, dtype=torch.long), ood, 5)
    g2 = det._guide_labels(x.flip(0), torch.zeros(5, dtype=torch.long), ood, 5)
    assert g2.tolist() == g1.flip(0).tolist()
    gt = det._guide_labels(x, torch.zeros(5, dtype=torch.long), torch.tensor([4, -1, 0, -1, 2]), 5)
    assert gt[[0, 2, 4]].tolist() == [4, 0, 2] and gt[[1, 3]].tolist() == g1[[1, 3]].tolist()
    with pytest.raises(ValueError, match="labels for 5 images"):
        det._guide_labels(x, torch.zeros(5, dtype=torch.long), torch.zeros(3, dtype=torch.long), 5)
