"""Stage defaults as plain data (no torch): the stages and ``openood-diffguard ncis <stage> --help`` share them."""
from __future__ import annotations

from typing import Any

#: ``ncis fit``: cVPN training
FIT_DEFAULTS: dict[str, Any] = {"epochs": 200, "batch_size": 64, "lr": 1e-4, "min_lr_factor": 0.1, "num_layers": 4,
                                "hidden_mult": 4, "reconstruction": True, "eval_samples": 1000, "seed": 0}
#: ``ncis embed``: per-image embedding optimisation
EMBED_DEFAULTS = {"steps": 3, "lr": 1e-2, "copies": 32, "num_timesteps": 50, "batch_images": 8, "seed": 0}
#: ``ncis generate``: outlier images
GENERATE_DEFAULTS = {"guidance_scale": 7.5, "num_steps": 50, "images_per_embedding": 8, "batch_size": 8,
                     "save_size": None, "seed": 42}
