"""``openood-diffguard convert adm|ldm|diffnb --src CKPT --out DIR [architecture flags]``.

Architecture flags mirror the original code's names (``--num-head-channels`` = guided-diffusion's
``num_head_channels``); their defaults are the released models' (ADM: chosen by the checkpoint's file
name, see ``flags.PRESETS``; LDM: cin256-v2; DiffNB: CIFAR-10 ``ddim_cifar10_cond.yml``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib

from . import flags as _flags  # no torch: `convert --help` stays fast; the converters load in run()

_FLAGS = {"adm": _flags.ADMFlags, "ldm": _flags.LDMFlags, "diffnb": _flags.DiffNBFlags}
_HELP = {"adm": "OpenAI guided-diffusion checkpoint (e.g. 256x256_diffusion_uncond.pt) -> UNet2DModel",
         "ldm": "CompVis latent-diffusion cin256-v2 model.ckpt -> UNet2DConditionModel + VQModel + class table",
         "diffnb": "DiffNB (DiffOOD) class-conditional CIFAR DDPM -> UNet2DModel (last class row = null)"}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False, got {text!r}")


def _number_tuple(text: str) -> tuple:
    try:
        return tuple(float(v) if "." in v else int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_flag_options(parser: argparse.ArgumentParser, cls) -> None:
    group = parser.add_argument_group("architecture flags (default: the released model's)")
    for f in dataclasses.fields(cls):
        kind = {bool: _bool, tuple: _number_tuple}.get(type(f.default), type(f.default))
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                           help=f"original `{f.name}` (default {f.default})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", required=True)
    for name, cls in _FLAGS.items():
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name], formatter_class=parser.formatter_class)
        p.add_argument("--src", required=True, help="original checkpoint file")
        p.add_argument("--out", required=True, help="output diffusers model directory")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow full unpickling (torch.load weights_only=False) for files you trust")
        if name == "adm":
            p.add_argument("--preset", choices=sorted(_flags.PRESETS),
                           help="flag set of a released checkpoint (default: from the --src file name)")
        _add_flag_options(p, cls)


def build_flags(args: argparse.Namespace):
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(_FLAGS[args.source])
                 if getattr(args, f.name, None) is not None}
    if args.source == "adm":
        from . import adm

        return adm.flags_for(args.src, args.preset, **overrides)
    return _FLAGS[args.source](**overrides)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"{__package__}.{args.source}")
    flags = build_flags(args)  # a bad file or flag raises with what to fix (one line from the command line)
    out = module.convert(args.src, args.out, flags, args.trust_pickle)
    loader = "load_ldm" if args.source == "ldm" else "load_unet"
    print(f"wrote {out}\n  flags: {flags.describe()}\n  load with openood_diffguard.diffusion.{loader}({str(out)!r})")
    return 0
