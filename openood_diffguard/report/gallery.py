"""Gallery store: the few samples a report shows per split, with the images behind their scores.

Chosen *after* scoring, from the split's final confidences (higher = ID):

- ``high``: the ``k`` most ID-like samples (for an OOD split: its most confident mistakes, OOD scored as ID),
- ``low``: the ``k`` most OOD-like samples (for an ID split: ID scored as OOD),
- ``sample``: ``2k`` samples drawn by a hash of their key (a seeded, order-independent random draw);
  the report shows the first ``k`` of them that the detector gets right as "typical correct" cases
  (the threshold that decides "right" needs the ID scores, so it is applied at report time).

Ties are broken by sample key, so the choice does not depend on batch size, order or sharding. For
each chosen sample the store keeps the input image and the detector's own images (DiffGuard: inversion
and guided synthesis; DiffNB: noised input and denoised neighbour), already converted to small uint8
pictures, plus its statistics row, label, prediction and confidence. A report therefore never runs a
model. Detectors that capture their images while scoring (``statistics(..., keep_images=True)``) cost nothing
extra; otherwise the at most ``4k`` chosen samples of a split are run once more when the gallery is
collected, and their pictures are kept in a small per-sample image cache next to the score cache.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: default number of samples per kind and split (the hash sample keeps twice as many)
DEFAULT_K = 6
#: longest side of a stored picture (ImageNet inputs are shrunk; CIFAR / digits stay as they are)
DEFAULT_IMAGE_SIZE = 128
#: bump when the stored pictures change meaning (part of the image cache key)
GALLERY_VERSION = 2  # 2: DiffNB pictures (noised input, neighbour)
ROLES = ("high", "low", "sample")

#: what each picture is, for the report's legends (detectors may add their own in ``gallery_kinds``)
IMAGE_KINDS: dict[str, str] = {
    "input": "input image, as the classifier saw it (un-normalised)",
    "inversion": "DDIM inversion x_T of the input (shown min-max scaled per image)",
    "synthesis": "guided synthesis toward the predicted label (DiffGuard compares it with the input)",
    "reference": "unconditional reconstruction (DiffGuard's reference in the classifier-guidance setting)",
    "noised": "input noised to the first timestep, first noise draw (DiffNB)",
    "neighbour": "denoised neighbour under guidance toward the predicted label (DiffNB, first draw)",
}


# ---------------------------------------------------------------------------------------- selection
def key_hash(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """Stable 64-bit hash of each sample key (independent of batching, process and Python's hash seed)."""
    salt = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "little")
                     for k in keys], dtype=np.uint64)


def select(conf: np.ndarray, keys: Sequence[str], k: int = DEFAULT_K, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of the gallery samples of one split: ``high`` / ``low`` (k each, by confidence, ties by key)
    and ``sample`` (2k by key hash). NaN confidences (samples a cascade never scored) are never chosen."""
    conf = np.asarray(conf, dtype=np.float64)
    keys = np.asarray(keys, dtype=str)
    if conf.shape != keys.shape:
        raise ValueError(f"conf has {conf.size} entries but keys {keys.size}")
    if k < 1:
        raise ValueError(f"gallery size k must be >= 1, got {k}")
    ok = np.flatnonzero(np.isfinite(conf))
    c, kk = conf[ok], keys[ok]
    return {
        "high": ok[np.lexsort((kk, -c))[:k]],
        "low": ok[np.lexsort((kk, c))[:k]],
        "sample": ok[np.lexsort((kk, key_hash(kk.tolist(), seed)))[:2 * k]],
    }


# ---------------------------------------------------------------------------------------- pictures
def to_uint8(x: torch.Tensor, low: float = -1.0, high: float = 1.0, size: int | None = DEFAULT_IMAGE_SIZE,
             scale: str = "fixed") -> np.ndarray:
    """[N, C, H, W] tensor -> uint8 [N, H, W, C'] (C' = 1 or 3) with the longest side at most ``size``.

    ``scale='fixed'`` maps [low, high] to [0, 255]; ``'minmax'`` stretches every image on its own (latents,
    noise). More than 3 channels (latents of a VAE): the first 3 are shown.
    """
    x = x.detach().float().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] > 3:
        x = x[:, :3]
    if x.shape[1] == 2:
        x = x[:, :1]
    if size is not None and max(x.shape[-2:]) > size:
        h, w = x.shape[-2:]
        f = size / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area")
    if scale == "minmax":
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    else:
        x = (x - low) / (high - low)
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H, W, 1|3] -> PNG file bytes."""
    from PIL import Image

    arr = img[..., 0] if img.shape[-1] == 1 else img
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def input_pixels(detector: Any, images: torch.Tensor, size: int | None = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Classifier-normalised images -> uint8 pictures, with the detector's normalisation (0.5/0.5 if none)."""
    from ..space import resolve_normalization

    params = getattr(detector, "params", {}) or {}
    mean, std = resolve_normalization(params.get("normalization"))
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = images.detach().float().cpu()
    if mean_t.shape[1] != x.shape[1]:
        mean_t, std_t = mean_t[:, :1], std_t[:, :1]
    return to_uint8(x * std_t + mean_t, 0.0, 1.0, size)


def detector_images(detector: Any, net: torch.nn.Module, images: torch.Tensor,
                    labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The images behind a detector's scores for a normalised batch (name -> [B, C, H, W] tensors, pixels in
    [-1, 1] except ``inversion``). Empty for detectors without image-space pictures (LFDN, baselines)."""
    grad = bool(getattr(detector, "needs_grad", True))
    with torch.set_grad_enabled(grad):
        if getattr(detector, "captures_images", False):
            _, pics = detector.statistics(net, images, labels, keep_images=True)
            return dict(pics)
        if hasattr(detector, "synthesise"):  # DiffGuard
            syn = detector.synthesise(net, images, labels)
            out = {"inversion": syn["latents"], "synthesis": syn["synthesis"]}
            if syn.get("reference") is not None:
                out["reference"] = syn["reference"]
            return out
    return {}


def pictures(detector: Any, images: torch.Tensor, pics: Mapping[str, torch.Tensor],
             size: int | None = DEFAULT_IMAGE_SIZE) -> dict[str, np.ndarray]:
    """Detector images + the input -> uint8 pictures keyed by kind (``input`` first)."""
    out = {"input": input_pixels(detector, images, size)}
    for name, t in pics.items():
        if t is None:
            continue
        out[name] = to_uint8(t, size=size, scale="minmax" if name in ("inversion",) else "fixed")
    return out


# ---------------------------------------------------------------------------------------- the stored gallery
@dataclass
class Gallery:
    """The gallery samples of one split of one method (see the module docstring)."""

    method: str
    split: str
    role: str  # "id" or "ood": which side of the benchmark the split is on
    keys: np.ndarray
    positions: np.ndarray  # index in the split's loader order (= row of OpenOOD's scores/<split>.npz)
    labels: np.ndarray
    preds: np.ndarray
    conf: np.ndarray
    roles: dict[str, np.ndarray]  # "high" / "low" / "sample" -> bool mask (a sample may have several)
    rank: dict[str, np.ndarray]  # role -> order within the role (0 = most extreme / first drawn), -1 if absent
    images: dict[str, np.ndarray]  # kind -> uint8 [N, H, W, C]
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # scalar statistics rows (float)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.keys.size)

    def picked(self, role: str) -> np.ndarray:
        """Row indices of a role, in its order."""
        rows = np.flatnonzero(self.roles[role])
        return rows[np.argsort(self.rank[role][rows], kind="stable")]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"keys": self.keys.astype(str), "positions": self.positions, "labels": self.labels,
                  "preds": self.preds, "conf": self.conf}
        arrays.update({f"role/{r}": self.roles[r] for r in ROLES})
        arrays.update({f"rank/{r}": self.rank[r] for r in ROLES})
        arrays.update({f"image/{k}": v for k, v in self.images.items()})
        arrays.update({f"stat/{k}": v for k, v in self.stats.items()})
        meta = {"method": self.method, "split": self.split, "role": self.role, "version": GALLERY_VERSION,
                **self.meta}
        arrays["meta"] = np.array(json.dumps(meta, default=str))
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        tmp.replace(path)  # a reader never sees a half-written gallery
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Gallery":
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        if "meta" not in data or "keys" not in data:
            raise ValueError(f"{path}: not a gallery file (written by openood_diffguard.report.gallery)")
        meta = json.loads(str(data.pop("meta")))
        pick = lambda prefix: {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}  # noqa: E731
        return cls(method=meta.pop("method"), split=meta.pop("split"), role=meta.pop("role"),
                   keys=data["keys"], positions=data["positions"], labels=data["labels"], preds=data["preds"],
                   conf=data["conf"], roles=pick("role/"), rank=pick("rank/"), images=pick("image/"),
                   stats=pick("stat/"), meta=meta)


# ---------------------------------------------------------------------------------------- collection
def _scalar_stats(stats: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample scalar statistics of the chosen rows (vectors such as logits are left out)."""
    out = {}
    for k, v in stats.items():
        v = np.asarray(v)
        if v.ndim == 1 and k != "pred" and np.issubdtype(v.dtype, np.number):
            out[k] = v[rows].astype(np.float64)
    return out


def fetch_inputs(loader: Iterable, positions: np.ndarray, keys: Sequence[str],
                 key_of: Callable[[Mapping[str, Any]], list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (and labels) of the chosen samples, in the order of ``keys``.

    Indexes the loader's dataset at ``positions`` when that dataset serves the same keys there (an
    unshuffled loader: O(k) reads); otherwise walks the loader once and keeps only the chosen rows.
    """
    want = list(keys)
    ds = getattr(loader, "dataset", None)
    if ds is not None and hasattr(ds, "__getitem__"):
        try:
            items = [ds[int(p)] for p in positions]
            if all(isinstance(it, Mapping) for it in items):
                batch = {"data": torch.stack([torch.as_tensor(it["data"]) for it in items]),
                         "label": torch.as_tensor([int(it["label"]) for it in items])}
                for name in ("image_name", "index"):
                    if all(name in it for it in items):
                        batch[name] = [it[name] for it in items] if name == "image_name" else \
                            torch.as_tensor([int(it[name]) for it in items])
                if key_of(batch) == want:
                    return batch["data"], batch["label"]
        except (IndexError, KeyError, TypeError, ValueError):
            pass  # not an indexable dict dataset: fall back to one pass over the loader
    found: dict[str, tuple[torch.Tensor, int]] = {}
    wanted = set(want)
    for batch in loader:
        ks = key_of(batch)
        hit = [i for i, kk in enumerate(ks) if kk in wanted]
        for i in hit:
            found[ks[i]] = (torch.as_tensor(batch["data"][i]), int(torch.as_tensor(batch["label"])[i]))
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise KeyError(f"gallery: {len(missing)} chosen samples were not found in the loader (e.g. {sorted(missing)[:3]})")
    return torch.stack([found[kk][0] for kk in want]), torch.as_tensor([found[kk][1] for kk in want])


class ImageCache:
    """Pictures of chosen samples, per sample key, next to the score cache (a rerun never recomputes them)."""

    def __init__(self, store: Any) -> None:
        self.store = store  # a cache.ScoreCache whose "statistics" are the uint8 pictures

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.store.lookup(list(keys))

    def put(self, keys: Sequence[str], pics: Mapping[str, np.ndarray]) -> None:
        self.store.put(list(keys), dict(pics))


def collect(detector: Any, net: torch.nn.Module, loader: Iterable, *, keys: Sequence[str], stats: Mapping[str, np.ndarray],
            conf: np.ndarray, labels: np.ndarray, method: str, split: str, role: str, k: int = DEFAULT_K,
            image_size: int | None = DEFAULT_IMAGE_SIZE, captured: Mapping[str, Mapping[str, np.ndarray]] | None = None,
            image_cache: ImageCache | None = None, device: torch.device | str | None = None,
            key_of: Callable[[Mapping[str, Any]], list[str]] | None = None, batch_size: int = 16,
            meta: Mapping[str, Any] | None = None) -> Gallery:
    """The gallery of one scored split (``keys`` / ``stats`` / ``conf`` / ``labels`` in loader order).

    Pictures come from ``captured`` (key -> pictures recorded while scoring), then ``image_cache``, and only
    the rest are computed here, by running the detector on those few samples (at most ``4k``).
    """
    if role not in ("id", "ood"):
        raise ValueError(f"role must be 'id' or 'ood', got {role!r}")
    keys = np.asarray(list(keys), dtype=str)
    conf = np.asarray(conf, dtype=np.float64)
    labels = np.asarray(labels)
    picks = select(conf, keys.tolist(), k)
    rows = np.unique(np.concatenate(list(picks.values())))
    n = rows.size
    roles = {r: np.isin(rows, picks[r]) for r in ROLES}
    rank = {r: np.full(n, -1, dtype=np.int64) for r in ROLES}
    for r in ROLES:
        rank[r][np.searchsorted(rows, picks[r])] = np.arange(picks[r].size)
    chosen = keys[rows].tolist()

    pics: dict[str, dict[str, np.ndarray]] = {kk: dict(captured[kk]) for kk in chosen if captured and kk in captured}
    if image_cache is not None:
        todo = [kk for kk in chosen if kk not in pics]
        if todo:
            found, cached = image_cache.get(todo)
            for i, kk in enumerate(np.asarray(todo)[found].tolist()):
                pics[kk] = {name: v[i] for name, v in cached.items()}
    todo = [kk for kk in chosen if kk not in pics]
    recomputed = 0
    if todo:
        if key_of is None:
            raise ValueError("gallery: key_of is needed to find the chosen samples in the loader")
        pos = rows[np.isin(keys[rows], todo)]
        x, y = fetch_inputs(loader, pos, keys[pos].tolist(), key_of)
        if device is None:
            device = next(net.parameters()).device
        needs_labels = bool(getattr(detector, "needs_labels", False))
        for i in range(0, len(todo), batch_size):
            xb = x[i:i + batch_size].to(device)
            yb = y[i:i + batch_size].to(device) if needs_labels else None
            own = detector_images(detector, net, xb, yb)
            recomputed += len(xb) if own else 0
            made = pictures(detector, xb, own, image_size)
            new = {kk: {name: v[j] for name, v in made.items()} for j, kk in enumerate(keys[pos[i:i + batch_size]].tolist())}
            pics.update(new)
            if image_cache is not None:
                batch_keys = list(new)
                image_cache.put(batch_keys, {name: np.stack([new[kk][name] for kk in batch_keys]) for name in made})
    kinds = list(dict.fromkeys(name for kk in chosen for name in pics[kk]))
    missing = [(kk, name) for kk in chosen for name in kinds if name not in pics[kk]]
    if missing:
        raise ValueError(f"gallery: pictures differ between samples ({missing[:3]}); the image cache was written "
                         "by another detector version: delete it")
    images = {name: np.stack([pics[kk][name] for kk in chosen]) for name in kinds}
    preds = np.asarray(stats["pred"])[rows] if "pred" in stats else np.full(n, -1)
    info = {"k": k, "n": int(keys.size), "n_scored": int(np.isfinite(conf).sum()), "recomputed": recomputed,
            "detector": getattr(detector, "name", type(detector).__name__),
            "params": json.loads(json.dumps(getattr(detector, "params", {}), default=str)),
            "image_kinds": {name: getattr(detector, "gallery_kinds", {}).get(name, IMAGE_KINDS.get(name, name))
                            for name in kinds}, **(meta or {})}
    return Gallery(method=method, split=split, role=role, keys=keys[rows], positions=rows.astype(np.int64),
                   labels=labels[rows].astype(np.int64), preds=np.asarray(preds).astype(np.int64), conf=conf[rows],
                   roles=roles, rank=rank, images=images, stats=_scalar_stats(stats, rows), meta=info)


def image_cache_for(detector: Any, net: torch.nn.Module, root: str | Path | None, image_size: int | None) -> ImageCache | None:
    """The per-sample picture cache of this detector (expensive parameters + weights) and classifier."""
    if root is None:
        return None
    from ..runtime.cache import ScoreCache, module_fingerprint, namespace

    ns = namespace(detector.cache_key(), module_fingerprint(net),
                   {"gallery": GALLERY_VERSION, "image_size": image_size})
    return ImageCache(ScoreCache(root, f"gallery-{ns}"))


def load_galleries(folder: str | Path) -> dict[str, dict[str, Gallery]]:
    """``<folder>/<method>/<split>.npz`` -> {method: {split: Gallery}} (empty if the folder is absent)."""
    folder = Path(folder)
    out: dict[str, dict[str, Gallery]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*/*.npz")):
        g = Gallery.load(path)
        out.setdefault(g.method, {})[g.split] = g
    return out


def gallery_path(folder: str | Path, method: str, split: str) -> Path:
    safe = lambda s: "".join(c if c.isalnum() or c in "-_.+" else "_" for c in s)  # noqa: E731
    return Path(folder) / safe(method) / f"{safe(split)}.npz"


def loader_keys(loader: Iterable) -> list[str]:
    """The score cache's sample keys of a loader, in loader order (``cache.sample_keys``): read from an
    OpenOOD image list without loading images when the loader is sequential, else one pass over it."""
    from ..runtime.cache import loader_source, sample_keys

    source = loader_source(loader)
    ds = getattr(loader, "dataset", None)
    sampler = getattr(loader, "sampler", None)
    imglist = getattr(ds, "imglist", None)
    if isinstance(imglist, list) and isinstance(sampler, torch.utils.data.SequentialSampler):
        return [f"{source}::{line.strip(chr(10)).split(' ', 1)[0]}" for line in imglist]
    return [k for batch in loader for k in sample_keys(batch, source)]


def save_gallery(detector: Any, net: torch.nn.Module, loader: Iterable, *, stats: Mapping[str, np.ndarray],
                 conf: np.ndarray, labels: np.ndarray, folder: str | Path, method: str, split: str, role: str,
                 cache_root: str | Path | None = None, k: int = DEFAULT_K, image_size: int | None = DEFAULT_IMAGE_SIZE,
                 keys: Sequence[str] | None = None, meta: Mapping[str, Any] | None = None) -> Path:
    """Collect the gallery of one scored split and write it to ``<folder>/<method>/<split>.npz``."""
    from ..runtime.cache import loader_source, sample_keys

    keys = loader_keys(loader) if keys is None else list(keys)
    if len(keys) != len(conf):
        raise ValueError(f"gallery: {len(keys)} sample keys but {len(conf)} scores for split {split!r}")
    source = loader_source(loader)
    g = collect(detector, net, loader, keys=keys, stats=stats, conf=conf, labels=labels, method=method, split=split,
                role=role, k=k, image_size=image_size, image_cache=image_cache_for(detector, net, cache_root, image_size),
                key_of=lambda b: sample_keys(b, source), meta=meta)
    return g.save(gallery_path(folder, method, split))


def openood_split(config: Any, loader: Any) -> tuple[str, str] | None:
    """(dataset name, 'id' | 'ood') of a main.py *test* loader, with the name OpenOOD gives its
    ``scores/<name>.npz``; None for validation / unknown loaders. OpenOOD's datasets do not keep their
    image-list path, so the loader's image list is compared with the lists the merged config names."""
    from ..openood.sections import plain

    cfg = plain(config) if config is not None else {}
    lines = getattr(getattr(loader, "dataset", None), "imglist", None)
    if not isinstance(lines, list) or not isinstance(cfg, Mapping):
        return None
    ds = cfg.get("dataset") or {}
    ood = cfg.get("ood_dataset") or {}
    candidates = [(str(ds.get("name") or "id"), "id", (ds.get("test") or {}).get("imglist_pth"))]
    for group, role in (("nearood", "ood"), ("farood", "ood"), ("csid", "id")):
        sec = ood.get(group) or {}
        candidates += [(str(n), role, (sec.get(n) or {}).get("imglist_pth")) for n in sec.get("datasets") or []]
    for name, role, path in candidates:
        if path and Path(path).is_file():
            with open(path) as fh:
                if fh.readlines() == lines:
                    return name, role
    return None


def openood_output_dir(config: Any) -> Path | None:
    """main.py's output directory when this process writes OpenOOD's score files there (rank 0), else None."""
    from ..openood.sections import plain

    cfg = plain(config) if config is not None else {}
    if not isinstance(cfg, Mapping) or not cfg.get("output_dir") or not (cfg.get("recorder") or {}).get("save_scores"):
        return None
    return Path(cfg["output_dir"])
