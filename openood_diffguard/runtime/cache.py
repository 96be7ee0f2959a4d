"""Per-sample score cache on disk, crash-safe and shared between processes.

Why: OpenOOD's ``main.py`` scores the ID test set twice, APS re-runs ``inference`` on the validation sets
for every grid point, and diffusion scoring of a benchmark takes hours. Raw ``Detector.statistics`` rows
are stored once per sample; confidences are always recomputed from them (``Detector.confidence`` uses only
cheap parameters), so repeated passes and cheap-parameter sweeps cost nothing, and a killed run resumes.

Layout: ``<root>/<namespace>/chunk-*.npz``. The namespace hashes the detector's ``cache_key()`` (name,
expensive parameters, content fingerprints of the models) and the classifier's weights hash. Each ``put``
writes one chunk to a temporary file, fsyncs it and renames it into place (atomic on POSIX), so a
``kill -9`` loses at most the batch in flight and never leaves a half-written chunk visible. Temporary
files of killed writers are removed when a cache is opened: those whose writer (pid, tagged with its host,
boot and pid namespace) is gone, and any older than ``stale_after`` seconds (writers on other hosts).

Several processes can share one namespace. torchrun ranks split the samples by key (``distributed``);
independent processes (two jobs started on the same benchmark) split the work batch by batch through
claim files ``claim-*.lock``: a process computes a batch only while it holds an exclusive ``flock`` on the
batch's claim, and skips batches another process holds. At the end it waits for the rows of the skipped
batches; batches whose holder died (the kernel releases its lock) or that take longer than
``claim_timeout`` are computed in a further pass over the loader. So every sample is computed once and
each process returns all rows. (``flock`` rather than pid files: a dead holder can never keep a claim,
with no heartbeat or takeover race. Where the filesystem has no ``flock``, or for one-shot iterators that
cannot be read twice, processes compute independently as before: duplicated work, same rows.)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

try:  # POSIX advisory locks for the work claims; absent on Windows (claims are then off)
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None

_KEYS = "__keys__"


def _writer_domain() -> str:
    """Where this process's pid means something: host name + boot id + pid namespace (two containers on one
    host, or two hosts with one name, get different tags, so a pid is only ever checked in its own domain)."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            pass
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:40] or "host"
    return f"{name}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:8]}"


_HOST = _writer_domain()


def default_cache_root() -> Path:
    return Path(os.environ.get("OPENOOD_DIFFGUARD_CACHE", Path.home() / ".cache" / "openood_diffguard"))


def hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed a tensor's name, shape, dtype and bytes into hashlib object ``h`` (any dtype, bf16 included)."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def module_fingerprint(net: torch.nn.Module) -> str:
    """Hash of a network's weights (names, shapes, dtypes, values; any dtype, bf16 included): the one weights
    fingerprint of the package (score-cache namespaces, the baselines' feature cache, LFDN checkpoints'
    ``classifier_hash``). A DataParallel ``module.`` prefix is ignored: a wrapped net is the same checkpoint."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        hash_tensor(h, name.removeprefix("module."), t)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True  # cannot tell: keep the file (the age rule still applies)
    return True


_TMP = re.compile(r"^\.tmp~(?P<host>[^~]+)~(?P<pid>\d+)~[0-9a-f]+(\.[^~]*)?$")


def clean_temp_files(folder: Path, stale_after: float = 3600.0) -> list[Path]:
    """Remove ``.tmp*`` files of dead writers in ``folder``: written on this host by a pid that is gone
    (names from :func:`atomic_write`), or older than ``stale_after`` seconds (other hosts, older versions)."""
    removed, now = [], time.time()
    for path in Path(folder).glob(".tmp*"):
        m = _TMP.match(path.name)
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if (m is not None and m["host"] == _HOST and not _pid_alive(int(m["pid"]))) or age > stale_after:
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], stale_after: float = 3600.0) -> Path:
    """Write ``path`` all or nothing: ``write(file)`` into a temporary file named after this writer (host, pid),
    fsync, rename into place. A killed writer leaves only its temporary file, which the next writer (or
    ``ScoreCache`` opening the folder) removes; concurrent writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temp_files(path.parent, stale_after)
    tmp = path.parent / f".tmp~{_HOST}~{os.getpid()}~{uuid.uuid4().hex}{''.join(path.suffixes)}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class Claim:
    """An exclusive claim on one batch of work (a held ``flock`` on ``claim-<id>.lock``); release() is idempotent."""

    def __init__(self, path: Path | None = None, fd: int | None = None) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a waiter that opened this inode sees it is stale
        except FileNotFoundError:
            pass
        os.close(self.fd)  # releases the lock
        self.fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class ScoreCache:
    """Append-only store of per-sample statistics rows, addressed by string sample keys.

    ``stale_after``: age (s) after which temporary files of writers on other hosts count as abandoned.
    ``claim_timeout``: how long (s) to wait for a batch another live process is computing before computing it
    here as well. ``poll``: seconds between checks while waiting.
    """

    def __init__(self, root: str | os.PathLike | None, namespace: str = "memory", *, stale_after: float = 3600.0,
                 claim_timeout: float = 3600.0, poll: float = 0.2) -> None:
        # root=None: in-memory only (same API; used when caching is disabled)
        self.dir = None if root is None else Path(root) / namespace
        self.stale_after, self.claim_timeout, self.poll = float(stale_after), float(claim_timeout), float(poll)
        self.claims_enabled = self.dir is not None and fcntl is not None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.clean()
        self._seen: set[str] = set()
        self._chunks: list[dict[str, np.ndarray]] = []
        self._index: dict[str, tuple[int, int]] = {}
        #: rows ``cached_statistics`` computed (cache misses) into this store in this process; a warm cache adds 0
        self.computed_rows = 0

    # ------------------------------------------------------------------ hygiene
    def clean(self) -> list[Path]:
        """Remove temporary files of dead writers (same host, pid gone; or older than ``stale_after``) and
        claim files nobody holds. Never touches a file a live process is writing or holding. Returns them."""
        if self.dir is None:
            return []
        removed = clean_temp_files(self.dir, self.stale_after)
        if self.claims_enabled:
            for path in self.dir.glob("claim-*.lock"):
                claim = self._lock(path, create=False)
                if isinstance(claim, Claim) and claim.fd is not None:
                    claim.release()  # unheld: its holder finished or died
                    removed.append(path)
        return removed

    # ------------------------------------------------------------------ claims
    def _lock(self, path: Path, create: bool = True) -> "Claim | None | bool":
        """Claim (held lock), None (another process holds it), False (no such file / no flock support)."""
        while True:
            try:
                fd = os.open(path, (os.O_CREAT if create else 0) | os.O_RDWR, 0o644)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as err:  # a filesystem without flock: claims off, work is duplicated, rows stay right
                os.close(fd)
                warnings.warn(f"score cache: no file locks on {self.dir} ({err}); concurrent processes will "
                              "compute the same samples")
                self.claims_enabled = False
                return False
            try:  # the previous holder unlinks the file before unlocking: did we lock the live path?
                live = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                live = False
            if live:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"host": _HOST, "pid": os.getpid(), "time": time.time()}).encode())
                return Claim(path, fd)
            os.close(fd)
            if not create:
                return False

    def _claim_path(self, keys: Sequence[str]) -> Path:
        return self.dir / f"claim-{hashlib.sha256(chr(10).join(sorted(keys)).encode()).hexdigest()[:24]}.lock"

    def claim(self, keys: Sequence[str]) -> "Claim | None":
        """Exclusive claim on computing ``keys`` (one batch): a held Claim, a no-op Claim when claims are off,
        or None when another live process holds it."""
        if not self.claims_enabled:
            return Claim()
        got = self._lock(self._claim_path(keys))
        return Claim() if got is False else got

    def held_elsewhere(self, keys: Sequence[str]) -> bool:
        """True while another live process holds the claim on exactly these keys."""
        if not self.claims_enabled:
            return False
        got = self._lock(self._claim_path(keys), create=False)
        if isinstance(got, Claim):
            got.release()
        return got is None

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
        atomic_write(self.dir / name, lambda f: np.savez(f, **arrays), self.stale_after)
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


def loader_source(loader: Any, *, content: bool = False) -> str | None:
    """Identity of the data behind a loader that is the same in every process (never an object id).

    ``content=False`` (score-cache sample keys, which add each image's name or index): where the names live,
    the image folder (else image list / name) and the test transform; ``"batches"`` for plain iterables.

    ``content=True`` (caches of results over a whole set, e.g. the baselines' ID train features): which
    samples, by content and without reading images: OpenOOD image lists (folder, lines, transform),
    torchvision folders (root, samples, transform), ``TensorDataset`` and in-memory lists of batches (their
    tensors). None when a loader has no such identity: then its results must not be cached across processes.
    """
    ds = getattr(loader, "dataset", None)
    if content:
        return _content_identity(loader if ds is None else ds)
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


def _content_identity(ds: Any) -> str | None:
    transform = _transform_repr(getattr(ds, "transform_image", None) or getattr(ds, "transform", None))
    h = hashlib.sha256()
    imglist, samples, tensors = getattr(ds, "imglist", None), getattr(ds, "samples", None), getattr(ds, "tensors", None)
    if isinstance(imglist, (list, tuple)) and all(isinstance(line, str) for line in imglist):
        folder = os.path.abspath(str(ds.data_dir)) if getattr(ds, "data_dir", None) else ""
        h.update(f"{type(ds).__name__}|{folder}|{transform}|{len(imglist)}|".encode())
        for line in imglist:
            h.update(line.encode())
        return "imglist-" + h.hexdigest()[:16]
    if isinstance(samples, list) and getattr(ds, "root", None) is not None:
        h.update(f"{type(ds).__name__}|{os.path.abspath(str(ds.root))}|{samples}|{transform}".encode())
        return "folder-" + h.hexdigest()[:16]
    if isinstance(tensors, tuple) and tensors and all(torch.is_tensor(t) for t in tensors):
        for i, t in enumerate(tensors):
            hash_tensor(h, str(i), t)
        return "tensors-" + h.hexdigest()[:16]
    if isinstance(ds, (list, tuple)) and ds:
        for i, batch in enumerate(ds):
            x, y = (batch["data"], batch["label"]) if isinstance(batch, Mapping) else (batch[0], batch[1])
            hash_tensor(h, f"{i}.data", torch.as_tensor(x))
            hash_tensor(h, f"{i}.label", torch.as_tensor(y))
        return "batches-" + h.hexdigest()[:16]
    return None


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


class _Work:
    """Computes the missing rows of one pass, batch by batch, under the cache's claims (see module docstring)."""

    def __init__(self, detector: Any, net: torch.nn.Module, store: ScoreCache, device: Any, claims: bool) -> None:
        self.detector, self.net, self.store, self.device = detector, net, store, device
        self.claims = claims and store.claims_enabled
        self.deferred: list[tuple[list[str], float]] = []  # (keys another process is computing, since when)
        self.new_chunks: list[dict[str, np.ndarray]] = []

    def batch(self, keys: list[str], batch: Mapping[str, Any], want: np.ndarray, claim: bool = True) -> None:
        if not want.any():
            return
        found, _ = self.store.lookup(keys)
        if not (want & ~found).any():
            return
        wanted = [keys[i] for i in np.nonzero(want)[0].tolist()]
        held = self.store.claim(wanted) if (claim and self.claims) else Claim()
        if held is None:
            self.deferred.append((wanted, time.monotonic()))
            return
        with held:
            found, _ = self.store.lookup(keys)  # the previous holder may have written them meanwhile
            need = want & ~found
            if need.any():
                self._compute(keys, batch, need)

    def _compute(self, keys: list[str], batch: Mapping[str, Any], need: np.ndarray) -> None:
        sel = torch.from_numpy(np.nonzero(need)[0])
        det = self.detector
        given = torch.as_tensor(batch["label"])[sel].to(self.device) if getattr(det, "needs_labels", False) else None
        stats = det.statistics(self.net, batch["data"][sel].to(self.device), given)
        if "pred" not in stats:
            raise KeyError(f"{type(det).__name__}.statistics must return 'pred' (Detector contract)")
        new_keys = [keys[i] for i in sel.tolist()]
        self.store.put(new_keys, stats)
        self.store.computed_rows += len(new_keys)
        self.new_chunks.append({_KEYS: np.asarray(new_keys, dtype=str), **{k: _to_numpy(v) for k, v in stats.items()}})

    def settle(self, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """Wait until every deferred batch is released by its holder (or ``claim_timeout`` passed). Returns the
        keys still missing (holder died or failed: computed in another pass, under claims) and, among them,
        those whose holder timed out (computed without a claim)."""
        from tqdm.auto import tqdm

        pending, self.deferred = self.deferred, []
        waited = [k for keys, _ in pending for k in keys]
        forced: list[str] = []
        bar = tqdm(total=len(pending), disable=not progress, desc="waiting for batches of other processes")
        while pending:
            still = []
            for keys, since in pending:
                if not self.store.held_elsewhere(keys):
                    bar.update(1)
                elif time.monotonic() - since > self.store.claim_timeout:
                    warnings.warn(f"score cache: another process has held a batch for more than "
                                  f"{self.store.claim_timeout:g} s; computing it here as well")
                    forced.extend(keys)
                    bar.update(1)
                else:
                    still.append((keys, since))
            pending = still
            if pending:
                time.sleep(self.store.poll)
        bar.close()
        found, _ = self.store.lookup(waited)
        missing = np.asarray(waited, dtype=str)[~found]
        forced_arr = np.asarray(forced, dtype=str)
        return missing, forced_arr[np.isin(forced_arr, missing)]


def cached_statistics(detector: Any, net: torch.nn.Module, loader: Iterable, cache: ScoreCache | None = None,
                      progress: bool = True, device: torch.device | str | None = None,
                      batch_hook: Callable[[torch.Tensor], tuple[Any, Mapping[str, Any]]] | None = None) -> Scored:
    """``detector.statistics`` over an OpenOOD loader, in loader order, computing only missing samples.

    ``batch_hook(data)`` (optional) runs on every batch (on ``device``) and returns ``(select, extras)``:
    a bool mask of the samples that need statistics (None = all; e.g. a fusion cascade's routing) and
    per-sample extras (e.g. a baseline's scores) computed in the same pass, so loaders that shuffle
    cannot misalign them. Under torchrun each rank computes the missing samples it owns
    (``distributed.owned``); rows are exchanged after the pass and every rank returns the full result.
    Independent processes on one cache split the batches through claims (module docstring): batches
    another process is computing are skipped, their rows awaited at the end, and re-read from ``loader``
    (a second pass, computing only what is still missing) if that process died.
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
    work = _Work(detector, net, store, device, claims=not isinstance(loader, Iterator))
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
        work.batch(keys, batch, select & owned(keys, rank, world))
    # batches other processes were computing: wait for their rows; compute what a dead / stuck holder left
    while work.deferred:
        todo, forced = work.settle(progress and rank == 0)
        if todo.size == 0:
            break
        for batch in loader:
            keys = sample_keys(batch, source)
            arr = np.asarray(keys)
            work.batch(keys, batch, np.isin(arr, todo) & ~np.isin(arr, forced))
            work.batch(keys, batch, np.isin(arr, forced), claim=False)
    new_chunks = work.new_chunks
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
