"""Gaussian noise keyed by each sample's content: independent per sample, yet independent of the batch.

Released detectors often draw fresh noise for every sample of a batch (``torch.randn_like(batch)``). A
sample's score then depends on its position in a batch and on the batch size, torchrun shard, cache
resume, ... Here each sample's noise is a pure function of (its 8-bit quantised content, the seed, the
element index): a counter-based generator, vectorised over samples and elements (integer hashing, then
Box-Muller), that gives the same draw on every device and for any batch composition. Identical images get
identical noise; images that differ anywhere get (pseudo-)independent noise.

The integer hash is Chris Wellons' ``triple32`` (a bijection of 32-bit words with near-ideal avalanche),
evaluated in int64 with 16-bit partial products so that nothing overflows.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_SALTS = (0x3C6EF372, 0xA54FF53A)  # two content words per sample (64-bit key: collisions ~ n^2 / 2^65)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): 16-bit halves of c keep every product below 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """``triple32`` of 32-bit words held in int64 (values in [0, 2^32)); a bijection on that range."""
    x = x & _M32
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ (x >> 14)


def content_key(unit_images: torch.Tensor) -> torch.Tensor:
    """[B, 2] int64 key of each image's 8-bit quantised content (pixels in [0, 1], any shape [B, ...]).

    Quantising to the 256 levels images are stored in makes the key immune to the float rounding of
    normalisation round trips (and of a different device)."""
    q = (unit_images.detach().float().clamp(0, 1) * 255).round().long().flatten(1)
    pos = torch.arange(q.shape[1], device=q.device) * 256  # position and value: a permutation changes the key
    words = []
    for salt in _SALTS:
        terms = hash32((pos + q) ^ salt)  # [B, N] words < 2^32; their sum fits int64 for N < 2^31
        words.append(hash32(terms.sum(1) & _M32))
    return torch.stack(words, 1)


def keyed_normal(keys: torch.Tensor, shape: tuple[int, ...], seed: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """Standard normal noise [B, *shape] (float32, on ``keys``' device): sample b's values depend only on
    ``keys[b]``, ``seed`` and the element index (counters 2m, 2m+1 -> one Box-Muller pair)."""
    if keys.ndim != 2 or keys.shape[1] != 2:
        raise ValueError(f"keys must be [B, 2] (content_key), got {tuple(keys.shape)}")
    n = math.prod(shape)
    if n >= 1 << 31:
        raise ValueError(f"at most 2^31 - 1 noise values per sample, got {n}")
    seed = int(seed)
    s1 = hash32(keys[:, 0] ^ int(hash32(torch.tensor(seed & _M32))))[:, None]
    s2 = hash32(keys[:, 1] ^ int(hash32(torch.tensor(((seed >> 32) & _M32) ^ 0x9E3779B9))))[:, None]
    pairs = (n + 1) // 2
    rows = max(1, chunk // max(pairs, 1))  # bound the int64 temporaries (samples per chunk)
    out = []
    for i in range(0, keys.shape[0], rows):
        a, b = s1[i:i + rows], s2[i:i + rows]
        m = torch.arange(pairs, device=keys.device)[None, :] * 2

        def uniform(c: torch.Tensor) -> torch.Tensor:  # (0, 1), never 0: log is finite
            h = hash32(hash32(c ^ a) ^ b)
            return (h.double() + 0.5) / 4294967296.0

        r = torch.sqrt(-2 * torch.log(uniform(m)))
        theta = 2 * math.pi * uniform(m + 1)
        z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1).flatten(1)[:, :n]
        out.append(z.float())
    return torch.cat(out).view(keys.shape[0], *shape)


__all__ = ["hash32", "content_key", "keyed_normal"]
