"""LFDN scoring speed (samples/s) on ResNet50-sized features (stages 1-3: 256 + 512 + 1024 = 1792-d), paper-size
LFDN (width 1440, 16 blocks), t = 3, final + first-epoch models (all three scores). LFDN calls per sample and
model: ``variant: code`` (default) 2 (the released sampler's third call is an identity), ``ours`` 4 (3 DDIM steps +
the step to the clean level), ``paper`` 1-4 (random stride). Random weights. The classifier's forward pass is not included: OpenOOD runs
it anyway; here a stub returns precomputed feature maps. H100 target: >= 10,000 samples/s.
    python benchmarks/lfdn_speed.py --dtype bf16 --out benchmarks/results/lfdn_h100.md
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout first
import openood_diffguard  # noqa: E402,F401
import torch  # noqa: E402
from _speed import parse_speed_args, speed_parser, statistics_runner, throughput, write_report  # noqa: E402

from openood_diffguard.detectors.lfdn import LFDN  # noqa: E402
from openood_diffguard.features import FeatureStandardizer  # noqa: E402
from openood_diffguard.networks import LFDNet  # noqa: E402

WIDTHS = [256, 512, 1024]  # ResNet50 stages 1-3 (lfdn_imagenet); ResNet18 stages 1-4: [64, 128, 256, 512]


class FeatureStub(torch.nn.Module):
    """Returns (logits, [f1, ...]) for images [B, 1, 1, sum(widths)]: pre-pooled [B, D_i, 1, 1] feature maps."""

    def __init__(self, widths=tuple(WIDTHS)) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.bounds = [0, *torch.tensor(widths).cumsum(0).tolist()]

    def forward(self, x, return_feature_list=False):
        x = x.flatten(1)
        b = self.bounds
        feats = [x[:, b[i]:b[i + 1], None, None] for i in range(len(b) - 1)]
        return x[:, :10], feats


def build(width: int, blocks: int, timesteps: list[int], first: bool, device: torch.device, widths=tuple(WIDTHS),
          dtype: str | None = None, variant: str = "code"):
    """(detector, feature stub, features(bs), LFDN denoiser, denoiser forwards per sample) with random weights;
    ``dtype``: the detector's dtype parameter (bf16 = autocast of the LFDN network)."""
    D = sum(widths)
    det = LFDN(variant=variant, layers=list(range(1, len(widths) + 1)), timesteps=timesteps, dtype=dtype,
               normalization=None)
    std = FeatureStandardizer(torch.zeros(D), torch.ones(D), list(widths)) if variant == "ours" else None
    det.set_models(LFDNet(D, width, blocks).to(device), LFDNet(D, width, blocks).to(device) if first else None,
                   widths=list(widths), standardizer=std)

    def features(bs: int) -> torch.Tensor:  # images [B, 1, 1, D] inside the normalised pixel range (checked)
        return torch.rand(bs, 1, 1, D, device=device) * 2 - 1

    calls = {"code": max(timesteps) - 1, "ours": max(timesteps) + 1, "paper": max(timesteps) + 1}[variant]
    return det, FeatureStub(widths).to(device), features, det.final, calls * (2 if first else 1)


def main(argv=None) -> int:
    p = speed_parser(__doc__, full_default=True, batch_sizes=[256, 1024, 4096, 16384], dtypes=("fp32", "bf16"))
    p.add_argument("--width", type=int, default=None, help="default: 1440 (--full), 64 (--tiny)")
    p.add_argument("--blocks", type=int, default=None, help="default: 16 (--full), 2 (--tiny)")
    p.add_argument("--timesteps", default="3")
    p.add_argument("--no-first", action="store_true", help="skip the first-epoch model (no LR score: half the cost)")
    p.add_argument("--variant", default="code", choices=("code", "paper", "ours"))
    a, device = parse_speed_args(p, argv)
    if a.compile is not None:
        p.error("--compile: LFDN is a small MLP without a compile option (only --dtype bf16 autocast)")
    a.width = a.width or (1440 if a.full else 64)
    a.blocks = a.blocks or (16 if a.full else 2)
    rates = {}
    for precision in a.dtype:  # LFDN is a small MLP: autocast only (no cast / compile)
        det, net, make_features, _, _ = build(a.width, a.blocks, [int(t) for t in a.timesteps.split(",")],
                                              not a.no_first, device, dtype=None if precision == "fp32" else precision,
                                              variant=a.variant)
        rates[precision] = throughput(statistics_runner(det, net, make_features), a.batch_sizes, device, a.seconds)
    n_params = sum(p.numel() for p in det.final.parameters()) / 1e6
    notes = [f"LFDN {n_params:.1f}M params (width {a.width}, {a.blocks} blocks, {sum(WIDTHS)}-d ResNet50 stages 1-3), "
             f"variant {a.variant}, timesteps {det.params['timesteps']}, eta {det.option('eta')}, "
             f"models: final{'' if a.no_first else ' + first-epoch'}", "classifier forward excluded (stub); random weights"]
    if a.out:
        write_report(a.out, "LFDN scoring speed", device, rates, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
