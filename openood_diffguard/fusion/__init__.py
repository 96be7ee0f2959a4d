"""Score fusion of a diffusion detector with a classifier baseline (EBO, MLS, KNN, ViM).

- ``ScoreFusion`` (``score_fusion.py``): fit on ID scores, route (cascade), fuse; the stable API.
- ``rules.py``: rank / z-score weighted sum, cascade, product and min of ID-probabilities, logistic (OOD-val).
- ``calibration.py``: ID-only ECDF and z-score calibration.
- ``baselines.py``: pytorch-ood's EBO / MLS / KNN / ViM from one shared classifier forward (standalone path;
  inside OpenOOD the baselines are OpenOOD's own postprocessors).
- ``scores_io.py`` / ``cli.py``: load cached per-sample scores (ours, OpenOOD's pickled ``evaluator.scores``)
  and the ``openood-diffguard fuse`` command.
"""
from .calibration import ECDF, ZScore
from .rules import RULES, FusionRule
from .score_fusion import ScoreFusion

__all__ = ["ScoreFusion", "RULES", "FusionRule", "ECDF", "ZScore"]
