"""One reader of OpenOOD yml sections (``openood.sections``) for detectors, fusion presets and sweeps: the same
key means the same parameter everywhere, errors name the yml key as written, one APS check, one cache root."""
import pytest

from openood_diffguard.fusion.presets import load_fusion_preset, parse_fusion_config
from openood_diffguard.openood.sections import (aps_flag, detector_name, read_postprocessor_section, sweep_items,
                                                sweep_param, sweep_parameters)


def _fusion(sweep, aps=True, rule_args=None):
    return {"postprocessor": {"name": "diffguard_fusion", "APS_mode": aps,
                              "postprocessor_args": {"detector": "diffguard", "baseline": "ebo", "rule": "rank",
                                                     "rule_args": rule_args or {"w": 0.5}},
                              "postprocessor_sweep": sweep}}


def test_sweep_key_rule_is_one_context_free_rule():
    # OpenOOD spells a sweep key <param>_list; the suffix is stripped whatever the parameters are called, so a
    # reader that does not know its detector's parameters (the fusion preset) reads a key like every other one
    assert sweep_param("alpha_out_list") == "alpha_out" and sweep_param("w") == "w"
    assert sweep_param("layers_list_list") == "layers_list" and sweep_param("_list") == "_list"
    # the old postprocessor rule kept "x_list" whole when "x_list" was a parameter; the preset reader stripped it
    assert sweep_parameters({"x_list": [1]}, {"x": 0, "x_list": 0}, "T") == ["x"]
    with pytest.raises(KeyError, match="'x_list' names no parameter"):
        sweep_parameters({"x_list": [1]}, {"x_list": 0}, "T")


def test_sweep_values_and_duplicates_are_checked_with_the_key_as_written():
    with pytest.raises(ValueError, match="postprocessor_sweep.aggregate_list must be a non-empty list, got 'mean'"):
        sweep_parameters({"aggregate_list": "mean"}, {"aggregate": "mean"}, "DiffNBPostprocessor")  # APS off too
    with pytest.raises(ValueError, match="'w_list' and 'w' both sweep 'w'"):
        sweep_items({"w_list": [0.1], "w": [0.2]}, "T")
    # the fusion preset reader named "<param>_list" even when the yml said "<param>"
    with pytest.raises(ValueError, match=r"postprocessor_sweep\.alpha_out value 1\.5"):
        parse_fusion_config(_fusion({"alpha_out": [0.01, 1.5]}, rule_args={"budget": 0.2}))
    with pytest.raises(ValueError, match=r"postprocessor_sweep\.budget: the budget is a compute limit"):
        parse_fusion_config(_fusion({"budget": [0.1]}))


def test_one_aps_check_for_detector_and_fusion_sections():
    # APS over cheap detector parameters only is a non-empty grid: the preset reader used to call it empty
    cfg = parse_fusion_config(_fusion({"similarity_list": ["dists", "lpips"]}))
    assert cfg.aps_mode and cfg.sweep == {} and cfg.detector_sweep == {"similarity": ["dists", "lpips"]}
    for check in (lambda: aps_flag({"APS_mode": True}, {}, "X"), lambda: parse_fusion_config(_fusion({}))):
        with pytest.raises(ValueError, match="APS_mode is true with an empty postprocessor_sweep"):
            check()
    assert parse_fusion_config(_fusion({}, aps="no")).aps_mode is False


def test_detector_name_and_yml_reader(tmp_path):
    assert detector_name({"name": "diffnb"}) == "diffnb"
    assert detector_name({"name": "x", "postprocessor_args": {"detector": "lfdn"}}, "diffguard") == "lfdn"
    assert detector_name({"name": "x", "postprocessor_args": {}}, "diffguard") == "diffguard"
    from openood_diffguard.openood import registration

    # one reader, re-exported (by module name: a test that reloads the package leaves two module objects)
    assert registration.read_postprocessor_section.__module__ == read_postprocessor_section.__module__
    bad = tmp_path / "fusion_x.yml"
    bad.write_text("postprocessor_args: {detector: diffguard}\n")
    for read in (read_postprocessor_section, load_fusion_preset):
        with pytest.raises(ValueError, match="no 'postprocessor' section"):
            read(bad)


def test_info_reports_the_cache_root_of_the_cache_module(monkeypatch, tmp_path):
    from openood_diffguard.cli import info
    from openood_diffguard.runtime import cache

    monkeypatch.setenv("OPENOOD_DIFFGUARD_CACHE", str(tmp_path / "env"))
    assert info.collect()["cache dir"] == str(cache.default_cache_root()) == str(tmp_path / "env")
    monkeypatch.setattr(cache, "default_cache_root", lambda: tmp_path / "one_rule")
    assert info.collect()["cache dir"] == str(tmp_path / "one_rule")
