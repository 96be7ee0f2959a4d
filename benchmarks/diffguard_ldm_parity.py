"""Numerical parity of DiffGuard's latent (LDM) path with the official implementation (cure-lab/DiffGuard).

    python benchmarks/diffguard_ldm_parity.py --official <cure-lab/DiffGuard checkout> \
        --taming <CompVis/taming-transformers checkout> [--n 40] [--steps 25 30] [--out <report.md>]

Needs ``einops`` and ``omegaconf`` (the official LDM code imports them). The official code is imported from
the local checkouts (never vendored here) and runs unmodified from model loading to the score:

- official: its vendored latent-diffusion (``ldm/``: ``LatentDiffusion``, ``DDIMForward`` for the inversion,
  ``DDIMSampler`` with the activation map for the masked CFG), ``ood_tester.latent_diffusion_model.LDMWrapper``
  (loads the model from a yml + ckpt, diffuse / denoise, Grad-CAM mask with its vendored pytorch-grad-cam),
  the classifier wrapper ``normalize_model`` and the score ``DistReverseWrapper(piq.DISTS)`` of
  ``ood_tester.test_runner``, i.e. 1 - DISTS(input, synthesis) on [0, 1] images;
- ours: the checkpoint converted with the package's ``convert ldm`` code path, loaded with ``load_ldm``, one
  batched ``DiffGuard.statistics`` call with ``guidance: cfg, variant: code``.

Both sides share one randomly initialised, perturbed, reduced cin256-v2 (spatial transformers, VQ-f4, 1001-row
class table with the null row 1000 that ``LDMWrapper`` hard-codes), one random torchvision ResNet18 and one
random-weight DISTS (piq's own forward on the official side). Stubs: ``pytorch_lightning`` (LightningModule =
nn.Module with ``.device``), ``kornia`` and ``guided_diffusion.dist_util`` (imported, never used on this
path); the samplers' ``register_buffer`` moves every buffer to CUDA, so it is replaced by a plain setattr,
and ``Tensor.cuda`` is the identity (the mask is moved with ``.cuda()``): device plumbing only, no arithmetic.
``torchvision.models.resnet.load_state_dict_from_url`` / ``model_urls`` (imported by the official classifier
module, gone from current torchvision, used only for downloads) are restored as ``torch.hub``'s function / {}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import openood_diffguard  # noqa: E402,F401  (repairs torchvision before anything imports it)

from _parity import (agreement, agreement_header, agreement_row, stub_dist_util, stub_module, varied_images,  # noqa: E402
                     write_report)

from openood_diffguard.convert import ldm as ldm_convert  # noqa: E402
from openood_diffguard.detectors.diffguard import DiffGuard  # noqa: E402
from openood_diffguard.diffusion import load_ldm  # noqa: E402
from openood_diffguard.similarity import PerceptualDistance  # noqa: E402
from openood_diffguard.space import ImageSpace  # noqa: E402

# reduced cin256-v2 (useful_data/ldm-cin256-v2.yaml): same blocks, smaller widths; 1001 classes (null = 1000)
LAT, CH, MULT, CTX, N_EMBED, VQ_CH = 16, 32, (1, 2, 3), 16, 64, 32
NUM_CLASSES = 10  # the classifier's classes (a subset of the model's 1000 real rows)


def model_config() -> dict:
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
        "first_stage_key": "image", "cond_stage_key": "class_label", "image_size": LAT, "channels": 3,
        "cond_stage_trainable": True, "conditioning_key": "crossattn", "monitor": "val/loss", "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": LAT, "in_channels": 3, "out_channels": 3, "model_channels": CH, "attention_resolutions": [4, 2],
            "num_res_blocks": 2, "channel_mult": list(MULT), "num_heads": 1, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": CTX}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": N_EMBED, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": LAT * 4, "in_channels": 3, "out_ch": 3, "ch": VQ_CH,
                "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 1001, "embed_dim": CTX, "key": "class_label"}}}}}


FLAGS = dict(image_size=LAT, model_channels=CH, attention_resolutions=(4, 2), num_res_blocks=2, channel_mult=MULT,
             num_heads=1, context_dim=CTX, n_classes=1001, vq_n_embed=N_EMBED, vq_ch=VQ_CH, vq_resolution=LAT * 4)


def install_official(official: Path, taming: Path) -> None:
    class LightningModule(nn.Module):
        @property
        def device(self):
            return next(self.parameters()).device

    pl = stub_module("pytorch_lightning", LightningModule=LightningModule)
    pl.utilities = stub_module("pytorch_lightning.utilities")
    pl.utilities.distributed = stub_module("pytorch_lightning.utilities.distributed", rank_zero_only=lambda f: f)
    stub_module("kornia")
    stub_dist_util()
    for p in (taming, official / "external" / "pytorch-grad-cam", official):
        sys.path.insert(0, str(p))
    import pytorch_grad_cam  # the copy vendored in external/ (the README symlinks it as external/pytorch_grad_cam)

    sys.modules["external.pytorch_grad_cam"] = pytorch_grad_cam
    from ldm.models.diffusion import ddim

    for cls in (ddim.DDIMSampler, ddim.DDIMForward):
        cls.register_buffer = lambda self, name, attr: setattr(self, name, attr)
    torch.Tensor.cuda = lambda self, *a, **k: self
    import torchvision.models.resnet as tv_resnet

    tv_resnet.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # names torchvision 0.11 still exported
    tv_resnet.model_urls = {}  # (used only to download pretrained weights, never here)


def build_checkpoint(tmp: Path, seed: int) -> tuple[Path, Path]:
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(model_config())
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # perturb every weight: zero-initialised output layers must not stay zero
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=g))
    yml, ckpt = tmp / "ldm.yaml", tmp / "model.ckpt"
    OmegaConf.save(cfg, yml)
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return yml, ckpt


def classifier(seed: int) -> nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    net = resnet18(num_classes=NUM_CLASSES).eval()
    with torch.no_grad():  # spread the random net's predictions over the classes
        net.fc.bias.copy_(torch.linspace(-0.5, 0.5, NUM_CLASSES)[torch.randperm(NUM_CLASSES)])
    return net


def official_scores(wrapper, clf01, dists, images_pm1: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """run_on_loader's steps for one loader: pred -> LDMWrapper -> 1 - DISTS(input, synthesis)."""
    from ood_tester.test_runner import DistReverseWrapper
    from ood_tester.utils import minus_1_1_to_01

    score_fn = DistReverseWrapper(dists.metric, True)  # piq.DISTS.forward itself
    out = {"score": [], "pred": [], "latent": [], "mask": []}
    with torch.no_grad():
        for image in images_pm1.split(batch):
            pred = clf01(minus_1_1_to_01(image)).argmax(-1)
            recon = wrapper(image, pred)
            out["score"].append(score_fn(minus_1_1_to_01(image), minus_1_1_to_01(recon)))
            out["pred"].append(pred)
            out["latent"].append(wrapper.diffuse(image, pred))  # diagnostics: the inverted latent, the DSG mask
            out["mask"].append(wrapper.get_activation_map(image, pred)[:, :1])
    return {k: torch.cat(v) for k, v in out.items()}


def run(args) -> list[str]:
    from ood_tester.classifier_model import normalize_model
    from ood_tester.latent_diffusion_model import LDMWrapper
    from external.pytorch_grad_cam import grad_cam
    from omegaconf import OmegaConf

    tmp = Path(tempfile.mkdtemp(prefix="diffguard_ldm_parity_"))
    yml, ckpt = build_checkpoint(tmp, args.seed)
    adapter = load_ldm(ldm_convert.convert(ckpt, tmp / "converted", ldm_convert.LDMFlags(**FLAGS)))
    net = classifier(args.seed)
    space = ImageSpace.for_dataset("imagenet")
    clf01 = normalize_model(net, mean=space.mean, std=space.std).eval()  # the official classifier takes [0, 1]
    cam = grad_cam.GradCAM(model=clf01, target_layers=[clf01.model.layer4[-1]], use_cuda=False)
    dists = PerceptualDistance("dists", pretrained=False, seed=args.seed)
    x01, groups = varied_images(args.n, LAT * 4, seed=args.seed)
    images = space.from_unit(x01)  # what OpenOOD hands a postprocessor
    lines = []
    for steps in args.steps:
        conf = OmegaConf.create(dict(ldm_config_path=str(yml), ldm_weight_path=str(ckpt), image_size=LAT * 4,
                                     input_size=LAT * 4, ddim_eta=0.0, ddim_steps=steps, denoise_guidance_scale=args.cfg,
                                     diffuse_guidance_scale=1.0, unconditional_diffuse=True, use_cam=True,
                                     cam_cut=args.cam_cut, batch_size=args.batch, process_method="pad"))
        wrapper = LDMWrapper(conf, cam=cam).to("cpu")
        t0 = time.time()
        off = official_scores(wrapper, clf01, dists, x01 * 2 - 1, args.batch)
        t_off = time.time() - t0
        base = dict(guidance="cfg", variant="code", num_steps=steps, normalization="imagenet", diffusion_size=None,
                    score_size=None, similarities=("dists",), pretrained_metrics=False, num_classes=NUM_CLASSES,
                    cfg_scale=args.cfg, cam_cut=args.cam_cut, model_type="ldm")
        runs = {"ours (variant: code)": {}}
        if args.ablations:
            runs.update({"clean level 1 instead of alpha_bar[0]": dict(clean_level="one"),
                         "diffusers leading grid (0, 40, ...)": dict(timestep_spacing="leading"),
                         "source-level inversion (paper Eq. 6)": dict(inversion_convention="source",
                                                                       clean_level="first_step"),
                         "CAM cut 0.2 (paper)": dict(cam_cut=0.2),
                         "no mask (global CFG)": dict(cam_cut=False),
                         "variant: paper": dict(variant="paper", cam_cut=None)})
        results = {}
        for name, over in runs.items():
            det = DiffGuard(model=adapter, **dict(base, **over))
            det._perceptual = {"dists": dists}
            t0 = time.time()
            with torch.enable_grad():  # Grad-CAM
                results[name] = (det.statistics(net, images), time.time() - t0)
        ours = DiffGuard(model=adapter, **base)
        ours._perceptual = {"dists": dists}
        with torch.enable_grad():
            syn = ours.synthesise(net, images)
        stats, t_ours = results["ours (variant: code)"]
        path = ours.paths()[1]
        lines += [f"### {steps} DDIM steps (official `ddim_steps: {steps}`)", "",
                  f"- path (variant code): {path.tolist()[:4]} ... {path.tolist()[-2:]}, {len(path) - 1} steps, "
                  "the clean level being alpha_bar[timestep 0]",
                  f"- predictions equal: {bool((stats['pred'] == off['pred']).all())} "
                  f"({len(set(off['pred'].tolist()))} distinct labels); inverted latents max |diff| "
                  f"{(syn['latents'] - off['latent']).abs().max().item():.2e} (max |latent| {off['latent'].abs().max().item():.2f})",
                  f"- DSG masks: {mask_agreement(ours, net, images, stats['pred'], off['mask']):.5f} of latent "
                  f"pixels equal; time: official {t_off:.1f} s (loader batches of {args.batch}), ours {t_ours:.1f} s "
                  f"(one batch of {args.n})", "", agreement_header()]
        off_score = off["score"].numpy()
        for name, (st, _) in results.items():
            a = agreement(st["sim_dists"].numpy(), off_score, groups)
            lines.append(agreement_row(name + (" vs official" if name.startswith("ours") else ""), a))
            if name.startswith("ours"):
                main = a
        lines += ["", f"scores (official 1 - DISTS) span [{main['score_min']:.4f}, {main['score_max']:.4f}], "
                      f"{main['distinct_official']} distinct values of {main['n']}.", ""]
        print("\n".join(lines[-(len(results) + 6):]), flush=True)
        if not (main["spearman"] >= 0.999 and abs(main["auroc_delta"]) <= 0.1):
            lines.append(f"**FAILED the bar** (Spearman >= 0.999, |AUROC delta| <= 0.1) at {steps} steps.")
    return lines


def mask_agreement(det, net, images, pred, official_mask) -> float:
    """Share of latent pixels where our Grad-CAM mask equals the official activation map (nearest to the latent)."""
    from openood_diffguard.guidance.gradcam import GradCAM, cam_mask

    eff = det.effective_params()
    with torch.enable_grad():
        ours = cam_mask(GradCAM(net, eff["cam_layer"])(images, pred, size=LAT * 4), float(eff["cam_cut"]), LAT)
    off = torch.nn.functional.interpolate(official_mask.float(), size=(LAT, LAT))  # as p_sample_ddim does
    return float((ours == off).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="local checkout of cure-lab/DiffGuard")
    ap.add_argument("--taming", required=True, type=Path, help="local checkout of CompVis/taming-transformers "
                    "(the official repo's submodule, commit 3ba01b2)")
    ap.add_argument("--n", type=int, default=40, help="images (half smooth 'ID', half texture 'OOD')")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 30], help="DDIM steps (30: a count that does not "
                    "divide 1000, where the LDM grid has 31 steps)")
    ap.add_argument("--batch", type=int, default=16, help="the official side's loader batch")
    ap.add_argument("--cfg", type=float, default=10.0)
    ap.add_argument("--cam-cut", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    install_official(args.official.resolve(), args.taming.resolve())
    import logging

    logging.basicConfig(level=logging.WARNING)
    lines = run(args)
    if args.out:
        write_report(args.out, "DiffGuard LDM path vs the official implementation (numerical parity)",
                     "diffguard_ldm_parity.py", argv, "fp32", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
