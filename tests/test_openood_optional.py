"""Without OpenOOD: everything imports; OpenOOD features fail with the install command."""
import importlib
import sys

import pytest


@pytest.fixture
def no_openood(monkeypatch):
    for name in [m for m in sys.modules if m == "openood" or m.startswith("openood.")
                 or m.startswith("openood_diffguard.openood.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openood", None)  # "import openood" -> ImportError


def test_package_imports_and_features_name_the_install_command(no_openood):
    import openood_diffguard.runtime.cache  # noqa: F401
    import openood_diffguard.openood.main  # noqa: F401
    import openood_diffguard.metrics  # noqa: F401
    import openood_diffguard.openood as oo

    importlib.reload(oo)
    with pytest.raises(ImportError, match="pip install --no-deps \"openood @ git\\+https://github.com/Jingkang50/OpenOOD@"):
        oo.DiffGuardPostprocessor  # noqa: B018
    with pytest.raises(ImportError, match="OpenOOD is not installed"):
        oo.register()
    with pytest.raises(ImportError, match="Jingkang50/OpenOOD"):
        from openood_diffguard.openood.main import main

        main(["--config", "x.yml"])
    with pytest.raises(AttributeError):
        oo.NoSuchThing  # noqa: B018


def test_every_packaged_name_maps_to_our_postprocessor_class():
    """The Evaluator is given a yml stem (or alias); main.py looks the class up by the yml's postprocessor.name.
    Both must land on the same registered class (checked end to end with OpenOOD in test_packaged_configs)."""
    from openood_diffguard.openood.registration import (ALIASES, PACKAGE_CONFIGS, packaged_configs,
                                                        read_postprocessor_section)
    from openood_diffguard.runtime.registry import POSTPROCESSORS

    stems = {p.stem for p in PACKAGE_CONFIGS.glob("*.yml")}
    assert set(packaged_configs()) == stems | set(ALIASES) and set(ALIASES.values()) <= stems
    names = {name: read_postprocessor_section(path)["name"] for name, path in packaged_configs().items()}
    assert names["diffguard_cifar10"] == "diffguard" and names["fusion_diffguard_ebo_cifar10"] == "diffguard_fusion"
    assert names["diffnb_imagenet"] == "diffnb" and names["lfdn"] == "lfdn"
    assert set(names.values()) <= set(POSTPROCESSORS)


def test_launcher_resolves_preset_names_and_cli_has_eval(tmp_path):
    from openood_diffguard.cli import build_parser
    from openood_diffguard.openood.main import resolve_config_args
    from openood_diffguard.openood.registration import PACKAGE_CONFIGS

    own = tmp_path / "a.yml"
    own.write_text("x: 1\n")
    args = resolve_config_args(["--config", str(own), "diffnb_imagenet", "missing/lfdn.yml", "--mark", "diffnb"])
    assert args == ["--config", str(own), str(PACKAGE_CONFIGS / "diffnb_imagenet.yml"),
                    str(PACKAGE_CONFIGS / "lfdn_cifar10.yml"), "--mark", "diffnb"]  # lfdn: alias of lfdn_cifar10
    assert "eval" in build_parser(only="").format_help()
