"""Fusion presets: the yml schema of OpenOOD's fusion postprocessor, also read by the standalone path.

Files: ``configs/postprocessors/fusion_<detector>_<baseline>_<dataset>.yml``, in OpenOOD's postprocessor
format (mergeable by ``openood.utils.config``; load one, never stack two)::

    postprocessor:
      name: diffguard_fusion          # main.py factory name (the Evaluator-by-name path uses the file stem)
      APS_mode: true                  # true only with a non-empty postprocessor_sweep
      postprocessor_args:
        detector: diffguard           # registered detector name (diffguard | diffnb | lfdn)
        detector_preset: diffguard_cifar10   # optional: stem of configs/postprocessors/<preset>.yml whose
                                      # postprocessor_args are the detector's arguments (no copy in this file)
        detector_args: {}             # detector arguments; override the preset's (resolve_detector_args)
        baseline: ebo                 # ebo | mls | knn | vim: OpenOOD's own postprocessor inside OpenOOD,
                                      # pytorch-ood's implementation standalone (fusion.baselines)
        baseline_args: {temperature: 1}   # that postprocessor's args in OpenOOD's spelling
                                      # (ebo: temperature; knn: K; vim: dim (< feature size); mls: none)
        rule: cascade                 # rank | zscore | cascade | product | min | logistic (fusion.rules)
        rule_args: {alpha_out: 0.02, alpha_in: 0.0, budget: null}   # budget rho: only a share rho of ID
                                      # samples reaches the detector (band (alpha_out, alpha_out + rho) of the
                                      # baseline's ID-val quantiles; alpha_in must then be 0 and not swept);
                                      # null = the cascade's band (alpha_out, 1 - alpha_in)
        cache_dir: null               # score cache of the detector (OpenOOD postprocessor)
      postprocessor_sweep:            # APS grid, <param>_list; key order = set_hyperparam order; rule
        alpha_out_list: [0.005, 0.01, 0.02, 0.03, 0.04]   # parameters, or cheap detector parameters;
        alpha_in_list: [0.0, 0.05, 0.1, 0.2]              # never budget_list (a compute limit: APS would
                                                          # pick the largest)

The calibration is always fitted on ID ``val`` (never train: augmented in ``main.py``; never test or OOD).
The fused score is ``ScoreFusion(rule, baseline="baseline", diffusion="diffusion", **rule_args)`` over the
components ``{"baseline": <baseline conf>, "diffusion": <detector conf>}`` (both higher = ID).
``logistic`` additionally fits on OOD-val (``ood['val']``), like OpenOOD's APS does. With a ``budget`` the
detector runs only on the samples inside the band, ID-val included; APS then also reads OOD-val (as for
any swept yml) to choose the band's start ``alpha_out``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..openood.sections import aps_flag, detector_name, read_postprocessor_section, sweep_items
from .baselines import BASELINE_ARGS
from .rules import RULES
from .score_fusion import ScoreFusion

POSTPROCESSOR_NAME = "diffguard_fusion"
BASELINE_KEY, DIFFUSION_KEY = "baseline", "diffusion"
FUSION_KEYS = ("detector", "detector_preset", "detector_args", "baseline", "baseline_args", "rule", "rule_args",
               "cache_dir", "cache")


def preset_dir() -> Path:
    """``configs/postprocessors`` shipped with the package."""
    return Path(__file__).resolve().parent.parent / "configs" / "postprocessors"


@dataclass
class FusionConfig:
    detector: str
    baseline: str
    rule: str
    detector_preset: str | None = None
    detector_args: dict[str, Any] = field(default_factory=dict)
    baseline_args: dict[str, Any] = field(default_factory=dict)
    rule_args: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list] = field(default_factory=dict)  # rule parameter -> candidates (``_list`` stripped)
    detector_sweep: dict[str, list] = field(default_factory=dict)  # other sweep keys, for the detector
    aps_mode: bool = False

    def build_fusion(self) -> ScoreFusion:
        return ScoreFusion(self.rule, baseline=BASELINE_KEY, diffusion=DIFFUSION_KEY, **self.rule_args)

    def build_baselines(self):
        """Standalone baseline scorer (pytorch-ood); inside OpenOOD use OpenOOD's postprocessor instead."""
        from .baselines import Baselines

        return Baselines({self.baseline: self.baseline_args})

    def resolved_detector_args(self, root: str | Path | None = None) -> dict[str, Any]:
        return resolve_detector_args({"detector": self.detector, "detector_preset": self.detector_preset,
                                      "detector_args": self.detector_args}, root)


def resolve_detector_args(postprocessor_args: Mapping[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """The detector's arguments: ``detector_preset``'s postprocessor_args (if given) updated by ``detector_args``.

    ``root`` is the folder of the preset ymls (default: the package's ``configs/postprocessors``). The preset
    must belong to the same detector (its ``postprocessor.name`` or ``postprocessor_args.detector``).
    """
    preset = postprocessor_args.get("detector_preset")
    overrides = dict(postprocessor_args.get("detector_args") or {})
    if not preset:
        return overrides
    path = Path(root or preset_dir()) / f"{preset}.yml"
    if not path.is_file():
        raise FileNotFoundError(f"detector_preset {preset!r} not found: expected {path}")
    pp = read_postprocessor_section(path)
    owner = detector_name(pp)
    args = {k: v for k, v in (pp.get("postprocessor_args") or {}).items() if k != "detector"}
    detector = postprocessor_args.get("detector")
    if detector and owner != detector:
        raise ValueError(f"detector_preset {preset!r} configures {owner!r}, not detector {detector!r}")
    return {**args, **overrides}


def parse_fusion_config(cfg: Mapping[str, Any], where: str = "fusion config") -> FusionConfig:
    """Validate a fusion preset (the whole yml dict, or its ``postprocessor`` section); clear errors."""
    pp = cfg.get("postprocessor", cfg)
    args = dict(pp.get("postprocessor_args") or {})
    unknown = set(args) - set(FUSION_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown postprocessor_args {sorted(unknown)}; allowed: {list(FUSION_KEYS)}")
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
    rule_params = set(RULES[args["rule"]].DEFAULTS)
    sweep, detector_sweep, keys = {}, {}, {}
    raw_sweep = dict(pp.get("postprocessor_sweep") or {})
    for key, param, values in sweep_items(raw_sweep, where):
        # not a rule parameter: a cheap detector parameter, checked by the postprocessor against the detector
        (sweep if param in rule_params else detector_sweep)[param] = values
        keys[param] = key
    if "budget" in sweep:
        raise ValueError(f"{where}: postprocessor_sweep.{keys['budget']}: the budget is a compute limit, not a "
                         f"hyper-parameter (APS would pick the largest); set rule_args.budget and sweep alpha_out")
    aps = aps_flag(pp, raw_sweep, where)
    out = FusionConfig(detector=args["detector"], baseline=args["baseline"], rule=args["rule"],
                       detector_preset=args.get("detector_preset"),
                       detector_args=dict(args.get("detector_args") or {}),
                       baseline_args=dict(args.get("baseline_args") or {}),
                       rule_args=dict(args.get("rule_args") or {}), sweep=sweep, detector_sweep=detector_sweep,
                       aps_mode=aps)
    fusion = out.build_fusion()  # rejects unknown / out-of-range rule_args now, not mid-run
    for param, values in sweep.items():  # and every APS candidate (e.g. alpha_in next to a budget)
        for value in values:
            try:
                fusion.rule.__class__(**{**out.rule_args, param: value})
            except (TypeError, ValueError) as err:
                if "alpha_out + alpha_in" in str(err):
                    continue  # the cascade's sweep skips combinations with alpha_out + alpha_in > 1
                raise ValueError(f"{where}: postprocessor_sweep.{keys[param]} value {value!r}: {err}") from None
    return out


def load_fusion_preset(name_or_path: str | Path) -> FusionConfig:
    """A preset by stem (``fusion_diffguard_ebo_cifar10``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = preset_dir() / f"{path.name}.yml"
    if not path.is_file():
        raise FileNotFoundError(f"fusion preset not found: {path}")
    return parse_fusion_config(read_postprocessor_section(path), where=str(path))
