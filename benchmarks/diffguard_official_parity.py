"""Numerical parity of DiffGuard's GDM path with the official implementation (cure-lab/DiffGuard).

    python benchmarks/diffguard_official_parity.py --official /path/to/DiffGuard-checkout [--n 40] [--steps 20 30]

The official code is imported from a local checkout (never vendored here). Same tiny random UNet
(6 output channels), classifier and random-weight DISTS on both sides, CPU, fp64 by default (``--dtype``). The official side runs
its own ``ddim_reverse_ode_loop`` (batched, AES with its 255-peak PSNR + DISTS rule) on
``SpacedDiffusion(space_timesteps(1000, "ddimN"))``, then per sample (generator reset, bs 1 + unconditional
twin) ``ddim_sample_loop`` with ``GuidedDiffusionModel.cond_fn`` (x0-blend gradient, seeded ``MakeCutouts``),
then 1 - DISTS(x_uncond, x_syn). Ours: one batched ``DiffGuard.statistics`` call, ``variant: code``.
Compared: stop steps, scores (Spearman, AUROC on a fixed two-group labelling, max |diff|). 30 steps do not
divide 1000: guided-diffusion's ddim30 uses stride 34 (0, 34, ..., 986), which ``variant: code`` reproduces.
Stubs: ``blobfile``/``mpi4py``-using ``dist_util`` and ``omegaconf`` (unused on this path).
"""
from __future__ import annotations

import argparse
import math
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import openood_diffguard  # noqa: E402,F401

from _parity import (agreement, agreement_header, agreement_row, stub_dist_util, stub_module, varied_images,  # noqa: E402
                     write_report)

from openood_diffguard.detectors.diffguard import DiffGuard  # noqa: E402
from openood_diffguard.diffusion import NoiseSchedule, UNetAdapter  # noqa: E402
from openood_diffguard.similarity import PerceptualDistance  # noqa: E402
from openood_diffguard.space import ImageSpace  # noqa: E402


class _Gen:
    def __init__(self, seed):
        self.seed = seed
        self.reset()

    def reset(self):
        self.rand_gen = torch.Generator().manual_seed(self.seed)


def smooth_(net: torch.nn.Module) -> torch.nn.Module:
    """ReLU -> SiLU and max-pool -> average pool in place: a classifier whose gradient has no kinks."""
    for mod in list(net.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(mod, name, torch.nn.SiLU())
            elif isinstance(child, torch.nn.MaxPool2d):
                setattr(mod, name, torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return net


def official_run(args, steps, unet, net, space, dists, images):
    """exp6.1's GuidedDiffusionModel.diffuse / denoise on ``images`` (normalised); returns (rev_t + 1, scores)."""
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion import metrics as official_metrics
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps
    from ood_tester.cutout import MakeCutouts
    from ood_tester.guided_diffusion_model import GuidedDiffusionModel

    official_metrics._METRICS = {"psnr": official_metrics.PSNR(),
                                 "dists": official_metrics.PiqDistWrapper(dists.with_options(check_range=False), True)}
    diffusion = SpacedDiffusion(use_timesteps=space_timesteps(1000, f"ddim{steps}"),
                                betas=gd.get_named_beta_schedule("linear", 1000), model_mean_type=gd.ModelMeanType.EPSILON,
                                model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)

    def model_fn(x, t, y=None):
        return unet(x, t).sample

    x0 = space.to_pixels(images)
    with torch.no_grad():
        xT, rev_t = diffusion.ddim_reverse_ode_loop(model_fn, x0, clip_denoised=True, model_kwargs={}, cond_fn=None,
                                                    device="cpu", early_stop_steps=args.cap_skip,
                                                    early_stop_metric=["psnr", "dists"],
                                                    early_stop_thresh=[args.psnr255, args.dists], aux=True)
    side = images.shape[-1]
    lrg = _Gen(100)
    fake = types.SimpleNamespace(diffusion=diffusion, model_fn=model_fn, no_x0_hat=False,
                                 make_cutouts=MakeCutouts(side, 8, out_size=side, local_rand_gen=lrg),
                                 config=types.SimpleNamespace(classifier_scale=args.scale))
    mean = torch.tensor(space.mean).view(1, 3, 1, 1)
    std = torch.tensor(space.std).view(1, 3, 1, 1)
    clf01 = lambda u: net((u - mean) / std)  # noqa: E731  (official classifier takes [0, 1])
    cond_fn = partial(GuidedDiffusionModel.cond_fn, fake, classifier=clf01)
    scores = []
    for b in range(len(images)):
        lrg.reset()
        y = net(images[b:b + 1]).argmax(1)
        skip = max(0, steps - int(rev_t[b]) - 3)
        out = diffusion.ddim_sample_loop(model_fn, noise=xT[b:b + 1].repeat(2, 1, 1, 1), clip_denoised=True,
                                         model_kwargs={"y": torch.cat([y, -torch.ones_like(y)])}, cond_fn=cond_fn,
                                         device="cpu", skip_first_steps=skip)
        syn, unc = out[:1], out[1:]
        u = lambda v: F.interpolate(v, size=side, mode="bilinear", align_corners=False).clamp(-1, 1) * 0.5 + 0.5  # noqa: E731
        scores.append(1 - dists.with_options().distance(u(syn), u(unc)))
    return rev_t + 1, torch.cat(scores)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="local checkout of cure-lab/DiffGuard")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 30])
    ap.add_argument("--cap-skip", type=int, default=2, help="official early_stop_steps")
    ap.add_argument("--psnr255", type=float, default=56.1, help="official PSNR' threshold (255 peak on [-1,1])")
    ap.add_argument("--dists", type=float, default=0.2, help="official DISTS-similarity threshold")
    ap.add_argument("--scale", type=float, default=30.0, help="classifier_scale on both sides (exp6.1: 3; the smooth "
                    "random classifier has ~10x weaker gradients, so 30 makes the scores vary)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--dtype", choices=("fp32", "fp64"), default="fp64",
                    help="precision of the UNet, classifier and images on both sides (DISTS stays fp32)")
    ap.add_argument("--classifier", choices=("smooth", "relu"), default="smooth",
                    help="relu: torchvision's ResNet18; smooth: the same with SiLU and average pooling. ReLU / max-pool "
                         "kinks make the guidance gradient discontinuous, so last-bit differences (fp32 rounding, the "
                         "official float32 schedule constants) now and then move a trajectory by ~1e-4")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(args.official).resolve()))
    stub_dist_util()
    stub_module("omegaconf", OmegaConf=object)
    import logging

    logging.basicConfig(level=logging.WARNING)  # the official loginfo needs a configured root logger
    from diffusers import UNet2DModel
    from torchvision.models import resnet18

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    net = resnet18(num_classes=10).eval()
    if args.classifier == "smooth":
        smooth_(net)
    space = ImageSpace.for_dataset("imagenet", diffusion_size=32)
    dists = PerceptualDistance("dists", pretrained=False)
    x01, groups = varied_images(args.n, 28, seed=0)
    images = space.from_unit(x01)
    if args.dtype == "fp64":
        unet, net, images = unet.double(), net.double(), images.double()
    lines = []
    for steps in args.steps:
        base = dict(variant="code", num_steps=steps, max_inversion_steps=steps - args.cap_skip, diffusion_size=32,
                    score_size=28, aes_psnr_legacy=args.psnr255, aes_dists_sim=args.dists, similarities=("dists",),
                    pretrained_metrics=False, classifier_scale=args.scale)
        runs = {"ours (variant: code)": {}}
        if args.ablations:
            runs.update({"PSNR in dB, peak 2 (paper's unit)": dict(aes_psnr_legacy=None,
                                                                   aes_psnr_db=args.psnr255 - 20 * math.log10(127.5)),
                         "forback_skip 2 (paper)": dict(forback_skip=2),
                         "guidance on x0 (paper Eq. 7)": dict(guidance_target="x0"),
                         "reference = input (paper)": dict(reference="input"),
                         "antialiased score resize (torchvision >= 0.17)": dict(score_antialias=True),
                         "diffusers leading grid": dict(timestep_spacing="leading")})
        model = UNetAdapter(unet, NoiseSchedule.from_config({"beta_schedule": "linear"}))
        results = {}
        for name, over in runs.items():
            det = DiffGuard(model=model, **dict(base, **over))
            det._perceptual = {"dists": dists}
            results[name] = det.statistics(net, images)
        ours = results["ours (variant: code)"]
        stop_off, official = official_run(args, steps, unet, net, space, dists, images)
        grid = DiffGuard(model=model, **base).paths()[0].tolist()
        lines += [f"### DDIM-{steps} (grid {grid[:3]} ... {grid[-1]}, {len(grid)} steps, cap {steps - args.cap_skip} "
                  "inversion steps)", ""]
        table = [agreement_header("stop steps equal")]
        for name, st in results.items():
            a = agreement(st["sim_dists"].numpy(), official.numpy(), groups)
            same = int((st["stop_index"] == stop_off).sum())
            table.append(agreement_row(name + (" vs official" if name.startswith("ours") else ""), a, f"{same}/{args.n}"))
            if name.startswith("ours"):
                main_row, main_same = a, same
        lines += [f"- stop steps equal: {main_same}/{args.n}; {len(set(stop_off.tolist()))} distinct official stop "
                  f"steps ({sorted(set(stop_off.tolist()))})", ""] + table + [
                  "", f"scores span [{main_row['score_min']:.4f}, {main_row['score_max']:.4f}], "
                      f"{main_row['distinct_official']} distinct values.", ""]
        print("\n".join(lines[-(len(table) + 6):]), flush=True)
        if not (main_same == args.n and main_row["spearman"] >= 0.999 and abs(main_row["auroc_delta"]) <= 0.1):
            lines.append(f"**FAILED the bar** (equal stops, Spearman >= 0.999, |AUROC delta| <= 0.1) at {steps} steps.")
    if args.out:
        write_report(args.out, "DiffGuard GDM path vs the official implementation (numerical parity)",
                     "diffguard_official_parity.py", argv, f"{args.dtype}, {args.classifier} ResNet18", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
