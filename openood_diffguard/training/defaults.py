"""Training defaults as plain data (no torch): the training code and the ``train-*`` commands' options share
them, and ``openood-diffguard train-* --help`` shows them without importing torch."""
from __future__ import annotations

from typing import Any

#: the DiffNB / DDPM CIFAR-10 UNet (ch 128, mult 1,2,2,2, 2 res blocks, attention at 16x16, dropout 0.1): 35.7M
CIFAR_UNET = {"sample_size": 32, "in_channels": 3, "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "dropout": 0.1,
              "norm_num_groups": 32}
#: a few-thousand-parameter model for tests and demos on CPU
TINY_UNET = {"sample_size": 8, "in_channels": 1, "block_out_channels": [16, 32], "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "dropout": 0.0, "norm_num_groups": 8}
#: ``train-diffusion`` (DiffNB code's recipe)
DIFFUSION_TRAIN: dict[str, Any] = {"num_classes": None, "unet": CIFAR_UNET, "steps": 240_000, "batch_size": 128,
                                   "lr": 2e-4, "weight_decay": 0.0, "warmup": 5000, "grad_clip": 1.0, "ema": 0.9999,
                                   "label_dropout": 0.1, "hflip": True, "bf16": False, "seed": 0,
                                   "save_every": 5000, "num_workers": 0}
#: ``train-lfdn`` (the DLSR paper's recipe and network size)
LFDN_TRAIN: dict[str, Any] = {"width": 1440, "blocks": 16, "dropout": 0.0, "epochs": 150, "batch_size": 128,
                              "lr": 1e-4, "weight_decay": 1e-4, "ema": 0.0, "seed": 0}
#: the released code's training recipe (main.py defaults, config/Config.yaml), ``variant: code``'s defaults
LFDN_CODE_TRAIN: dict[str, Any] = {**LFDN_TRAIN, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.02, "ema": 0.9999}
#: ``train-lfdn --network``: OpenOOD's classifiers by name (else ``package.module:Class``)
OPENOOD_NETWORKS = {"resnet18_32x32": "ResNet18_32x32", "resnet18_224x224": "ResNet18_224x224", "resnet50": "ResNet50"}
