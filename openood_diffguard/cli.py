"""Command line: ``openood-diffguard <command>``; each sub-command lives with the code it drives."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

# name -> (module, help). Each module provides ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("openood_diffguard.demo.run", "CPU demo on scikit-learn digits: every detector, OpenOOD-style table, plots"),
    "info": ("openood_diffguard.info", "versions, device and which optional parts are available"),
    "fuse": ("openood_diffguard.fusion.cli", "fuse cached per-sample score files (ours / OpenOOD's) and print metrics"),
    "convert": ("openood_diffguard.convert.cli", "convert original ADM / LDM cin256-v2 / DiffNB checkpoints to diffusers"),
    "train-diffusion": ("openood_diffguard.training.diffusion", "train DiffNB's class-conditional pixel UNet"),
    "train-lfdn": ("openood_diffguard.training.lfdn", "train the LFDN feature denoiser on a classifier's ID features"),
    "ncis": ("openood_diffguard.ncis.cli", "NCIS outlier synthesis + training, one resumable stage per command"),
    "eval": ("openood_diffguard.main", "run OpenOOD's main.py pipeline with our postprocessors registered"),
    "report": ("openood_diffguard.report.cli", "one self-contained HTML page per run: metrics, curves, galleries"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openood-diffguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(_module=module)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = importlib.import_module(args._module).run
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
