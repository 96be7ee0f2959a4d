"""Fusion presets: the yml schema shared by OpenOOD's ``diffguard_fusion`` postprocessor and the standalone path.

Files: ``configs/postprocessors/fusion_<detector>_<baseline>_<dataset>.yml``, in OpenOOD's postprocessor
format (mergeable by ``openood.utils.config``; load one, never stack two)::

    postprocessor:
      name: diffguard_fusion          # main.py factory name (the Evaluator-by-name path uses the file stem)
      APS_mode: true                  # true only with a non-empty postprocessor_sweep
      postprocessor_args:
        detector: diffguard_cifar10   # our detector preset = stem of configs/postprocessors/<detector>.yml;
                                      # its postprocessor_args are the detector's arguments
        detector_args: {}             # overrides of those arguments
        baseline: ebo                 # ebo | mls | knn | vim: OpenOOD's own postprocessor inside OpenOOD,
                                      # pytorch-ood's implementation standalone (fusion.baselines)
        baseline_args: {temperature: 1}   # that postprocessor's args in OpenOOD's spelling
                                      # (ebo: temperature; knn: K; vim: dim, null = safe default; mls: none)
        rule: cascade                 # rank | zscore | cascade | product | min | logistic (fusion.rules)
        rule_args: {alpha_out: 0.02, alpha_in: 0.0}
        fit_on: val                   # ID split the calibration is fitted on (id['val']; never test, never OOD)
      postprocessor_sweep:            # APS grid over rule_args: <param>_list; key order = set_hyperparam order
        alpha_out_list: [0.005, 0.01, 0.02, 0.03, 0.04]
        alpha_in_list: [0.0, 0.05, 0.1, 0.2]

The fused score is ``ScoreFusion(rule, baseline="baseline", diffusion="diffusion", **rule_args)`` over the
components ``{"baseline": <baseline conf>, "diffusion": <detector conf>}`` (both higher = ID).
``logistic`` additionally fits on OOD-val (``ood['val']``), like OpenOOD's APS does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .baselines import BASELINE_ARGS
from .rules import RULES
from .score_fusion import ScoreFusion

POSTPROCESSOR_NAME = "diffguard_fusion"
BASELINE_KEY, DIFFUSION_KEY = "baseline", "diffusion"
FIT_SPLITS = ("val",)
_ARGS = {"detector", "detector_args", "baseline", "baseline_args", "rule", "rule_args", "fit_on"}


def preset_dir() -> Path:
    """``configs/postprocessors`` shipped with the package."""
    return Path(__file__).resolve().parent.parent / "configs" / "postprocessors"


@dataclass
class FusionConfig:
    detector: str
    baseline: str
    rule: str
    detector_args: dict[str, Any] = field(default_factory=dict)
    baseline_args: dict[str, Any] = field(default_factory=dict)
    rule_args: dict[str, Any] = field(default_factory=dict)
    fit_on: str = "val"
    sweep: dict[str, list] = field(default_factory=dict)  # rule parameter -> candidates (``_list`` stripped)
    aps_mode: bool = False

    def build_fusion(self) -> ScoreFusion:
        return ScoreFusion(self.rule, baseline=BASELINE_KEY, diffusion=DIFFUSION_KEY, **self.rule_args)

    def build_baselines(self):
        """Standalone baseline scorer (pytorch-ood); inside OpenOOD use OpenOOD's postprocessor instead."""
        from .baselines import Baselines

        return Baselines({self.baseline: self.baseline_args})

    def detector_preset(self, root: str | Path | None = None) -> dict[str, Any]:
        """The detector's preset args (``<root>/<detector>.yml`` postprocessor_args) with overrides applied."""
        path = Path(root or preset_dir()) / f"{self.detector}.yml"
        if not path.is_file():
            raise FileNotFoundError(f"detector preset {self.detector!r} not found: expected {path}")
        args = (yaml.safe_load(path.read_text()) or {}).get("postprocessor", {}).get("postprocessor_args") or {}
        return {**args, **self.detector_args}


def parse_fusion_config(cfg: Mapping[str, Any], where: str = "fusion config") -> FusionConfig:
    """Validate a fusion preset (the whole yml dict, or its ``postprocessor`` section); clear errors."""
    pp = cfg.get("postprocessor", cfg)
    args = dict(pp.get("postprocessor_args") or {})
    unknown = set(args) - _ARGS
    if unknown:
        raise ValueError(f"{where}: unknown postprocessor_args {sorted(unknown)}; allowed: {sorted(_ARGS)}")
    for key in ("detector", "baseline", "rule"):
        if not args.get(key):
            raise ValueError(f"{where}: postprocessor_args.{key} is required")
    if args["baseline"] not in BASELINE_ARGS:
        raise ValueError(f"{where}: baseline {args['baseline']!r} not supported; choose from {sorted(BASELINE_ARGS)}")
    b_unknown = set(args.get("baseline_args") or {}) - set(BASELINE_ARGS[args["baseline"]])
    if b_unknown:
        raise ValueError(f"{where}: baseline_args {sorted(b_unknown)} unknown for {args['baseline']!r}; "
                         f"allowed: {sorted(BASELINE_ARGS[args['baseline']])}")
    if args["rule"] not in RULES:
        raise ValueError(f"{where}: rule {args['rule']!r} unknown; choose from {sorted(RULES)}")
    fit_on = args.get("fit_on", "val")
    if fit_on not in FIT_SPLITS:
        raise ValueError(f"{where}: fit_on {fit_on!r} not allowed: calibrate on ID {FIT_SPLITS} only "
                         f"(train is augmented in main.py; test and OOD would leak)")
    rule_params = set(RULES[args["rule"]].DEFAULTS)
    sweep = {}
    for key, values in (pp.get("postprocessor_sweep") or {}).items():
        param = key[:-5] if key.endswith("_list") else key
        if param not in rule_params:
            raise ValueError(f"{where}: postprocessor_sweep.{key} does not name a {args['rule']!r} parameter "
                             f"({sorted(p + '_list' for p in rule_params)})")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: postprocessor_sweep.{key} must be a non-empty list")
        sweep[param] = values
    aps = bool(pp.get("APS_mode", False))
    if aps and not sweep:
        raise ValueError(f"{where}: APS_mode true with an empty postprocessor_sweep (OpenOOD would recurse forever)")
    out = FusionConfig(detector=args["detector"], baseline=args["baseline"], rule=args["rule"],
                       detector_args=dict(args.get("detector_args") or {}),
                       baseline_args=dict(args.get("baseline_args") or {}),
                       rule_args=dict(args.get("rule_args") or {}), fit_on=fit_on, sweep=sweep, aps_mode=aps)
    out.build_fusion()  # rejects unknown / out-of-range rule_args now, not mid-run
    return out


def load_fusion_preset(name_or_path: str | Path) -> FusionConfig:
    """A preset by stem (``fusion_diffguard_ebo_cifar10``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = preset_dir() / f"{path.name}.yml"
    if not path.is_file():
        raise FileNotFoundError(f"fusion preset not found: {path}")
    return parse_fusion_config(yaml.safe_load(path.read_text()) or {}, where=str(path))
