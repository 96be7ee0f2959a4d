"""Step 'score': each detector in its own module, all following ``base.Detector``."""
from .base import Detector

__all__ = ["Detector"]
