"""Launcher: OpenOOD's ``main.py`` pipeline with our postprocessors registered.

    python -m openood_diffguard.openood.main --config configs/datasets/cifar10/cifar10.yml \\
        configs/datasets/cifar10/cifar10_ood.yml configs/networks/resnet18_32x32.yml \\
        configs/pipelines/test/test_ood.yml configs/preprocessors/base_preprocessor.yml diffguard_cifar10 \\
        --network.checkpoint results/.../best.ckpt \\
        --postprocessor.postprocessor_args.model_path models/diffnb_cifar10

(also ``openood-diffguard eval ...``). Run it from the OpenOOD checkout (its ``configs/`` and ``data/`` paths are
relative). What it adds to OpenOOD's own ``main.py``:

- a ``--config`` entry that is not a file but names one of our presets (a packaged yml stem such as
  ``diffguard_cifar10``, or an alias: ``diffguard``, ``diffnb``, ``lfdn``, ``diffguard_fusion``) is replaced by
  the packaged yml, and so is a packaged training config (``train_ncis``: OpenOOD's ``train_oe`` pipeline with our
  NCIS trainer, registered in OpenOOD's ``get_trainer``);
- ``--device auto|cpu|cuda``: on a machine without CUDA (``auto``) OpenOOD's hard-coded ``.cuda()`` calls run
  on the CPU (``devices.openood_device``), without editing OpenOOD;
- overrides under ``--postprocessor.`` take YAML values (``null``, ``3.0``, ``[120, 240]``, ``true``) and may
  name keys the yml leaves out (``--postprocessor.postprocessor_args.detector_args.num_steps 25``); OpenOOD's
  own parser would cast them to the yml's type (``null`` -> an error, ``False`` -> True). They are merged as a
  last config file, so OpenOOD's merge and ``@{...}`` references apply as usual;
- ``--merge_option`` defaults to ``merge``, so a rerun into an existing output directory does not stop to
  ask (OpenOOD's default ``default`` waits on ``input()``).

Under ``torchrun --nproc_per_node N`` every rank runs the pipeline, our detectors shard samples across
ranks and only rank 0 writes OpenOOD's csv / score files.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..runtime.devices import add_device_argument

#: ``cli`` hands this module its raw arguments: everything it does not know belongs to OpenOOD
RAW_ARGV = True
PROG = "python -m openood_diffguard.openood.main"
OVERRIDE_PREFIX = "postprocessor."

_EPILOG = """\
any other --KEY VALUE is an override of the merged OpenOOD config, passed to OpenOOD's parser
(e.g. --network.checkpoint results/.../best.ckpt, --num_workers 0, --dataset.test.batch_size 64).
Overrides under --postprocessor. are ours: YAML values, keys may be new, e.g.
  --postprocessor.postprocessor_args.model_path models/diffnb_cifar10
  --postprocessor.postprocessor_args.detector_args.num_steps 25     (fusion presets)
  --postprocessor.postprocessor_args.timesteps [120,240,360]
Presets: diffguard_cifar10, diffnb_cifar10, lfdn_cifar10, fusion_diffguard_ebo_cifar10, ... (file stems of the
package's configs/postprocessors/) and the aliases diffguard, diffnb, lfdn, diffguard_fusion.
Run it from the OpenOOD checkout: OpenOOD's configs/ and data/ paths are relative to it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", nargs="+", required=True, metavar="YML",
                        help="OpenOOD config files in merge order; an entry that is not a file may name one of our "
                             "presets (e.g. diffguard_cifar10), which stands for the packaged yml")
    add_device_argument(parser)
    parser.add_argument("--merge_option", choices=("merge", "pass", "default"), default="merge",
                        help="what to do when the output directory exists: merge into it, pass (skip), or "
                             "default (OpenOOD's: ask on the terminal)")
    parser.epilog = _EPILOG  # the formatter keeps its line breaks (cli.HelpFormatter is a RawDescription one)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, formatter_class=HelpFormatter,
                                     description="Run OpenOOD v1.5's main.py pipeline with openood-diffguard's "
                                                 "postprocessors registered.")
    add_arguments(parser)
    return parser


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace preset names after ``--config`` by the packaged yml paths (other entries unchanged)."""
    from .registration import packaged_configs, packaged_train_configs

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


def config_files(entries: Sequence[str]) -> list[str]:
    """``--config`` entries -> existing yml paths; a missing one is an error naming it (and the presets)."""
    from .registration import packaged_configs, packaged_train_configs

    paths = resolve_config_args(["--config", *entries])[1:]
    missing = [e for e, p in zip(entries, paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--config: {', '.join(missing)} is neither a file (run from the OpenOOD checkout, "
                                f"configs/ is relative) nor one of our presets "
                                f"{sorted({**packaged_configs(), **packaged_train_configs()})}")
    bad = [p for p in paths if not p.endswith(".yml")]
    if bad:
        raise ValueError(f"--config: OpenOOD reads .yml files only, got {', '.join(bad)}")
    return paths


def split_overrides(args: Sequence[str]) -> tuple[dict, list[str]]:
    """OpenOOD's ``--key value`` / ``--key=value`` overrides -> (our ``postprocessor.*`` ones as a nested dict
    with YAML-typed values, the rest for OpenOOD's parser). A malformed list is a ValueError."""
    import yaml

    ours: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2 or arg[2] == "-":
            raise ValueError(f"unexpected argument {arg!r}: OpenOOD overrides are --KEY VALUE pairs")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        if not key.startswith(OVERRIDE_PREFIX):
            rest += [f"--{key}", value]
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--{key} {value!r}: not a YAML value ({' '.join(str(err).split())})") from None
        node = ours
        *parents, leaf = key.split(".")
        if not leaf or not all(parents):
            raise ValueError(f"--{key}: empty key component")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--{key}: a parent key was also given a value")
        node[leaf] = parsed
    return ours, rest


def load_config(paths: Sequence[str], openood_args: Sequence[str], overrides: dict):
    """OpenOOD's ``setup_config`` on ``paths`` (+ our overrides as a last yml) and ``openood_args``."""
    import yaml
    from openood.utils import setup_config

    with tempfile.TemporaryDirectory() as tmp:
        files = list(paths)
        if overrides:
            extra = Path(tmp) / "command_line_overrides.yml"
            extra.write_text(yaml.safe_dump(overrides, sort_keys=False))
            files.append(str(extra))
        saved, sys.argv = sys.argv, [sys.argv[0], "--config", *files, *openood_args]  # setup_config reads sys.argv
        try:
            return setup_config()
        except KeyError as err:  # OpenOOD: an override must name an existing key
            raise ValueError(f"--{err.args[0]}: no such key in the merged OpenOOD config (overrides under "
                             f"--{OVERRIDE_PREFIX} may add keys; others must exist)") from None
        except AssertionError as err:
            raise ValueError(f"OpenOOD rejected the command line: {err}") from None
        finally:
            sys.argv = saved


#: the bindings the launcher's documented pipelines call (test_ood, test_ood_aps; train_oe runs the NCIS trainer)
MAIN_BINDINGS = ("openood.pipelines.test_ood_pipeline.get_postprocessor",
                 "openood.pipelines.test_ood_pipeline_aps.get_postprocessor",
                 "openood.pipelines.train_oe_pipeline.get_trainer")


def register_checked() -> list[str]:
    """``register()`` for the pipeline, failing loudly (naming the OpenOOD attribute) if it missed a binding
    the launcher relies on: an OpenOOD that moved its factories would otherwise run with OpenOOD's own."""
    from .registration import register, require_bound

    patched = register(evaluator=False, device=None)
    require_bound(patched, MAIN_BINDINGS)
    return patched


def _run_pipeline(config) -> None:
    register_checked()  # again: mp.spawn children import fresh modules
    from openood.pipelines import get_pipeline

    from .registration import require_pipeline_bound

    pipeline = get_pipeline(config)
    require_pipeline_bound(pipeline)
    pipeline.run()


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args, rest = build_parser(prog).parse_known_args(list(sys.argv[1:] if argv is None else argv))
    overrides, openood_args = split_overrides(rest)
    register_checked()  # first: without OpenOOD nothing else matters (the error names the install)
    from openood.utils import launch

    from ..runtime.devices import openood_device, resolve_device
    from ..runtime.distributed import init_from_env

    paths = config_files(args.config)
    device = resolve_device(args.device)

    distributed = init_from_env()
    config = load_config(paths, [*openood_args, "--merge_option", args.merge_option], overrides)
    if device.type != "cuda" and int(config.num_gpus or 1) > 1:
        raise ValueError(f"num_gpus {config.num_gpus} needs CUDA; on --device {device.type} leave it at 1")
    if distributed:
        import torch.distributed as dist

        config.num_gpus = 1  # torchrun owns the processes; OpenOOD must not spawn or shard loaders itself
        if dist.get_rank() != 0:
            config.recorder.save_csv = False
            config.recorder.save_scores = False
    with openood_device(device):
        launch(_run_pipeline, config.num_gpus, num_machines=config.num_machines or 1,
               machine_rank=config.machine_rank or 0, dist_url="auto", args=(config,))
    return 0


if __name__ == "__main__":
    from ..cli import guarded

    sys.exit(guarded(PROG, main))
