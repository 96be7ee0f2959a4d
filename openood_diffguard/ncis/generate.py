"""Stage 4: outlier images from sampled embeddings, written as an image folder + an OpenOOD image list.

Each embedding generates ``images_per_embedding`` images (released code: 8 per embedding, sharing it and
differing only by noise) with classifier-free guidance. Batch b's noise comes from a generator seeded by
(seed, b), so an interrupted run resumes at the first missing batch and produces the same images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backends import EmbeddingBackend

from .defaults import GENERATE_DEFAULTS  # noqa: E402,F401  (plain data, shared with the CLI)


def generate_outliers(backend: EmbeddingBackend, embeddings: torch.Tensor, labels: torch.Tensor,
                      config: dict | None = None, out_dir: str | Path | None = None,
                      progress: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Generate ``len(embeddings) * images_per_embedding`` images in [-1, 1].

    With ``out_dir``: PNGs ``out_dir/images/<class>/<index>.png`` (existing ones are kept: resume), and
    returns (None, labels); without: returns (images [M, C, H, W], labels of their source class)."""
    cfg = {**GENERATE_DEFAULTS, **(config or {})}
    unknown = set(cfg) - set(GENERATE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown generation option(s) {sorted(unknown)}; allowed: {sorted(GENERATE_DEFAULTS)}")
    k, bs = int(cfg["images_per_embedding"]), int(cfg["batch_size"])
    if k < 1 or bs < 1 or int(cfg["num_steps"]) < 1:
        raise ValueError("images_per_embedding, batch_size and num_steps must be >= 1")
    e = torch.as_tensor(embeddings).float().repeat_interleave(k, 0)
    y = backend._check_labels(labels).repeat_interleave(k, 0)
    if len(e) != len(y):
        raise ValueError(f"{len(embeddings)} embeddings for {len(labels)} labels")
    if not torch.isfinite(e).all():
        raise ValueError("embeddings contain NaN or inf")
    paths = None if out_dir is None else [outlier_path(out_dir, int(c), i) for i, c in enumerate(y)]
    images = []
    for b, s in enumerate(tqdm(range(0, len(e), bs), desc="NCIS generate", disable=not progress, unit="batch")):
        sl = slice(s, s + bs)
        if paths is not None and all(p.is_file() for p in paths[sl]):
            continue
        g = torch.Generator().manual_seed((int(cfg["seed"]) * 1_000_003 + b) % (2 ** 63))
        x = backend.generate(e[sl], y[sl], float(cfg["guidance_scale"]), int(cfg["num_steps"]), g).float().cpu()
        if cfg["save_size"]:
            x = torch.nn.functional.interpolate(x, size=(int(cfg["save_size"]),) * 2, mode="bilinear",
                                                align_corners=False, antialias=True).clamp(-1, 1)
        if paths is None:
            images.append(x)
        else:
            _save_pngs(x, paths[sl])
    return (None if paths is not None else torch.cat(images)), y


def outlier_path(out_dir: str | Path, cls: int, index: int) -> Path:
    return Path(out_dir) / "images" / str(cls) / f"{index:06d}.png"


def _save_pngs(x: torch.Tensor, paths: list[Path]) -> None:
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for a, p in zip(arr, paths):  # file writes are per image by nature
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp.png")
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(tmp)
        tmp.replace(p)


def write_openood_files(out_dir: str | Path, n_images: int, batch_size: int = 128) -> dict[str, Path]:
    """``outliers.txt`` (OpenOOD image list, label -1, paths relative to ``out_dir``) and ``openood_oe.yml``
    (the ``dataset.oe`` split for OpenOOD's ``train_oe`` pipeline, to add after the dataset yml)."""
    import yaml

    out = Path(out_dir).resolve()
    images = sorted((out / "images").rglob("*.png"))
    if len(images) != n_images:
        raise RuntimeError(f"{out / 'images'} has {len(images)} PNGs, expected {n_images}: run generate again")
    imglist = out / "outliers.txt"
    imglist.write_text("".join(f"{p.relative_to(out).as_posix()} -1\n" for p in images))
    yml = out / "openood_oe.yml"
    yml.write_text(yaml.safe_dump({"dataset": {
        "split_names": ["train", "oe", "val", "test"],
        "oe": {"dataset_class": "ImglistDataset", "data_dir": str(out) + "/", "imglist_pth": str(imglist),
               "batch_size": int(batch_size), "shuffle": True, "interpolation": "bilinear"}}}, sort_keys=False))
    return {"imglist": imglist, "openood_yml": yml}


def load_outlier_images(out_dir: str | Path, channels: int) -> torch.Tensor:
    """The generated PNGs back as a tensor in [-1, 1] (image-list order)."""
    from PIL import Image

    out = Path(out_dir)
    rows = [line.split(" ", 1)[0] for line in (out / "outliers.txt").read_text().splitlines() if line.strip()]
    mode = "L" if channels == 1 else "RGB"
    arr = np.stack([np.asarray(Image.open(out / r).convert(mode), dtype=np.float32) for r in rows])
    t = torch.from_numpy(arr) / 127.5 - 1
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()
