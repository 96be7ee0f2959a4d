"""Every packaged postprocessor yml builds its real detector (no OpenOOD needed) and rejects unknown keys;
with OpenOOD installed, each also builds through OpenOOD's Config and our main.py / Evaluator factories."""
import copy

from pathlib import Path

import pytest
import yaml

from openood_diffguard.runtime import registry
from openood_diffguard.fusion.score_fusion import ScoreFusion
from openood_diffguard.openood.registration import ALIASES, PACKAGE_CONFIGS, packaged_configs, read_postprocessor_section
from openood_diffguard.openood.sections import (detector_from_section, fusion_detector_section, is_fusion_section,
                                                sweep_parameters)

FILES = sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yml"))
#: the class a preset builds (DiffGuard's presets: by their ``guidance``; ``diffguard`` is the factory of both)
DETECTOR_OF = {"diffguard_gdm": "DiffGuardGDM", "diffguard_cfg": "DiffGuardCFG", "diffnb": "DiffNB", "lfdn": "LFDN"}
DIFFGUARD_PATH = {"classifier": "diffguard_gdm", "cfg": "diffguard_cfg"}


def _section(stem):
    return read_postprocessor_section(PACKAGE_CONFIGS / f"{stem}.yml")


def _build(pp):
    """(detector, fusion or None) of a section, the way the OpenOOD postprocessors build them."""
    if is_fusion_section(pp):
        cfg, det_pp = fusion_detector_section(pp)
        return detector_from_section(det_pp)[0], cfg.build_fusion()
    return detector_from_section(pp)[0], None


def test_one_yml_per_preset_and_aliases():
    assert len(FILES) >= 12 and {"diffguard_cifar10", "diffnb_imagenet", "fusion_diffguard_ebo_cifar10"} <= set(FILES)
    assert not set(ALIASES) & set(FILES)  # generic names are aliases, never a second copy of a preset
    for alias, stem in ALIASES.items():
        assert packaged_configs()[alias] == PACKAGE_CONFIGS / f"{stem}.yml"
    texts = [(PACKAGE_CONFIGS / f"{s}.yml").read_text() for s in FILES]
    bodies = [yaml.safe_load(t) for t in texts]
    assert len({yaml.safe_dump(b, sort_keys=True) for b in bodies}) == len(bodies)  # no duplicate presets


@pytest.mark.parametrize("stem", FILES)
def test_yml_builds_its_real_detector(stem):
    pp = _section(stem)
    assert set(pp) == {"name", "APS_mode", "postprocessor_args", "postprocessor_sweep"}
    assert pp["name"] in registry.POSTPROCESSORS  # main.py's factory looks the class up by this name
    det, fusion = _build(pp)
    expected = pp["postprocessor_args"].get("detector", pp["name"])
    if expected == "diffguard":
        args = _section(pp["postprocessor_args"].get("detector_preset", stem))["postprocessor_args"]
        expected = DIFFGUARD_PATH[args["guidance"]]
    assert type(det).__name__ == DETECTOR_OF[expected] and type(det).name == expected
    assert (fusion is not None) == stem.startswith("fusion_") == (pp["name"] == "diffguard_fusion")
    if fusion is not None:
        assert isinstance(fusion, ScoreFusion)
        preset = pp["postprocessor_args"]["detector_preset"]  # the detector's args come from that preset
        ref = detector_from_section(_section(preset))[0]
        assert det.params == ref.params
        allowed = {**fusion.get_params(), **{p: None for p in det.cheap_params}}
    else:
        # every non-wrapper arg reached the detector unchanged (nothing silently dropped)
        for k, v in pp["postprocessor_args"].items():
            if k not in ("cache_dir", "cache", "detector"):
                assert det.params[k] == v or (isinstance(v, list) and list(det.params[k]) == v), k
        allowed = det.params
    sweep = pp["postprocessor_sweep"]
    assert sweep and all(k.endswith("_list") and isinstance(v, list) and v for k, v in sweep.items())
    sweep_parameters(sweep, allowed, stem)  # every sweep key names a parameter
    assert not pp["APS_mode"] or sweep  # APS with an empty grid recurses forever in OpenOOD


@pytest.mark.parametrize("stem", FILES)
def test_unknown_keys_fail_loudly(stem):
    pp = copy.deepcopy(_section(stem))
    if is_fusion_section(pp):
        bad_det = copy.deepcopy(pp)
        bad_det["postprocessor_args"]["detector_args"] = {"no_such_param": 1}
        with pytest.raises(TypeError, match="no_such_param"):
            _build(bad_det)
        pp["postprocessor_args"]["no_such_key"] = 1
        with pytest.raises(ValueError, match="no_such_key"):
            _build(pp)
    else:
        pp["postprocessor_args"]["no_such_param"] = 1
        with pytest.raises(TypeError, match="no_such_param"):
            _build(pp)


def test_lfdn_cache_dir_follows_the_cache_root_and_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENOOD_DIFFGUARD_CACHE", str(tmp_path))
    for stem in ("lfdn_cifar10", "lfdn_imagenet"):
        det, _ = _build(_section(stem))
        assert det.params["cache_dir"] == str(tmp_path / "lfdn")  # the preset leaves it null
    pp = _section("lfdn_cifar10")
    pp["postprocessor_args"]["cache_dir"] = "~/elsewhere"
    assert _build(pp)[0].params["cache_dir"] == str(Path("~/elsewhere").expanduser())


@pytest.mark.openood
@pytest.mark.parametrize("stem", FILES + sorted(ALIASES))
def test_builds_through_openood_config_and_factories(stem, no_download):
    pytest.importorskip("openood.evaluation_api", reason="OpenOOD (with its Evaluator) not installed")
    import openood.evaluation_api.postprocessor as E
    from openood.postprocessors import utils as U
    from openood.utils import Config
    from openood.utils.config import merge_configs
    from openood_diffguard.openood import register

    register()
    path = packaged_configs()[stem]
    cls = registry.load(registry.POSTPROCESSORS[_section(path.stem)["name"]])
    # main.py: the merged Config goes through OpenOOD's (patched) factory, looked up by postprocessor.name
    merged = merge_configs(Config(str(path)), Config(**{"dataset": {"name": "cifar10"}}))
    built = U.get_postprocessor(merged)
    assert type(built) is cls
    # Evaluator: the table is keyed by the stem, the class is the yml's, and the factory never downloads
    assert E.postprocessors[stem] is cls
    pp = E.get_postprocessor("/nonexistent/config_root", stem, "cifar10")
    assert type(pp) is cls and pp.hyperparam_search_done is False
    assert pp.APS_mode == bool(_section(path.stem)["APS_mode"])
    det = pp.diffusion.detector if hasattr(pp, "diffusion") else pp.detector
    ref = _build(_section(path.stem))[0]
    assert type(det) is type(ref) and det.params == ref.params
