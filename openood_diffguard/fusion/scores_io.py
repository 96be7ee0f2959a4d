"""Load cached per-sample scores of one detector, from our npz files or OpenOOD's pickled ``evaluator.scores``.

A loaded score file is a dict ``split -> {"conf", "label"[, "pred"][, "key"]}`` of numpy arrays, with
canonical split names ``id_val``, ``id_test``, ``ood_val``, ``near/<dataset>``, ``far/<dataset>``,
``csid/<dataset>``. ``conf`` is higher = ID, ``label`` is -1 for OOD.

**Our npz** (one file per detector; written by :func:`save_scores_npz`): ``conf`` [N] float, ``label`` [N]
int, ``split`` [N] str (canonical names above), optional ``pred`` [N] and an alignment ``key`` [N]
(image name or image-list row index). ``conf`` may be NaN where a cascade never computed it.

**OpenOOD pickle** (``scripts/eval_ood.py --save-score`` writes ``<run>/scores/<postprocessor>.pkl``):
``{'id': {'train', 'val', 'test'}, 'csid': {name}, 'ood': {'val', 'near': {name}, 'far': {name}}, ...}``
whose filled leaves are ``[pred, conf, gt]``. The Evaluator never stores ID-val / OOD-val scores there
(APS scores them without caching), so fusion of OpenOOD pickles alone must fit on ``id_test_half``.
OpenOOD pickles carry no alignment key: files are matched by position, which needs ``shuffle=False``
runs (``scripts/eval_ood_imagenet.py`` shuffles; its cached arrays do not line up).

**Safe loading.** Unpickling can run arbitrary code, so pickles are read by a restricted unpickler that
builds only plain data: dicts, lists, tuples, sets, numbers, strings, bytes, None, numpy arrays / dtypes /
scalars and torch tensors (OpenOOD's ``id_preds`` / ``id_labels`` are tensors; their storage is read with
``torch.load(weights_only=True)``). Anything else is refused with :class:`UnsafePickleError`, which names
the opt-in (``--trust-pickle`` / ``trust_pickle=True``) for files you trust. npz files are read with
``allow_pickle=False``.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

Split = dict[str, np.ndarray]
ScoreFile = dict[str, Split]


def _split_arrays(pred: Any, conf: Any, label: Any, where: str) -> Split:
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    if conf.shape != label.shape:
        raise ValueError(f"{where}: conf has {conf.size} entries but label {label.size}")
    out = {"conf": conf, "label": label}
    if pred is not None:
        out["pred"] = np.asarray(pred).reshape(-1)
    return out


class UnsafePickleError(ValueError):
    """A score pickle holds something other than plain data (and may run code when unpickled)."""


#: globals plain score data needs; protocol-2 pickles spell builtins ``__builtin__``, numpy 1 ``numpy.core``
_SAFE_GLOBALS = {
    *((m, n) for m in ("builtins", "__builtin__")
      for n in ("complex", "set", "frozenset", "bytearray", "bytes", "int", "float", "bool", "str", "list",
                "tuple", "dict")),
    ("_codecs", "encode"),  # protocol <= 2 spells bytes as encode(str, "latin1")
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *((f"numpy.{core}.{mod}", n) for core in ("core", "_core")
      for mod, n in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))),
    ("torch._utils", "_rebuild_tensor_v2"),
}


def _load_torch_storage(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes`` (a full ``torch.load`` of nested bytes): weights only."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's own refusal (UnpicklingError) or a corrupt storage
        raise pickle.UnpicklingError(f"a torch tensor's storage is not plain data ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else ''})") from err


_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_torch_storage
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which is not plain data")
        if module.startswith("numpy.core.") and _NUMPY2:
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 1 pickle under numpy 2: no warning
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids (not a plain pickle.dump)")


def load_pickle(path: str | Path, trust_pickle: bool = False) -> Any:
    """Unpickle plain data only (see the module docstring); ``trust_pickle=True``: plain ``pickle.load``."""
    with open(path, "rb") as f:
        if trust_pickle:
            return pickle.load(f)
        try:
            return _PlainDataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise UnsafePickleError(
                f"{path}: refused to unpickle: {err}. A score pickle holds only arrays, tensors, numbers, strings, "
                "lists and dicts; unpickling anything else can run code. If you trust this file, pass "
                "--trust-pickle (fuse) or trust_pickle=True.") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err


def load_openood_pickle(path: str | Path, trust_pickle: bool = False) -> ScoreFile:
    """OpenOOD ``evaluator.scores`` pickle -> canonical splits (only filled entries); plain data only unless
    ``trust_pickle``."""
    raw = load_pickle(path, trust_pickle)
    if not isinstance(raw, Mapping) or "id" not in raw or "ood" not in raw:
        raise ValueError(f"{path}: not an OpenOOD evaluator.scores pickle (expected keys 'id', 'ood', ...)")
    out: ScoreFile = {}

    def add(name: str, leaf: Any) -> None:
        if leaf is None:
            return
        if not (isinstance(leaf, (list, tuple)) and len(leaf) == 3):
            raise ValueError(f"{path}: entry {name!r} should be [pred, conf, gt], got {type(leaf).__name__}")
        out[name] = _split_arrays(*leaf, where=f"{path}:{name}")

    add("id_val", raw["id"].get("val"))
    add("id_test", raw["id"].get("test"))
    add("ood_val", raw["ood"].get("val"))
    for group in ("near", "far"):
        for ds, leaf in (raw["ood"].get(group) or {}).items():
            add(f"{group}/{ds}", leaf)
    for ds, leaf in (raw.get("csid") or {}).items():
        add(f"csid/{ds}", leaf)
    for name, split in out.items():
        if not name.startswith(("id_", "csid/")):
            split["label"] = -np.ones_like(split["label"])  # the Evaluator forces OOD gt to -1 as well
    if not out:
        raise ValueError(f"{path}: the pickle holds no computed scores (all entries None)")
    return out


def load_npz(path: str | Path) -> ScoreFile:
    with np.load(path, allow_pickle=False) as z:
        missing = {"conf", "label", "split"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing key(s) {sorted(missing)}; a score npz holds conf, label, split "
                             f"[, pred, key] (see openood_diffguard.fusion.scores_io)")
        data = {k: z[k] for k in z.files}
    split = data["split"].astype(str)
    out: ScoreFile = {}
    for name in dict.fromkeys(split):  # first-seen order
        m = split == name
        out[name] = _split_arrays(data["pred"][m] if "pred" in data else None, data["conf"][m], data["label"][m],
                                  where=f"{path}:{name}")
        if "key" in data:
            out[name]["key"] = data["key"][m]
    return out


def load_scores(path: str | Path, trust_pickle: bool = False) -> ScoreFile:
    """Load by extension: ``.npz`` (ours) or ``.pkl`` / ``.pickle`` (OpenOOD's saved scores; plain data only
    unless ``trust_pickle``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score file not found: {path}")
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix in (".pkl", ".pickle"):
        return load_openood_pickle(path, trust_pickle)
    raise ValueError(f"{path}: unknown score file type; expected .npz (openood-diffguard) or .pkl (OpenOOD)")


def save_scores_npz(path: str | Path, splits: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``split -> {conf, label[, pred][, key]}`` as one npz (the format :func:`load_npz` reads)."""
    names, cols = [], {}
    for name, s in splits.items():
        n = np.asarray(s["conf"]).reshape(-1).size
        names.append(np.full(n, name))
        for k in ("conf", "label", "pred", "key"):
            if k in s:
                cols.setdefault(k, []).append(np.asarray(s[k]).reshape(-1))
    lengths = {k: sum(map(len, v)) for k, v in cols.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"every split needs the same optional keys; got column lengths {lengths}")
    np.savez(path, split=np.concatenate(names), **{k: np.concatenate(v) for k, v in cols.items()})


def align(files: Mapping[str, ScoreFile]) -> dict[str, dict[str, np.ndarray]]:
    """Splits present in every file -> ``{"label", component: conf, ...}`` aligned sample by sample.

    Uses the ``key`` column when every file has one for that split (order-independent), otherwise position;
    either way the labels must agree, so mismatched runs fail loudly instead of fusing unrelated samples.
    """
    names = list(files)
    common = [s for s in files[names[0]] if all(s in files[n] for n in names[1:])]
    if not common:
        raise ValueError(f"the score files share no split: {({n: sorted(f) for n, f in files.items()})}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in common:
        parts = [files[n][split] for n in names]
        if all("key" in p for p in parts):
            ref = parts[0]["key"]
            if len(np.unique(ref)) != len(ref):
                raise ValueError(f"split {split!r}: alignment keys are not unique")
            order = []
            for n, p in zip(names, parts):
                pos = {k: i for i, k in enumerate(p["key"].tolist())}
                missing = [k for k in ref.tolist() if k not in pos]
                if missing or len(p["key"]) != len(ref):
                    raise ValueError(f"split {split!r}: {n} has a different sample set ({len(missing)} keys missing)")
                order.append(np.array([pos[k] for k in ref.tolist()]))
            parts = [{k: v[o] for k, v in p.items()} for p, o in zip(parts, order)]
        sizes = {n: p["conf"].size for n, p in zip(names, parts)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"split {split!r}: files hold different sample counts {sizes} (different runs?)")
        for n, p in zip(names[1:], parts[1:]):
            if not np.array_equal(p["label"], parts[0]["label"]):
                raise ValueError(f"split {split!r}: labels of {n} and {names[0]} differ sample by sample; the "
                                 f"files are not aligned (a shuffled loader, e.g. eval_ood_imagenet.py?)")
        out[split] = {"label": parts[0]["label"], **{n: p["conf"] for n, p in zip(names, parts)}}
    return out
