"""Without OpenOOD: everything imports; OpenOOD features fail with the install command."""
import importlib
import sys

import pytest
import yaml


@pytest.fixture
def no_openood(monkeypatch):
    for name in [m for m in sys.modules if m == "openood" or m.startswith("openood.")
                 or m.startswith("openood_diffguard.openood.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openood", None)  # "import openood" -> ImportError


def test_package_imports_and_features_name_the_install_command(no_openood):
    import openood_diffguard.cache  # noqa: F401
    import openood_diffguard.main  # noqa: F401
    import openood_diffguard.metrics  # noqa: F401
    import openood_diffguard.openood as oo

    importlib.reload(oo)
    with pytest.raises(ImportError, match="pip install git\\+https://github.com/Jingkang50/OpenOOD"):
        oo.DiffGuardPostprocessor  # noqa: B018
    with pytest.raises(ImportError, match="OpenOOD is not installed"):
        oo.register()
    with pytest.raises(ImportError, match="Jingkang50/OpenOOD"):
        from openood_diffguard.main import main

        main(["--config", "x.yml"])
    with pytest.raises(AttributeError):
        oo.NoSuchThing  # noqa: B018


def test_packaged_ymls_follow_openood_format():
    from openood_diffguard.openood.registration import PACKAGE_CONFIGS, packaged_configs

    assert PACKAGE_CONFIGS.is_dir() and {"diffguard", "diffnb", "lfdn", "diffguard_fusion"} <= set(packaged_configs())
    for name, path in packaged_configs().items():
        pp = yaml.safe_load(path.read_text())["postprocessor"]
        assert pp["name"] == name  # the Evaluator looks the class up by file stem
        assert set(pp) == {"name", "APS_mode", "postprocessor_args", "postprocessor_sweep"}
        assert not pp["APS_mode"] or pp["postprocessor_sweep"]  # empty sweep + APS = infinite recursion in OpenOOD
        assert all(k.endswith("_list") and isinstance(v, list) and v for k, v in pp["postprocessor_sweep"].items())


def test_launcher_resolves_preset_names_and_cli_has_eval(tmp_path):
    from openood_diffguard.cli import build_parser
    from openood_diffguard.main import resolve_config_args
    from openood_diffguard.openood.registration import PACKAGE_CONFIGS

    own = tmp_path / "a.yml"
    own.write_text("x: 1\n")
    args = resolve_config_args(["--config", str(own), "diffnb", "missing/lfdn.yml", "--mark", "diffnb"])
    assert args == ["--config", str(own), str(PACKAGE_CONFIGS / "diffnb.yml"), str(PACKAGE_CONFIGS / "lfdn.yml"),
                    "--mark", "diffnb"]
    ns = build_parser().parse_args(["eval", "--config", "a.yml", "diffguard", "--network.checkpoint", "c.ckpt"])
    assert ns.openood_args == ["--config", "a.yml", "diffguard", "--network.checkpoint", "c.ckpt"]
