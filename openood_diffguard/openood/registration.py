"""Teach OpenOOD our postprocessor names (it has no plugin mechanism; docs/openood.md).

``register()`` (idempotent) replaces every module-level binding of OpenOOD's ``get_postprocessor``
(``openood.postprocessors``, ``openood.postprocessors.utils`` and each pipeline that imported it) with a
factory that serves our names and delegates everything else, adds our names to the Evaluator's table and
swaps the Evaluator's factory for one that reads our yml from ``config_root`` or, if absent there, from
this package, so OpenOOD never tries to download a config for our names. The Evaluator's table is keyed by
the name it is given (a yml stem, e.g. ``diffguard_cifar10``); the class comes from that yml's
``postprocessor.name`` (``diffguard``), exactly the class main.py's factory builds from the same yml.
"""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from . import require_openood
from .sections import is_fusion_section, read_postprocessor_section

PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "postprocessors"
#: packaged training configs (``configs/pipelines/*.yml``), usable by stem after ``--config`` in the launcher
PACKAGE_TRAIN_CONFIGS = PACKAGE_CONFIGS.parent / "pipelines"
#: our OpenOOD trainers: ``trainer.name`` -> "module:Class" (two-loader trainers, like OpenOOD's OE trainer)
TRAINERS: dict[str, str] = {"ncis": "openood_diffguard.ncis.openood_trainer:NCISTrainer"}
_MARK = "openood_diffguard_patched"

#: generic names -> the default preset (one yml per preset; the generic name is an alias, not a copy).
#: Each is the preset whose arguments are closest to the detector's own DEFAULTS.
ALIASES: dict[str, str] = {
    "diffguard": "diffguard_gdm_imagenet",
    "diffnb": "diffnb_cifar10",
    "lfdn": "lfdn_cifar10",
    "diffguard_fusion": "fusion_diffguard_ebo_cifar10",
}


@lru_cache(maxsize=None)
def packaged_configs() -> dict[str, Path]:
    """Our yml presets shipped in the package: name (file stem, or alias of one) -> path."""
    files = {p.stem: p for p in sorted(PACKAGE_CONFIGS.glob("*.yml"))}
    return {**files, **{alias: files[stem] for alias, stem in ALIASES.items() if stem in files}}


@lru_cache(maxsize=None)
def packaged_train_configs() -> dict[str, Path]:
    """Our training configs shipped in the package: file stem -> path (e.g. ``train_ncis``)."""
    return {p.stem: p for p in sorted(PACKAGE_TRAIN_CONFIGS.glob("*.yml"))}


def postprocessor_config(name: str, config_root: str | Path | None = None) -> Path:
    """yml of one of our names: ``<config_root>/postprocessors/<name>.yml`` if present, else the packaged one."""
    if config_root is not None:
        user = Path(config_root) / "postprocessors" / f"{name}.yml"
        if user.is_file():
            return user
    if name in packaged_configs():
        return packaged_configs()[name]
    raise FileNotFoundError(f"no config for postprocessor {name!r}: put it at "
                            f"{Path(config_root or '.') / 'postprocessors' / (name + '.yml')}; packaged: "
                            f"{sorted(packaged_configs())}")


def class_for(pp: dict) -> Any:
    """Our postprocessor class for a ``postprocessor`` config section, or None if it is not ours.

    Looked up by ``pp['name']`` (what main.py does): a POSTPROCESSORS entry, else a registered detector, else
    any section whose args name a ``detector`` (a fusion when they also name a ``baseline``).
    """
    from ..registry import DETECTORS, POSTPROCESSORS, load

    name, args = pp.get("name"), pp.get("postprocessor_args") or {}
    if name in POSTPROCESSORS:
        return load(POSTPROCESSORS[name])
    if "detector" in args:
        return load(POSTPROCESSORS["fusion" if is_fusion_section(pp) else "detector"])
    if name in DETECTORS:
        return load(POSTPROCESSORS["detector"])
    return None


def our_names() -> list[str]:
    from ..registry import DETECTORS, POSTPROCESSORS

    return sorted(set(POSTPROCESSORS) | set(DETECTORS) | set(packaged_configs()))


def evaluator_class(name: str, config_root: str | Path | None = None) -> Any:
    """Class the Evaluator builds for ``postprocessor_name=name``: from the yml's ``postprocessor.name``
    (a preset stem such as ``diffguard_cifar10`` builds DiffGuard), or None if neither name nor yml is ours."""
    try:
        path = postprocessor_config(name, config_root)
    except FileNotFoundError:
        return class_for({"name": name}) if name in our_names() else None
    return class_for(read_postprocessor_section(path))


def build_postprocessor(config: Any) -> Any:
    """main.py-style factory: a merged OpenOOD config -> our postprocessor (None if the name is not ours)."""
    pp = dict(config["postprocessor"]) if "postprocessor" in config and config["postprocessor"] else {}
    cls = class_for(pp)
    return None if cls is None else cls(config)


def _marked(factory: Callable, original: Callable) -> Callable:
    """Tag our factory with OpenOOD's original (``register()`` is idempotent and delegates to it)."""
    factory.openood_original = original
    setattr(factory, _MARK, True)
    return factory


def _patched_main_factory(original: Callable) -> Callable:
    def get_postprocessor(config):
        pp = build_postprocessor(config)
        return original(config) if pp is None else pp

    return _marked(get_postprocessor, original)


def _patched_evaluator_factory(original: Callable) -> Callable:
    def get_postprocessor(config_root: str, postprocessor_name: str, id_data_name: str):
        if evaluator_class(postprocessor_name, config_root) is None:
            return original(config_root, postprocessor_name, id_data_name)
        from openood.utils.config import Config, merge_configs

        config = Config(str(postprocessor_config(postprocessor_name, config_root)))  # never downloaded
        config = merge_configs(config, Config(**{"dataset": {"name": id_data_name}}))
        pp = build_postprocessor(config)
        pp.APS_mode = bool(config.postprocessor.APS_mode) and pp.APS_mode
        pp.hyperparam_search_done = False
        return pp

    return _marked(get_postprocessor, original)


def _unwrap(fn: Callable) -> Callable:
    return getattr(fn, "openood_original", fn)


def _patched_trainer_factory(original: Callable) -> Callable:
    def get_trainer(net, train_loader, val_loader, config):
        name = config.trainer.name if "trainer" in config and config.trainer else None
        if name not in TRAINERS:
            return original(net, train_loader, val_loader, config)
        if not isinstance(train_loader, (list, tuple)) or len(train_loader) != 2:
            raise ValueError(f"trainer {name!r} needs an ID and an outlier loader: use pipeline 'train_oe' with "
                             f"the dataset's 'oe' split (got {type(train_loader).__name__})")
        module, cls = TRAINERS[name].split(":")
        import importlib

        return getattr(importlib.import_module(module), cls)(net, train_loader[0], train_loader[1], config)

    return _marked(get_trainer, original)


def _patch_bindings(attr: str, original: Callable, factory: Callable) -> list[str]:
    """Point every ``openood.*`` module attribute ``attr`` that is OpenOOD's ``original`` (or an earlier
    factory of ours wrapping it) at ``factory``."""
    patched = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("openood.") or module is None:
            continue
        current = getattr(module, attr, None)
        if current is original or getattr(current, _MARK, False) and _unwrap(current) is original:
            setattr(module, attr, factory)
            patched.append(f"{name}.{attr}")
    return patched


def _register_trainers() -> list[str]:
    """Replace every binding of OpenOOD's ``get_trainer`` (``openood.trainers``, its ``utils`` and each
    pipeline that imported it) by a factory that serves ``TRAINERS`` and delegates the rest."""
    import openood.trainers.utils as tr_utils

    original = _unwrap(tr_utils.get_trainer)
    return _patch_bindings("get_trainer", original, _patched_trainer_factory(original))


def register(evaluator: bool = True, device: Any = "auto") -> list[str]:
    """Patch OpenOOD (idempotent). Returns the module attributes that now point at our factories.

    ``device``: where OpenOOD's hard-coded ``.cuda()`` calls go from now on (``devices.use_openood_device``):
    ``"auto"`` (default) leaves CUDA machines alone and runs them on the CPU when CUDA is absent, so the
    Evaluator works there; ``"cpu"`` forces the CPU; None changes nothing (the launcher sets it per run).
    """
    require_openood()
    if device is not None:
        from ..devices import use_openood_device

        use_openood_device(device)
    import openood.pipelines  # noqa: F401  (imports every pipeline module, i.e. every binding)
    import openood.postprocessors.utils as pp_utils

    original = _unwrap(pp_utils.get_postprocessor)
    patched = _patch_bindings("get_postprocessor", original, _patched_main_factory(original))
    patched += _register_trainers()
    if evaluator:
        patched += _register_evaluator()
    return patched


def _register_evaluator() -> list[str]:
    try:
        import openood.evaluation_api.evaluator as ev_mod
        import openood.evaluation_api.postprocessor as ev_pp
    except ImportError as err:  # pandas / gdown / timm / foolbox are needed by the Evaluator only
        raise ImportError(f"OpenOOD's Evaluator could not be imported ({err}); install pandas gdown timm foolbox") from err
    for name in our_names():  # the table is keyed by the name given to the Evaluator (= yml stem)
        cls = evaluator_class(name)
        if cls is not None:
            ev_pp.postprocessors[name] = cls
    original = _unwrap(ev_pp.get_postprocessor)
    factory = _patched_evaluator_factory(original)
    ev_pp.get_postprocessor = factory
    ev_mod.get_postprocessor = factory
    return ["openood.evaluation_api.postprocessor.get_postprocessor",
            "openood.evaluation_api.evaluator.get_postprocessor", "openood.evaluation_api.postprocessor.postprocessors"]
