"""``openood-diffguard info``: what this installation can do."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass  # no options


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
        return getattr(mod, "__version__", "installed")
    except Exception as err:  # noqa: BLE001 - report any import failure as unavailable
        return f"not available ({type(err).__name__})"


def piq_weights() -> dict[str, bool]:
    """Which weight files piq's DISTS/LPIPS would load from the torch hub cache (no download here)."""
    import torch

    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    names = {"vgg16 (torchvision)": "vgg16-397923af.pth", "DISTS alpha/beta": "dists_weights.pt",
             "LPIPS weights": "lpips_weights.pt"}
    return {f"{k}: {ckpt / v}": (ckpt / v).is_file() for k, v in names.items()}


def collect() -> dict[str, str]:
    import torch

    import openood_diffguard

    info = {"openood-diffguard": openood_diffguard.__version__}
    for name in ("torch", "torchvision", "diffusers", "piq", "sklearn", "pytorch_grad_cam", "pytorch_ood"):
        info[name] = _version(name)
    try:
        import openood  # noqa: F401

        info["openood"] = f"importable ({Path(openood.__file__).parent})"
    except Exception as err:  # noqa: BLE001
        info["openood"] = f"not available ({type(err).__name__}); optional: README 'Install' / docs/openood.md"
    info["cuda"] = f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})" if torch.cuda.is_available() else "not available"
    info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    info["threads"] = str(torch.get_num_threads())
    info["torch hub dir"] = torch.hub.get_dir()
    for k, ok in piq_weights().items():
        info[k] = "present" if ok else "missing"
    from ..runtime.cache import default_cache_root

    info["cache dir"] = str(default_cache_root())
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0
