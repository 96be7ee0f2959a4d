"""The OpenOOD binding: ``register()`` checks what it patches, fails loudly on an OpenOOD it cannot patch, and
``registered()`` / ``unregister()`` undo every patch. The first tests use a small fake ``openood`` package (they
run in every environment); those marked ``openood`` check the same against the real OpenOOD."""
import importlib
import sys
import types

import pytest

from openood_diffguard.openood import OPENOOD_COMMIT


def _fake_openood(monkeypatch, drop=(), pipelines=True):
    """A minimal ``openood`` package in sys.modules: the factories register() patches (minus ``drop``, as
    ``module.attr``) and, with ``pipelines``, the two test pipelines and train_oe binding them like OpenOOD."""
    for name in [m for m in sys.modules if m == "openood" or m.startswith("openood.")]:
        monkeypatch.delitem(sys.modules, name)

    def module(name, **attrs):
        mod = types.ModuleType(name)
        for attr, value in attrs.items():
            if f"{name}.{attr}" not in drop:
                setattr(mod, attr, value)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    def get_postprocessor(config):
        return "openood's"

    def get_trainer(net, train_loader, val_loader, config):
        return "openood's"

    module("openood")
    pp_utils = module("openood.postprocessors.utils", get_postprocessor=get_postprocessor)
    module("openood.postprocessors", get_postprocessor=getattr(pp_utils, "get_postprocessor", None), utils=pp_utils)
    tr_utils = module("openood.trainers.utils", get_trainer=get_trainer)
    module("openood.trainers", get_trainer=getattr(tr_utils, "get_trainer", None))
    module("openood.pipelines")
    if pipelines:
        module("openood.pipelines.test_ood_pipeline", get_postprocessor=get_postprocessor)
        module("openood.pipelines.test_ood_pipeline_aps", get_postprocessor=get_postprocessor)
        module("openood.pipelines.train_oe_pipeline", get_trainer=get_trainer)
    return get_postprocessor, get_trainer


def _bindings():
    return {(name, attr): getattr(mod, attr) for name, mod in list(sys.modules.items())
            if (name == "openood" or name.startswith("openood.")) and mod is not None
            for attr in ("get_postprocessor", "get_trainer") if getattr(mod, attr, None) is not None}


@pytest.fixture
def clean_log(monkeypatch):
    # the module main.py imports (sys.modules; a test that reloads the package may leave another as its attribute)
    registration = importlib.import_module("openood_diffguard.openood.registration")
    monkeypatch.setattr(registration, "_LOG", [])  # the fake's patches never mix with a real OpenOOD's
    return registration


@pytest.mark.parametrize("missing", ["openood.postprocessors.utils.get_postprocessor",
                                     "openood.trainers.utils.get_trainer"])
def test_register_fails_loudly_without_a_factory_and_patches_nothing(monkeypatch, clean_log, missing):
    _fake_openood(monkeypatch, drop=(missing,))
    before = _bindings()
    with pytest.raises(clean_log.OpenOODBindingError, match=f"{missing} does not exist.*{OPENOOD_COMMIT}"):
        clean_log.register(evaluator=False, device=None)
    assert _bindings() == before and clean_log._LOG == []  # checked before anything was patched
    assert issubclass(clean_log.OpenOODBindingError, ImportError)  # the CLI prints it as one error line


def test_fake_openood_register_then_context_manager_restores_identity(monkeypatch, clean_log):
    originals = _fake_openood(monkeypatch)
    before = _bindings()
    assert set(before.values()) == set(originals)
    with clean_log.registered(evaluator=False, device=None) as patched:
        assert "openood.pipelines.test_ood_pipeline.get_postprocessor" in patched
        assert all(getattr(f, clean_log._MARK, False) for f in _bindings().values())
        assert sys.modules["openood.trainers.utils"].get_trainer.openood_original is originals[1]
    after = _bindings()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the very objects
    # nested: a block inside an earlier register() leaves that registration in place
    clean_log.register(evaluator=False, device=None)
    ours = _bindings()
    with clean_log.registered(evaluator=False, device=None):
        pass
    assert _bindings() == ours
    clean_log.unregister()
    assert all(_bindings()[k] is before[k] for k in before)


def test_launcher_refuses_an_openood_whose_pipelines_bind_elsewhere(monkeypatch, clean_log):
    """main.py checks register()'s list: pipelines that do not bind the factory (an OpenOOD that moved it) would
    run OpenOOD's own factory, which knows none of our names."""
    _fake_openood(monkeypatch, pipelines=False)
    from openood_diffguard.openood.main import register_checked

    with pytest.raises(clean_log.OpenOODBindingError, match="test_ood_pipeline.get_postprocessor.*was not patched"):
        register_checked()
    clean_log.unregister()
    _fake_openood(monkeypatch)
    assert "openood.pipelines.train_oe_pipeline.get_trainer" in register_checked()
    clean_log.unregister()


@pytest.mark.openood
def test_real_openood_registered_block_restores_every_original():
    import torch

    import openood.evaluation_api.evaluator as ev_mod
    import openood.evaluation_api.postprocessor as ev_pp
    from openood_diffguard.openood import register, registered, unregister

    register(device=None)  # whatever earlier tests did: start from a registered process, then undo it all
    unregister()
    import openood.pipelines  # noqa: F401

    before, table, cuda = _bindings(), dict(ev_pp.postprocessors), torch.Tensor.cuda
    assert not any(hasattr(f, "openood_original") for f in before.values())
    assert ev_mod.get_postprocessor is ev_pp.get_postprocessor and "diffguard" not in table
    with registered(device="cpu") as patched:
        assert "openood.pipelines.test_ood_pipeline.get_postprocessor" in patched
        assert ev_pp.postprocessors["diffguard"].__name__ == "DiffGuardPostprocessor"
        assert ev_mod.get_postprocessor is not before[("openood.evaluation_api.evaluator", "get_postprocessor")]
        assert torch.Tensor.cuda is not cuda
    after = _bindings()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert ev_pp.postprocessors == table and torch.Tensor.cuda is cuda
    register(device=None)  # leave the process registered, as earlier tests did (no device redirection)


@pytest.mark.openood
def test_real_openood_missing_evaluator_table_fails_before_patching(monkeypatch):
    import openood.evaluation_api.postprocessor as ev_pp

    registration = importlib.import_module("openood_diffguard.openood.registration")
    registration.unregister()
    before = _bindings()
    monkeypatch.delattr(ev_pp, "postprocessors")
    with pytest.raises(registration.OpenOODBindingError,
                       match=f"openood.evaluation_api.postprocessor.postprocessors does not exist.*{OPENOOD_COMMIT}"):
        registration.register(device=None)
    assert all(_bindings()[k] is before[k] for k in before)
    monkeypatch.undo()
    registration.register(device=None)


@pytest.mark.openood
def test_register_benchmark_inside_a_registered_block_is_undone(tmp_path):
    import openood.evaluation_api.datasets as ds
    import openood.evaluation_api.evaluator as ev_mod
    from openood_diffguard.openood import register_benchmark, registered
    from openood_diffguard.space import NORMALIZATION

    data_setup = ev_mod.data_setup
    lists = {"id": {s: f"{s}.txt" for s in ("train", "val", "test")}, "ood_val": "v.txt", "near": {"a": "a.txt"},
             "far": {"b": "b.txt"}}
    with registered(device=None):
        register_benchmark("undo_me", num_classes=2, normalization="cifar10", data_dir="img", **lists)
        assert "undo_me" in ds.DATA_INFO and "undo_me" in NORMALIZATION and ev_mod.data_setup is not data_setup
    assert "undo_me" not in ds.DATA_INFO and "undo_me" not in NORMALIZATION and ev_mod.data_setup is data_setup
