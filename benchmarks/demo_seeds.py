"""The demo over several seeds: what a user should expect from ``openood-diffguard demo`` (mean, spread, per seed).

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --report benchmarks/results/demo.md
    python benchmarks/demo_seeds.py --seeds 0 --quick --report benchmarks/results/demo_quick.md
    python benchmarks/demo_seeds.py --seeds 0 1 2 --work W --from-runs   # W/seed<S> written by
        # `openood-diffguard demo --seed S --out W/seed<S> --cache-dir W/cache<S>` (e.g. two seeds at a time)

Each seed is a full demo run from an empty cache (the seed changes the ID/OOD split, both trainings and every
detector draw), so the spread covers everything a user's own run can differ in. Writes a markdown report with
the hardware, torch version, command, date and commit, and prints the README table (mean and min-max).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import openood_diffguard  # noqa: E402,F401  (repairs torchvision first)
import torch  # noqa: E402

from openood_diffguard.demo.run import PRESETS, run_demo  # noqa: E402
from openood_diffguard.metrics import METRIC_COLUMNS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _metrics(out: Path) -> dict[str, dict[str, float]]:
    import csv

    with open(out / "metrics.csv") as fh:
        return {r["method"]: {c: float(r[c]) for c in METRIC_COLUMNS} for r in csv.DictReader(fh)}


def _commit() -> str:
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return res.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def _cpu() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return model


def summary_table(runs: dict[int, dict[str, dict[str, float]]]) -> str:
    """README table: per method and column, the mean over the seeds and (min–max); with 3-5 seeds the range says
    more than a standard deviation."""
    methods = list(next(iter(runs.values())))
    lines = ["| method | " + " | ".join(METRIC_COLUMNS) + " |", "|" + "---|" * (len(METRIC_COLUMNS) + 1)]
    for m in methods:
        cells = []
        for c in METRIC_COLUMNS:
            v = np.array([runs[s][m][c] for s in runs])
            cells.append(f"{v.mean():.1f} ({v.min():.1f}–{v.max():.1f})" if len(v) > 1 else f"{v[0]:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(runs: dict[int, dict[str, dict[str, float]]], column: str) -> str:
    seeds = list(runs)
    methods = list(runs[seeds[0]])
    lines = [f"| method | " + " | ".join(f"seed {s}" for s in seeds) + " | min–max |", "|" + "---|" * (len(seeds) + 2)]
    for m in methods:
        v = [runs[s][m][column] for s in seeds]
        lines.append(f"| {m} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {min(v):.2f}–{max(v):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="demo seeds (default: 0 1 2 3 4)")
    p.add_argument("--quick", action="store_true", help="the --quick demo (default: the full one)")
    p.add_argument("--work", default=None, help="folder for caches and outputs (default: a temporary folder)")
    p.add_argument("--report", default=None, help="markdown report to write (default: print only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--from-runs", action="store_true",
                   help="read finished runs from --work/seed<S> (metrics.csv, summary.json) instead of running them")
    p.add_argument("--plots-to", default=None, help="copy the first seed's PNGs here as demo_<name>.png (e.g. docs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_runs and not args.work:
        p.error("--from-runs needs --work (the folder holding seed<S>/)")
    work = Path(args.work or tempfile.mkdtemp(prefix="demo_seeds_"))
    preset = "quick" if args.quick else "full"
    runs, info = {}, {}
    for seed in args.seeds:
        out, cache = work / f"seed{seed}", work / f"cache{seed}"
        if args.from_runs:
            res = json.loads((out / "summary.json").read_text())
            if res["config"] != asdict(PRESETS[preset].with_seed(seed)):
                p.error(f"{out} was not written by the {preset} demo with seed {seed}")
            wall = res["seconds"]
        else:
            t0 = time.perf_counter()
            res = run_demo(PRESETS[preset].with_seed(seed), out, cache, "cpu", progress=False)
            wall = time.perf_counter() - t0
        runs[seed] = _metrics(out)
        info[seed] = {"acc": 100 * res["classifier_accuracy"], "wall": wall, "timings": res["timings_s"],
                      "n": (res["n_id"], res["n_ood"])}
        print(f"seed {seed}: {wall:.0f} s, classifier {info[seed]['acc']:.2f} %, AUROC "
              + ", ".join(f"{m} {v['AUROC']:.2f}" for m, v in runs[seed].items()), flush=True)
    if args.plots_to:
        import shutil

        first = work / f"seed{args.seeds[0]}"
        for name in ("roc", "histograms", "diffguard_grid"):
            shutil.copy(first / f"{name}.png", Path(args.plots_to) / f"demo_{name}.png")
    table = summary_table(runs)
    threads = args.threads or torch.get_num_threads()
    walls = [i["wall"] for i in info.values()]
    lines = [
        f"# `openood-diffguard demo{' --quick' if args.quick else ''}` over {len(runs)} seed(s)", "",
        f"- Date: {datetime.date.today():%Y-%m-%d}. Commit: `{_commit()}`.",
        f"- Hardware: {_cpu()}, {threads} torch thread(s) per run, no GPU; torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        f"- Command: `python benchmarks/demo_seeds.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"(each seed = `openood-diffguard demo{' --quick' if args.quick else ''} --seed S --device cpu` from an "
        "empty cache" + (", run separately, the table read back with --from-runs" if args.from_runs else "") + ").",
        f"- Test images per seed: {info[args.seeds[0]]['n'][0]} ID / {info[args.seeds[0]]['n'][1]} OOD. Classifier "
        "accuracy: " + ", ".join(f"{i['acc']:.2f}" for i in info.values()) + " %.",
        f"- Wall time per run from nothing: {min(walls):.0f}–{max(walls):.0f} s "
        f"(stages of seed {args.seeds[0]}: " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                         info[args.seeds[0]]["timings"].items()) + ").",
        "", "Mean over the seeds (min–max), in %; columns: docs/metrics.md:", "", table, "",
        "AUROC per seed:", "", per_seed_table(runs, "AUROC"), "",
        "FPR@95_IDpos (the papers' convention) per seed:", "", per_seed_table(runs, "FPR@95_IDpos"), "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
