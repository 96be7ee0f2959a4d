"""Image sources for training: OpenOOD image lists (``<relpath> <label>`` lines + a data root) and
class-per-folder directories. Images come out as [-1, 1] tensors at a fixed side length."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset


def _load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (OSError, ValueError) as err:
        raise RuntimeError(f"cannot read image {path}: {err}") from err
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t[None]


class ImageListDataset(Dataset):
    """OpenOOD image list: each line ``<path relative to data_root> <integer label>``."""

    def __init__(self, imglist: str | Path, data_root: str | Path, size: int, channels: int = 3) -> None:
        imglist, self.root = Path(imglist), Path(data_root)
        if not imglist.is_file():
            raise FileNotFoundError(f"image list {imglist} not found (OpenOOD: benchmark_imglist/<dataset>/train_*.txt)")
        self.items: list[tuple[str, int]] = []
        for n, line in enumerate(imglist.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise ValueError(f"{imglist}:{n}: expected '<relpath> <label>', got {line!r}")
            self.items.append((parts[0], int(parts[1])))
        if not self.items:
            raise ValueError(f"image list {imglist} is empty")
        if min(y for _, y in self.items) < 0:
            raise ValueError(f"{imglist} contains negative (OOD) labels: train on an ID list only")
        self.size, self.channels = size, channels
        self.num_classes = max(y for _, y in self.items) + 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, y = self.items[i]
        return _load_image(self.root / rel, self.size, self.channels), y


class ImageFolderDataset(ImageListDataset):
    """``root/<class name>/<image>``; classes sorted by name (torchvision ImageFolder order)."""

    EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

    def __init__(self, root: str | Path, size: int, channels: int = 3) -> None:
        self.root = Path(root)
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir()) if self.root.is_dir() else []
        if not classes:
            raise FileNotFoundError(f"{self.root} has no class sub-folders (expected root/<class>/<image>)")
        self.classes = classes
        self.items = [(str(p.relative_to(self.root)), k) for k, c in enumerate(classes)
                      for p in sorted((self.root / c).rglob("*")) if p.suffix.lower() in self.EXTS]
        if not self.items:
            raise ValueError(f"no images under {self.root}")
        self.size, self.channels, self.num_classes = size, channels, len(classes)


class TensorImages(Dataset):
    """In-memory images [N, C, H, W] in [-1, 1] with integer labels (demos, tests)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"need images [N, C, H, W] and N labels, got {tuple(images.shape)} / {len(labels)}")
        if images.min() < -1.01 or images.max() > 1.01:
            raise ValueError(f"images must lie in [-1, 1], got [{float(images.min()):.3f}, {float(images.max()):.3f}]")
        self.images, self.labels = images.float(), torch.as_tensor(labels).long()
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
