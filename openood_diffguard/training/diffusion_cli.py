"""``openood-diffguard train-diffusion``: train DiffNB's class-conditional pixel UNet on an image list or folder.

The options are defined without torch (``--help`` is instant); training is ``training.diffusion.train_diffusion``.
"""
from __future__ import annotations

import argparse

from ..runtime.devices import add_device_argument
from .defaults import DIFFUSION_TRAIN

_HELP = {
    "steps": "training steps (a rerun into the same --out resumes to this step)",
    "batch_size": "images per step",
    "warmup": "steps of linear learning-rate warm-up",
    "save_every": "steps between checkpoints (checkpoint.pt + the diffusers model directory)",
    "num_workers": "DataLoader worker processes",
    "seed": "seed of the weights and of every random draw (resumable)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clip",
    "ema": "EMA decay of the weights that are saved and sampled with",
    "label_dropout": "share of labels replaced by the null class (classifier-free guidance)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imglist", help="OpenOOD image list (<relpath> <label> per line), with --data-root")
    src.add_argument("--image-folder", help="class-per-folder image directory (one sub-folder per class)")
    p.add_argument("--data-root", default=".",
                   help="folder the image list's paths are relative to (OpenOOD: data/images_classic)")
    p.add_argument("--out", required=True, help="output diffusers model directory (resumed if it has checkpoint.pt)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes C; the model gets C + 1 class rows (default: 1 + the largest label)")
    p.add_argument("--preset", choices=("cifar", "tiny"), default="cifar",
                   help="UNet size: cifar = the 35.7M DiffNB CIFAR UNet, tiny = a test-size model")
    p.add_argument("--sample-size", type=int, default=None, help="image side in pixels (default: the preset's)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3), help="image channels (default: the preset's)")
    for name in ("steps", "batch_size", "warmup", "save_every", "num_workers", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=DIFFUSION_TRAIN[name], help=_HELP[name])
    for name in ("lr", "weight_decay", "grad_clip", "ema", "label_dropout"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=DIFFUSION_TRAIN[name], help=_HELP[name])
    p.add_argument("--no-hflip", action="store_true", help="no random horizontal flips (default: flip, as DiffNB)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU; default: fp32)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint "
                                                            "(default: resume)")
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    from ..runtime.devices import resolve_device
    from .data import ImageFolderDataset, ImageListDataset
    from .defaults import CIFAR_UNET, TINY_UNET
    from .diffusion import train_diffusion

    device = resolve_device(args.device)  # before anything is written
    unet = dict(CIFAR_UNET if args.preset == "cifar" else TINY_UNET)
    if args.sample_size:
        unet["sample_size"] = args.sample_size
    if args.channels:
        unet["in_channels"] = args.channels
    size, ch = unet["sample_size"], unet["in_channels"]
    data = (ImageListDataset(args.imglist, args.data_root, size, ch) if args.imglist
            else ImageFolderDataset(args.image_folder, size, ch))
    cfg = {"num_classes": args.num_classes or data.num_classes, "unet": unet, "hflip": not args.no_hflip,
           "bf16": args.bf16}
    for k in ("steps", "batch_size", "warmup", "save_every", "num_workers", "seed", "lr", "weight_decay", "grad_clip",
              "ema", "label_dropout"):
        cfg[k] = getattr(args, k)
    res = train_diffusion(data, cfg, args.out, resume=not args.no_resume, device=device)
    print(f"step {res['step']}; model directory {res['out_dir']} (load with openood_diffguard.diffusion.load_unet)")
    return 0
