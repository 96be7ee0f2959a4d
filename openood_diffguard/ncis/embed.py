"""Stage 1: diffusion-space embedding of each training image (NCIS Alg. 1).

Each image gets its own copy of its class's conditioning row, optimised for ``steps`` Adam steps on the
eps-prediction loss of ``copies`` noisy versions of the image (own noise, own timestep drawn from the
sampler's grid); everything else is frozen. The released code optimises the whole table and zeroes the
gradients of the other rows, one image at a time; Adam is per coordinate, so optimising a separate vector
per image with the summed per-image losses is the same optimisation, for a batch of images at once
(tests check it against the one-image masked-table procedure). An image's noise and timesteps come from a
generator seeded by (seed, image index), so its embedding does not depend on the batch it is in.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .backends import EmbeddingBackend

from .defaults import EMBED_DEFAULTS  # noqa: E402,F401  (plain data, shared with the CLI)


def image_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))


def embed_batch(backend: EmbeddingBackend, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                steps: int = 3, lr: float = 1e-2, copies: int = 32, num_timesteps: int = 50,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, D] of a batch of images in [-1, 1] (``indices``: their dataset positions, for the
    per-image random streams). Returns (embeddings, final per-image loss)."""
    labels = torch.as_tensor(labels).long()
    B = len(images)
    with torch.no_grad():
        z = backend.encode(images)
    grid = backend.embed_timesteps(num_timesteps)
    gens = [image_generator(seed, int(i)) for i in indices]  # RNG only: one small draw per image and step
    e = backend.class_embeddings(labels).float().requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    z_rep = z.repeat_interleave(copies, 0)
    loss_i = torch.zeros(B)
    for _ in range(steps):
        t = torch.stack([grid[torch.randint(len(grid), (copies,), generator=g)] for g in gens]).flatten()
        noise = torch.stack([torch.randn((copies, *z.shape[1:]), generator=g) for g in gens]).flatten(0, 1)
        t, noise = t.to(z.device), noise.to(z.device, z.dtype)
        x_t = backend.schedule.add_noise(z_rep, noise, t).to(z.dtype)
        cond = backend.condition(e, labels).repeat_interleave(copies, 0)
        pred = backend.eps(x_t, t, cond).float()
        per_image = ((pred - noise.float()) ** 2).flatten(1).mean(1).view(B, copies).mean(1)
        opt.zero_grad(set_to_none=True)
        per_image.sum().backward()  # each e_b gets exactly the gradient of its own image's loss
        opt.step()
        loss_i = per_image.detach().cpu()
    return e.detach().cpu(), loss_i


def learn_embeddings(backend: EmbeddingBackend, images: torch.Tensor, labels: torch.Tensor,
                     config: dict | None = None, done: torch.Tensor | None = None,
                     on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                     progress: bool = True) -> torch.Tensor:
    """Embeddings [N, D] of all images (``images`` [N, C, H, W] in [-1, 1] or a sequence-like of them).

    ``done``: a bool mask of images already embedded (resume) whose rows are left as NaN to be filled by
    the caller; ``on_batch(indices, embeddings, losses)`` is called after each batch (checkpointing)."""
    cfg = {**EMBED_DEFAULTS, **(config or {})}
    unknown = set(cfg) - set(EMBED_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown embedding option(s) {sorted(unknown)}; allowed: {sorted(EMBED_DEFAULTS)}")
    for k in ("steps", "copies", "num_timesteps", "batch_images"):
        if int(cfg[k]) < 1:
            raise ValueError(f"embedding option {k} must be >= 1, got {cfg[k]}")
    labels = torch.as_tensor(labels).long()
    N = len(labels)
    if len(images) != N:
        raise ValueError(f"{len(images)} images for {N} labels")
    backend._check_labels(labels)
    todo = torch.arange(N) if done is None else torch.nonzero(~torch.as_tensor(done, dtype=torch.bool)).flatten()
    out = torch.full((N, backend.dim), float("nan"))
    bs = int(cfg["batch_images"])
    for s in tqdm(range(0, len(todo), bs), desc="NCIS embed", disable=not progress, unit="batch"):
        idx = todo[s:s + bs]
        x = (images[idx] if torch.is_tensor(images) else torch.stack([torch.as_tensor(images[int(i)]) for i in idx])).float()
        if not torch.isfinite(x).all() or x.min() < -1.01 or x.max() > 1.01:
            raise ValueError("images must be finite and lie in [-1, 1]")
        e, loss = embed_batch(backend, x, labels[idx], idx, steps=int(cfg["steps"]), lr=float(cfg["lr"]),
                              copies=int(cfg["copies"]), num_timesteps=int(cfg["num_timesteps"]), seed=int(cfg["seed"]))
        out[idx] = e
        if on_batch is not None:
            on_batch(idx, e, loss)
    return out
