"""Both FPR@95 conventions from the score files an OpenOOD main.py run saved (``recorder.save_scores``).

    python paper_metrics.py results/<exp_name>/scores --id cifar10 --near cifar100 tin --far mnist svhn texture place365

OpenOOD's csv reports FPR@95 with OOD as the positive class; the papers report it with ID positive (OOD
accepted at 95 % ID recall). AUROC is the same in both. Uses ``openood_diffguard.metrics`` (tested against
OpenOOD's ``compute_all_metrics``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from openood_diffguard.metrics import benchmark_table, format_table


def load(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = folder / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run OpenOOD with recorder.save_scores True (test_ood.yml default); "
                                f"found {sorted(p.stem for p in folder.glob('*.npz'))}")
    z = np.load(path, allow_pickle=False)  # a user-supplied file: never unpickle objects
    return z["pred"], z["conf"], z["label"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scores", type=Path, help="the run's scores/ folder")
    p.add_argument("--id", required=True, help="ID dataset name (cifar10, imagenet)")
    p.add_argument("--near", nargs="*", default=[])
    p.add_argument("--far", nargs="*", default=[])
    a = p.parse_args(argv)
    ood = {n: load(a.scores, n) for n in a.near + a.far}
    groups = {k: v for k, v in (("nearood", a.near), ("farood", a.far)) if v}
    print(format_table(benchmark_table(load(a.scores, a.id), ood, groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
