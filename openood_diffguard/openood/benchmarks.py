"""Your own ID / OOD image lists as an OpenOOD Evaluator benchmark, offline.

OpenOOD's ``Evaluator`` only knows ``cifar10``, ``cifar100``, ``imagenet200`` and ``imagenet`` (``Dataset [x] is not
supported``), and for those it downloads every missing set (with ``id_name="cifar10"`` a custom ID split still
triggers the CIFAR-100 / TIN / ... downloads). :func:`register_benchmark` adds a benchmark under a new name to the
Evaluator's tables (``DATA_INFO``, its default preprocessing) and to our detectors' normalisation table, so

    register_benchmark("digits6", num_classes=6, normalization="cifar10", data_dir="images",
                       id={"train": "lists/train.txt", "val": "lists/val.txt", "test": "lists/test.txt"},
                       ood_val="lists/val_ood.txt", near={"digits6to9": "lists/test_ood.txt"},
                       far={"noise": "lists/test_noise.txt"})
    Evaluator(net, id_name="digits6", data_root="my_data", postprocessor_name="diffnb_cifar10").eval_ood()

reads ``my_data/lists/*.txt`` (OpenOOD's image-list format: ``<path relative to data_dir> <label>`` per line,
label -1 for OOD) and never downloads: for a registered name, the Evaluator's ``data_setup`` only checks that the
files are there and names the missing ones.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from . import require_openood

#: OpenOOD's own benchmarks: never replaced
BUILTIN = ("cifar10", "cifar100", "imagenet200", "imagenet")
_REGISTERED: dict[str, dict] = {}


def _entry(data_dir: str, imglist: str, what: str) -> dict[str, str]:
    if not isinstance(imglist, (str, os.PathLike)) or not str(imglist):
        raise ValueError(f"register_benchmark: {what} must be an image-list path, got {imglist!r}")
    return {"data_dir": str(data_dir), "imglist_path": str(imglist)}


def _group(data_dir: str, sets: Mapping[str, str] | None, what: str, required: bool) -> dict:
    sets = dict(sets or {})
    if required and not sets:
        raise ValueError(f"register_benchmark: {what} needs at least one OOD set {{name: image list}}; OpenOOD's "
                         "Evaluator reports a near and a far group (the same list may appear in both)")
    return {"datasets": list(sets), **{n: _entry(data_dir, p, f"{what}[{n!r}]") for n, p in sets.items()}}


def _normalization(name: str, normalization: Any) -> tuple[list[float], list[float]]:
    from ..space import NORMALIZATION

    if isinstance(normalization, str):
        if normalization.lower() not in NORMALIZATION:
            raise ValueError(f"register_benchmark: normalization {normalization!r} is not one of "
                             f"{sorted(NORMALIZATION)}; give (mean, std) instead")
        mean, std = NORMALIZATION[normalization.lower()]
    else:
        try:
            mean, std = (tuple(float(v) for v in part) for part in normalization)
        except (TypeError, ValueError):
            raise ValueError(f"register_benchmark: normalization must be a name or (mean, std) sequences, got "
                             f"{normalization!r}") from None
        if len(mean) != len(std) or not mean or min(std) <= 0:
            raise ValueError(f"register_benchmark: normalization mean {mean} / std {std}: same length, std > 0")
    return list(mean), list(std)


def register_benchmark(name: str, *, num_classes: int, normalization: str | Sequence[Sequence[float]],
                       data_dir: str, id: Mapping[str, str], ood_val: str, near: Mapping[str, str],
                       far: Mapping[str, str], csid: Mapping[str, str] | None = None, image_size: int = 32,
                       pre_size: int | None = None) -> dict:
    """Register an image-list benchmark under ``name`` for OpenOOD's ``Evaluator`` (see the module docstring).

    ``data_dir`` and every image list are relative to the Evaluator's ``data_root`` (or absolute); ``id`` needs
    ``train``, ``val`` and ``test``. ``normalization``: the classifier's input normalisation, a known name
    (``cifar10``, ``imagenet``, ...) or ``(mean, std)``; it is also what our detectors un-normalise with.
    Test-time transform: resize to ``pre_size`` (default ``image_size``), centre crop ``image_size``.
    Returns the ``DATA_INFO`` entry. Registering the same name again replaces it.
    """
    require_openood()
    from ..space import NORMALIZATION
    from .registration import _set_item, _target, _unwrap

    if not isinstance(name, str) or not name or name in BUILTIN:
        raise ValueError(f"register_benchmark: name must be a new name, not one of OpenOOD's {BUILTIN}, got {name!r}")
    if "imagenet" in name:
        raise ValueError(f"register_benchmark: {name!r}: OpenOOD treats any id_name containing 'imagenet' as ImageNet")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"register_benchmark: num_classes must be a positive integer, got {num_classes!r}")
    missing = {"train", "val", "test"} - set(id)
    if missing:
        raise ValueError(f"register_benchmark: id needs image lists for {sorted(missing)}")
    for key, value in (("image_size", image_size), ("pre_size", pre_size if pre_size is not None else image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"register_benchmark: {key} must be a positive integer, got {value!r}")
    mean, std = _normalization(name, normalization)
    info = {
        "num_classes": num_classes,
        "id": {split: _entry(data_dir, id[split], f"id[{split!r}]") for split in ("train", "val", "test")},
        "csid": _group(data_dir, csid, "csid", required=False),
        "ood": {"val": _entry(data_dir, ood_val, "ood_val"), "near": _group(data_dir, near, "near", True),
                "far": _group(data_dir, far, "far", True)},
    }
    tables = [_target("openood.evaluation_api.datasets", "DATA_INFO", dict),
              _target("openood.evaluation_api.datasets", "benchmarks_dict", dict),
              _target("openood.evaluation_api.preprocessor", "default_preprocessing_dict", dict)]
    original = _unwrap(_target("openood.evaluation_api.evaluator", "data_setup", object))
    # logged like register()'s patches: registration.unregister() / registered() undo them too
    for table, value in zip(tables, (info, [], {"pre_size": pre_size or image_size, "img_size": image_size,
                                                "normalization": [mean, std]})):  # [] = nothing to download
        _set_item(table, name, value)
    _set_item(NORMALIZATION, name.lower(), (tuple(mean), tuple(std)))  # our detectors resolve it by dataset name
    _REGISTERED[name] = info
    _patch_data_setup(original)
    return info


def benchmark_files(name: str, data_root: str) -> list[str]:
    """Every folder and image list a registered benchmark reads under ``data_root``."""
    info = _REGISTERED[name]
    entries = [*info["id"].values(), info["ood"]["val"]]
    for group in (info["csid"], info["ood"]["near"], info["ood"]["far"]):
        entries += [group[n] for n in group["datasets"]]
    paths = []
    for e in entries:
        for key in ("data_dir", "imglist_path"):
            path = os.path.join(data_root, e[key])
            if path not in paths:
                paths.append(path)
    return paths


def check_benchmark_files(name: str, data_root: str) -> None:
    missing = [p for p in benchmark_files(name, data_root) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"benchmark {name!r} under data_root {data_root!r}: missing {', '.join(missing)} "
                                "(registered benchmarks are never downloaded)")


def _patch_data_setup(original: Any) -> None:
    """The Evaluator's ``data_setup`` (download what is missing) -> a file check for registered names."""
    import openood.evaluation_api.evaluator as ev

    from .registration import _marked, _set

    def data_setup(data_root, id_data_name):
        if id_data_name in _REGISTERED:
            return check_benchmark_files(id_data_name, data_root)
        return original(data_root, id_data_name)

    _set(ev, "data_setup", _marked(data_setup, original))
