"""``openood-diffguard demo``: options (defined without torch, so ``--help`` is instant) and the console report."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..runtime.devices import add_device_argument

#: what the demo imports beyond the core dependencies (the ``demo`` extra)
DEMO_MODULES = {"matplotlib": "matplotlib", "pytorch_ood": "pytorch-ood"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smaller run: fewer training steps, 96 test images per side (default: the full run)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the ID/OOD split, the training runs and the detectors' draws")
    p.add_argument("--out", default="demo_out", help="output directory (metrics.csv, scores/, summary.json, plots)")
    p.add_argument("--cache-dir", default=None, help="where trained models and scores are cached "
                   "(default: $OPENOOD_DIFFGUARD_CACHE/demo, else ~/.cache/openood_diffguard/demo)")
    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: show them)")


def check_demo_dependencies() -> None:
    missing = [pip for mod, pip in DEMO_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(f"the demo needs {', '.join(missing)}: pip install \"openood-diffguard[demo]\" "
                          "(or .[demo] in a clone)")


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    check_demo_dependencies()
    from ..runtime.cache import default_cache_root
    from ..runtime.devices import resolve_device
    from .run import LEGEND, OUTPUTS, PRESETS, run_demo

    device = resolve_device(args.device)  # an unavailable device fails before anything is written
    cfg = PRESETS["quick" if args.quick else "full"].with_seed(args.seed)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_root() / "demo"
    res = run_demo(cfg, Path(args.out), cache, str(device), progress=not args.no_progress)
    print(f"\nopenood-diffguard demo ({'quick' if args.quick else 'full'}, seed {args.seed}): digits, known 0-5 = ID "
          f"({res['n_id']} test images), 6-9 = OOD ({res['n_ood']}); classifier accuracy "
          f"{100 * res['classifier_accuracy']:.1f} %\n")
    print(res["table"])
    print(f"\n{LEGEND}\nwrote {args.out}/: {', '.join(OUTPUTS)}  ({res['seconds']:.0f} s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in res["timings_s"].items()) + ")")
    return 0
