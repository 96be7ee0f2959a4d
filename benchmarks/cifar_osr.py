"""CIFAR-10 open-set benchmark, split A (known {0..5} = ID, unknown {6..9} = OOD), end to end on one device.

    python benchmarks/cifar_osr.py                       # full run, ~20 min on one H100
    python benchmarks/cifar_osr.py --tiny                # CPU smoke run (few hundred images, < 4 min)

Steps (each cached under --work, git-ignored; a re-run resumes / reuses what is there, --fresh redoes it):
 1. verify the CIFAR-10 JPEG export (cifar10-jpeg.tar.gz, in --data-dir) against sha256sums.txt, extract, decode to uint8
    arrays; ID val = the last --val-per-class train images of each known class (held out from training,
    used only to calibrate the fusions), ID test = test images of the known classes, OOD = the unknown ones;
 2. train OpenOOD's ResNet18_32x32 (``openood_diffguard.networks``; key-identical to OpenOOD's) on the known
    classes (``training.classifier.train_classifier``: AdamW + cosine, random shifts, h-flips);
 3. train the class-conditional DiffNB CIFAR UNet (``training.diffusion.train_diffusion``) for a wall-clock
    budget (--diffusion-minutes, cumulative over re-runs; exact resume from checkpoint.pt);
 4. fit LFDN on the classifier's stage 1-4 features (``training.lfdn.fit_lfdn``);
 5. score ID val, ID test and OOD with DiffGuard (``diffguard_cifar10`` preset), DiffNB (``diffnb_cifar10``),
    LFDN (``lfdn_cifar10``: MFsim, MSE, LR), EBO / MLS / KNN / ViM (``fusion.baselines``) and fusions
    (``fusion.ScoreFusion``: rank and the paper's cascade, calibrated on ID val only);
 6. metrics (``openood_diffguard.metrics``, both FPR@95 conventions) -> markdown table + ROC plot.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout first
import openood_diffguard  # noqa: E402,F401  (repairs torchvision first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _speed import hardware  # noqa: E402

from openood_diffguard.metrics import format_table, ood_metrics  # noqa: E402
from openood_diffguard.space import ImageSpace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: folder with cifar10-jpeg.tar.gz + sha256sums.txt: --data-dir, else $OPENOOD_DIFFGUARD_CIFAR10, else benchmarks/_work/data
DATA = Path(os.environ.get("OPENOOD_DIFFGUARD_CIFAR10", ROOT / "benchmarks" / "_work" / "data"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
KNOWN, UNKNOWN = [0, 1, 2, 3, 4, 5], [6, 7, 8, 9]  # split A: the first six classes are known
BASELINES = {"ebo": "EBO", "mls": "MLS", "knn": "KNN", "vim": "ViM"}  # pytorch-ood key -> row name
DETECTOR_GROUPS = ("DiffGuard", "DiffNB", "LFDN")
STAGES = ("data", "classifier", "diffusion", "lfdn", "scores", "report")

#: full run vs CPU smoke run; every entry can be overridden on the command line
MODES = {
    "full": dict(train_per_class=None, val_per_class=100, test_per_class=None, classifier="resnet18_32x32",
                 clf_epochs=30, diffusion_minutes=10.0, unet="cifar", diffusion_batch=128, diffusion_chunk=200,
                 lfdn_epochs=150, lfdn_width=1440, lfdn_blocks=16,
                 diffguard_steps=50, diffnb_stride=20, diffnb_timesteps=None, diffnb_repeats=4, score_batch=500),
    "tiny": dict(train_per_class=40, val_per_class=5, test_per_class=10, classifier="small", clf_epochs=4,
                 diffusion_minutes=0.25, unet="tiny", diffusion_batch=32, diffusion_chunk=5, lfdn_epochs=2,
                 lfdn_width=32, lfdn_blocks=2, diffguard_steps=5, diffnb_stride=100,
                 diffnb_timesteps=[100, 200, 300],  # the code's [120, 240, 360] are not on the stride-100 grid
                 diffnb_repeats=2, score_batch=100),
}


# ------------------------------------------------------------------------------------------ data
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract(data_dir: Path, work: Path) -> Path:
    """Checksum-verified extraction (once) of the JPEG archive; returns the folder holding train/ and test/."""
    archive = data_dir / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} not found: pass --data-dir (folder with cifar10-jpeg.tar.gz and sha256sums.txt)")
    out = work / "cifar10"
    if (out / ".extracted").is_file():
        return out
    expected = {line.split()[1].lstrip("*"): line.split()[0] for line in (data_dir / "sha256sums.txt").read_text().splitlines() if line.strip()}
    got = sha256(archive)
    if got != expected.get(archive.name):
        raise ValueError(f"{archive}: sha256 {got} does not match sha256sums.txt ({expected.get(archive.name)})")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    base = out if (out / "train").is_dir() else next(p for p in out.iterdir() if (p / "train").is_dir())
    if base != out:
        for sub in ("train", "test"):
            (base / sub).rename(out / sub)
    (out / ".extracted").write_text(got + "\n")
    return out


def decode(folder: Path, classes: list[int], per_class: int | None, skip_last: int = 0, last_only: int = 0):
    """uint8 images [N, 32, 32, 3] and labels of ``folder/<class name>/*.jpg`` (sorted file order)."""
    from PIL import Image

    imgs, labels = [], []
    for k in classes:
        files = sorted((folder / CLASSES[k]).glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"no images in {folder / CLASSES[k]}")
        files = files[len(files) - last_only:] if last_only else files[:len(files) - skip_last]
        files = files[:per_class] if per_class else files
        for f in files:
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        labels += [k] * len(files)
    return np.stack(imgs), np.asarray(labels, dtype=np.int64)


def load_splits(root: Path, work: Path, o: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    key = hashlib.sha256(json.dumps([o["train_per_class"], o["val_per_class"], o["test_per_class"]]).encode()).hexdigest()[:10]
    cache = work / f"splits_{key}.npz"
    if cache.is_file():
        z = np.load(cache)
        return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "val", "test", "ood")}
    v = o["val_per_class"]
    splits = {"train": decode(root / "train", KNOWN, o["train_per_class"], skip_last=v),
              "val": decode(root / "train", KNOWN, None, last_only=v),
              "test": decode(root / "test", KNOWN, o["test_per_class"]),
              "ood": decode(root / "test", UNKNOWN, o["test_per_class"])}
    np.savez(cache, **{f"{s}_{n}": a for s, (x, y) in splits.items() for n, a in (("x", x), ("y", y))})
    return splits


class Batches:
    """OpenOOD-style batches ({"data": normalised images, "label"}) from uint8 arrays held on the device;
    ``train=True`` shuffles and h-flips (the classifier adds random shifts itself)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, space: ImageSpace, batch: int, device, train=False, seed=0):
        self.x = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous().to(device)
        self.y = torch.as_tensor(y)  # labels stay on the CPU (metrics, caches)
        self.space, self.batch, self.train = space, batch, train
        self.gen = torch.Generator().manual_seed(seed)
        self.dataset = self.x  # len() for caches

    def __len__(self) -> int:
        return (len(self.y) + self.batch - 1) // self.batch

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.gen) if self.train else torch.arange(n)
        for i in range(0, n, self.batch):
            idx = order[i:i + self.batch]
            x = self.x[idx.to(self.x.device)].float() / 255.0
            if self.train:
                flip = (torch.rand(len(idx), generator=self.gen) < 0.5).to(x.device)
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            yield {"data": self.space.from_unit(x), "label": self.y[idx]}


# ------------------------------------------------------------------------------------------ stages
def train_or_load_classifier(splits, space, work: Path, o: dict, device, fresh: bool):
    from openood_diffguard.networks import ResNet18_32x32, SmallResNet
    from openood_diffguard.training.classifier import accuracy, train_classifier

    path = work / f"{o['classifier']}_e{o['clf_epochs']}_n{len(splits['train'][1])}.pt"
    # the smoke run's "small" net has the same interface at a fraction of the cost (CPU only)
    net = (ResNet18_32x32 if o["classifier"] == "resnet18_32x32" else SmallResNet)(num_classes=len(KNOWN)).to(device)
    if path.is_file() and not fresh:
        net.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return net.eval(), path, None
    t0 = time.perf_counter()
    loader = Batches(*splits["train"], space, 128, device, train=True)
    train_classifier(net, loader, epochs=o["clf_epochs"], lr=3e-3, weight_decay=5e-4, max_shift=4, device=device)
    torch.save(net.state_dict(), path)
    acc = accuracy(net, Batches(*splits["test"], space, 500, device))
    print(f"classifier: {time.perf_counter() - t0:.0f} s, ID test accuracy {acc:.4f}", flush=True)
    return net.eval(), path, time.perf_counter() - t0


def train_diffusion_for(splits, work: Path, o: dict, device, fresh: bool) -> tuple[Path, dict]:
    """train_diffusion in resumable chunks until the cumulative wall-clock budget is spent."""
    from openood_diffguard.training.data import TensorImages
    from openood_diffguard.training.diffusion import CIFAR_UNET, TINY_UNET, train_diffusion

    out = work / f"diffusion_{o['unet']}"
    log_path = out / "budget.json"
    if fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"seconds": 0.0, "step": 0}
    x, y = splits["train"]
    data = TensorImages(torch.as_tensor(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0, torch.as_tensor(y))
    data.num_classes = len(KNOWN)
    # tiny: no attention layer (256-token attention dominates a 16-channel UNet on the CPU)
    unet = dict(CIFAR_UNET) if o["unet"] == "cifar" else {**TINY_UNET, "in_channels": 3, "sample_size": 32,
                                                        "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    # short budgets: EMA 0.9999 would still be dominated by the random initialisation after ~10k steps
    cfg = {"num_classes": len(KNOWN), "unet": unet, "batch_size": o["diffusion_batch"], "warmup": 1000 if o["unet"] == "cifar" else 20,
           "ema": 0.999 if o["unet"] == "cifar" else 0.99, "bf16": device.type == "cuda", "seed": 0}
    budget, chunk = 60.0 * o["diffusion_minutes"], o["diffusion_chunk"]
    while log["seconds"] < budget:
        t0 = time.perf_counter()
        res = train_diffusion(data, {**cfg, "steps": log["step"] + chunk, "save_every": chunk}, out, device=device)
        dt = time.perf_counter() - t0
        log = {"seconds": log["seconds"] + dt, "step": res["step"], "last_loss": float(np.mean(res["history"][-20:]))}
        log_path.write_text(json.dumps(log))
        # size the next chunk to ~1/10 of the budget (at most what is left); saving costs a few seconds per chunk
        rate = chunk / max(dt, 1e-3)
        chunk = int(max(o["diffusion_chunk"], min(rate * budget / 10, rate * (budget - log["seconds"]))))
    print(f"diffusion: {log['step']} steps in {log['seconds'] / 60:.1f} min, loss {log.get('last_loss', float('nan')):.4f}",
          flush=True)
    return out, log


def fit_or_load_lfdn(net, splits, space, work: Path, o: dict, device, fresh: bool) -> Path:
    """LFDN trained on the features the lfdn_cifar10 preset's variant feeds (its feature normalisation)."""
    from openood_diffguard.detectors.lfdn import LFDN
    from openood_diffguard.training.lfdn import fit_lfdn, save_checkpoint, train_config

    preset = LFDN(**{k: v for k, v in preset_args("lfdn_cifar10").items() if k not in ("train", "cache_dir")})
    norm = preset.feature_norm
    path = work / f"lfdn_w{o['lfdn_width']}_b{o['lfdn_blocks']}_e{o['lfdn_epochs']}_{norm}.pt"
    if path.is_file() and not fresh:
        return path
    t0 = time.perf_counter()
    cfg = train_config({"width": o["lfdn_width"], "blocks": o["lfdn_blocks"], "epochs": o["lfdn_epochs"]},
                       preset.params["variant"])
    ckpt = fit_lfdn(net, Batches(*splits["train"], space, 500, device), [1, 2, 3, 4], cfg, feature_norm=norm)
    save_checkpoint(ckpt, path)
    print(f"LFDN: {time.perf_counter() - t0:.0f} s, final loss {ckpt['history'][-1]:.4f}", flush=True)
    return path


def preset_args(name: str) -> dict:
    return dict(yaml.safe_load((ROOT / "openood_diffguard" / "configs" / "postprocessors" / f"{name}.yml").read_text())["postprocessor"]
                ["postprocessor_args"])


def detectors(diffusion_dir: Path, lfdn_path: Path, o: dict) -> dict:
    """name -> (detector, {row name: cheap params}); the presets' arguments, adapted to 6 classes / short runs."""
    from openood_diffguard.detectors.diffguard import DiffGuard
    from openood_diffguard.detectors.diffnb import DiffNB
    from openood_diffguard.detectors.lfdn import LFDN

    dg = preset_args("diffguard_cifar10")
    dg.update(model_path=str(diffusion_dir), num_classes=len(KNOWN), num_steps=o["diffguard_steps"], pretrained_metrics=False,
              dtype="bf16" if torch.cuda.is_available() else "fp32")
    nb = {k: v for k, v in preset_args("diffnb_cifar10").items() if k != "cache_dir"}
    if o.get("diffnb_timesteps"):
        nb["timesteps"] = list(o["diffnb_timesteps"])
    nb.update(model_path=str(diffusion_dir), stride=o["diffnb_stride"], repeats=o["diffnb_repeats"],
              dtype="bf16" if torch.cuda.is_available() else None)
    lf = {k: v for k, v in preset_args("lfdn_cifar10").items() if k not in ("train", "cache_dir")}
    lf.update(checkpoint=str(lfdn_path))
    return {"DiffGuard": (DiffGuard(**dg), {"DiffGuard": {}}),
            "DiffNB": (DiffNB(**nb), {"DiffNB": {}}),
            "LFDN": (LFDN(**lf), {"LFDN (MFsim)": {"score": "mfsim"}, "LFDN (MSE)": {"score": "mse"},
                                  "LFDN (LR)": {"score": "lr"}})}


def score_all(net, splits, space, diffusion_dir, lfdn_path, work: Path, o: dict, device, fresh: bool,
              only: list[str] | None = None) -> dict:
    """{split: {"label", "pred", <method>: conf}} for val / test / ood. Each (method group, split) is cached
    as its own npz, so a run killed mid-way (e.g. by a 10-minute device limit) resumes where it stopped;
    ``only`` restricts this call to some groups (baselines, DiffGuard, DiffNB, LFDN)."""
    from openood_diffguard.fusion.baselines import Baselines

    key = hashlib.sha256(json.dumps([o, str(diffusion_dir), str(lfdn_path)], sort_keys=True).encode()).hexdigest()[:10]
    folder = work / f"scores_{key}"
    folder.mkdir(parents=True, exist_ok=True)
    groups = ["baselines", *DETECTOR_GROUPS]
    base, dets = None, None
    out: dict = {s: {} for s in ("val", "test", "ood")}
    out["timing"] = {}
    for group in groups:
        if only and group not in only:
            continue
        for split in ("val", "test", "ood"):
            path = folder / f"{group}_{split}.npz"
            if path.is_file() and not fresh:
                z = np.load(path)
                out[split].update({k: z[k] for k in z.files if k != "seconds"})
                out["timing"][group] = out["timing"].get(group, 0.0) + float(z["seconds"])
                continue
            loader = Batches(*splits[split], space, o["score_batch"], device)
            t0 = time.perf_counter()
            if group == "baselines":
                if base is None:
                    k = min(50, len(splits["train"][1]))  # K 50 (OpenOOD's CIFAR value) unless the train set is smaller
                    base = Baselines({"ebo": {"temperature": 1.0}, "mls": {}, "knn": {"K": k}, "vim": {"dim": None}})
                    base.setup(net, Batches(*splits["train"], space, 500, device))  # ViM dim None: 256 on 512-d
                res = base.score_loader(net, loader)
                row = {"label": res["label"] if split != "ood" else -np.ones_like(res["label"]), "pred": res["pred"],
                       **{name: res[b] for b, name in BASELINES.items()}}
            else:
                if dets is None:
                    dets = detectors(diffusion_dir, lfdn_path, o)
                det, variants = dets[group]
                det.setup(net)
                stats = det.statistics_loader(net, loader)
                row = {}
                for row_name, cheap in variants.items():
                    det.set_params(**cheap)
                    row[row_name] = det.confidence(stats).float().numpy()
            dt = time.perf_counter() - t0
            row = {k: np.asarray(v) for k, v in row.items()}
            np.savez(path, seconds=dt, **row)
            out[split].update(row)
            out["timing"][group] = out["timing"].get(group, 0.0) + dt
    return out


FUSIONS = [(d, b, "rank", {"w": 0.5}) for d in ("DiffGuard", "DiffNB", "LFDN (MFsim)") for b in BASELINES.values()]
FUSIONS += [("DiffGuard", b, "cascade", {"alpha_out": 0.02, "alpha_in": 0.0}) for b in BASELINES.values()]


def fused(scores: dict) -> tuple[dict, dict]:
    """Fused confidences of every FUSIONS entry on test / ood (calibrated on ID val only) + routed shares."""
    from openood_diffguard.fusion import ScoreFusion

    rows, routed = {}, {}
    for d, b, rule, params in FUSIONS:
        f = ScoreFusion(rule, **params).fit({"baseline": scores["val"][b], "diffusion": scores["val"][d]})
        name = f"{d} + {b} ({rule})"
        conf = []
        for split in ("test", "ood"):
            conf.append(f({"baseline": scores[split][b], "diffusion": scores[split][d]}))
            if rule == "cascade":
                routed[name] = routed.get(name, 0.0) + float(f.route(scores[split][b]).sum())
        rows[name] = np.concatenate(conf)
        if name in routed:
            routed[name] /= len(rows[name])
    return rows, routed


# ------------------------------------------------------------------------------------------ report
def report(scores: dict, args, o: dict, device, facts: dict, out: Path) -> None:
    from sklearn.metrics import roc_curve

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test, ood = scores["test"], scores["ood"]
    label = np.r_[test["label"], ood["label"]]
    pred = np.r_[test["pred"], ood["pred"]]
    singles = [k for k in test if k not in ("label", "pred")]
    confs = {k: np.r_[test[k], ood[k]] for k in singles}
    fusion_confs, routed = fused(scores)
    rows = {k: ood_metrics(v, label, pred) for k, v in {**confs, **fusion_confs}.items()}

    png = out.with_name(out.stem + "_roc.png")
    fig, ax = plt.subplots(figsize=(6, 5))
    for k in singles:
        fpr, tpr, _ = roc_curve(label != -1, confs[k])
        ax.plot(fpr, tpr, label=f"{k} ({100 * rows[k].auroc:.1f})", lw=1.2)
    best = max(fusion_confs, key=lambda k: rows[k].auroc)
    fpr, tpr, _ = roc_curve(label != -1, fusion_confs[best])
    ax.plot(fpr, tpr, "k--", label=f"{best} ({100 * rows[best].auroc:.1f})", lw=1.2)
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
    ax.set(xlabel="OOD accepted (FPR, ID positive)", ylabel="ID accepted (TPR)",
           title=f"CIFAR-10 open-set split A{' (CPU smoke run)' if args.tiny else ''}: ROC, AUROC %")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)

    tiny_note = ["", "> **CPU smoke run, not a result.** `--tiny` trains on a few hundred images for seconds with tiny "
                 "stand-in models (a small classifier trained for a few epochs, a tiny UNet trained for seconds, a small LFDN, "
                 "5 DDIM steps); the numbers only show "
                 "that every stage runs end to end. The real numbers come from the full run on a GPU "
                 "(`benchmarks/results/cifar_osr.md`).", ""] if args.tiny else [""]
    timing = {k: float(v) for k, v in scores.get("timing", {}).items()}
    n_scored = sum(len(scores[s]["label"]) for s in ("val", "test", "ood"))
    lines = [f"# CIFAR-10 open-set benchmark, split A{' — CPU smoke run (--tiny)' if args.tiny else ''}", *tiny_note,
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- device: {hardware(device)}; torch {torch.__version__}, python {platform.python_version()}",
             f"- command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`".replace(" `", " `", 1),
             f"- data: CIFAR-10 JPEG export (sha256 verified); ID = known classes {KNOWN} "
             f"({', '.join(CLASSES[k] for k in KNOWN)}), OOD = unknown {UNKNOWN} ({', '.join(CLASSES[k] for k in UNKNOWN)})",
             f"- sizes: train {facts['n_train']} / ID val {len(scores['val']['label'])} (held-out train "
             f"images, fusion calibration only) / ID test {len(test['label'])} / OOD test {len(ood['label'])}",
             f"- classifier: {'OpenOOD ResNet18_32x32' if o['classifier'] == 'resnet18_32x32' else 'SmallResNet (16-64 channels, same interface)'}, {o['clf_epochs']} epochs (AdamW 3e-3, cosine, shifts ±4, h-flip), "
             f"ID test accuracy {100 * rows[singles[0]].acc:.2f} %",
             f"- diffusion model: {'DiffNB CIFAR UNet (35.7 M)' if o['unet'] == 'cifar' else 'tiny UNet'}, "
             f"class-conditional with null class 6, training budget {o['diffusion_minutes']:g} min wall clock -> "
             f"{facts['diffusion']['step']} steps of batch {o['diffusion_batch']} "
             f"({facts['diffusion']['seconds'] / 60:.1f} min; EMA {'0.999' if o['unet'] == 'cifar' else '0.99'}, warm-up shortened "
             f"for the short budget; final loss {facts['diffusion'].get('last_loss', float('nan')):.4f})",
             f"- LFDN: width {o['lfdn_width']}, {o['lfdn_blocks']} blocks, {o['lfdn_epochs']} epochs on the pooled stage 1-4 "
             f"features, t = 3",
             f"- detectors: DiffGuard `diffguard_cifar10` preset (CFG ω 3, DDIM-{o['diffguard_steps']}, −ℓ1 logits), "
             f"DiffNB `diffnb_cifar10` (t {o.get('diffnb_timesteps') or 'of the preset'}, stride {o['diffnb_stride']}, "
             f"R {o['diffnb_repeats']}), LFDN "
             f"`lfdn_cifar10`; baselines EBO (T 1), MLS, KNN (K 50), ViM (dim = half the feature size: 256 on ResNet18) from `fusion.baselines`",
             f"- scoring time ({n_scored} images): " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()),
             f"- fusions: `ScoreFusion` calibrated on ID val only; rank = 0.5·F_b + 0.5·F_d; cascade α_out 0.02, "
             f"α_in 0 (routed share to the diffusion detector: "
             + ", ".join(f"{k.split(' (')[0]} {100 * v:.0f} %" for k, v in routed.items()) + ")",
             "", "Metrics in %. FPR@95 (ID+) is the papers' convention (OOD accepted at 95 % ID recall); FPR@95 (OOD+) "
             "is OpenOOD v1.5's (ID rejected at 95 % OOD recall). ACC = classifier top-1 on ID test.", "",
             format_table({k: rows[k] for k in singles}), "", "Fusions:", "",
             format_table({k: rows[k] for k in fusion_confs}), "", f"![ROC]({png.name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {png}")
    print(format_table(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: few hundred images, tiny models (< 4 min)")
    p.add_argument("--data-dir", default=None, help="folder with cifar10-jpeg.tar.gz + sha256sums.txt (default "
                   "$OPENOOD_DIFFGUARD_CIFAR10, else benchmarks/_work/data: copy them there to carry them along)")
    p.add_argument("--stop-after", choices=STAGES, default="report", help="end after this stage (re-runs resume)")
    p.add_argument("--only", nargs="+", choices=["baselines", *DETECTOR_GROUPS], default=None,
                   help="score only these method groups in this call (the report needs all of them)")
    p.add_argument("--work", default=None, help="work dir for data, weights, scores (default benchmarks/_work/cifar_osr[_tiny])")
    p.add_argument("--out", default=None, help="markdown report (default benchmarks/results/cifar_osr[_cpu_tiny].md)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="retrain and rescore everything (data extraction is kept)")
    for k, v in MODES["full"].items():
        many = isinstance(MODES["tiny"][k], list)
        p.add_argument("--" + k.replace("_", "-"), type=type(v) if v is not None and not many else int, default=None,
                       nargs="+" if many else None, help=f"full default {v}, tiny {MODES['tiny'][k]}")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "tiny" if args.tiny else "full"
    o = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in MODES[mode].items()}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(args.work or ROOT / "benchmarks" / "_work" / f"cifar_osr{'_tiny' if args.tiny else ''}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"cifar_osr{'_cpu_tiny' if args.tiny else ''}.md")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    data_dir = Path(args.data_dir) if args.data_dir else DATA
    splits = load_splits(extract(data_dir, work.parent if args.work is None else work), work, o)
    print("data: " + ", ".join(f"{s} {len(y)}" for s, (_, y) in splits.items()), flush=True)
    stop = STAGES.index(args.stop_after)
    if stop == 0:
        return 0
    space = ImageSpace.for_dataset("cifar10")
    net, _, _ = train_or_load_classifier(splits, space, work, o, device, args.fresh)
    if stop == 1:
        return 0
    diffusion_dir, dlog = train_diffusion_for(splits, work, o, device, args.fresh)
    if stop == 2:
        return 0
    lfdn_path = fit_or_load_lfdn(net, splits, space, work, o, device, args.fresh)
    if stop == 3:
        return 0
    scores = score_all(net, splits, space, diffusion_dir, lfdn_path, work, o, device, args.fresh, args.only)
    if stop == 4 or args.only:
        return 0
    facts = {"diffusion": dlog, "n_train": len(splits["train"][1])}
    report(scores, args, o, device, facts, out)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
