"""One speed table for every detector preset: img/s at the best batch size, denoiser forwards per image,
fp32 vs bf16, and the share of the ceiling (bare denoiser forward rate / minimal forwards per image).

    python benchmarks/speed.py --out benchmarks/results/speed.md                      # GPU: exact architectures
    python benchmarks/speed.py --tiny --out benchmarks/results/speed_cpu_tiny.md      # CPU smoke run

Reuses the per-detector benchmarks (diffguard_speed.py, diffnb_speed.py, lfdn_speed.py; random weights, which
do not change speed). Rows: diffguard_gdm_imagenet (ADM-256 as ``convert adm`` lays it out, ResNet50 guidance,
AES replaced by a fixed stop after 60 inversion steps = the paper's "stops at t ≈ 600" scenario; its forwards
then equal the official lower bound of 184/img), diffguard_dit_imagenet (DiT-XL/2 + SD-VAE, the LDM stand-in),
diffguard_cifar10, diffnb_cifar10, lfdn_cifar10 (ResNet18 stages 1-4, 960-d), lfdn_imagenet (ResNet50
stages 1-3, 1792-d). The GDM row is compared with the official implementation's cost, the official code (cure-lab/DiffGuard at 6125295) timed by this project on one H100
(0.069 img/s as shipped, main config exp6.1, AES stop 59; 246 UNet forwards/img). Not covered: diffguard_ldm_imagenet (no LDM builder with random weights here; DiT stands in)
and diffnb_imagenet (its model is whatever pixel UNet the user trains).
"""
from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout first
import openood_diffguard  # noqa: E402,F401  (repairs torchvision first)
import torch  # noqa: E402
from _speed import (PRECISIONS, DenoiserCounter, compile_option, hardware, parse_speed_args, pick_device,  # noqa: E402
                    speed_parser, statistics_runner, throughput)

import diffguard_speed  # noqa: E402
import diffnb_speed  # noqa: E402
import lfdn_speed  # noqa: E402

#: the official DiffGuard GDM pipeline (cure-lab/DiffGuard at 6125295) timed on one H100: main config exp6.1, AES stop i = 59
OFFICIAL_GDM = {"img_s": 0.069, "unet_fwd": 246, "img_s_speed_config": 0.161}

#: per preset: full and tiny settings. minimal = fewest denoiser forwards per image the algorithm needs.
#: GDM runs one batch size (16): with its warm-up batch it already takes ~1.5 min per dtype on an H100
#: (ADM-256 bare forwards peak at batch 32-64 on an H100).
ROWS = {
    "diffguard_gdm_imagenet": dict(kind="diffguard", preset="gdm", fixed_stop=60, minimal=184,
                                   batches=[16], tiny=dict(batches=[2], steps=6, fixed_stop=3, minimal=3 + 2 * 5)),
    # the official "speed config" (exp/speed/exp6.1.yaml): 60 fixed inversion steps, no unconditional twin
    "diffguard_gdm_imagenet_speedcfg": dict(kind="diffguard", preset="gdm", fixed_stop=60, reference="input", minimal=122,
                                            batches=[16], optional=True,
                                            tiny=dict(batches=[2], steps=6, fixed_stop=3, minimal=3 + 5)),
    "diffguard_dit_imagenet": dict(kind="diffguard", preset="dit", minimal=3 * 25, batches=[16, 32, 64],
                                   tiny=dict(batches=[2], steps=4, minimal=3 * 4)),
    "diffguard_cifar10": dict(kind="diffguard", preset="cifar", minimal=3 * 50, batches=[128, 256, 512],
                              tiny=dict(batches=[4], steps=4, minimal=3 * 4)),
    "diffnb_cifar10": dict(kind="diffnb", timesteps=[300], repeats=4, minimal=4 * 15 * 2, batches=[64, 128, 256],
                           tiny=dict(batches=[2], timesteps=[40], repeats=1, minimal=1 * 2 * 2)),
    # LFDN variant code, t = 3: 2 calls per model (the released sampler's third call is an identity), final + first
    "lfdn_cifar10": dict(kind="lfdn", widths=(64, 128, 256, 512), width=1440, blocks=16, minimal=2 * 2,
                         batches=[1024, 4096, 16384], tiny=dict(batches=[256], width=64, blocks=2)),
    "lfdn_imagenet": dict(kind="lfdn", widths=(256, 512, 1024), width=1440, blocks=16, minimal=2 * 2,
                          batches=[1024, 4096, 16384], tiny=dict(batches=[256], width=64, blocks=2)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(forward, batch_sizes: list[int], device: torch.device, seconds: float) -> float:
    """Best denoiser forwards/s over the batch sizes (the ceiling's numerator)."""
    with torch.no_grad():
        rates = throughput(forward, batch_sizes, device, seconds)
    return max(rates.values()) if rates else float("nan")


def adapter_forward(model, dtype: str, device: torch.device):
    """forward(bs) = one ``model.eps`` call on random inputs of the model's own shape (the model is
    already configured for ``dtype`` / compile by its detector)."""
    side, ch = model.sample_size, model.in_channels
    cache = {}

    def forward(bs: int) -> None:
        if bs not in cache:
            t = torch.randint(0, 1000, (bs,), device=device)
            y = None if model.num_classes is None else torch.randint(0, model.num_classes, (bs,), device=device)
            cache[bs] = (torch.randn(bs, ch, side, side, device=device), t, y)
        model.eps(*cache[bs])

    return forward


def diffguard_row(name: str, cfg: dict, dtype: str, tiny: bool, device: torch.device, seconds: float,
                  compile=None) -> dict:
    args = SimpleNamespace(no_aes=False, fixed_stop=cfg.get("fixed_stop"), steps=cfg.get("steps"), compile=compile,
                           reference=cfg.get("reference"))
    runs = [diffguard_speed.run_one(cfg["preset"], dtype, bs, 1, not tiny, str(device), args) for bs in cfg["batches"]]
    best = max(runs, key=lambda r: r["img_s"])
    det, net, _, model = diffguard_speed.make_detector(cfg["preset"], dtype, 1, not tiny, str(device), args)
    det.setup(net)  # applies dtype / cast / compile
    rate = bare_rate(adapter_forward(model, dtype, device), [b * 2 for b in cfg["batches"]], device, seconds)
    return dict(img_s=best["img_s"], batch=best["batch"], fwd=best["unet_fwd"], clf=best["clf_fwd"], bare=rate,
                params=best["params"])


def diffnb_row(name: str, cfg: dict, dtype: str, tiny: bool, device: torch.device, seconds: float,
               compile=None) -> dict:
    det, net, images, model, _ = diffnb_speed.build(not tiny, dtype, cfg["timesteps"], cfg["repeats"], device,
                                                    compile_option(compile))
    counter = DenoiserCounter(model)
    run = statistics_runner(det, net, images)
    run(cfg["batches"][0])
    fwd = counter.n / cfg["batches"][0]
    rates = throughput(run, cfg["batches"], device, seconds)
    best = max(rates, key=rates.get)
    rate = bare_rate(adapter_forward(model, dtype, device), [b * 2 for b in cfg["batches"]], device, seconds)
    return dict(img_s=rates[best], batch=best, fwd=fwd, clf=float("nan"), bare=rate,
                params=sum(p.numel() for p in model.parameters()))


def lfdn_row(name: str, cfg: dict, dtype: str, tiny: bool, device: torch.device, seconds: float,
             compile=None) -> dict:
    bf16 = PRECISIONS[dtype][0] == "bf16"  # LFDN is a small MLP: autocast only (no cast / compile option)
    det, net, features, lfdn, _ = lfdn_speed.build(cfg["width"], cfg["blocks"], [3], True, device, cfg["widths"],
                                                   dtype="bf16" if bf16 else None)
    counter = diffguard_speed.ForwardCounter(lfdn)
    run = statistics_runner(det, net, features)
    run(cfg["batches"][0])
    fwd = 2 * counter.n / cfg["batches"][0]  # final + first-epoch model: the counter sees the final one
    rates = throughput(run, cfg["batches"], device, seconds)
    best = max(rates, key=rates.get)
    D = sum(cfg["widths"])

    def forward(bs: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            lfdn(torch.randn(bs, D, device=device), torch.full((bs,), 3, device=device))

    rate = bare_rate(forward, cfg["batches"], device, seconds)
    return dict(img_s=rates[best], batch=best, fwd=fwd, clf=float("nan"), bare=rate,
                params=sum(p.numel() for p in lfdn.parameters()))


BUILDERS = {"diffguard": diffguard_row, "diffnb": diffnb_row, "lfdn": lfdn_row}


def main(argv=None) -> int:
    p = speed_parser(__doc__, full_default=True, dtype_default=("fp32", "bf16"))
    p.add_argument("--rows", nargs="+", default=[k for k, v in ROWS.items() if not v.get("optional")], choices=list(ROWS),
                   help="default: every row but the optional ones (diffguard_gdm_imagenet_speedcfg)")
    args, device = parse_speed_args(p, argv)
    args.tiny = not args.full
    results = []
    for name in args.rows:
        cfg = {**ROWS[name], **(ROWS[name]["tiny"] if args.tiny else {})}
        if args.batch_sizes:
            cfg["batches"] = args.batch_sizes
        for dtype in args.dtype:
            t0 = time.perf_counter()
            r = BUILDERS[cfg["kind"]](name, cfg, dtype, args.tiny, device, args.seconds, args.compile)
            ceiling = r["bare"] / cfg["minimal"]
            r.update(name=name, dtype=dtype, minimal=cfg["minimal"], ceiling=ceiling, share=r["img_s"] / ceiling)
            results.append(r)
            print(f"{name} {dtype}: {r['img_s']:.3f} img/s at batch {r['batch']}, {r['fwd']:.1f} fwd/img "
                  f"(minimal {cfg['minimal']}), bare {r['bare']:.1f} fwd/s -> ceiling {ceiling:.3f} img/s, "
                  f"{100 * r['share']:.0f} % of it ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        write(args, device, results)
    return 0


def write(args, device: torch.device, results: list[dict]) -> None:
    label = "CPU smoke run (tiny stand-in models, short step counts): not a result" if args.tiny else \
        "exact architectures, random weights"
    lines = [f"# Detector speed, every preset ({label})", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- device: {hardware(device)}; torch {torch.__version__}, python {platform.python_version()}",
             f"- command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`",
             f"- torch.compile of the diffusion backbones: {compile_option(args.compile)}; dtype bf16 = autocast, "
             "bf16-cast = backbone weights in bf16; cuDNN benchmark mode on (GPU)",
             "- fwd/img: denoiser image-forwards per image, counted (a CFG step counts 2; LFDN: final + first-epoch "
             "model); minimal: fewest the algorithm needs; ceiling = bare denoiser forwards/s (best batch) / minimal; "
             "share = img/s / ceiling", "",
             "| preset | dtype | best batch | img/s | fwd/img | minimal fwd/img | bare fwd/s | ceiling img/s | share of ceiling | denoiser params (M) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | {r['img_s']:.3f} | {r['fwd']:.1f} | {r['minimal']} | "
                     f"{r['bare']:.1f} | {r['ceiling']:.3f} | {100 * r['share']:.0f} % | {r['params'] / 1e6:.2f} |")
    speedcfg = [r for r in results if r["name"] == "diffguard_gdm_imagenet_speedcfg"]
    if speedcfg and not args.tiny:
        lines += ["", "DiffGuard GDM speed config (60 fixed inversion steps, reference = input, no twin) against the official "
                  f"speed config on one H100 ({OFFICIAL_GDM['img_s_speed_config']} img/s as shipped, "
                  "184 UNet forwards/img there, 122 here):", ""]
        lines += [f"- {r['dtype']}: {r['img_s']:.3f} img/s = **{r['img_s'] / OFFICIAL_GDM['img_s_speed_config']:.1f}x** the "
                  "official speed config" for r in speedcfg]
    gdm = [r for r in results if r["name"] == "diffguard_gdm_imagenet"]
    if gdm and not args.tiny:
        lines += ["", "DiffGuard GDM (ADM-256) against the official implementation on one H100 ("
                  f"{OFFICIAL_GDM['img_s']} img/s as shipped, main config, {OFFICIAL_GDM['unet_fwd']} UNet forwards/img; "
                  f"speed config {OFFICIAL_GDM['img_s_speed_config']} img/s):", ""]
        lines += [f"- {r['dtype']}: {r['img_s']:.3f} img/s = **{r['img_s'] / OFFICIAL_GDM['img_s']:.1f}x** the official "
                  f"main config, {r['fwd']:.0f} vs {OFFICIAL_GDM['unet_fwd']} UNet forwards/img" for r in gdm]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
