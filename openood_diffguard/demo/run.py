"""``openood-diffguard demo``: every detector on real images, CPU only, from nothing.

scikit-learn's handwritten ``digits`` become an open-set benchmark in OpenOOD's terms (known 0-5 = ID,
6-9 = OOD, see ``data/digits.py``). The demo trains a small classifier and a small class-conditional
diffusion UNet (cached under ``--cache-dir``), then scores the ID and OOD test splits with DiffGuard,
DiffNB, LFDN, OpenOOD's standard baselines (EBO, MLS, KNN, ViM; pytorch-ood's implementations) and
fusions, through the same detector + score-cache path the OpenOOD postprocessors use, and writes an
OpenOOD-style table, ``metrics.csv``, per-method score files ``scores/<method>.npz`` (the format
``openood-diffguard fuse`` reads) plots and ``report.html`` (with its ``gallery/``) to ``--out``. The options are in ``demo/cli.py``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DigitsOpenSet
from ..detectors.diffguard import DiffGuard
from ..detectors.diffnb import DiffNB
from ..detectors.lfdn import LFDN
from ..fusion import ScoreFusion
from ..fusion.baselines import Baselines
from ..fusion.scores_io import save_scores_npz
from ..metrics import FPR_LEGEND, METRIC_COLUMNS, format_table, ood_metrics, table_row
from ..networks import SmallResNet
from ..openood.inference import open_store, score
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
    diffnb_timesteps: list | None = None  # None = the diffnb_cifar10 preset's (variant code: 120, 240, 360)

    def with_seed(self, seed: int) -> "DemoConfig":
        return dataclasses.replace(self, seed=int(seed))

    def model_key(self, *fields: str) -> str:
        blob = json.dumps({f: getattr(self, f) for f in fields} | {"unet": DEMO_UNET}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRESETS = {
    "full": DemoConfig(),
    "quick": DemoConfig(classifier_epochs=12, diffusion_steps=400, n_test=96, diffguard_steps=10, diffnb_repeats=2),
}
#: pytorch-ood's implementations of OpenOOD's baselines, under OpenOOD's spelling
BASELINES = {"ebo": "EBO", "mls": "MLS", "knn": "KNN", "vim": "ViM"}
FUSIONS = {"rank": {"w": 0.5}, "cascade": {}}
OOD_SET = "digits6-9"  # the OOD test split in the score files: near/<OOD_SET>
OUTPUTS = ("metrics.csv", "scores/<method>.npz", "summary.json", "roc.png", "histograms.png", "diffguard_grid.png",
           "gallery/", "report.html")
LEGEND = FPR_LEGEND + ".\nFuse two score files: openood-diffguard fuse --scores <out>/scores/EBO.npz <out>/scores/DiffGuard.npz"


def score_file_stem(method: str) -> str:
    """``DiffGuard+EBO (rank)`` -> ``DiffGuard+EBO_rank``: file-system-safe, still readable."""
    return "".join(c if c.isalnum() or c in "+-_" else "_" for c in method.replace(" (", "_").replace(")", ""))


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
        "DiffNB": DiffNB(**common, timesteps=cfg.diffnb_timesteps and list(cfg.diffnb_timesteps),
                         repeats=cfg.diffnb_repeats, cfg_scale=3.0,
                         stride=20, seed=cfg.seed),
        "LFDN": LFDN(score="mfsim", layers=[1, 2, 3, 4], cache_dir=str(cache), normalization="digits",
                     train={"width": 128, "blocks": 2, "epochs": 30, "batch_size": 64, "lr": 1e-3}),
    }


def _score(detector, net, loader, root: Path, progress: bool, gallery: dict | None = None):
    """Cached per-sample statistics -> ((pred, conf, label), rows computed now), through the scoring path of
    ``DetectorPostprocessor.inference`` (``openood.inference``); ``gallery``: also keep the report's gallery of
    this split (``report.gallery.save_gallery`` arguments)."""
    store = open_store(detector, net, root)
    out, conf = score(detector, net, loader, store, progress)
    if gallery is not None:
        save_gallery(detector, net, loader, stats=out.stats, conf=conf, labels=out.labels, cache_root=root, **gallery)
    return (out.stats["pred"].astype(int), conf, out.labels.astype(int)), store.computed_rows


def _grid(detector: DiffGuard, net, data: DigitsOpenSet, path: Path, device: torch.device, conf: np.ndarray,
          n_id: int, threshold: float, n: int = 6) -> Path:
    """Input / inversion / guided synthesis for the first ``n`` ID and OOD test digits, each captioned with its true
    digit, the class the classifier predicted and DiffGuard's score (``conf``: the test scores, ``n_id`` ID ones
    first; below ``threshold`` = flagged OOD)."""
    id_set, ood_set = data.dataset("id", "test"), data.dataset("ood", "test")
    x = torch.cat([id_set.images[:n], ood_set.images[:n]]).to(device)
    syn = detector.synthesise(net, x)
    to01 = lambda t: (t.detach().float().cpu().clamp(-1, 1)[:, 0] * 0.5 + 0.5).numpy()  # noqa: E731
    lat = syn["latents"].detach().float().cpu()[:, 0]
    lat = ((lat - lat.amin((1, 2), keepdim=True)) / (lat.amax((1, 2), keepdim=True) - lat.amin((1, 2), keepdim=True) + 1e-8)).numpy()
    names = id_set.names[:n] + ood_set.names[:n]  # digits/<true digit>/<index>.png
    scores = np.r_[conf[:n], conf[n_id:n_id + n]]
    columns = [{"true": int(name.split("/")[1]), "ood": i >= n, "pred": int(p), "score": float(sc),
                "flagged": bool(sc < threshold)} for i, (name, p, sc) in enumerate(zip(names, syn["pred"].tolist(), scores))]
    return plots.synthesis_grid({"input": to01(syn["input"]), "DDIM inversion x_T": lat, "guided synthesis": to01(syn["synthesis"])},
                                columns, path, threshold, "minus the l1 distance between the classifier's logits of input and synthesis")


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
        scores[BASELINES[name]] = tuple(np.r_[base["id"][f], base["ood"][f]] for f in ("pred", name, "label"))
        val[BASELINES[name]] = base_val[name]
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
    for rule, params in FUSIONS.items():
        fusion = ScoreFusion(rule, baseline="EBO", diffusion="DiffGuard", **params).fit({"EBO": val["EBO"], "DiffGuard": val["DiffGuard"]})
        pred, conf_b, label = scores["EBO"]
        fused = fusion({"EBO": conf_b, "DiffGuard": scores["DiffGuard"][1]})
        scores[f"DiffGuard+EBO ({rule})"] = (pred, np.asarray(fused, dtype=np.float64), label)
        val[f"DiffGuard+EBO ({rule})"] = np.asarray(fusion({"EBO": val["EBO"], "DiffGuard": val["DiffGuard"]}), dtype=np.float64)

    metrics = {name: ood_metrics(conf, label, pred) for name, (pred, conf, label) in scores.items()}
    table = format_table(metrics)
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", *METRIC_COLUMNS])
        for name, m in metrics.items():
            w.writerow([name, *(f"{v:.2f}" for v in table_row(m))])
    _write_score_files(out / "scores", scores, val, base_val["pred"], data, loaders)
    view = {k: (c, l) for k, (_, c, l) in scores.items()}
    plots.roc_curves(view, out / "roc.png", f"digits open set (seed {cfg.seed}): known 0-5 = ID, 6-9 = OOD")
    plots.histograms(view, out / "histograms.png", {k: float(np.quantile(v, 0.05)) for k, v in val.items()})
    _grid(detectors["DiffGuard"], net, data, out / "diffguard_grid.png", dev, scores["DiffGuard"][1],
          len(loaders["id"].dataset), float(np.quantile(val["DiffGuard"], 0.05)))
    lap("fusion, metrics, plots")
    summary = {"config": asdict(cfg), "classifier_accuracy": acc, "seconds": time.time() - t0, "timings_s": timings,
               "auroc": {k: m.auroc for k, m in metrics.items()}, "n_id": int((scores["EBO"][2] >= 0).sum()),
               "n_ood": int((scores["EBO"][2] < 0).sum()),
               "computed": {"classifier_epochs": classifier_epochs, "diffusion_steps": diffusion_steps,
                            "score_rows": computed_rows}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out)  # report.html next to the csv: reads what was just written, runs no model
    return {"table": table, **summary}


def _write_score_files(folder: Path, scores: dict, val: dict, val_pred: np.ndarray, data: DigitsOpenSet,
                       loaders: dict) -> None:
    """One npz per method in ``fusion.scores_io``'s format (splits id_val, id_test, near/<OOD_SET>, image-name keys),
    so any two can be fused with ``openood-diffguard fuse``."""
    folder.mkdir(parents=True, exist_ok=True)
    n_id, n_ood = len(loaders["id"].dataset), len(loaders["ood"].dataset)
    keys = {"id_test": np.array(data.dataset("id", "test").names[:n_id]),
            "ood": np.array(data.dataset("ood", "test").names[:n_ood]),
            "id_val": np.array(data.dataset("id", "val").names)}
    for name, (pred, conf, label) in scores.items():
        save_scores_npz(folder / f"{score_file_stem(name)}.npz", {
            "id_val": {"conf": val[name], "label": data.dataset("id", "val").labels.numpy(), "pred": val_pred,
                       "key": keys["id_val"]},
            "id_test": {"conf": conf[:n_id], "label": label[:n_id], "pred": pred[:n_id], "key": keys["id_test"]},
            f"near/{OOD_SET}": {"conf": conf[n_id:], "label": label[n_id:], "pred": pred[n_id:], "key": keys["ood"]},
        })
