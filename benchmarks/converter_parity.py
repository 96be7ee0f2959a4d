"""Parity of the converters against fixtures made by ``make_parity_fixtures.py`` (original code outputs).

    PYTHONPATH=. python benchmarks/converter_parity.py <fixtures dir> [more dirs or .pt files]

Each fixture is converted, written as a diffusers directory, re-loaded through the package's loaders and
evaluated on the stored input; prints max |ours - original| / max |original| per output part.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import openood_diffguard  # noqa: F401  (repairs torchvision before anything imports it)
import torch

from openood_diffguard.convert import adm, diffnb, ldm
from openood_diffguard.diffusion import NoiseSchedule, load_ldm, load_unet


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def adm_flags(kw: dict) -> adm.ADMFlags:
    return adm.ADMFlags(image_size=kw["image_size"], num_channels=kw["num_channels"], num_res_blocks=kw["num_res_blocks"],
                        channel_mult=tuple(int(c) for c in kw["channel_mult"].split(",")),
                        attention_resolutions=tuple(int(r) for r in kw["attention_resolutions"].split(",")),
                        num_head_channels=kw.get("num_head_channels", -1), num_heads=kw.get("num_heads", 1),
                        use_scale_shift_norm=kw["use_scale_shift_norm"], resblock_updown=kw["resblock_updown"],
                        learn_sigma=kw["learn_sigma"], class_cond=kw["class_cond"],
                        use_new_attention_order=kw.get("use_new_attention_order", False))


def check(path: Path, tmp: Path) -> list[str]:
    fx = torch.load(path, weights_only=True)  # tensors + plain dicts: never unpickle code from a fixture
    name = path.stem
    src = tmp / f"{name}.pt"
    torch.save(fx["state_dict"], src)
    rows = []
    if name.startswith("adm"):
        flags = adm_flags(fx["flags"])
        model = load_unet(adm.convert(src, tmp / name, flags))
        for kind, betas in fx["betas"].items():
            d = tmp / f"sched_{kind}"
            adm.write_scheduler(d, *adm._SCHEDULES[kind])
            ours = NoiseSchedule.from_pretrained(d).alphas_cumprod
            rows.append(f"| {name} | alpha_bar ({kind}) | {rel(ours, torch.cumprod(1 - betas, 0)):.2e} |")
    elif name.startswith("ldm"):
        model = load_ldm(ldm.convert(src, tmp / name, ldm.LDMFlags(**fx["flags"])))
        with torch.no_grad():
            z = model.codec.encode(fx["img"])
            rows.append(f"| {name} | VQ encode (scaled latent) | {rel(z, fx['z']):.2e} |")
            rows.append(f"| {name} | VQ decode (quantised) | {rel(model.codec.decode(fx['z']), fx['dec']):.2e} |")
        ours = NoiseSchedule.from_pretrained(tmp / name).alphas_cumprod
        rows.append(f"| {name} | alpha_bar (scaled_linear) | {rel(ours, fx['state_dict']['alphas_cumprod'].double()):.2e} |")
    else:
        model = load_unet(diffnb.convert(src, tmp / name, diffnb.DiffNBFlags.from_original(fx["flags"])))
    with torch.no_grad():
        eps, var = model.predict(fx["x"], fx["t"], fx["y"])
    C = fx["x"].shape[1]
    rows.append(f"| {name} | eps | {rel(eps, fx['out'][:, :C]):.2e} |")
    if var is not None:
        rows.append(f"| {name} | variance channels | {rel(var, fx['out'][:, C:]):.2e} |")
    return rows


def main(paths: list[str]) -> int:
    print("| fixture | output | max abs err / max abs original |\n|---|---|---|")
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("*.pt")) if p.is_dir() else [p])]
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            for row in check(path, Path(tmp)):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
