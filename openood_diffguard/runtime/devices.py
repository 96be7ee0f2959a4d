"""The ``--device`` option shared by every command, and running OpenOOD (which hard-codes ``.cuda()``) on a
machine without CUDA.

Parsing is torch-free (``--help`` stays fast); torch is imported only to resolve ``auto`` and to check that a
requested CUDA device exists, before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import re
from typing import Any, Iterator

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = f"{DEVICE_CHOICES}; auto = cuda when CUDA is available, else cpu"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_argument(text: str) -> str:
    """argparse ``type=``: the device spelling, checked without importing torch."""
    value = text.strip().lower()
    if not _PATTERN.match(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a supported device ({DEVICE_CHOICES})")
    return value


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", type=device_argument, default=default, metavar="DEVICE", help=DEVICE_HELP)


def resolve_device(spec: str | None, option: str = "--device") -> Any:
    """``auto`` / ``cpu`` / ``cuda[:N]`` -> ``torch.device``; a CUDA device that does not exist is a ValueError
    naming the option (raised before any output is written)."""
    import torch

    spec = device_argument(spec or "auto") if not isinstance(spec, torch.device) else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {spec}: CUDA is not available on this machine (torch {torch.__version__}); "
                             f"use {option} cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


@contextlib.contextmanager
def openood_device(device: Any = "auto") -> Iterator[Any]:
    """Run OpenOOD code on ``device`` although it calls ``.cuda()`` (``main.py``'s pipelines, the Evaluator,
    ``BasePostprocessor.inference``, KNN/ViM setup, ``get_network``).

    On a CUDA device nothing is patched. On the CPU, while the block runs, ``Tensor.cuda`` and ``Module.cuda``
    return the object on the CPU and ``torch.load`` maps CUDA-saved checkpoints to the CPU (OpenOOD's
    ``get_network`` loads without ``map_location``). OpenOOD's files are not modified. Yields the
    ``torch.device``.
    """
    import torch

    device = resolve_device(device)
    if device.type == "cuda":
        yield device
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda, torch.load

    def tensor_cuda(self, *args, **kwargs):
        return self.to("cpu")

    def module_cuda(self, *args, **kwargs):
        return self.to("cpu")

    def load(*args, **kwargs):
        if kwargs.get("map_location") is None and len(args) < 2:
            kwargs["map_location"] = "cpu"
        return saved[2](*args, **kwargs)

    ours = (tensor_cuda, module_cuda, load)
    torch.Tensor.cuda, torch.nn.Module.cuda, torch.load = ours
    try:
        yield device
    finally:  # restore only what is still ours: a later patch by someone else (a test fixture) stays theirs
        for (owner, name), mine, before in zip(((torch.Tensor, "cuda"), (torch.nn.Module, "cuda"), (torch, "load")),
                                               ours, saved):
            if getattr(owner, name) is mine:
                setattr(owner, name, before)


_installed: contextlib.ExitStack | None = None


def use_openood_device(device: Any = "auto") -> Any:
    """:func:`openood_device` for the rest of the process (the Evaluator is built in one statement and used in
    later ones). Idempotent; returns the ``torch.device``. :func:`release_openood_device` undoes it."""
    global _installed
    release_openood_device()
    stack = contextlib.ExitStack()
    resolved = stack.enter_context(openood_device(device))
    _installed = stack
    return resolved


def release_openood_device() -> None:
    global _installed
    if _installed is not None:
        _installed.close()
        _installed = None
