"""Launcher: OpenOOD's ``main.py`` pipeline with our postprocessors registered.

    python -m openood_diffguard.main --config configs/datasets/cifar10/cifar10.yml \\
        configs/datasets/cifar10/cifar10_ood.yml configs/networks/resnet18_32x32.yml \\
        configs/pipelines/test/test_ood.yml configs/preprocessors/base_preprocessor.yml diffguard \\
        --network.checkpoint results/.../best.ckpt --merge_option merge

(also ``openood-diffguard eval ...``). A ``--config`` entry that is not a file but names one of our
presets (a packaged yml stem such as ``diffguard_cifar10``, or an alias: ``diffguard``, ``diffnb``, ``lfdn``,
``diffguard_fusion``), or a packaged training config (``train_ncis``: OpenOOD's ``train_oe`` pipeline with
our NCIS trainer, registered in OpenOOD's ``get_trainer``), is replaced by the packaged yml.
Run it from the OpenOOD checkout (its ``configs/`` and ``data/`` paths are relative). Under
``torchrun --nproc_per_node N`` every rank runs the pipeline, our detectors shard samples across ranks
and only rank 0 writes OpenOOD's csv / score files.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace preset names after ``--config`` by the packaged yml paths."""
    from .openood.registration import packaged_configs, packaged_train_configs

    known = {**packaged_train_configs(), **packaged_configs()}
    out, in_config = [], False
    for arg in argv:
        if arg.startswith("--"):
            in_config = arg == "--config"
        elif in_config and not os.path.isfile(arg):
            stem = os.path.splitext(os.path.basename(arg))[0]
            if stem in known:
                arg = str(known[stem])
        out.append(arg)
    return out


def _run_pipeline(config) -> None:
    from .openood import register

    register(evaluator=False)  # again: mp.spawn children import fresh modules
    from openood.pipelines import get_pipeline

    get_pipeline(config).run()


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import init_from_env
    from .openood import register

    register(evaluator=False)  # main.py needs no Evaluator (whose imports add timm / foolbox / pandas)
    from openood.utils import launch, setup_config

    argv = resolve_config_args(list(sys.argv[1:] if argv is None else argv))
    distributed = init_from_env()
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # setup_config parses sys.argv
    try:
        config = setup_config()
    finally:
        sys.argv = saved
    if distributed:
        import torch.distributed as dist

        config.num_gpus = 1  # torchrun owns the processes; OpenOOD must not spawn or shard loaders itself
        if dist.get_rank() != 0:
            config.recorder.save_csv = False
            config.recorder.save_scores = False
    launch(_run_pipeline, config.num_gpus, num_machines=config.num_machines or 1,
           machine_rank=config.machine_rank or 0, dist_url="auto", args=(config,))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # everything after `eval` belongs to OpenOOD (--config, --network.checkpoint, ...): treat no "-" as an option
    parser.prefix_chars = "+"
    parser.add_argument("openood_args", nargs=argparse.REMAINDER,
                        help="OpenOOD main.py arguments: --config a.yml b.yml ... [--key value ...]")


def run(args: argparse.Namespace) -> int:
    return main(args.openood_args)


if __name__ == "__main__":
    sys.exit(main())
