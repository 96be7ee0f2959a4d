"""Command line: ``openood-diffguard <command>``; each sub-command lives with the code it drives.

Only the module of the command being run is imported (``--help`` answers without torch), and a user's
mistake (a bad option, a missing file, a missing optional dependency) ends in one ``error:`` line and exit
status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from .. import __version__

DESCRIPTION = ("Diffusion-based out-of-distribution detectors (DiffGuard, DiffNB, LFDN) for OpenOOD v1.5: a CPU demo, "
               "evaluation inside OpenOOD, score fusion, checkpoint conversion and training.")
TRACEBACK_ENV = "OPENOOD_DIFFGUARD_TRACEBACK"
EPILOG = (f"Run 'openood-diffguard <command> --help' for a command's options. Errors print one line; set "
          f"{TRACEBACK_ENV}=1 to see the full traceback.")

# name -> (module, help). Each module provides ``add_arguments(parser)`` and ``run(args) -> int``; a module
# with ``RAW_ARGV = True`` parses its own arguments instead (``eval`` passes OpenOOD's through).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("openood_diffguard.demo.cli", "CPU demo on scikit-learn digits: every detector, OpenOOD-style table, plots"),
    "info": ("openood_diffguard.cli.info", "versions, device and which optional parts are available"),
    "eval": ("openood_diffguard.openood.main", "run OpenOOD's main.py pipeline with our postprocessors registered"),
    "fuse": ("openood_diffguard.fusion.cli", "fuse cached per-sample score files (ours / OpenOOD's) and print metrics"),
    "convert": ("openood_diffguard.convert.cli", "convert original ADM / LDM cin256-v2 / DiffNB checkpoints to diffusers"),
    "train-diffusion": ("openood_diffguard.training.diffusion_cli", "train DiffNB's class-conditional pixel UNet"),
    "train-lfdn": ("openood_diffguard.training.lfdn_cli", "train the LFDN feature denoiser on a classifier's ID features"),
    "ncis": ("openood_diffguard.ncis.cli", "NCIS outlier synthesis + training, one resumable stage per command"),
    "report": ("openood_diffguard.report.cli", "one self-contained HTML page per run: metrics, curves, galleries"),
}

#: exceptions that mean "the input is wrong" (options, files, configs, missing extras), not "the code is wrong"
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, LookupError, OSError, ImportError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option whose default is a value; options defaulting to None or flags
    explain their default in their own help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default == argparse.SUPPRESS
                or not action.option_strings
                or isinstance(action, argparse._StoreTrueAction)):
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub, name: str, help: str, module: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, epilog=EPILOG)
    p.set_defaults(_module=module, _command=name)
    return p


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All commands are listed; only ``only``'s module is imported for its options (None: every command's)."""
    parser = argparse.ArgumentParser(prog="openood-diffguard", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", title="commands")
    for name, (module, help) in COMMANDS.items():
        p = add_parser(sub, name, help, module)
        if only in (None, name):
            importlib.import_module(module).add_arguments(p)
    return parser


def one_line(err: BaseException) -> str:
    """An exception as one line: KeyError's quotes dropped, multi-line messages joined."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(msg).split()) or type(err).__name__


def guarded(prog: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn``; a user error -> ``<prog>: error: <one line>`` on stderr and exit status 2."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # raise SystemExit("message"): a refusal, reported like the others
        if isinstance(exit_.code, str):
            print(f"{prog}: error: {' '.join(exit_.code.split())}", file=sys.stderr)
            return 2
        raise
    except USER_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2


def _command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _command(argv)
    if name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        if getattr(module, "RAW_ARGV", False) and argv[0] == name:
            return guarded(f"openood-diffguard {name}", lambda: module.main(argv[1:], prog=f"openood-diffguard {name}"))
    parser = build_parser(only=name if name in COMMANDS else "")
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = importlib.import_module(args._module).run
    return guarded(f"openood-diffguard {args._command}", lambda: run(args))

