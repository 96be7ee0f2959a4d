"""Shared helpers for the speed benchmarks: device choice, timing at several batch sizes, markdown report."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch


#: benchmark precision names -> (detector ``dtype``, ``cast_weights``); see ``DiffusionModel.configure``
PRECISIONS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-cast": ("bf16", True)}


def compile_option(value: str | None):
    """--compile [MODE | key=value,...] -> the detectors' ``compile`` parameter: False, True,
    {"mode": MODE} or torch.compile options (e.g. ``backend=eager``; values stay strings)."""
    if value is None or value is False:
        return False
    if value in ("", "default", True):
        return True
    if "=" in value:
        return dict(item.split("=", 1) for item in value.split(","))
    return {"mode": value}


def add_compile_argument(p) -> None:
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the diffusion backbone (optional mode, e.g. max-autotune, or key=value "
                        "options such as backend=eager); compile time is spent in the warm-up call, not timed")


def common_arguments(p, batch_sizes: str):
    """Options every speed benchmark shares; call ``setup_run(args)`` after parsing."""
    p.add_argument("--batch-sizes", default=batch_sizes)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--cast-weights", action="store_true", help="with --bf16: store the diffusion backbone in bf16")
    add_compile_argument(p)
    p.add_argument("--device", default=None)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="markdown report to write (benchmarks/results/...)")


def setup_run(args) -> torch.device:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms per shape (the official code disables cuDNN)
    return device


def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                    .stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads (CPU)"


class DenoiserCounter:
    """Counts the rows a diffusion adapter sends through its backbone (wraps ``_raw``: outside any compiled
    region, so it also counts a ``torch.compile``d backbone)."""

    def __init__(self, model) -> None:
        self.n = 0
        raw = model._raw

        def counted(x, t, y):
            self.n += int(x.shape[0])
            return raw(x, t, y)

        model._raw = counted


def statistics_runner(det, net, make_inputs: Callable[[int], torch.Tensor]) -> Callable[[int], None]:
    """run(bs) = ``det.statistics`` on a batch of size bs; inputs are made once per size, outside the timing."""
    inputs: dict[int, torch.Tensor] = {}

    def run(bs: int) -> None:
        if bs not in inputs:
            inputs[bs] = make_inputs(bs)
        det.statistics(net, inputs[bs])

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(run_batch: Callable[[int], None], batch_sizes: list[int], device: torch.device,
               min_seconds: float = 2.0, warmup: int = 1) -> dict[int, float]:
    """samples/s per batch size: warm up, then repeat until ``min_seconds`` have passed. OOM ends the sweep."""
    rates: dict[int, float] = {}
    for bs in batch_sizes:
        try:
            for _ in range(warmup):
                run_batch(bs)
            sync(device)
            n, t0 = 0, time.perf_counter()
            while True:
                run_batch(bs)
                n += bs
                sync(device)
                if time.perf_counter() - t0 >= min_seconds:
                    break
            rates[bs] = n / (time.perf_counter() - t0)
            print(f"batch {bs}: {rates[bs]:.1f} samples/s", flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {bs}: out of memory", flush=True)
            break
    return rates


def write_report(path: str | Path, title: str, device: torch.device, rates: dict[int, float], notes: list[str]) -> None:
    best = max(rates, key=rates.get)
    lines = [f"# {title}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- hardware: {hardware(device)}",
             f"- torch {torch.__version__}, python {platform.python_version()}",
             f"- command: `python {' '.join(sys.argv)}`", *[f"- {n}" for n in notes], "",
             "| batch size | samples/s |", "|---|---|", *[f"| {b} | {r:.1f} |" for b, r in rates.items()], "",
             f"**best: {rates[best]:.1f} samples/s at batch {best}**", ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    print(f"wrote {path}")
