"""Shared fixtures for the tests against a real OpenOOD checkout: a tiny cifar10-style image-list benchmark
on disk (scikit-learn digits as PNGs, OpenOOD's folder/imglist layout), a tiny ResNet18_32x32 checkpoint,
the CPU shim for OpenOOD's hard-coded ``.cuda()`` (test fixtures only, never the product), and checks that
OpenOOD's tables equal ``openood_diffguard.metrics``. Importable without OpenOOD (it is imported where
used), so the ``openood`` marker, not an import error, decides whether these tests run (conftest.py).
"""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openood_diffguard.metrics import benchmark_table, ood_metrics

OOD_SETS = {"near": ["cifar100", "tin"], "far": ["mnist", "svhn", "texture", "places365"]}
EVALUATOR_ROWS = ["cifar100", "tin", "nearood", "mnist", "svhn", "texture", "places365", "farood"]
MAIN_PY_ROWS = ["cifar100", "tin", "nearood", "mnist", "svhn", "texture", "place365", "farood"]  # main.py's spelling
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MAIN_PY_CONFIGS = ("datasets/cifar10/cifar10.yml", "datasets/cifar10/cifar10_ood.yml", "networks/resnet18_32x32.yml",
                   "pipelines/test/test_ood.yml", "preprocessors/base_preprocessor.yml")


@pytest.fixture(autouse=True)
def cpu_shim(monkeypatch):
    """OpenOOD calls .cuda() on tensors and nets in many places: make it a no-op on this CPU machine."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    # main.py's setup_logger swaps sys.stdout for a Logger that closes its console (pytest's capture) on __del__
    from openood.utils import logger

    monkeypatch.setattr(logger.Logger, "__del__", lambda self: None)
    stdout = sys.stdout
    yield
    sys.stdout = stdout


def _write_images(folder: Path, images: np.ndarray) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
        names.append(f"{folder.parent.name}/{folder.name}/{i:03d}.png")
    return names


def build_bench(root: Path) -> Path:
    """data/{images_classic,benchmark_imglist} for cifar10 with digits images + best.ckpt under ``root``."""
    from openood.networks import ResNet18_32x32
    from sklearn.datasets import load_digits

    digits = load_digits()
    up = np.kron(digits.images / 16.0, np.ones((4, 4)))  # 8x8 -> 32x32
    rgb = (np.stack([up] * 3, -1) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    classic, lists = root / "data" / "images_classic", root / "data" / "benchmark_imglist" / "cifar10"
    lists.mkdir(parents=True)

    def imglist(name, names, labels):
        (lists / f"{name}.txt").write_text("".join(f"{n} {int(l)}\n" for n, l in zip(names, labels)))

    for split, sl in {"train": slice(0, 10), "val": slice(30, 36), "test": slice(40, 50)}.items():
        names = _write_images(classic / "cifar10" / split, rgb[sl])
        imglist(f"{split}_cifar10", names, digits.target[sl])
    imglist("test_cifar10c", names[:4], digits.target[40:44])
    ood_images = {  # real digits, transformed away from the ID look, plus noise / stripes
        "tin": 255 - rgb[100:104], "cifar100": np.roll(rgb[110:114], 8, axis=2),
        "mnist": rgb[120:124, ::-1], "svhn": (rng.random((4, 32, 32, 3)) * 255).astype(np.uint8),
        "texture": np.tile((np.arange(32) % 4 < 2)[None, :, None, None] * 255, (4, 1, 32, 3)).astype(np.uint8),
        "places365": (rgb[130:134] * 0.5 + 64).astype(np.uint8),
    }
    for name, ims in ood_images.items():
        names = _write_images(classic / name / "test", ims)
        imglist(f"test_{name}", names, -np.ones(len(names)))
    imglist("val_tin", _write_images(classic / "tin" / "val", 255 - rgb[140:146]), -np.ones(6))
    torch.manual_seed(0)
    torch.save(ResNet18_32x32(num_classes=10).state_dict(), root / "best.ckpt")
    (root / "configs" / "postprocessors").mkdir(parents=True)
    return root


def load_net(bench: Path) -> torch.nn.Module:
    from openood.networks import ResNet18_32x32

    net = ResNet18_32x32(num_classes=10)
    net.load_state_dict(torch.load(bench / "best.ckpt", weights_only=True))
    return net.eval()


def imglist_images(bench: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One image list read without OpenOOD: (cifar10-normalised images [N, 3, 32, 32], labels)."""
    from PIL import Image

    lines = (bench / "data" / "benchmark_imglist" / "cifar10" / f"{name}.txt").read_text().split("\n")
    rows = [line.split(" ", 1) for line in lines if line]
    x = torch.stack([torch.from_numpy(np.array(Image.open(bench / "data" / "images_classic" / p).convert("RGB")))
                     for p, _ in rows]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor([int(l) for _, l in rows])


def train_bench_unet(bench: Path) -> Path:
    """A class-conditional tiny UNet trained for two steps on the benchmark's CIFAR-normalised train images
    (pixels mapped back to [-1, 1]), saved under ``bench/unet``: a real model_path for our presets."""
    from openood_diffguard.training.data import TensorImages
    from openood_diffguard.training.diffusion import TINY_UNET, train_diffusion

    x, y = imglist_images(bench, "train_cifar10")
    pixels = x * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    train_diffusion(TensorImages((2 * pixels - 1).clamp(-1, 1), y),
                    {"num_classes": 10, "unet": {**TINY_UNET, "sample_size": 32, "in_channels": 3}, "steps": 2,
                     "batch_size": 10, "warmup": 1, "ema": 0.5, "save_every": 2, "hflip": False},
                    bench / "unet", progress=False, device="cpu")
    return bench / "unet"


def check_evaluator_rows(ev, table, reference=None):
    """Evaluator's DataFrame equals our standalone metrics: of its own cached scores, or of ``reference``
    = ``(id_triple, {ood set: triple})`` computed outside OpenOOD (pred, conf, label)."""
    if reference is None:
        id_t = ev.scores["id"]["test"]
        ood = {n: ev.scores["ood"][s][n] for s in ("near", "far") for n in ev.scores["ood"][s]}
    else:
        id_t, ood = reference
    ours = benchmark_table(id_t, ood, groups={"nearood": OOD_SETS["near"], "farood": OOD_SETS["far"]})
    assert list(table.index) == EVALUATOR_ROWS
    for row, m in ours.items():
        np.testing.assert_allclose(table.loc[row, ["FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT"]].to_numpy(dtype=float),
                                   np.array(m.as_openood()[:4]) * 100, atol=1e-9)
    acc = (ev.scores["id_preds"].numpy() == ev.scores["id_labels"].numpy()).mean() * 100  # classifier top-1
    np.testing.assert_allclose(table["ACC"].to_numpy(dtype=float), acc)


def openood_root() -> Path:
    """The OpenOOD checkout (imported lazily: this module is collected where OpenOOD is absent too)."""
    import openood

    return Path(openood.__file__).resolve().parent.parent


def main_py_argv(bench: Path, pp_yml: Path, *extra: str) -> list[str]:
    """Arguments of OpenOOD's main.py (through our launcher) on the tiny benchmark."""
    cfg = openood_root() / "configs"  # configs/ beside the editable checkout
    return ["--config", *(str(cfg / p) for p in MAIN_PY_CONFIGS), str(pp_yml),
            "--network.checkpoint", str(bench / "best.ckpt"), "--merge_option", "merge", "--num_workers", "0",
            "--dataset.test.batch_size", "16", "--ood_dataset.batch_size", "16", *extra]


def check_main_py_csv(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """main.py's ood.csv rows equal our metrics of its saved scores (csv rounds to 2 decimals). Returns the scores."""
    rows = {r["dataset"]: r for r in csv.DictReader(out.open())}
    assert list(rows) == MAIN_PY_ROWS
    scores = {p.stem: dict(np.load(p)) for p in (out.parent / "scores").glob("*.npz")}
    id_t = tuple(scores["cifar10"][k] for k in ("pred", "conf", "label"))
    for name in [r for r in MAIN_PY_ROWS if not r.endswith("ood")]:
        s = scores[name]
        m = ood_metrics(np.r_[id_t[1], s["conf"]], np.r_[id_t[2], s["label"]], np.r_[id_t[0], s["pred"]])
        got = [float(rows[name][k]) for k in ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC")]
        np.testing.assert_allclose(got, np.round(np.array(m.as_openood()) * 100, 2), atol=0.0051)
    return scores
