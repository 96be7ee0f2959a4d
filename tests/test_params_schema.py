"""The parameter schema (``detectors/params.py``): each detector's ``PARAMS`` table is the one place that
declares types, allowed values, ranges and defaults; every violation is an error naming the parameter; a
detector's ``config()`` round-trips through yml to an equal detector (same parameters, same cache key)."""
import math

import pytest
import yaml

from openood_diffguard.runtime import registry
from openood_diffguard.detectors.base import Detector
from openood_diffguard.detectors.params import Param, ParameterError
from openood_diffguard.openood.registration import PACKAGE_CONFIGS, read_postprocessor_section
from openood_diffguard.openood.sections import detector_from_section

NAMES = sorted(registry.DETECTORS)


def _cls(name):
    return registry.detector_class(name)


def _schema_cases():
    """(detector, parameter, bad value) for every constraint the schema declares."""
    for name in NAMES:
        for key, spec in _cls(name).PARAMS.items():
            kinds = spec.accepted_types()
            if str not in kinds:
                yield name, key, "a-string"
            if spec.choices is not None and str in kinds:
                yield name, key, "no-such-choice"
            if spec.low is not None:
                yield name, key, spec.low if spec.low_open else spec.low - 1
            if spec.high is not None:
                yield name, key, spec.high if spec.high_open else spec.high + 1
            if float in kinds:
                yield name, key, math.nan
            if type(None) not in kinds:
                yield name, key, None


CASES = list(_schema_cases())


def test_every_detector_declares_a_schema_with_docs():
    for name in NAMES:
        cls = _cls(name)
        assert cls.PARAMS and set(cls.DEFAULTS) == set(cls.PARAMS), name
        undocumented = [k for k, p in cls.PARAMS.items() if not p.doc]
        assert not undocumented, f"{name}: parameters without a doc line: {undocumented}"
        assert cls.cheap_params == tuple(k for k, p in cls.PARAMS.items() if p.cheap)
    assert len(CASES) > 60  # the generated bad values below cover the schema, not a handful


@pytest.mark.parametrize("name,key,value", CASES, ids=[f"{n}-{k}-{v!r}" for n, k, v in CASES])
def test_schema_violation_is_an_error_naming_the_parameter(name, key, value):
    with pytest.raises(ParameterError, match=f"parameter '{key}'"):
        _cls(name)(**{key: value})
    det = _cls(name)()
    before = dict(det.params)
    with pytest.raises(ParameterError, match=f"parameter '{key}'"):
        det.set_params(**{key: value})
    assert det.params == before  # a rejected change leaves the detector as it was


PRESETS = sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yml") if not p.stem.startswith("fusion_"))


@pytest.mark.parametrize("source", NAMES + PRESETS)
def test_yml_round_trip(source):
    if source in NAMES:
        det = _cls(source)()
    else:  # the detector a packaged preset builds, the way OpenOOD's postprocessor builds it
        det = detector_from_section(read_postprocessor_section(PACKAGE_CONFIGS / f"{source}.yml"))[0]
    name = type(det).name
    text = yaml.safe_dump(det.config())  # plain yml data only (safe_dump refuses tuples, paths, numpy)
    clone = _cls(name).from_config(yaml.safe_load(text))
    assert clone.config() == det.config()
    assert clone.cache_key() == det.cache_key()


def test_defaults_are_copied_per_instance():
    name = next(n for n in NAMES if any(isinstance(p.default, (list, dict)) for p in _cls(n).PARAMS.values()))
    key = next(k for k, p in _cls(name).PARAMS.items() if isinstance(p.default, (list, dict)))
    a = _cls(name)()
    a.params[key].clear() if isinstance(a.params[key], dict) else a.params[key].append(99)
    assert _cls(name)().params[key] == _cls(name).PARAMS[key].default != a.params[key]


class _Schema(Detector):
    name = "schema_toy"
    PARAMS = {"scale": Param(1.0, "a positive number", low=0, low_open=True),
              "mode": Param("a", "a or b", choices=("a", "b")),
              "cut": Param(None, "null = the variant's, false = off", types=(float,), off=True, low=-1, high=1),
              "sign": Param(1.0, "cheap", cheap=True)}

    def statistics(self, net, images, labels=None):
        return {}

    def confidence(self, stats):
        return stats


@pytest.mark.parametrize("params,match", [
    ({"scale": 0}, r"'scale' must be > 0"), ({"scale": "2"}, r"'scale' must be a number"),
    ({"scale": True}, r"'scale' must be a number"), ({"scale": math.inf}, r"'scale' must be finite"),
    ({"mode": "c"}, r"'mode' must be one of \['a', 'b'\]"), ({"cut": True}, r"'cut' must be a number, null"),
    ({"cut": 2.0}, r"'cut' must be >= -1 and <= 1"), ({"nope": 1}, r"unknown parameter")])
def test_param_rules(params, match):
    with pytest.raises((ParameterError, TypeError), match=match):
        _Schema(**params)


def test_param_rules_accept_valid_values_and_derive_cheap():
    d = _Schema(scale=3, mode="b", cut=False)
    assert d.params["cut"] is False and _Schema(cut=None).params["cut"] is None and _Schema(cut=-0.5)
    assert _Schema.cheap_params == ("sign",) and _Schema.DEFAULTS == {"scale": 1.0, "mode": "a", "cut": None, "sign": 1.0}


def test_older_style_declaration_keeps_its_checks_and_accepts_undeclared_types():
    class Legacy(Detector):
        name = "legacy_toy"
        DEFAULTS = {"sign": 1.0, "normalization": None, "steps": 10}
        PARAM_TYPES = {"steps": (int,)}
        cheap_params = ("sign",)

        def statistics(self, net, images, labels=None):
            return {}

        def confidence(self, stats):
            return stats

    assert Legacy(normalization="cifar10").params["normalization"] == "cifar10"  # None default, no declared type
    with pytest.raises(ParameterError, match="'steps' must be an integer"):
        Legacy(steps="3")
    with pytest.raises(ParameterError, match="'sign' must be a number"):
        Legacy(sign="x")
    assert Legacy.cheap_params == ("sign",)
