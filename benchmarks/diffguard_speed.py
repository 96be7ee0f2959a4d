"""DiffGuard throughput: images/s and model forwards per image for each preset, fp32 / bf16, on any device.

    python benchmarks/diffguard_speed.py --preset gdm dit cifar --batch-sizes 4 --dtype fp32 bf16        # tiny, CPU
    python benchmarks/diffguard_speed.py --full --preset gdm --batch-sizes 32 --dtype bf16 --out r.md   # GPU

Weights are random (speed does not depend on them; no checkpoint is needed). ``--full`` builds the exact
architectures: ADM-256 as ``convert adm`` lays it out (UNet2DModel, 552.8 M params), DiT-XL/2-256 + SD-VAE,
the DiffNB CIFAR UNet (35.7 M), with a torchvision ResNet50 / CIFAR ResNet18 classifier. Without it tiny
stand-ins of the same kinds run (CPU smoke / relative numbers only). Hyperparameters come from
the package's ``diffguard_<preset>`` preset yml.

Counted per image: diffusion-network image-forwards (a CFG step counts 2, the unconditional twin counts),
classifier image-forwards (each cutout counts) and mean AES stop index. The official pipeline's counts for
comparison, from the official code (cure-lab/DiffGuard at 6125295): main config 246 UNet forwards + 496 ResNet50
crop passes per image at AES stop i = 59; lower bound 184. With random weights AES stops are arbitrary: pass
``--no-aes`` for the fixed 90-step cap, or ``--fixed-stop N`` (all samples stop after N inversion steps).
"""
from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openood_diffguard  # noqa: E402,F401  (repairs torchvision first)
import yaml  # noqa: E402

from openood_diffguard.detectors.diffguard import DiffGuard  # noqa: E402
from openood_diffguard.diffusion import DiTAdapter, LatentCodec, NoiseSchedule, UNetAdapter  # noqa: E402
from openood_diffguard.fusion.presets import preset_dir  # noqa: E402
from openood_diffguard.space import ImageSpace  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _speed import (PRECISIONS, DenoiserCounter, compile_option, hardware, parse_speed_args,  # noqa: E402
                    speed_parser)

PRESETS = {"gdm": "diffguard_gdm_imagenet", "dit": "diffguard_dit_imagenet", "cifar": "diffguard_cifar10"}


def _adm_config() -> dict:
    try:  # the converter's exact layout, when present
        from openood_diffguard.convert.adm import PRESETS as ADM, unet_config

        return unet_config(ADM["256x256_diffusion_uncond"])
    except ImportError:  # same architecture spelled out (guided-diffusion flags of DiffGuard's GDM config)
        return dict(sample_size=256, in_channels=3, out_channels=6, block_out_channels=(256, 256, 512, 512, 1024, 1024),
                    layers_per_block=2, attention_head_dim=64, norm_num_groups=32, norm_eps=1e-5,
                    attn_norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
                    down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
                    up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3,
                    resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet")


class OpenOODResNet(nn.Module):
    """torchvision ResNet with OpenOOD's calling convention: net(x, return_feature=True) -> (logits, feature)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet, self.layer4 = resnet, resnet.layer4

    def forward(self, x, return_feature=False):
        r = self.resnet
        h = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
        feat = torch.flatten(r.avgpool(h), 1)
        logits = r.fc(feat)
        return (logits, feat) if return_feature else logits


def _classifier(kind: str, full: bool, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18, resnet50

    if kind == "imagenet":
        return OpenOODResNet(resnet50(num_classes=num_classes) if full else resnet18(num_classes=num_classes))
    net = resnet18(num_classes=num_classes)  # OpenOOD ResNet18_32x32-like: 3x3 stem, no max-pool
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return OpenOODResNet(net)


def build(preset: str, full: bool):
    """(adapter, classifier, image side, parameter overrides) with random weights."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel

    linear = NoiseSchedule.from_config({"beta_schedule": "linear"})
    if preset == "gdm":
        cfg = _adm_config() if full else dict(sample_size=32, in_channels=3, out_channels=6, block_out_channels=(32, 64),
                                              layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        model = UNetAdapter(UNet2DModel(**cfg).eval(), linear)
        side = 224 if full else 28
        over = {} if full else dict(diffusion_size=32, score_size=28)
        return model, _classifier("imagenet", full, 1000 if full else 10), side, dict(over, num_classes=None)
    if preset == "dit":
        if full:
            dit = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                        num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                layers_per_block=2, sample_size=256, scaling_factor=0.18215)
        else:
            dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16),
                                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                layers_per_block=1, norm_num_groups=8, sample_size=32)
        model = DiTAdapter(dit.eval(), linear, codec=LatentCodec(vae.eval()))
        side = 224 if full else 28
        over = {} if full else dict(diffusion_size=32, score_size=32)
        return model, _classifier("imagenet", full, 1000 if full else 10), side, dict(over, num_classes=None)
    cfg = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=11)
    if not full:
        cfg.update(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    model = UNetAdapter(UNet2DModel(**cfg).eval(), linear)
    return model, _classifier("cifar", full, 10), 32, {}


class ForwardCounter:
    """Counts image-forwards (batch rows) through a module with a forward pre-hook."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.n += int(args[0].shape[0])


def make_detector(preset: str, dtype: str, batch: int, full: bool, device: str, args):
    """(DiffGuard with random-weight models, classifier, input batch, adapter) for one preset."""
    torch.manual_seed(0)
    model, net, side, over = build(preset, full)
    params = yaml.safe_load((preset_dir() / f"{PRESETS[preset]}.yml").read_text())  # the package's presets
    dt, cast = PRECISIONS[dtype]
    params = dict(params["postprocessor"]["postprocessor_args"], **over, dtype=dt, cast_weights=cast,
                  compile=compile_option(getattr(args, "compile", None)), pretrained_metrics=False)
    gdm = params["guidance"] == "classifier"  # AES, the inversion cap and the reference exist on the GDM path only
    if args.no_aes and gdm:
        params["aes"] = False
    if args.fixed_stop is not None and gdm:
        params.update(aes=False, max_inversion_steps=args.fixed_stop)
    if getattr(args, "reference", None) and gdm:
        params["reference"] = args.reference
    if args.steps:
        params["num_steps"] = args.steps
        if params.get("max_inversion_steps"):
            params["max_inversion_steps"] = min(params["max_inversion_steps"], args.steps - 1)
    model, net = model.to(device), net.to(device).eval()
    det = DiffGuard(model=model, **params)
    space = ImageSpace.for_dataset(params["normalization"])
    g = torch.Generator().manual_seed(0)
    x = space.from_unit(torch.rand(batch, 3, side, side, generator=g)).to(device)
    return det, net, x, model


def run_one(preset: str, dtype: str, batch: int, batches: int, full: bool, device: str, args) -> dict:
    det, net, x, model = make_detector(preset, dtype, batch, full, device, args)
    unet_count, clf_count = DenoiserCounter(model), ForwardCounter(net)
    det.statistics(net, x)  # warm-up: metric construction, kernels, compilation
    unet_count.n = clf_count.n = 0
    stops = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        stats = det.statistics(net, x)
        stops.append(stats["stop_index"].float().mean().item())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    n = batch * batches
    return dict(preset=preset, dtype=dtype, batch=batch, img_s=n / dt, s_img=dt / n, unet_fwd=unet_count.n / n,
                clf_fwd=clf_count.n / n, stop=sum(stops) / len(stops), params=sum(p.numel() for p in model.parameters()))


def main(argv=None) -> int:
    ap = speed_parser(__doc__, batch_sizes=[4], dtype_default=("fp32", "bf16"), timed_by_seconds=False)
    ap.add_argument("--preset", nargs="+", default=["gdm", "dit", "cifar"], choices=sorted(PRESETS))
    ap.add_argument("--batches", type=int, default=1, help="timed batches after one warm-up batch")
    ap.add_argument("--steps", type=int, default=None, help="override num_steps (shorter CPU runs)")
    ap.add_argument("--no-aes", action="store_true", help="GDM preset: no adaptive early stop")
    ap.add_argument("--fixed-stop", type=int, default=None, help="GDM preset: every sample stops after N inversion steps")
    ap.add_argument("--reference", choices=["uncond", "input"], default=None,
                    help="GDM preset: override the reference; input + --fixed-stop 60 = the official speed config")
    args, device = parse_speed_args(ap, argv)
    args.device = str(device)
    rows = []
    for preset in args.preset:
        for dtype in args.dtype:
            for batch in args.batch_sizes:
                r = run_one(preset, dtype, batch, args.batches, args.full, args.device, args)
                rows.append(r)
                print(f"{preset:5s} {dtype} bs {r['batch']}: {r['img_s']:.3f} img/s ({r['s_img']:.2f} s/img), "
                      f"{r['unet_fwd']:.1f} diffusion fwd/img, {r['clf_fwd']:.1f} classifier fwd/img, "
                      f"mean stop {r['stop']:.1f}, {r['params'] / 1e6:.2f} M params", flush=True)
    if args.out:
        dev = hardware(device)
        lines = [f"# DiffGuard speed ({'exact architectures' if args.full else 'tiny stand-in models'}, random weights)", "",
                 f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
                 f"- device: {dev}; torch {torch.__version__}; python {platform.python_version()}",
                 f"- command: `python {' '.join(['benchmarks/diffguard_speed.py'] + (argv if argv is not None else sys.argv[1:]))}`",
                 f"- torch.compile of the diffusion backbone: {compile_option(args.compile)}; dtype bf16 = autocast, "
                 "bf16-cast = backbone weights in bf16", "",
                 "| preset | dtype | batch | img/s | s/img | diffusion fwd/img | classifier fwd/img | mean stop index | model params (M) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['dtype']} | {r['batch']} | {r['img_s']:.3f} | {r['s_img']:.2f} | {r['unet_fwd']:.1f} | "
                  f"{r['clf_fwd']:.1f} | {r['stop']:.1f} | {r['params'] / 1e6:.2f} |" for r in rows]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
