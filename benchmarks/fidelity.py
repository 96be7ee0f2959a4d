"""Fidelity comparison: one detector, several configurations (e.g. ``variant: code`` vs ``paper``), on real images.

    python benchmarks/fidelity.py --setup digits --detector diffnb \
        --config code variant=code --config paper variant=paper --out benchmarks/results/fidelity_diffnb.md
    python benchmarks/fidelity.py --setup cifar --work <cifar work dir> --detector lfdn --config code variant=code

Each ``--config NAME key=value ...`` is one row: the detector's setup preset (below) with these parameters on top
(values are parsed as YAML: ``timesteps=[120,240,360]``, ``train={epochs: 20}``, ``dtype=null``). Rows that differ
only in cheap parameters re-score the same cached statistics. ``--append`` adds the rows to an existing ``--out``.
``--ci-against NAME`` adds each row's AUROC difference to row NAME with a paired bootstrap interval (same images).

Setups (both run on the CPU in minutes to an hour):

- ``digits``: the demo's open set (scikit-learn digits at 8 px, known 0-5 = ID, 6-9 = OOD), with the demo's cached
  classifier and class-conditional UNet (``openood-diffguard demo``'s full preset; trained on first use, ~3 min).
- ``cifar``: CIFAR-10 open-set split A (known {0..5} = ID, {6..9} = OOD) with the stages of ``cifar_osr.py`` at CPU
  size: 2,000 train images per known class, 100 held-out ID val, 300 test images per class (1,800 ID / 1,200 OOD),
  SmallResNet classifier (20 epochs), tiny class-conditional UNet (45 min of CPU training). The first run trains
  them under ``--work`` (about an hour on 2 cores); later runs reuse them.

Python API: ``load_setup(name, ...) -> Setup`` and ``evaluate(detector, setup) -> (metrics, scores)``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout first
import openood_diffguard  # noqa: E402,F401  (repairs torchvision first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _speed import hardware  # noqa: E402

from openood_diffguard.runtime.cache import ScoreCache, cached_statistics, module_fingerprint, namespace  # noqa: E402
from openood_diffguard.metrics import OODMetrics, format_table, ood_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DETECTORS = ("diffguard", "diffnb", "lfdn")
#: cifar_osr.py overrides of its "tiny" mode that make the CPU-size CIFAR setup
CIFAR_CPU = dict(train_per_class=2000, val_per_class=100, test_per_class=300, clf_epochs=20, diffusion_minutes=45.0,
                 diffusion_chunk=500, diffusion_batch=64)


@dataclass
class Setup:
    name: str
    net: torch.nn.Module
    loaders: dict[str, Iterable]  # train / val / test / ood: OpenOOD-style batches, OOD label -1
    normalization: str
    num_classes: int
    diffusion_path: Path  # class-conditional diffusers UNet2DModel directory (null class = num_classes)
    description: str
    base_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # detector -> preset arguments for this setup
    cache_root: Path | None = None

    @property
    def id_loaders(self) -> dict:
        return {k: self.loaders[k] for k in ("train", "val", "test")}

    @property
    def ood_loaders(self) -> dict:
        return {"val": self.loaders["val_ood"]} if "val_ood" in self.loaders else {}


# ------------------------------------------------------------------------------------------ setups
def _digits(work: Path, device: torch.device, n: int | None) -> Setup:
    from openood_diffguard.data import DigitsOpenSet
    from openood_diffguard.demo.run import PRESETS, _classifier, _diffusion_model_dir, build_detectors

    cfg = PRESETS["full"]
    cache = work / "digits"
    data = DigitsOpenSet(size=cfg.size, seed=cfg.seed)
    net, _ = _classifier(data, cfg, cache, device, progress=True)  # (model, epochs trained now)
    unet, _ = _diffusion_model_dir(data, cfg, cache, device, progress=True)  # (folder, steps trained now)
    loaders = {"train": data.loader("id", "train", 128), "val": data.loader("id", "val", 128),
               "test": data.loader("id", "test", 128, limit=n), "ood": data.loader("ood", "test", 128, limit=n),
               "val_ood": data.loader("ood", "val", 128)}
    demo = build_detectors(unet, cfg, data.num_classes, cache)
    base = {k.lower(): dict(d.params) for k, d in demo.items()}
    return Setup("digits", net, loaders, "digits", data.num_classes, unet,
                 f"scikit-learn digits at {cfg.size} px, known 0-5 = ID ({len(loaders['test'].dataset)} test), "
                 f"6-9 = OOD ({len(loaders['ood'].dataset)} test); the demo's classifier ({cfg.classifier_epochs} "
                 f"epochs) and class-conditional UNet ({cfg.diffusion_steps} steps)", base, cache / "scores")


class _Split(torch.utils.data.Dataset):
    """uint8 CIFAR images of one split; ``name`` makes the score cache keys of different splits distinct, ``index``
    (the images' positions in the whole split; default 0..n-1) keys each image within it."""

    def __init__(self, x: np.ndarray, y: np.ndarray, name: str, index: np.ndarray | None = None) -> None:
        self.x, self.y, self.name = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y), name
        self.index = np.arange(len(y)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": self.y[i], "index": int(self.index[i])}


def _cifar_loader(x, y, name: str, space, batch: int = 250, shuffle: bool = False, index: np.ndarray | None = None):
    def collate(items):
        u = torch.stack([it["x"] for it in items]).float() / 255.0
        return {"data": space.from_unit(u), "label": torch.stack([it["label"] for it in items]),
                "index": torch.tensor([it["index"] for it in items])}

    return torch.utils.data.DataLoader(_Split(x, y, name, index), batch_size=batch, shuffle=shuffle, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(0) if shuffle else None)


def subset_indices(size: int, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a fixed random subset of n of size items (all when n is None or >= size). The permutation
    is drawn whatever n is, so the subset of n is part of that of any larger n: a larger ``--n`` re-uses the
    per-sample score cache of a smaller one."""
    order = rng.permutation(size)
    return np.sort(order[:n]) if n is not None and n < size else np.arange(size)


def _test_loader(x: np.ndarray, y: np.ndarray, split: str, n: int | None, rng: np.random.Generator, space):
    """Loader of a fixed random subset of n images of a test split (all when n is None); OOD labels -1."""
    keep = subset_indices(len(y), n, rng)
    y = y if split != "ood" else -np.ones_like(y)
    # score cache keys: the image's index in the whole split, so every n keys an image the same way. Subsets get
    # their own source name: they used to be keyed by position in the subset, and such entries (left in older work
    # folders) would be read for the wrong images.
    name = f"cifar_cpu/{split}" if len(keep) == len(y) else f"cifar_cpu/{split}/subset"
    return _cifar_loader(x[keep], y[keep], name, space, index=keep)


def _cifar(work: Path, device: torch.device, n: int | None) -> Setup:
    import cifar_osr as C

    from openood_diffguard.space import ImageSpace

    o = {**C.MODES["tiny"], **CIFAR_CPU}
    work.mkdir(parents=True, exist_ok=True)
    data_dir = C.DATA if C.DATA.is_dir() else ROOT / "benchmarks" / "_work" / "data"
    splits = C.load_splits(C.extract(data_dir, work), work, o)
    space = ImageSpace.for_dataset("cifar10")
    net, _, _ = C.train_or_load_classifier(splits, space, work, o, device, fresh=False)
    unet, log = C.train_diffusion_for(splits, work, o, device, fresh=False)
    rng = np.random.default_rng(0)

    loaders = {s: _cifar_loader(*splits[s], f"cifar_cpu/{s}", space) for s in ("train", "val")}
    loaders.update({s: _test_loader(*splits[s], s, n, rng, space) for s in ("test", "ood")})  # in this order
    known = len(C.KNOWN)
    dg = C.preset_args("diffguard_cifar10")
    dg.update(model_path=str(unet), num_classes=known, pretrained_metrics=False)
    nb = {k: v for k, v in C.preset_args("diffnb_cifar10").items() if k != "cache_dir"}
    nb.update(model_path=str(unet))
    lf = {k: v for k, v in C.preset_args("lfdn_cifar10").items() if k != "cache_dir"}
    # the paper's 1440-wide, 16-block LFDN takes ~1 h per epoch-set here: a CPU-sized one, trained in setup()
    lf.update(train={"width": 512, "blocks": 4, "epochs": 50, "batch_size": 128, "lr": 1e-3}, cache_dir=str(work / "lfdn"))
    n_id, n_ood = len(loaders["test"].dataset), len(loaders["ood"].dataset)
    return Setup("cifar", net, loaders, "cifar10", known, unet,
                 f"CIFAR-10 split A (JPEG export): known {C.KNOWN} = ID ({n_id} test), unknown {C.UNKNOWN} = OOD "
                 f"({n_ood} test); SmallResNet classifier ({o['clf_epochs']} epochs on {len(splits['train'][1])} "
                 f"images), tiny class-conditional UNet ({log['step']} steps of batch {o['diffusion_batch']}, "
                 f"{log['seconds'] / 60:.0f} min CPU)", {"diffguard": dg, "diffnb": nb, "lfdn": lf}, work / "scores")


def load_setup(name: str, work: str | Path | None = None, device: str | None = None, n: int | None = None) -> Setup:
    """``digits`` or ``cifar``; ``n`` limits the ID and OOD test sets to n images each (a fixed subset)."""
    dev = torch.device(device or "cpu")
    work = Path(work) if work else ROOT / "benchmarks" / "_work" / ("fidelity" if name == "digits" else "cifar_osr_cpu")
    if name == "digits":
        return _digits(work, dev, n)
    if name == "cifar":
        return _cifar(work, dev, n)
    raise ValueError(f"unknown setup {name!r}: digits or cifar")


# ------------------------------------------------------------------------------------------ scoring
def make_detector(kind: str, setup: Setup, **overrides: Any):
    from openood_diffguard.detectors.diffguard import DiffGuard
    from openood_diffguard.detectors.diffnb import DiffNB
    from openood_diffguard.detectors.lfdn import LFDN

    cls = {"diffguard": DiffGuard, "diffnb": DiffNB, "lfdn": LFDN}[kind]
    return cls(**{**setup.base_args.get(kind, {}), **overrides})


def evaluate(detector, setup: Setup, progress: bool = True) -> tuple[OODMetrics, dict[str, np.ndarray]]:
    """Metrics of one configured detector on the setup's ID test vs OOD test, through the cached scoring path
    (``cache.cached_statistics``, as the OpenOOD postprocessors use it)."""
    detector.setup(setup.net, setup.id_loaders, setup.ood_loaders)
    root = setup.cache_root
    store = ScoreCache(root, namespace(detector.cache_key(), module_fingerprint(setup.net)))
    parts = []
    with torch.set_grad_enabled(True):  # guidance / Grad-CAM need gradients
        for split in ("test", "ood"):
            out = cached_statistics(detector, setup.net, setup.loaders[split], store, progress)
            stats = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.stats.items()}
            conf = torch.as_tensor(detector.confidence(stats)).float().numpy()
            parts.append((out.stats["pred"].astype(int), conf, out.labels.astype(int)))
    pred, conf, label = (np.concatenate(v) for v in zip(*parts))
    label = np.where(np.arange(len(label)) < len(parts[0][2]), label, -1)
    return ood_metrics(conf, label, pred), {"pred": pred, "conf": conf, "label": label}


def paired_auroc_delta(ref: dict[str, np.ndarray], other: dict[str, np.ndarray], n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """AUROC(other) - AUROC(ref) in points with a 95 % paired bootstrap interval: both score the same images
    (``evaluate``'s scores, same order); ID and OOD samples are resampled separately."""
    from scipy.stats import rankdata

    if not np.array_equal(ref["label"], other["label"]):
        raise ValueError("paired_auroc_delta needs scores of the same images in the same order")
    is_id = ref["label"] >= 0
    ids, oods = np.nonzero(is_id)[0], np.nonzero(~is_id)[0]

    def auroc(conf: np.ndarray, n_id: int) -> float:  # ID first; Mann-Whitney with mid-ranks = ROC AUC with ties
        ranks = rankdata(conf)
        return (ranks[:n_id].sum() - n_id * (n_id + 1) / 2) / (n_id * (len(conf) - n_id))

    def delta(idx: np.ndarray) -> float:
        return 100 * (auroc(other["conf"][idx], len(ids)) - auroc(ref["conf"][idx], len(ids)))

    rng = np.random.default_rng(seed)
    boot = [delta(np.r_[rng.choice(ids, len(ids)), rng.choice(oods, len(oods))]) for _ in range(n_boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return delta(np.r_[ids, oods]), float(lo), float(hi)


# ------------------------------------------------------------------------------------------ CLI
def _parse_config(tokens: list[str]) -> tuple[str, dict[str, Any]]:
    if not tokens:
        raise SystemExit("--config needs a name, then key=value pairs")
    params = {}
    for tok in tokens[1:]:
        if "=" not in tok:
            raise SystemExit(f"--config {tokens[0]}: expected key=value, got {tok!r}")
        k, v = tok.split("=", 1)
        params[k] = yaml.safe_load(v)
    return tokens[0], params


def _shown(argv: list[str]) -> str:
    """The command as a user would type it: the local work folder is not part of the result."""
    words = list(argv)
    for i, w in enumerate(words[:-1]):
        if w == "--work":
            words[i + 1] = "<work dir>"
    return " ".join(words)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setup", choices=("digits", "cifar"), required=True)
    p.add_argument("--detector", choices=DETECTORS, required=True)
    p.add_argument("--config", nargs="+", action="append", required=True, metavar="NAME [key=value ...]")
    p.add_argument("--work", default=None, help="folder for trained models and score caches "
                   "(default benchmarks/_work/fidelity or benchmarks/_work/cifar_osr_cpu)")
    p.add_argument("--n", type=int, default=None, help="score only n ID and n OOD test images (fixed subset)")
    p.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--ci-against", default=None, metavar="NAME",
                   help="add AUROC(row) - AUROC(NAME) with a 95 %% paired bootstrap interval for every other row")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [_parse_config(c) for c in args.config]
    setup = load_setup(args.setup, args.work, args.device, args.n)
    rows, seconds, params, scores = {}, {}, {}, {}
    for name, overrides in configs:
        t0 = time.perf_counter()
        det = make_detector(args.detector, setup, **overrides)
        rows[name], scores[name] = evaluate(det, setup)
        seconds[name], params[name] = time.perf_counter() - t0, overrides
        print(f"{name}: AUROC {100 * rows[name].auroc:.2f}  ({seconds[name]:.0f} s)", flush=True)
    table = format_table(rows)
    if args.ci_against:
        if args.ci_against not in scores:
            raise SystemExit(f"--ci-against {args.ci_against}: no --config of that name")
        ci = ["", f"AUROC difference to **{args.ci_against}** (points; 95 % paired bootstrap interval over the "
              "test images, 2,000 resamples):", "", f"| | AUROC - AUROC({args.ci_against}) | 95 % interval |",
              "|---|---|---|"]
        for name in rows:
            if name != args.ci_against:
                d, lo, hi = paired_auroc_delta(scores[args.ci_against], scores[name])
                ci.append(f"| {name} | {d:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
        table += "\n" + "\n".join(ci)
    print(table)
    if args.out:
        out = Path(args.out)
        lines = [f"## {args.detector} on {args.setup}", "",
                 f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: "
                 f"{hardware(torch.device(args.device or 'cpu'))}; torch {torch.__version__}, python "
                 f"{platform.python_version()}",
                 f"- command: `python benchmarks/fidelity.py {_shown(sys.argv[1:] if argv is None else argv)}`",
                 f"- setup: {setup.description}",
                 "- rows (parameters on top of the setup's preset; seconds include scoring from an empty cache): "
                 + "; ".join(f"**{n}** `{json.dumps(params[n])}` {seconds[n]:.0f} s" for n in rows), "",
                 "Metrics in %; FPR@95 (OOD+) is OpenOOD v1.5's convention, FPR@95 (ID+) the papers'. ACC = classifier "
                 "top-1 on ID test.", "", table, ""]
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a" if args.append else "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
