"""Overhead of the diffusion core over the bare network.

ratio = (DDIM invert + synthesise wall time) / (model forwards x bare forward time at the same batch).
Target <= 1.10 at batch 32: the core must add almost nothing on top of the network.

    python benchmarks/core_overhead.py                      # tiny UNet on CPU
    python benchmarks/core_overhead.py --device cuda --unet path/to/diffusers_unet --batch 32
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

import openood_diffguard  # noqa: F401
from openood_diffguard.diffusion import DDIM, NoiseSchedule, UNetAdapter, load_unet
from openood_diffguard.guidance import model_eps


def tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=7)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", help="local diffusers UNet2DModel directory (default: tiny random UNet)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="append a markdown row to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    sched = NoiseSchedule.from_config({"beta_schedule": "linear"})
    model = load_unet(args.unet) if args.unet else UNetAdapter(tiny_unet().eval(), sched)
    model = model.to(device)
    size, ch = model.sample_size, model.in_channels
    x = torch.rand(args.batch, ch, size, size, device=device) * 2 - 1
    y = torch.randint(0, model.num_classes or 1, (args.batch,), device=device) if model.conditional else None
    levels = model.schedule.levels(model.schedule.timesteps(args.steps))
    ddim, eps = DDIM(model.schedule), model_eps(model)
    cond = {"y": y} if y is not None else {}
    t = torch.full((args.batch,), 500, device=device)

    with torch.no_grad():
        bare = timed(lambda: model.eps(x, t, y), device, args.repeats * 3)
        pipeline = timed(lambda: ddim.sample(eps, ddim.invert(eps, x, levels, cond=cond).latents, levels, cond=cond),
                         device, args.repeats)
    forwards = 2 * args.steps
    ratio = pipeline / (forwards * bare)
    params = sum(p.numel() for p in model.parameters())
    row = (f"| {datetime.date.today()} | {platform.processor() or platform.machine()} / {device} | "
           f"{'tiny random UNet' if not args.unet else args.unet} ({params / 1e6:.2f}M) | {args.batch} | {forwards} | "
           f"{bare * 1e3:.1f} ms | {pipeline * 1e3:.0f} ms | **{ratio:.3f}** |")
    print("| date | hardware | model | batch | forwards | bare forward | pipeline | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print(row)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(row + "\n")


if __name__ == "__main__":
    main()
