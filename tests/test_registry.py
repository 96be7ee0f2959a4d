import pytest

from ood_toys import ToyDetector
from openood_diffguard.runtime import registry


def test_lazy_table_and_toy_registration(monkeypatch):
    monkeypatch.setattr(registry, "DETECTORS", dict(registry.DETECTORS))
    assert registry.DETECTORS["diffguard"] == "openood_diffguard.detectors.diffguard:DiffGuard"
    assert set(registry.DETECTORS) >= {"diffguard", "diffnb", "lfdn"} and "fusion" in registry.POSTPROCESSORS
    registry.register_detector("toy", "ood_toys:ToyDetector")
    det = registry.build_detector("toy", sign=-1.0)
    assert isinstance(det, ToyDetector) and det.params["sign"] == -1.0
    registry.register_detector("toy", "ood_toys:ToyDetector")  # idempotent
    with pytest.raises(KeyError, match="already registered"):
        registry.register_detector("toy", ToyDetector)
    registry.register_detector("toy2", ToyDetector)
    assert registry.detector_class("toy2") is ToyDetector
    with pytest.raises(KeyError, match="unknown detector 'nope'"):
        registry.build_detector("nope")
    registry.register_detector("broken", "openood_diffguard.no_such_module:X")
    with pytest.raises(ImportError, match="broken"):
        registry.detector_class("broken")
    assert registry.detector_class("ood_toys:ToyDetector") is ToyDetector  # unregistered module:Class path
    with pytest.raises(ValueError, match="module:Attr"):
        registry.load("no_colon")
