"""Shared plumbing for checkpoint converters: safe loading, key bookkeeping, writing a diffusers directory.

A converter builds the target diffusers module from the architecture flags, produces a mapping
``target key -> tensor`` from the original state_dict and hands both to :func:`fill_strict`, which
refuses to write anything unless every original key was consumed and every target key was produced.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..diffusion.models import CONVERSION_SIDECAR as SIDECAR

#: wrapper keys under which training frameworks nest the weights
_NESTED = ("state_dict", "model", "ema", "module")


def load_state_dict(path: str | Path, what: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``weights_only=True`` (full unpickling only when the user vouches for the
    file with ``trust_pickle``); unwrap common nesting; clear errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found at {p}: download it (docs/checkpoints.md "
                                "lists where) and pass its path with --src")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # pickle/zip errors have many types; report them uniformly
        hint = "" if trust_pickle else (" If the file is a genuine checkpoint that also pickles training objects "
                                        "(e.g. a Lightning checkpoint), re-run with --trust-pickle.")
        raise ValueError(f"{p} is not a loadable PyTorch checkpoint for {what} "
                         f"(torch.load(weights_only={not trust_pickle}) failed: {type(err).__name__}: {err}).{hint}") from err
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], Mapping):
        obj = obj[0]  # training states saved as [model, optimizer, scheduler]
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not any(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{p} holds no state_dict of tensors (top-level keys: {list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class KeyMapper:
    """Collects ``target <- source`` assignments and remembers which source keys were used."""

    def __init__(self, source: Mapping[str, torch.Tensor], what: str) -> None:
        self.source, self.what = dict(source), what
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.out: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor | None:
        if key not in self.source:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.source[key]

    def copy(self, src_prefix: str, dst_prefix: str, names=("weight", "bias"), squeeze: bool = False) -> None:
        """Copy ``src_prefix.name`` to ``dst_prefix.name``; ``squeeze`` turns 1x1 conv weights into Linear."""
        for n in names:
            t = self.get(f"{src_prefix}.{n}")
            if t is not None:
                self.out[f"{dst_prefix}.{n}"] = t.reshape(t.shape[0], -1) if squeeze and t.ndim > 2 else t

    def set(self, key: str, tensor: torch.Tensor) -> None:
        self.out[key] = tensor


def fill_strict(module: torch.nn.Module, mapper: KeyMapper, flags_hint: str) -> torch.nn.Module:
    """Load ``mapper.out`` into ``module``; raise listing missing/unexpected/mis-shaped keys."""
    target = module.state_dict()
    unexpected = set(mapper.source) - mapper.used
    not_produced = set(target) - set(mapper.out)
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                 for k, v in mapper.out.items() if k in target and v.shape != target[k].shape]
    problems = []
    if mapper.missing:
        problems.append(f"missing from the checkpoint ({len(mapper.missing)}): {_listing(mapper.missing)}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint ({len(unexpected)}): {_listing(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): " + "; ".join(bad_shape[:6]))
    foreign = set(mapper.out) - set(target)
    if foreign and not problems:
        problems.append(f"converter produced keys the model lacks ({len(foreign)}): {_listing(foreign)}")
    if not_produced and not problems:
        problems.append(f"converter produced no value for ({len(not_produced)}): {_listing(not_produced)}")
    if problems:
        raise ValueError(f"the {mapper.what} checkpoint does not match the architecture flags "
                         f"({flags_hint}):\n  " + "\n  ".join(problems))
    module.load_state_dict({k: v.float() for k, v in mapper.out.items()}, strict=True)
    return module.eval()


def write_scheduler(out: Path, beta_schedule: str, beta_start: float, beta_end: float,
                    num_train_timesteps: int = 1000, variance_type: str = "fixed_small") -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                  beta_end=beta_end, clip_sample=False, variance_type=variance_type,
                  prediction_type="epsilon").save_pretrained(out / "scheduler")


def write_sidecar(out: Path, **info) -> None:
    (out / SIDECAR).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

