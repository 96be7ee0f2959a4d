"""The scoring path of ``DetectorPostprocessor.inference``, without OpenOOD: cached per-sample statistics of a
loader, then the detector's confidence. The postprocessor (inside OpenOOD) and the demo (outside it) both call
these functions, so the demo's numbers come from the code path OpenOOD runs. Importing this imports no OpenOOD.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..runtime.cache import ScoreCache, Scored, cached_statistics, module_fingerprint, namespace


def store_namespace(detector: Any, net: torch.nn.Module) -> str:
    """Score-cache namespace of the detector's expensive parameters and models and the classifier's weights."""
    return namespace(detector.cache_key(), module_fingerprint(net))


def open_store(detector: Any, net: torch.nn.Module, root: str | Path | None) -> ScoreCache:
    """The score store for (detector, classifier) under ``root`` (None: in memory only)."""
    return ScoreCache(root, store_namespace(detector, net))


def needs_grad(detector: Any) -> bool:
    """Guidance and Grad-CAM need gradients; detectors that do not say so get them."""
    return bool(getattr(detector, "needs_grad", True))


def scored(detector: Any, net: torch.nn.Module, loader: Any, store: ScoreCache, progress: bool = True,
           batch_hook: Any = None) -> Scored:
    """Cached statistics of a loader (``cache.cached_statistics``), with gradients where the detector needs them."""
    with torch.set_grad_enabled(needs_grad(detector)):
        return cached_statistics(detector, net, loader, store, progress, batch_hook=batch_hook)


def confidence(detector: Any, stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """The detector's confidence (higher = ID) of cached statistics rows."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.items()}
    return torch.as_tensor(detector.confidence(tensors)).detach().cpu().numpy()


def score(detector: Any, net: torch.nn.Module, loader: Any, store: ScoreCache, progress: bool = True
          ) -> tuple[Scored, np.ndarray]:
    """(cached statistics, confidence) of a loader: what ``DetectorPostprocessor.inference`` returns, before the
    gallery and the (pred, conf, label) unpacking."""
    out = scored(detector, net, loader, store, progress)
    return out, confidence(detector, out.stats)
