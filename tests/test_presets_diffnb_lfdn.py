"""The shipped DiffNB / LFDN presets are valid OpenOOD postprocessor configs for our detectors."""
from pathlib import Path

import pytest
import yaml

from openood_diffguard.detectors.diffnb import DiffNB
from openood_diffguard.detectors.lfdn import LFDN

ROOT = Path(__file__).resolve().parents[1] / "configs" / "postprocessors"


@pytest.mark.parametrize("stem,cls,t", [("diffnb_cifar10", DiffNB, [300]), ("diffnb_imagenet", DiffNB, [600]),
                                        ("lfdn_cifar10", LFDN, [3]), ("lfdn_imagenet", LFDN, [3])])
def test_preset(stem, cls, t):
    pp = yaml.safe_load((ROOT / f"{stem}.yml").read_text())["postprocessor"]
    assert pp["name"] == cls.name and pp["APS_mode"] is False
    assert pp["postprocessor_sweep"]  # never empty (OpenOOD recursion with APS on)
    det = cls(**pp["postprocessor_args"])  # unknown keys would raise
    assert det.params["timesteps"] == t
