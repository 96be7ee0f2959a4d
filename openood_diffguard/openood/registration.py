"""Teach OpenOOD our postprocessor names (it has no plugin mechanism; docs/openood.md).

``register()`` (idempotent) replaces every module-level binding of OpenOOD's ``get_postprocessor``
(``openood.postprocessors``, ``openood.postprocessors.utils`` and each pipeline that imported it) with a
factory that serves our names and delegates everything else, adds our names to the Evaluator's table and
swaps the Evaluator's factory for one that reads our yml from ``config_root`` or, if absent there, from
this package, so OpenOOD never tries to download a config for our names. The Evaluator's table is keyed by
the name it is given (a yml stem, e.g. ``diffguard_cifar10``); the class comes from that yml's
``postprocessor.name`` (``diffguard``), exactly the class main.py's factory builds from the same yml.

Before patching anything ``register()`` checks that every OpenOOD object it replaces exists (``OPENOOD_TARGETS``):
an OpenOOD without them (another version, a rename) raises :class:`OpenOODBindingError` naming the missing
attribute and the tested commit, instead of patching nothing. Every patch is logged with the object it replaced:
``unregister()`` restores them all, and ``with registered(): ...`` registers for the block only.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from . import INSTALL_STEPS, OPENOOD_COMMIT, require_openood
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
    "diffguard_gdm": "diffguard_gdm_imagenet",
    "diffguard_cfg": "diffguard_ldm_imagenet",
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
    from ..runtime.registry import DETECTORS, POSTPROCESSORS, load

    name, args = pp.get("name"), pp.get("postprocessor_args") or {}
    if name in POSTPROCESSORS:
        return load(POSTPROCESSORS[name])
    if "detector" in args:
        return load(POSTPROCESSORS["fusion" if is_fusion_section(pp) else "detector"])
    if name in DETECTORS:
        return load(POSTPROCESSORS["detector"])
    return None


def our_names() -> list[str]:
    from ..runtime.registry import DETECTORS, POSTPROCESSORS

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


class OpenOODBindingError(ImportError):
    """The installed OpenOOD lacks an object ``register()`` must patch (another OpenOOD version)."""


#: what ``register()`` replaces: (module, attribute, what it must be). Checked before anything is patched.
OPENOOD_TARGETS: tuple[tuple[str, str, type], ...] = (
    ("openood.postprocessors.utils", "get_postprocessor", object),  # main.py's factory (object: any callable)
    ("openood.trainers.utils", "get_trainer", object),
)
EVALUATOR_TARGETS: tuple[tuple[str, str, type], ...] = (
    ("openood.evaluation_api.postprocessor", "get_postprocessor", object),  # the Evaluator's by-name factory
    ("openood.evaluation_api.postprocessor", "postprocessors", dict),  # its name -> class table
    ("openood.evaluation_api.evaluator", "get_postprocessor", object),  # the Evaluator module's own binding
)
_MISSING = object()
#: every patch as (owner, key, replaced value or _MISSING, is a dict item), oldest first
_LOG: list[tuple[Any, str, Any, bool]] = []


def binding_error(what: str, why: str) -> OpenOODBindingError:
    return OpenOODBindingError(
        f"cannot register openood-diffguard in this OpenOOD: {what} {why}. openood-diffguard is tested against "
        f"OpenOOD commit {OPENOOD_COMMIT}: {INSTALL_STEPS[-1]}")


def _target(module: str, attr: str, kind: type) -> Any:
    """``module.attr``, checked (callable, or an instance of ``kind``); else :class:`OpenOODBindingError`."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):  # the module itself is gone, not one of its dependencies
            raise binding_error(f"module {module}", "does not exist") from err
        raise
    value = getattr(mod, attr, _MISSING)
    if value is _MISSING:
        raise binding_error(f"{module}.{attr}", "does not exist")
    if not (callable(value) if kind is object else isinstance(value, kind)):
        raise binding_error(f"{module}.{attr}", f"is a {type(value).__name__}, not a "
                                                f"{'function' if kind is object else kind.__name__}")
    return value


def _set(owner: Any, key: str, value: Any) -> None:
    """``setattr`` that logs the value it replaces (undone newest first, so any nesting unwinds exactly)."""
    _LOG.append((owner, key, getattr(owner, key, _MISSING), False))
    setattr(owner, key, value)


def _set_item(table: dict, key: str, value: Any) -> None:
    _LOG.append((table, key, table.get(key, _MISSING), True))
    table[key] = value


def unregister(_keep: int = 0) -> None:
    """Undo every patch of ``register()`` (newest first): OpenOOD's objects are its originals again."""
    while len(_LOG) > _keep:
        owner, key, value, item = _LOG.pop()
        if item:
            owner.pop(key, None) if value is _MISSING else owner.__setitem__(key, value)
        elif value is _MISSING:
            delattr(owner, key)
        else:
            setattr(owner, key, value)
    if not _keep:  # an openood module imported after register() copied our factory: point it back too
        for name, module in list(sys.modules.items()):
            for attr in ("get_postprocessor", "get_trainer") if name.startswith("openood.") and module else ():
                current = getattr(module, attr, None)
                if getattr(current, _MARK, False):
                    setattr(module, attr, _unwrap(current))


@contextlib.contextmanager
def registered(evaluator: bool = True, device: Any = "auto"):
    """``register()`` for a ``with`` block; on exit every patch made inside it is undone (those from before the
    block stay), and so is the ``device`` redirection (``devices.openood_device``; None: none).
    Yields ``register()``'s list."""
    keep = len(_LOG)
    with contextlib.ExitStack() as stack:
        if device is not None:
            from ..runtime.devices import openood_device

            require_openood()
            stack.enter_context(openood_device(device))
        stack.callback(unregister, keep)
        yield register(evaluator=evaluator, device=None)


def require_bound(patched: list[str], required: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`OpenOODBindingError` unless every ``module.attr`` of ``required`` is in ``patched``."""
    missing = [t for t in required if t not in patched]
    if missing:
        raise binding_error(", ".join(missing), "was not patched (does this OpenOOD bind its factories elsewhere?)")


def require_pipeline_bound(pipeline: Any) -> None:
    """The module of an OpenOOD pipeline object must bind our factories (where it imports OpenOOD's)."""
    module = sys.modules.get(type(pipeline).__module__)
    for attr in ("get_postprocessor", "get_trainer"):
        current = getattr(module, attr, None)
        if current is not None and not getattr(current, _MARK, False):
            raise binding_error(f"{type(pipeline).__module__}.{attr}", "is still OpenOOD's own after register()")


def _patch_bindings(attr: str, original: Callable, factory: Callable) -> list[str]:
    """Point every ``openood.*`` module attribute ``attr`` that is OpenOOD's ``original`` (or an earlier
    factory of ours wrapping it) at ``factory``."""
    patched = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("openood.") or module is None:
            continue
        current = getattr(module, attr, None)
        if current is original or getattr(current, _MARK, False) and _unwrap(current) is original:
            _set(module, attr, factory)
            patched.append(f"{name}.{attr}")
    return patched


def _register_trainers() -> list[str]:
    """Replace every binding of OpenOOD's ``get_trainer`` (``openood.trainers``, its ``utils`` and each
    pipeline that imported it) by a factory that serves ``TRAINERS`` and delegates the rest."""
    original = _unwrap(_target(*OPENOOD_TARGETS[1]))
    return _patch_bindings("get_trainer", original, _patched_trainer_factory(original))


def register(evaluator: bool = True, device: Any = "auto") -> list[str]:
    """Patch OpenOOD (idempotent). Returns the module attributes that now point at our factories.

    Every target is checked first (:class:`OpenOODBindingError`, nothing patched, if one is missing);
    :func:`unregister` / :func:`registered` undo the patches.
    ``device``: where OpenOOD's hard-coded ``.cuda()`` calls go from now on (``devices.use_openood_device``):
    ``"auto"`` (default) leaves CUDA machines alone and runs them on the CPU when CUDA is absent, so the
    Evaluator works there; ``"cpu"`` forces the CPU; None changes nothing (the launcher sets it per run).
    """
    require_openood()
    import openood.pipelines  # noqa: F401  (imports every pipeline module, i.e. every binding)

    if evaluator:
        _evaluator_modules()  # a clear error for a missing Evaluator dependency, before any check
    for target in OPENOOD_TARGETS + (EVALUATOR_TARGETS if evaluator else ()):
        _target(*target)
    if device is not None:
        from ..runtime.devices import use_openood_device

        use_openood_device(device)
    original = _unwrap(_target(*OPENOOD_TARGETS[0]))
    patched = _patch_bindings("get_postprocessor", original, _patched_main_factory(original))
    require_bound(patched, [".".join(OPENOOD_TARGETS[0][:2])])
    patched += _register_trainers()
    if evaluator:
        patched += _register_evaluator()
    return patched


def _evaluator_modules() -> tuple[Any, Any]:
    try:
        import openood.evaluation_api.evaluator as ev_mod
        import openood.evaluation_api.postprocessor as ev_pp
    except ImportError as err:  # pandas / gdown / timm / foolbox are needed by the Evaluator only
        raise ImportError(f"OpenOOD's Evaluator could not be imported ({err}); install pandas gdown timm foolbox") from err
    return ev_mod, ev_pp


def _register_evaluator() -> list[str]:
    ev_mod, ev_pp = _evaluator_modules()
    for name in our_names():  # the table is keyed by the name given to the Evaluator (= yml stem)
        cls = evaluator_class(name)
        if cls is not None:
            _set_item(ev_pp.postprocessors, name, cls)
    original = _unwrap(ev_pp.get_postprocessor)
    factory = _patched_evaluator_factory(original)
    _set(ev_pp, "get_postprocessor", factory)
    _set(ev_mod, "get_postprocessor", factory)
    return ["openood.evaluation_api.postprocessor.get_postprocessor",
            "openood.evaluation_api.evaluator.get_postprocessor", "openood.evaluation_api.postprocessor.postprocessors"]
