"""Per-sample score cache on disk, crash-safe and shared between processes.

Why: OpenOOD's ``main.py`` scores the ID test set twice, APS re-runs ``inference`` on the validation sets
for every grid point, and diffusion scoring of a benchmark takes hours. Raw ``Detector.statistics`` rows
are stored once per sample; confidences are always recomputed from them (``Detector.confidence`` uses only
cheap parameters), so repeated passes and cheap-parameter sweeps cost nothing, and a killed run resumes.

Layout: ``<root>/<namespace>/chunk-*.npz``. The namespace hashes the detector's ``cache_key()`` (name,
expensive parameters, model fingerprints) and the classifier's weights hash. Each ``put`` writes one
chunk to a temporary file, fsyncs it and renames it into place (atomic on POSIX), so a ``kill -9`` loses
at most the batch in flight and never leaves a half-written chunk visible. Several processes (torchrun
ranks) can write the same namespace: chunk names are unique, readers pick up new chunks on ``refresh``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

_KEYS = "__keys__"


def default_cache_root() -> Path:
    return Path(os.environ.get("OPENOOD_DIFFGUARD_CACHE", Path.home() / ".cache" / "openood_diffguard"))


def module_fingerprint(net: torch.nn.Module) -> str:
    """Hash of a network's weights (names, shapes, dtypes, values): the 'checkpoint hash' of the cache key."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def namespace(detector_key: str, checkpoint_hash: str | None, extra: Mapping[str, Any] | None = None) -> str:
    blob = json.dumps({"detector": detector_key, "checkpoint": checkpoint_hash, "extra": extra or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _to_numpy(v: Any) -> np.ndarray:
    if torch.is_tensor(v):
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ScoreCache:
    """Append-only store of per-sample statistics rows, addressed by string sample keys."""

    def __init__(self, root: str | os.PathLike | None, namespace: str = "memory") -> None:
        # root=None: in-memory only (same API; used when caching is disabled)
        self.dir = None if root is None else Path(root) / namespace
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._seen: set[str] = set()
        self._chunks: list[dict[str, np.ndarray]] = []
        self._index: dict[str, tuple[int, int]] = {}
        #: rows ``cached_statistics`` computed (cache misses) into this store in this process; a warm cache adds 0
        self.computed_rows = 0

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Load chunks written since the last call (by this or another process)."""
        if self.dir is None:
            return
        for path in sorted(self.dir.glob("chunk-*.npz")):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            try:
                with np.load(path, allow_pickle=False) as z:
                    chunk = {k: z[k] for k in z.files}
            except Exception as err:  # noqa: BLE001 - a foreign/corrupt file must not kill a long run
                warnings.warn(f"score cache: ignoring unreadable chunk {path} ({err}); delete it to silence this")
                continue
            self.add(chunk)

    def add(self, chunk: Mapping[str, np.ndarray]) -> None:
        """Register rows in memory only (``chunk`` holds ``__keys__`` and one array per statistic)."""
        c = len(self._chunks)
        self._chunks.append(dict(chunk))
        for r, key in enumerate(np.asarray(chunk[_KEYS]).tolist()):
            self._index[key] = (c, r)

    def __len__(self) -> int:
        self.refresh()
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        self.refresh()
        return key in self._index

    def lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(found mask [N], rows of the found keys in the given order)."""
        self.refresh()
        loc = [self._index.get(k) for k in keys]
        found = np.array([x is not None for x in loc], dtype=bool)
        if not found.any():
            return found, {}
        chunk_ids = np.array([x[0] for x in loc if x is not None])
        rows = np.array([x[1] for x in loc if x is not None])
        names = [k for k in self._chunks[chunk_ids[0]] if k != _KEYS]
        out: dict[str, np.ndarray] = {}
        for name in names:
            first = self._chunks[chunk_ids[0]][name]
            buf = np.empty((rows.size, *first.shape[1:]), dtype=first.dtype)
            for c in np.unique(chunk_ids):  # one gather per chunk, not per sample
                sel = chunk_ids == c
                buf[sel] = self._chunks[c][name][rows[sel]]
            out[name] = buf
        return found, out

    # ------------------------------------------------------------------ writing
    def put(self, keys: Sequence[str], stats: Mapping[str, Any]) -> None:
        """Append rows atomically (temp file + fsync + rename)."""
        keys = list(keys)
        if not keys:
            return
        arrays = {k: _to_numpy(v) for k, v in stats.items()}
        for k, v in arrays.items():
            if k == _KEYS:
                raise ValueError(f"statistic name {_KEYS!r} is reserved by the cache")
            if v.ndim == 0 or v.shape[0] != len(keys):
                raise ValueError(f"statistic {k!r} has leading dim {v.shape[:1]}, expected {len(keys)} (one row per sample)")
        arrays[_KEYS] = np.asarray(keys, dtype=str)
        if self.dir is None:
            self.add(arrays)
            return
        name = f"chunk-{os.getpid()}-{uuid.uuid4().hex}.npz"
        tmp = self.dir / f".tmp-{name}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        _fsync_dir(self.dir)
        self._seen.add(name)
        self.add(arrays)

    def compact(self) -> None:
        """Merge all chunks into one (single process only: do not call while other ranks write)."""
        self.refresh()
        if self.dir is None:
            return
        paths = sorted(self.dir.glob("chunk-*.npz"))
        if len(paths) < 2:
            return
        keys = list(self._index)
        _, rows = self.lookup(keys)
        self.put(keys, rows)
        for p in paths:
            p.unlink()
        self._seen.clear()
        self._chunks.clear()
        self._index.clear()
        self.refresh()


def sample_keys(batch: Mapping[str, Any], source: str) -> list[str]:
    """Stable per-sample keys of an OpenOOD batch: image name (else imglist row ``index``) within ``source``."""
    if "image_name" in batch:
        return [f"{source}::{n}" for n in batch["image_name"]]
    if "index" in batch:
        return [f"{source}::#{int(i)}" for i in _to_numpy(batch["index"]).tolist()]
    raise KeyError("batch has neither 'image_name' nor 'index': cannot key the score cache "
                   "(OpenOOD's ImglistDataset provides both)")


def _transform_repr(t: Any) -> str:
    """Run-independent description of a transform (OpenOOD preprocessors wrap a torchvision Compose)."""
    inner = getattr(t, "transform", None)
    text = repr(inner if inner is not None else t)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # default reprs carry memory addresses


def loader_source(loader: Any) -> str:
    """Identity of the data behind a loader: image folder (or imglist/name) and the test transform."""
    ds = getattr(loader, "dataset", None)
    if ds is None:  # a plain iterable of batch dicts: image names / indices are the only identity
        return "batches"
    parts: Iterable[Any] = (
        type(ds).__name__,
        os.path.abspath(ds.data_dir) if getattr(ds, "data_dir", None) else None,
        getattr(ds, "imglist_pth", None) if not getattr(ds, "data_dir", None) else None,
        getattr(ds, "name", None) if not getattr(ds, "data_dir", None) else None,
        _transform_repr(getattr(ds, "transform_image", None) or getattr(ds, "transform", None)),
    )
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


class Scored(NamedTuple):
    stats: dict[str, np.ndarray]  # detector statistics rows in loader order (NaN / -1 where not selected)
    labels: np.ndarray
    extras: dict[str, np.ndarray]  # per-sample outputs of ``batch_hook``, in loader order
    selected: np.ndarray  # bool mask of samples that have statistics


def _expand(found: np.ndarray, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows for all samples: found ones in place, the rest NaN (floats) or -1 (integers)."""
    out = {}
    for k, v in rows.items():
        fill = np.nan if np.issubdtype(v.dtype, np.floating) else -1
        full = np.full((found.size, *v.shape[1:]), fill, dtype=v.dtype if fill is np.nan else np.int64)
        full[found] = v
        out[k] = full
    return out


def cached_statistics(detector: Any, net: torch.nn.Module, loader: Iterable, cache: ScoreCache | None = None,
                      progress: bool = True, device: torch.device | str | None = None,
                      batch_hook: Callable[[torch.Tensor], tuple[Any, Mapping[str, Any]]] | None = None) -> Scored:
    """``detector.statistics`` over an OpenOOD loader, in loader order, computing only missing samples.

    ``batch_hook(data)`` (optional) runs on every batch (on ``device``) and returns ``(select, extras)``:
    a bool mask of the samples that need statistics (None = all; e.g. a fusion cascade's routing) and
    per-sample extras (e.g. a baseline's scores) computed in the same pass, so loaders that shuffle
    cannot misalign them. Under torchrun each rank computes the missing samples it owns
    (``distributed.owned``); rows are exchanged after the pass and every rank returns the full result.
    """
    from tqdm.auto import tqdm

    from .distributed import all_gather, owned, rank_and_world

    rank, world = rank_and_world()
    store = cache if cache is not None else ScoreCache(None)
    source = loader_source(loader)
    if device is None:
        device = next(net.parameters()).device
    all_keys: list[str] = []
    labels: list[np.ndarray] = []
    selected: list[np.ndarray] = []
    extras: dict[str, list[np.ndarray]] = {}
    new_chunks: list[dict[str, np.ndarray]] = []
    for batch in tqdm(loader, disable=not progress or rank != 0, desc=f"{detector.name} scoring"):
        keys = sample_keys(batch, source)
        all_keys.extend(keys)
        labels.append(_to_numpy(batch["label"]))
        select = np.ones(len(keys), dtype=bool)
        if batch_hook is not None:
            mask, extra = batch_hook(batch["data"].to(device))
            if mask is not None:
                select = _to_numpy(mask).astype(bool)
            for k, v in extra.items():
                extras.setdefault(k, []).append(_to_numpy(v))
        selected.append(select)
        found, _ = store.lookup(keys)
        need = ~found & select & owned(keys, rank, world)
        if not need.any():
            continue
        sel = torch.from_numpy(np.nonzero(need)[0])
        given = torch.as_tensor(batch["label"])[sel].to(device) if getattr(detector, "needs_labels", False) else None
        stats = detector.statistics(net, batch["data"][sel].to(device), given)
        if "pred" not in stats:
            raise KeyError(f"{type(detector).__name__}.statistics must return 'pred' (Detector contract)")
        new_keys = [keys[i] for i in sel.tolist()]
        store.put(new_keys, stats)
        store.computed_rows += len(new_keys)
        new_chunks.append({_KEYS: np.asarray(new_keys, dtype=str), **{k: _to_numpy(v) for k, v in stats.items()}})
    if world > 1:
        for r, chunks in enumerate(all_gather(new_chunks)):
            if r != rank:
                for chunk in chunks:
                    store.add(chunk)
    sel_all = np.concatenate(selected) if selected else np.zeros(0, dtype=bool)
    found, rows = store.lookup(all_keys)
    if (sel_all & ~found).any():
        raise RuntimeError(f"score cache is missing {int((sel_all & ~found).sum())} of {len(all_keys)} samples "
                           "after scoring")
    stats = {k: v for k, v in rows.items()} if found.all() else _expand(found, rows)
    return Scored(stats, np.concatenate(labels) if labels else np.empty(0, dtype=np.int64),
                  {k: np.concatenate(v) for k, v in extras.items()}, found)
