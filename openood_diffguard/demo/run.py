"""``openood-diffguard demo``: every detector on real images, CPU only, from nothing.

scikit-learn's handwritten ``digits`` become an open-set benchmark in OpenOOD's terms (known 0-5 = ID,
6-9 = OOD, see ``data/digits.py``). The demo trains a small classifier and a small class-conditional
diffusion UNet (cached under ``--cache-dir``), then scores the ID and OOD test splits with DiffGuard,
DiffNB, LFDN, OpenOOD's standard baselines (EBO, MLS, KNN, ViM; pytorch-ood's implementations) and
fusions, through the same detector + score-cache path the OpenOOD postprocessors use, and writes an
OpenOOD-style table, ``metrics.csv``, ``scores.npz``, plots and ``report.html`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import ScoreCache, cached_statistics, default_cache_root, module_fingerprint, namespace
from ..data import DigitsOpenSet
from ..detectors.diffguard import DiffGuard
from ..detectors.diffnb import DiffNB
from ..detectors.lfdn import LFDN
from ..fusion import ScoreFusion
from ..fusion.baselines import Baselines
from ..metrics import format_table, ood_metrics
from ..networks import SmallResNet
from ..report import write_report
from ..report.gallery import save_gallery
from ..training.classifier import accuracy, train_classifier
from ..training.diffusion import train_diffusion
from . import plots

#: digits are 8x8: the UNet works at native size (two levels, attention at 4x4)
DEMO_UNET = {"sample_size": 8, "in_channels": 1, "block_out_channels": [32, 64], "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "dropout": 0.0, "norm_num_groups": 8}


@dataclass
class DemoConfig:
    size: int = 8
    seed: int = 0
    classifier_epochs: int = 30
    diffusion_steps: int = 800
    diffusion_batch: int = 64
    n_test: int | None = None  # per side (ID / OOD); None = all 325 ID and as many OOD
    diffguard_steps: int = 25
    diffnb_repeats: int = 4
    diffnb_timesteps: list = field(default_factory=lambda: [300])

    def model_key(self, *fields: str) -> str:
        blob = json.dumps({f: getattr(self, f) for f in fields} | {"unet": DEMO_UNET}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRESETS = {
    "full": DemoConfig(),
    "quick": DemoConfig(classifier_epochs=12, diffusion_steps=400, n_test=96, diffguard_steps=10, diffnb_repeats=2),
}


class _ImagesAndLabels(torch.utils.data.Dataset):
    """(image in [-1, 1], label) pairs for ``train_diffusion``; digits are normalised with 0.5 / 0.5, i.e.
    the normalised tensor *is* the [-1, 1] image."""

    def __init__(self, split) -> None:
        self.images, self.labels = split.images, split.labels
        self.num_classes = int(split.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _classifier(data: DigitsOpenSet, cfg: DemoConfig, cache: Path, device: torch.device,
                progress: bool) -> tuple[SmallResNet, int]:
    """(classifier, epochs trained now: 0 when it came from the cache)."""
    path = cache / f"classifier-{cfg.model_key('size', 'seed', 'classifier_epochs')}.pt"
    torch.manual_seed(cfg.seed)
    net = SmallResNet(data.num_classes, in_channels=1, widths=(16, 32, 32, 32))
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.to(device).eval(), 0
    train_classifier(net, data.loader("id", "train", 64, shuffle=True), epochs=cfg.classifier_epochs,
                     seed=cfg.seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written checkpoint
    return net.to(device).eval(), cfg.classifier_epochs


def _diffusion_model_dir(data: DigitsOpenSet, cfg: DemoConfig, cache: Path, device: torch.device,
                         progress: bool) -> tuple[Path, int]:
    """(diffusers model dir, training steps run now: 0 when the cached model is complete)."""
    out = cache / f"unet-{cfg.model_key('size', 'seed', 'diffusion_steps', 'diffusion_batch')}"
    # resumable: a finished model only reloads its checkpoint, an interrupted one continues
    res = train_diffusion(_ImagesAndLabels(data.dataset("id", "train")),
                          {"num_classes": data.num_classes, "unet": DEMO_UNET, "steps": cfg.diffusion_steps,
                           "batch_size": cfg.diffusion_batch, "lr": 1e-3, "warmup": 100, "ema": 0.995,
                           "hflip": False, "save_every": 250, "seed": cfg.seed},
                          out, resume=True, progress=progress, device=device)
    return out, len(res["history"])


def build_detectors(unet_dir: Path, cfg: DemoConfig, num_classes: int, cache: Path) -> dict[str, Any]:
    """Demo-sized versions of the CIFAR-10 presets (configs/postprocessors/*_cifar10.yml)."""
    common = {"normalization": "digits", "model_path": str(unet_dir)}
    return {
        "DiffGuard": DiffGuard(**common, model_type="unet", num_classes=num_classes, guidance="cfg", cfg_scale=3.0,
                               num_steps=cfg.diffguard_steps, variant="paper", cam_cut=False,  # as diffguard_cifar10
                               similarities=("logits_l1", "logits_cos"), similarity="logits_l1",
                               diffusion_size=None, score_size=None),
        "DiffNB": DiffNB(**common, timesteps=list(cfg.diffnb_timesteps), repeats=cfg.diffnb_repeats, cfg_scale=3.0,
                         stride=20, seed=cfg.seed),
        "LFDN": LFDN(score="mfsim", layers=[1, 2, 3, 4], cache_dir=str(cache), normalization="digits",
                     train={"width": 128, "blocks": 2, "epochs": 30, "batch_size": 64, "lr": 1e-3}),
    }


def _score(detector, net, loader, root: Path, progress: bool, gallery: dict | None = None):
    """Cached per-sample statistics -> ((pred, conf, label), rows computed now), as
    ``DetectorPostprocessor.inference`` does; ``gallery``: also keep the report's gallery of this split
    (``report.gallery.save_gallery`` arguments)."""
    store = ScoreCache(root, namespace(detector.cache_key(), module_fingerprint(net)))
    with torch.set_grad_enabled(True):  # guidance / Grad-CAM need gradients
        out = cached_statistics(detector, net, loader, store, progress)
    stats = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.stats.items()}
    conf = detector.confidence(stats).numpy()
    if gallery is not None:
        save_gallery(detector, net, loader, stats=out.stats, conf=conf, labels=out.labels, cache_root=root, **gallery)
    return (out.stats["pred"].astype(int), conf, out.labels.astype(int)), store.computed_rows


def _grid(detector: DiffGuard, net, data: DigitsOpenSet, path: Path, device: torch.device, n: int = 6) -> Path:
    """Input / inversion / guided synthesis for a few ID and OOD digits: the picture that explains DiffGuard."""
    x = torch.cat([data.dataset("id", "test").images[:n], data.dataset("ood", "test").images[:n]]).to(device)
    syn = detector.synthesise(net, x)
    to01 = lambda t: (t.detach().float().cpu().clamp(-1, 1)[:, 0] * 0.5 + 0.5).numpy()  # noqa: E731
    lat = syn["latents"].detach().float().cpu()[:, 0]
    lat = ((lat - lat.amin((1, 2), keepdim=True)) / (lat.amax((1, 2), keepdim=True) - lat.amin((1, 2), keepdim=True) + 1e-8)).numpy()
    pred = syn["pred"].tolist()
    captions = [f"ID, pred {p}" for p in pred[:n]] + [f"OOD, pred {p}" for p in pred[n:]]
    return plots.synthesis_grid({"input": to01(syn["input"]), "inverted x_T": lat, "guided synthesis": to01(syn["synthesis"])},
                                captions, path, "DiffGuard: OOD digits drift toward the predicted class, ID digits stay")


def run_demo(cfg: DemoConfig, out: Path, cache: Path, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(stage: str) -> None:
        timings[stage] = round(time.time() - t0 - sum(timings.values()), 1)

    dev = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    data = DigitsOpenSet(size=cfg.size, seed=cfg.seed)
    net, classifier_epochs = _classifier(data, cfg, cache, dev, progress)
    acc = accuracy(net, data.loader("id", "test"))
    lap("classifier")
    unet_dir, diffusion_steps = _diffusion_model_dir(data, cfg, cache, dev, progress)
    lap("diffusion model")
    loaders = {"id": data.loader("id", "test", 128, limit=cfg.n_test),
               "ood": data.loader("ood", "test", 128, limit=cfg.n_test or len(data.dataset("id", "test")))}
    id_loaders, ood_loaders = data.loader_dicts(128)
    scores: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    val: dict[str, np.ndarray] = {}

    baselines = Baselines(["ebo", "mls", "knn", "vim"]).setup(net, id_loaders["train"], progress=False)
    with torch.no_grad():
        base = {k: baselines.score_loader(net, loaders[k], progress=False) for k in loaders}
        base_val = baselines.score_loader(net, id_loaders["val"], progress=False)
    for name in baselines.names:
        scores[name.upper()] = tuple(np.r_[base["id"][f], base["ood"][f]] for f in ("pred", name, "label"))
        val[name.upper()] = base_val[name]
    lap("baselines")

    detectors = build_detectors(unet_dir, cfg, data.num_classes, cache)
    score_root = cache / "scores"
    computed_rows: dict[str, int] = {}  # detector statistics rows computed by this run (0 = all from the cache)
    for name, det in detectors.items():
        det.setup(net, id_loaders, ood_loaders)
        (id_part, n_id), (ood_part, n_ood) = (
            _score(det, net, loaders[k], score_root, progress,
                   {"folder": out / "gallery", "method": name, "split": f"{k}_test", "role": k}) for k in ("id", "ood"))
        scores[name] = tuple(np.r_[a, b] for a, b in zip(id_part, ood_part))
        (_, val[name], _), n_val = _score(det, net, id_loaders["val"], score_root, progress)
        computed_rows[name] = n_id + n_ood + n_val
        lap(name)

    # fusion: calibrated on ID validation scores only
    for rule, params in (("rank", {"w": 0.5}), ("cascade", {})):
        fusion = ScoreFusion(rule, baseline="EBO", diffusion="DiffGuard", **params).fit({"EBO": val["EBO"], "DiffGuard": val["DiffGuard"]})
        pred, conf_b, label = scores["EBO"]
        fused = fusion({"EBO": conf_b, "DiffGuard": scores["DiffGuard"][1]})
        scores[f"DiffGuard+EBO ({rule})"] = (pred, np.asarray(fused, dtype=np.float64), label)

    metrics = {name: ood_metrics(conf, label, pred) for name, (pred, conf, label) in scores.items()}
    table = format_table(metrics)
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "AUROC", "AUPR-In", "AUPR-Out", "FPR@95 (OOD-positive, OpenOOD)", "FPR@95 (ID-positive, papers)", "ACC"])
        for name, m in metrics.items():
            w.writerow([name, *(f"{100 * v:.2f}" for v in (m.auroc, m.aupr_in, m.aupr_out, m.fpr95_ood_positive, m.fpr95_id_positive, m.acc))])
    np.savez(out / "scores.npz", **{f"{k}/{f}": v for k, trip in scores.items() for f, v in zip(("pred", "conf", "label"), trip)})
    view = {k: (c, l) for k, (_, c, l) in scores.items()}
    plots.roc_curves(view, out / "roc.png", "digits open set: known 0-5 (ID) vs 6-9 (OOD)")
    plots.histograms(view, out / "histograms.png")
    _grid(detectors["DiffGuard"], net, data, out / "diffguard_grid.png", dev)
    lap("fusion, metrics, plots")
    summary = {"config": asdict(cfg), "classifier_accuracy": acc, "seconds": time.time() - t0, "timings_s": timings,
               "auroc": {k: m.auroc for k, m in metrics.items()}, "n_id": int((scores["EBO"][2] >= 0).sum()),
               "n_ood": int((scores["EBO"][2] < 0).sum()),
               "computed": {"classifier_epochs": classifier_epochs, "diffusion_steps": diffusion_steps,
                            "score_rows": computed_rows}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out)  # report.html next to the csv: reads what was just written, runs no model
    return {"table": table, **summary}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes on a 2-core CPU)")
    p.add_argument("--out", default="demo_out", help="output directory (table, metrics.csv, scores.npz, plots)")
    p.add_argument("--cache-dir", default=None, help="where trained models and scores are cached "
                   "(default: $OPENOOD_DIFFGUARD_CACHE/demo or ~/.cache/openood_diffguard/demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available (see `openood-diffguard info`)")
    cfg = PRESETS["quick" if args.quick else "full"]
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_root() / "demo"
    res = run_demo(cfg, Path(args.out), cache, args.device, progress=not args.no_progress)
    print(f"\nopenood-diffguard demo ({'quick' if args.quick else 'full'}): digits, known 0-5 = ID "
          f"({res['n_id']} test images), 6-9 = OOD ({res['n_ood']}); classifier accuracy "
          f"{100 * res['classifier_accuracy']:.1f} %\n")
    print(res["table"])
    print(f"\nFPR@95: 'OOD+' is OpenOOD v1.5's convention (ID flagged OOD at 95 % OOD recall); 'ID+' is the "
          f"papers' (OOD accepted at 95 % ID recall). Higher conf = ID.\nwrote {args.out}/: metrics.csv, "
          f"scores.npz, summary.json, roc.png, histograms.png, diffguard_grid.png, gallery/, report.html  "
          f"({res['seconds']:.0f} s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in res["timings_s"].items()) + ")")
    return 0
