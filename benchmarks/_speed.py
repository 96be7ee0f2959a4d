"""Shared helpers for the speed benchmarks: device choice, timing at several batch sizes, markdown report."""
from __future__ import annotations

import argparse
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


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def speed_parser(description: str, *, full_default: bool = False, batch_sizes: list[int] | None = None,
                 dtypes: tuple[str, ...] = tuple(PRECISIONS), dtype_default: tuple[str, ...] = ("fp32",),
                 timed_by_seconds: bool = True) -> argparse.ArgumentParser:
    """The flags every speed script takes, with one spelling and meaning; parse with ``parse_speed_args``.

    ``--full`` / ``--tiny``: exact architectures (GPU) or tiny stand-ins (CPU smoke run), default per script;
    ``--dtype``: one or more of ``PRECISIONS`` (one run each); ``--batch-sizes 8 32 64`` (or ``8,32,64``);
    ``--seconds``: minimum timed seconds per batch size (scripts that time a fixed number of batches instead
    say so with ``timed_by_seconds=False``); ``--compile``, ``--device``, ``--threads``, ``--out``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", dest="full", action="store_true", default=full_default,
                      help="exact architectures, random weights (GPU)" + (" (default)" if full_default else ""))
    size.add_argument("--tiny", dest="full", action="store_false",
                      help="tiny stand-in models (CPU smoke run)" + ("" if full_default else " (default)"))
    p.add_argument("--dtype", nargs="+", default=list(dtype_default), choices=list(dtypes),
                   help="bf16 = autocast, bf16-cast = diffusion backbone weights in bf16; one run each")
    p.add_argument("--batch-sizes", nargs="+", type=_sizes, default=None if batch_sizes is None else [batch_sizes],
                   metavar="N", help=f"batch sizes to time (default: {batch_sizes or 'per row'})")
    if timed_by_seconds:
        p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per batch size")
    add_compile_argument(p)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="markdown report to write (benchmarks/results/...)")
    return p


def parse_speed_args(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, torch.device]:
    """Parse, flatten ``--batch-sizes``, set threads / device (``setup_run``): (args, device)."""
    args = p.parse_args(argv)
    if args.batch_sizes is not None:
        args.batch_sizes = [b for group in args.batch_sizes for b in group]
    return args, setup_run(args)


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


def write_report(path: str | Path, title: str, device: torch.device, rates: dict[str, dict[int, float]],
                 notes: list[str]) -> None:
    """Markdown report of ``rates[dtype][batch size]`` (samples/s), with hardware, versions and the command."""
    lines = [f"# {title}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- hardware: {hardware(device)}",
             f"- torch {torch.__version__}, python {platform.python_version()}",
             f"- command: `python {' '.join(sys.argv)}`", *[f"- {n}" for n in notes], "",
             "| dtype | batch size | samples/s |", "|---|---|---|",
             *[f"| {d} | {b} | {r:.1f} |" for d, per in rates.items() for b, r in per.items()], ""]
    for d, per in rates.items():
        if per:
            best = max(per, key=per.get)
            lines.append(f"- **{d}: best {per[best]:.1f} samples/s at batch {best}**")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
