"""OpenOOD-free parsing of our postprocessor yml sections (shared by the OpenOOD postprocessors, the
preset checks and anything that wants a yml's detector without importing OpenOOD).

A section is the ``postprocessor`` mapping of an OpenOOD yml: ``name``, ``APS_mode``,
``postprocessor_args``, ``postprocessor_sweep``. Detector sections pass their args to the detector, minus
the wrapper's own keys ``WRAPPER_KEYS``; fusion sections follow ``fusion.presets``. This module is the one
reader of those sections: the yml file (:func:`read_postprocessor_section`), the sweep keys
(:func:`sweep_param`, :func:`sweep_items`), the APS switch (:func:`aps_flag`) and the detector name
(:func:`detector_name`); detectors check their own parameters' types and ranges.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

WRAPPER_KEYS = ("detector", "cache_dir", "cache", "gallery")
#: OpenOOD's spelling of a sweep key: ``<param>_list`` (its own ymls: ``temperature_list``, ``K_list``)
LIST_SUFFIX = "_list"
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def parse_bool(value: Any, key: str) -> bool:
    """A yml / command-line boolean: true/false, yes/no, 1/0 (any case, also as strings); else an error naming
    ``key``. (``bool("false")`` is True: a quoted ``cache: "false"`` used to leave the disk cache on.)"""
    import numpy as np

    from ..detectors.base import ParameterError

    if isinstance(value, (bool, np.bool_)):  # numpy bools from APS grids
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ParameterError(f"{key} must be true or false (also yes/no, 1/0), got {value!r}")


def plain(obj: Any) -> Any:
    """OpenOOD ``Config`` (dict subclass with attribute access) -> plain dicts/lists, recursively."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def section(config: Any, key: str) -> dict:
    """``config[key]`` as a dict; OpenOOD's Config returns None for missing attributes, so test membership."""
    return plain(config[key]) if key in config and config[key] is not None else {}


def dataset_normalization(dataset: Mapping[str, Any]) -> str | None:
    """normalisation key of a ``dataset`` section (merged or Evaluator config): normalization_type, else name."""
    return dataset.get("normalization_type") or dataset.get("name")


def read_postprocessor_section(path: str | Path) -> dict:
    """The ``postprocessor`` section of a yml (a clear error if the file has none)."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("postprocessor"), Mapping):
        raise ValueError(f"{path}: no 'postprocessor' section (OpenOOD postprocessor yml expected)")
    return dict(cfg["postprocessor"])


def sweep_param(key: str) -> str:
    """The parameter a ``postprocessor_sweep`` key sweeps: ``<param>_list`` -> ``<param>``; a bare ``<param>`` is
    accepted too. The rule does not depend on which parameters exist, so the fusion preset reader (which does
    not know its detector's parameters) and the postprocessors read every key the same way."""
    return key[:-len(LIST_SUFFIX)] if key.endswith(LIST_SUFFIX) and len(key) > len(LIST_SUFFIX) else key


def sweep_items(sweep: Mapping[str, Any], owner: str) -> list[tuple[str, str, list]]:
    """``(yml key, parameter, candidates)`` per sweep entry, in key order (= ``set_hyperparam`` order). Each
    entry must be a non-empty list, and no parameter may be swept by two keys (errors name the yml key)."""
    items, seen = [], {}
    for key, values in sweep.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{owner}: postprocessor_sweep.{key} must be a non-empty list, got {values!r}")
        param = sweep_param(key)
        if param in seen:
            raise ValueError(f"{owner}: postprocessor_sweep keys {seen[param]!r} and {key!r} both sweep {param!r}")
        seen[param] = key
        items.append((key, param, list(values)))
    return items


def sweep_parameters(sweep: Mapping[str, Any], allowed: Mapping[str, Any], owner: str) -> list[str]:
    """Parameter names of the sweep keys, in key order; a key naming no parameter of ``allowed`` is a KeyError."""
    names = []
    for key, name, _ in sweep_items(sweep, owner):
        if name not in allowed:
            raise KeyError(f"{owner}: postprocessor_sweep key {key!r} names no parameter; sweepable: "
                           f"{sorted(f'{p}{LIST_SUFFIX}' for p in allowed)}")
        names.append(name)
    return names


def aps_flag(pp: Mapping[str, Any], sweep: Mapping[str, Any], owner: str) -> bool:
    """``postprocessor.APS_mode``, parsed strictly; APS with an empty ``sweep`` is an error."""
    aps = parse_bool(pp.get("APS_mode", False), f"{owner}: postprocessor.APS_mode")
    if aps and not sweep:
        # OpenOOD's Evaluator recurses forever on an empty grid: refuse early, with the fix
        raise ValueError(f"{owner}: APS_mode is true with an empty postprocessor_sweep (OpenOOD's Evaluator would "
                         "recurse forever); add <param>_list entries or set APS_mode: false")
    return aps


def detector_name(pp: Mapping[str, Any], default: str | None = None) -> str | None:
    """The detector a section configures: ``postprocessor_args.detector``, else ``default`` (a postprocessor
    class's own), else ``postprocessor.name``."""
    return (pp.get("postprocessor_args") or {}).get("detector") or default or pp.get("name")


def split_wrapper_args(pp: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(wrapper keys, detector args)`` of a detector section (``cache_dir`` with ``~`` expanded)."""
    args = dict(pp.get("postprocessor_args") or {})
    wrapper = {k: args.pop(k) for k in WRAPPER_KEYS if k in args}
    if "cache" in wrapper:
        wrapper["cache"] = parse_bool(wrapper["cache"], "postprocessor_args.cache")
    if wrapper.get("cache_dir"):
        wrapper["cache_dir"] = str(Path(wrapper["cache_dir"]).expanduser())
    return wrapper, args


def detector_from_section(pp: Mapping[str, Any], dataset: Mapping[str, Any] | None = None,
                          default_name: str | None = None) -> tuple[Any, dict]:
    """``(detector, wrapper_args)`` of a detector section; unknown detector parameters raise TypeError.

    The detector is ``postprocessor_args.detector``, else ``default_name``, else ``postprocessor.name``
    (a registered name or ``module:Class``). ``normalization`` defaults to the dataset's; ``cache_dir`` is
    also the detector's own when it has one (LFDN keeps its on-the-fly checkpoints there; null =
    ``<default cache root>/<detector name>``, which follows ``$OPENOOD_DIFFGUARD_CACHE``).
    """
    from ..runtime.registry import detector_class

    wrapper, args = split_wrapper_args(pp)
    cls = detector_class(detector_name(pp, default_name))
    if "cache_dir" in cls.DEFAULTS:  # null: under $OPENOOD_DIFFGUARD_CACHE (else ~/.cache/openood_diffguard)
        from ..runtime.cache import default_cache_root

        args.setdefault("cache_dir", wrapper.get("cache_dir") or str(default_cache_root() / cls.name))
    if "normalization" in cls.DEFAULTS and args.get("normalization") is None:
        norm = dataset_normalization(dataset or {})
        if norm is not None:
            args["normalization"] = norm
    return cls(**args), wrapper


def fusion_detector_section(pp: Mapping[str, Any]) -> tuple[Any, dict]:
    """``(FusionConfig, detector section)`` of a fusion section: the detector's args are its
    ``detector_preset``'s updated by ``detector_args``; the fusion's ``cache_dir`` / ``cache`` apply to it."""
    from ..fusion.presets import parse_fusion_config

    cfg = parse_fusion_config(pp, where=f"fusion postprocessor {pp.get('name')!r}")  # unknown keys fail here
    args = dict(pp.get("postprocessor_args") or {})
    det_args = {**cfg.resolved_detector_args(), "detector": cfg.detector,
                **{k: args[k] for k in ("cache_dir", "cache") if k in args}}
    return cfg, {"name": cfg.detector, "APS_mode": False, "postprocessor_args": det_args}


def is_fusion_section(pp: Mapping[str, Any]) -> bool:
    return "baseline" in (pp.get("postprocessor_args") or {})
