"""``openood-diffguard fuse``: fuse cached per-sample scores without re-running any model.

    openood-diffguard fuse --scores ebo.pkl diffguard.npz --rule cascade --param alpha_out=0.02 --fit-on id_val
    openood-diffguard fuse --scores ebo.npz diffguard.npz --rule rank --budget 0.2   # diffusion on 20 % of ID

Inputs are our score npz files and/or OpenOOD's pickled ``evaluator.scores`` (see ``scores_io``); the
first file is the baseline, the second the diffusion detector (``--baseline`` / ``--diffusion`` to change).
Calibration is fitted on ID data only (``id_val``, or a seeded half of ID test with ``id_test_half`` when
the files have no ID-val, as OpenOOD's pickles never do). ``--sweep`` picks the rule's parameters by
AUROC on ID-val vs OOD-val, like OpenOOD's APS (so it uses OOD-val; the logistic rule always does).
Prints, per OOD dataset, AUROC, AUPR-In, AUPR-Out and FPR@95 in both conventions for every input and
the fused score, plus the unweighted near/far means and, for the cascade or a ``--budget``, the share of
each split routed to the diffusion detector (diffusion scores may be NaN outside that band).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .rules import RULES
from .score_fusion import ScoreFusion
from .scores_io import align, load_scores

METRIC_COLUMNS = ("AUROC", "AUPR_IN", "AUPR_OUT", "FPR@95_OpenOOD", "FPR@95_IDpos")


def _ood_metrics(conf_id: np.ndarray, conf_ood: np.ndarray) -> dict[str, float]:
    """``openood_diffguard.metrics`` (OpenOOD v1.5's definitions) under this table's column names.

    FPR@95_OpenOOD: share of ID flagged OOD when 95 % of OOD are caught (OOD = positive, OpenOOD v1.5).
    FPR@95_IDpos: share of OOD accepted when 95 % of ID are accepted (DiffGuard / DLSR / pre-2023-08 OpenOOD).
    """
    from ..metrics import ood_metrics  # imports scikit-learn: not for --help

    m = ood_metrics(np.r_[conf_id, conf_ood], np.r_[np.zeros(conf_id.size, np.int64), -np.ones(conf_ood.size, np.int64)])
    return {"AUROC": m.auroc, "AUPR_IN": m.aupr_in, "AUPR_OUT": m.aupr_out,
            "FPR@95_OpenOOD": m.fpr95_ood_positive, "FPR@95_IDpos": m.fpr95_id_positive}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", nargs="+", required=True, type=Path,
                   help="score files: .npz (ours: conf, label, split[, pred, key]) or .pkl (OpenOOD evaluator.scores)")
    p.add_argument("--names", nargs="+", help="component names (default: file stems)")
    p.add_argument("--rule", default="rank", choices=sorted(RULES), help="fusion rule (openood_diffguard.fusion.rules)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="rule parameter, e.g. w=0.3, alpha_out=0.02 (repeatable)")
    p.add_argument("--budget", type=float, default=None, metavar="RHO",
                   help="compute budget: share of ID samples (0 < RHO <= 1) whose diffusion score is read, the band "
                        "where the baseline is least certain (any rule; same as --param budget=RHO; default: no budget, "
                        "the rule's own band)")
    p.add_argument("--baseline", help="component gating the cascade / weighted by w (default: first file)")
    p.add_argument("--diffusion", help="component the cascade routes to (default: second file)")
    p.add_argument("--fit-on", default="id_val", choices=("id_val", "id_test_half"),
                   help="ID data the calibration is fitted on; id_test_half fits on a seeded half of ID test and "
                        "evaluates on the other half (OpenOOD pickles hold no ID-val)")
    p.add_argument("--sweep", action="store_true",
                   help="choose the rule's parameters by AUROC on ID-val vs OOD-val (OpenOOD APS; uses OOD-val)")
    p.add_argument("--seed", type=int, default=0, help="seed of the id_test_half split")
    p.add_argument("--json", type=Path, help="also write the metrics table as JSON to this file (default: print only)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle .pkl score files without restriction (can run code: only for files you trust); "
                        "default: only plain data (arrays, tensors, numbers, strings, lists, dicts) is loaded")


def _parse_params(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--param {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def fuse_tables(aligned: dict[str, dict[str, np.ndarray]], components: list[str], rule: str,
                params: dict[str, Any], baseline: str, diffusion: str, fit_on: str = "id_val",
                sweep: bool = False, seed: int = 0) -> dict[str, Any]:
    """Fit, optionally sweep, and evaluate. Returns ``{"rows": [...], "params", "fit_on", "uses_ood_val"}``."""
    if "id_test" not in aligned:
        raise ValueError(f"no id_test split common to all score files (have {sorted(aligned)})")
    id_test = {c: aligned["id_test"][c] for c in components}
    if fit_on == "id_val":
        if "id_val" not in aligned:
            raise ValueError("--fit-on id_val, but the score files share no id_val split (OpenOOD's pickles never "
                             "hold one): use --fit-on id_test_half or score ID-val into a npz")
        id_fit = {c: aligned["id_val"][c] for c in components}
    else:
        perm = np.random.default_rng(seed).permutation(id_test[components[0]].size)
        half, rest = perm[: perm.size // 2], perm[perm.size // 2:]
        id_fit = {c: v[half] for c, v in id_test.items()}
        id_test = {c: v[rest] for c, v in id_test.items()}
    ood_val = {c: aligned["ood_val"][c] for c in components} if "ood_val" in aligned else None
    fusion = ScoreFusion(rule, baseline=baseline, diffusion=diffusion, **params)
    needs_ood = fusion.uses_ood_val or sweep
    if needs_ood and ood_val is None:
        raise ValueError(f"{'--sweep' if sweep else 'rule ' + rule} needs an ood_val split in every score file")
    fusion.fit(id_fit, ood_val_scores=ood_val if fusion.uses_ood_val else None)
    if sweep:
        grid = ScoreFusion.sweep(rule, params.get("budget"))
        best, best_auroc = None, -np.inf
        for values in itertools.product(*grid.values()):
            combo = dict(zip(grid, values))
            try:
                fusion.set_params(**combo)
            except ValueError:
                continue  # e.g. alpha_out + alpha_in > 1
            auroc = _ood_metrics(fusion(id_fit), fusion(ood_val))["AUROC"]
            if auroc > best_auroc:  # first strict best, like the Evaluator's APS
                best, best_auroc = combo, auroc
        fusion.set_params(**best)

    rows = []
    banded = fusion.rule.routes  # routed shares are reported for every rule with a band (cascade, budget)
    ood_splits = [s for s in aligned if s == "ood_val" or s.startswith(("near/", "far/"))]
    for split in ood_splits:
        ood = {c: aligned[split][c] for c in components}
        for name in [*components, "fused"]:
            if name == "fused":
                m = _ood_metrics(fusion(id_test), fusion(ood))
                routed = float(fusion.route(ood[baseline]).mean()) if banded else None
            elif np.isfinite(id_test[name]).all() and np.isfinite(ood[name]).all():
                m, routed = _ood_metrics(id_test[name], ood[name]), None
            else:
                continue  # a cascade-only diffusion score: not computed for every sample
            # OOD-val rows are in-sample when the logistic rule or --sweep fitted on them
            label = f"{split} (fit)" if split == "ood_val" and (fusion.uses_ood_val or sweep) else split
            rows.append({"dataset": label, "score": name, **m, "routed": routed})
    for group in ("near", "far"):
        for name in [*components, "fused"]:
            sel = [r for r in rows if r["dataset"].startswith(group + "/") and r["score"] == name]
            if sel:
                rows.append({"dataset": f"{group}ood", "score": name,
                             **{k: float(np.mean([r[k] for r in sel])) for k in METRIC_COLUMNS}, "routed": None})
    routed_id = float(fusion.route(id_test[baseline]).mean())
    return {"rows": rows, "rule": rule, "params": fusion.get_params(), "fit_on": fit_on,
            "uses_ood_val": bool(fusion.uses_ood_val or sweep), "routed_id_test": routed_id,
            "expected_routed_id": fusion.expected_routed_fraction, "banded": banded}


def format_table(result: dict[str, Any]) -> str:
    head = f"{'dataset':<22} {'score':<14}" + "".join(f" {c:>15}" for c in METRIC_COLUMNS) + f" {'routed':>7}"
    lines = [f"rule={result['rule']} params={result['params']} fit_on={result['fit_on']} "
             f"uses_ood_val={result['uses_ood_val']}", head, "-" * len(head)]
    for r in result["rows"]:
        routed = "" if r["routed"] is None else f"{100 * r['routed']:.1f}"
        lines.append(f"{r['dataset']:<22} {r['score']:<14}" + "".join(f" {100 * r[c]:>15.2f}" for c in METRIC_COLUMNS)
                     + f" {routed:>7}")
    lines.append("metrics in %; FPR@95_OpenOOD = ID flagged OOD at 95% OOD recall (OpenOOD v1.5), FPR@95_IDpos = "
                 "OOD accepted at 95% ID recall (papers); routed = share sent to the diffusion detector")
    if result.get("banded"):
        lines.append(f"{result['rule']} routed {100 * result['routed_id_test']:.1f}% of ID test to diffusion "
                     f"(calibrated band: {100 * result['expected_routed_id']:.1f}% of ID)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:  # bad inputs: one clear line, no traceback
        print(f"openood-diffguard fuse: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    names = args.names or [p.stem for p in args.scores]
    if len(names) != len(args.scores) or len(set(names)) != len(names):
        raise SystemExit(f"need one unique name per score file, got {names} (use --names)")
    if len(names) < 2:
        raise SystemExit("fuse needs at least two score files")
    files = {n: load_scores(p, trust_pickle=args.trust_pickle) for n, p in zip(names, args.scores)}
    aligned = align(files)
    baseline = args.baseline or names[0]
    diffusion = args.diffusion or names[1]
    for role, n in (("--baseline", baseline), ("--diffusion", diffusion)):
        if n not in names:
            raise SystemExit(f"{role} {n!r} is not one of the component names {names}")
    params = _parse_params(args.param)
    if args.budget is not None:
        if params.get("budget", args.budget) != args.budget:
            raise ValueError(f"--budget {args.budget} and --param budget={params['budget']} disagree")
        params["budget"] = args.budget
    result = fuse_tables(aligned, names, args.rule, params, baseline, diffusion, args.fit_on, args.sweep, args.seed)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
