"""DiffNB scoring speed (images/s) at the best batch size; random weights (speed does not depend on them).

--full: the DiffNB CIFAR UNet (35.7M, 32x32), t = 300, R = 4, CFG (2 UNet rows per sample and step): the
H100 target is >= 200 img/s with --dtype bf16. Default: a tiny UNet so it runs anywhere in seconds.
    python benchmarks/diffnb_speed.py --full --dtype bf16 --out benchmarks/results/diffnb_h100.md
    python benchmarks/diffnb_speed.py --full --dtype bf16-cast --compile --out benchmarks/results/diffnb_h100_compiled.md
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout first
import openood_diffguard  # noqa: E402,F401  (repairs torchvision first)
import torch  # noqa: E402
from _speed import (PRECISIONS, compile_option, parse_speed_args, speed_parser, statistics_runner,  # noqa: E402
                    throughput, write_report)

from openood_diffguard.detectors.diffnb import DiffNB  # noqa: E402
from openood_diffguard.diffusion import NoiseSchedule, UNetAdapter  # noqa: E402
from openood_diffguard.training.diffusion import CIFAR_UNET, SCHEDULER, TINY_UNET, build_unet  # noqa: E402


def build(full: bool, precision: str, timesteps: list[int], repeats: int, device: torch.device, compile=False):
    """(detector, classifier, images(bs), UNet adapter, UNet sample-evaluations per image) with random weights.
    ``precision``: a key of ``_speed.PRECISIONS``; ``compile``: the detectors' ``compile`` parameter."""
    cfg = dict(CIFAR_UNET if full else {**TINY_UNET, "in_channels": 3, "sample_size": 32})
    C = 10
    unet = build_unet(cfg, C).to(device).eval()
    model = UNetAdapter(unet, NoiseSchedule.from_config(SCHEDULER))
    dtype, cast = PRECISIONS[precision]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, C)).to(device).eval()
    det = DiffNB(model, timesteps=timesteps, repeats=repeats, cfg_scale=3.0, normalization="cifar10",
                 dtype=None if dtype == "fp32" else dtype, cast_weights=cast, compile=compile)
    det.setup(net)  # applies dtype / cast / compile to the model
    size = cfg["sample_size"]

    def images(bs: int) -> torch.Tensor:
        return (torch.rand(bs, 3, size, size, device=device) - 0.49) / 0.25

    stride = det.params["stride"]  # grid 'code': t / stride steps; 'exact': one more (to the clean level)
    calls = sum(t // stride + (det.settings()["grid"] == "exact") for t in timesteps) * repeats * 2
    return det, net, images, model, calls


def main(argv=None) -> int:
    p = speed_parser(__doc__, batch_sizes=[8, 32, 64, 128, 256])
    p.add_argument("--timesteps", default="300")
    p.add_argument("--repeats", type=int, default=4)
    a, device = parse_speed_args(p, argv)
    ts = [int(t) for t in a.timesteps.split(",")]
    rates = {}
    for precision in a.dtype:
        det, net, make_images, model, calls = build(a.full, precision, ts, a.repeats, device, compile_option(a.compile))
        rates[precision] = throughput(statistics_runner(det, net, make_images), a.batch_sizes, device, a.seconds)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
    notes = [f"UNet {n_params:.1f}M params ({'full DiffNB CIFAR config' if a.full else 'tiny config'}), "
             f"compile={compile_option(a.compile)}, timesteps={ts}, R={a.repeats}, "
             f"CFG: {calls} UNet sample-evaluations per image",
             "random weights; classifier = tiny conv net (the UNet dominates)"]
    if a.out:
        write_report(a.out, "DiffNB scoring speed", device, rates, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
