"""Numerical parity of DiffGuard's GDM path with the official implementation (cure-lab/DiffGuard).

    python benchmarks/diffguard_official_parity.py --official /path/to/DiffGuard-checkout

The official code is imported from a local checkout (never vendored here). Same tiny random UNet
(6 output channels), classifier and random-weight DISTS on both sides, CPU, fp32. The official side runs
its own ``ddim_reverse_ode_loop`` (batched, AES with its 255-peak PSNR + DISTS rule), then per sample
(generator reset, bs 1 + unconditional twin) ``ddim_sample_loop`` with ``GuidedDiffusionModel.cond_fn``
(x0-blend gradient, seeded ``MakeCutouts``), then 1 - DISTS(x_uncond, x_syn). Ours: one batched
``DiffGuard.statistics`` call with ``aes_psnr_legacy``. Compared: stop steps, final latents, scores.
Stubs: ``blobfile``/``mpi4py``-using ``dist_util`` and ``omegaconf`` (unused on this path).
"""
from __future__ import annotations

import argparse
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import openood_diffguard  # noqa: E402,F401

from openood_diffguard.detectors.diffguard import DiffGuard  # noqa: E402
from openood_diffguard.diffusion import NoiseSchedule, UNetAdapter  # noqa: E402
from openood_diffguard.similarity import PerceptualDistance  # noqa: E402
from openood_diffguard.space import ImageSpace  # noqa: E402


def _stub_modules() -> None:
    dist_util = types.ModuleType("guided_diffusion.dist_util")
    dist_util.dev = lambda: torch.device("cpu")
    dist_util.load_state_dict = None
    sys.modules["guided_diffusion.dist_util"] = dist_util
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.OmegaConf = object
    sys.modules["omegaconf"] = omegaconf


class _Gen:
    def __init__(self, seed):
        self.seed = seed
        self.reset()

    def reset(self):
        self.rand_gen = torch.Generator().manual_seed(self.seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="local checkout of cure-lab/DiffGuard")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cap-skip", type=int, default=2, help="official early_stop_steps")
    ap.add_argument("--psnr255", type=float, default=56.1, help="official PSNR' threshold (255 peak on [-1,1])")
    ap.add_argument("--dists", type=float, default=0.2, help="official DISTS-similarity threshold")
    ap.add_argument("--n", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(args.official).resolve()))
    _stub_modules()
    import logging

    logging.basicConfig(level=logging.WARNING)  # the official loginfo needs a configured root logger
    from diffusers import UNet2DModel
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion import metrics as official_metrics
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps
    from ood_tester.cutout import MakeCutouts
    from ood_tester.guided_diffusion_model import GuidedDiffusionModel
    from torchvision.models import resnet18

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    net = resnet18(num_classes=10).eval()
    space = ImageSpace.for_dataset("imagenet", diffusion_size=32)
    dists = PerceptualDistance("dists", pretrained=False)
    g = torch.Generator().manual_seed(0)
    contrast = torch.linspace(0.1, 1.0, args.n).view(-1, 1, 1, 1)
    images = space.from_unit(0.5 + (torch.rand(args.n, 3, 28, 28, generator=g) - 0.5) * contrast)

    # ---------------------------------------------------------------- ours, one batched call
    det = DiffGuard(model=UNetAdapter(unet, NoiseSchedule.from_config({"beta_schedule": "linear"})),
                    num_steps=args.steps, max_inversion_steps=args.steps - args.cap_skip, diffusion_size=32, score_size=28,
                    aes_psnr_legacy=args.psnr255, aes_dists_sim=args.dists, similarities=("dists",),
                    pretrained_metrics=False)
    det._perceptual = {"dists": dists}
    ours = det.statistics(net, images)

    # ---------------------------------------------------------------- official
    official_metrics._METRICS = {"psnr": official_metrics.PSNR(),
                                 "dists": official_metrics.PiqDistWrapper(dists.with_options(check_range=False), True)}
    diffusion = SpacedDiffusion(use_timesteps=space_timesteps(1000, f"ddim{args.steps}"),
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
    lrg = _Gen(100)
    fake = types.SimpleNamespace(diffusion=diffusion, model_fn=model_fn, no_x0_hat=False,
                                 make_cutouts=MakeCutouts(28, 8, out_size=28, local_rand_gen=lrg),
                                 config=types.SimpleNamespace(classifier_scale=3.0))
    mean = torch.tensor(space.mean).view(1, 3, 1, 1)
    std = torch.tensor(space.std).view(1, 3, 1, 1)
    clf01 = lambda u: net((u - mean) / std)  # noqa: E731  (official classifier takes [0, 1])
    cond_fn = partial(GuidedDiffusionModel.cond_fn, fake, classifier=clf01)
    scores = []
    for b in range(args.n):
        lrg.reset()
        y = net(images[b:b + 1]).argmax(1)
        skip = max(0, args.steps - int(rev_t[b]) - 3)
        out = diffusion.ddim_sample_loop(model_fn, noise=xT[b:b + 1].repeat(2, 1, 1, 1), clip_denoised=True,
                                         model_kwargs={"y": torch.cat([y, -torch.ones_like(y)])}, cond_fn=cond_fn,
                                         device="cpu", skip_first_steps=skip)
        syn, unc = out[:1], out[1:]
        u = lambda v: F.interpolate(v, size=28, mode="bilinear", align_corners=False).clamp(-1, 1) * 0.5 + 0.5  # noqa: E731
        scores.append(1 - dists.with_options().distance(u(syn), u(unc)))
    official = torch.cat(scores)
    print("stop index  ours", ours["stop_index"].tolist(), " official rev_t + 1", (rev_t + 1).tolist())
    print("1 - DISTS   ours", [f"{v:.6f}" for v in ours["sim_dists"].tolist()])
    print("            official", [f"{v:.6f}" for v in official.tolist()])
    print("max |diff|", (ours["sim_dists"] - official).abs().max().item())
    return 0


if __name__ == "__main__":
    sys.exit(main())
