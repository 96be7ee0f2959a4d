"""``openood-diffguard train-lfdn``: train the LFDN feature denoiser on a classifier's ID training features.

The options are defined without torch (``--help`` is instant); training is ``training.lfdn.fit_lfdn``.
"""
from __future__ import annotations

import argparse

from ..runtime.devices import add_device_argument
from .defaults import LFDN_CODE_TRAIN, LFDN_TRAIN, OPENOOD_NETWORKS

_INTS = ("width", "blocks", "epochs", "batch_size", "seed")
_HELP = {
    "width": "hidden width of the residual MLP blocks (paper: 1440; 256-512 train in minutes on a CPU)",
    "blocks": "residual MLP blocks (paper: 16)",
    "epochs": "training epochs; the model after epoch 1 is kept for the LR score",
    "batch_size": "feature vectors per step",
    "seed": "seed of the weights and draws",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "ema": "EMA decay of the saved weights (0 = no EMA)",
    "dropout": "dropout inside the blocks",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--imglist", required=True, help="OpenOOD ID train image list (<relpath> <label> per line)")
    p.add_argument("--data-root", default=".",
                   help="folder the image list's paths are relative to (OpenOOD: data/images_classic)")
    p.add_argument("--network", required=True,
                   help=f"the classifier: {', '.join(OPENOOD_NETWORKS)} (needs OpenOOD) or package.module:Class "
                        "(built with num_classes=)")
    p.add_argument("--classifier", required=True, help="classifier checkpoint (a state dict, e.g. OpenOOD's best.ckpt)")
    p.add_argument("--num-classes", type=int, required=True, help="classes of the classifier")
    p.add_argument("--normalization", default="cifar10",
                   help="OpenOOD normalization_type of the classifier's input (cifar10, cifar100, imagenet, ...)")
    p.add_argument("--image-size", type=int, default=32, help="side the images are resized to")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels")
    p.add_argument("--layers", default="1,2,3,4",
                   help="1-based indices into the classifier's feature list (DLSR's ResNet50 setting: 1,2,3)")
    p.add_argument("--out", required=True, help="checkpoint path to write (.pt)")
    p.add_argument("--feature-batch-size", type=int, default=256, help="images per feature-extraction batch")
    p.add_argument("--variant", default="code", choices=("code", "paper", "ours"),
                   help="the LFDN detector variant the checkpoint is for: its feature normalisation and, for code, "
                        "the released code's training recipe as the defaults below")
    for name in LFDN_TRAIN:
        default = (f"default {LFDN_TRAIN[name]}" if LFDN_TRAIN[name] == LFDN_CODE_TRAIN[name]
                   else f"default {LFDN_TRAIN[name]}; with --variant code {LFDN_CODE_TRAIN[name]}")
        p.add_argument("--" + name.replace("_", "-"), type=int if name in _INTS else float, default=None,
                       metavar="N" if name in _INTS else "X", help=f"{_HELP[name]} ({default})")
    add_device_argument(p)


def _layers(text: str) -> list[int]:
    try:
        layers = [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        layers = []
    if not layers or min(layers) < 1:
        raise ValueError(f"--layers {text!r}: expected comma-separated 1-based indices, e.g. 1,2,3,4")
    return layers


def run(args: argparse.Namespace) -> int:
    import torch

    from ..runtime.devices import resolve_device
    from .data import ImageListDataset
    from ..detectors.lfdn import VARIANTS
    from .lfdn import _Normalised, build_classifier, fit_lfdn, save_checkpoint, train_config

    device = resolve_device(args.device)
    layers = _layers(args.layers)
    net = build_classifier(args.network, args.num_classes, args.classifier).to(device)
    data = _Normalised(ImageListDataset(args.imglist, args.data_root, args.image_size, args.channels), args.normalization,
                       args.channels)
    loader = torch.utils.data.DataLoader(data, batch_size=args.feature_batch_size, shuffle=False)
    cfg = train_config({k: getattr(args, k) for k in LFDN_TRAIN if getattr(args, k) is not None}, args.variant)
    ckpt = fit_lfdn(net, loader, layers, cfg, feature_norm=VARIANTS[args.variant]["feature_norm"])
    path = save_checkpoint(ckpt, args.out)
    print(f"LFDN checkpoint {path} (final loss {ckpt['history'][-1]:.4f}); use it as postprocessor_args.checkpoint "
          f"with variant: {args.variant}")
    return 0
