"""Split a batch into passes that fit the device: a pass that runs out of memory is retried in halves."""
from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def map_chunks(fn: Callable[[int, int], T], n: int, size: int) -> list[T]:
    """``[fn(i, j) for consecutive slices [i, j) of range(n)]``, at most ``size`` samples per slice.

    When a slice raises ``torch.OutOfMemoryError`` the slice size halves (and stays halved for the rest)
    and that slice is retried; finished slices are kept. Callers draw their randomness for the whole batch
    beforehand, so the results never depend on where the batch was cut.
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    out: list[T] = []
    i = 0
    while i < n:
        j = min(n, i + size)
        try:
            out.append(fn(i, j))
        except torch.OutOfMemoryError:
            if j - i == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = (j - i + 1) // 2
            warnings.warn(f"out of memory with {j - i} samples per pass: retrying with {size} "
                          "(lower max_model_batch to skip this)", RuntimeWarning, stacklevel=2)
            continue
        i = j
    return out
