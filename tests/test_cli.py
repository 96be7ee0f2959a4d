"""The command line a newcomer meets: fast ``--help`` (no torch), every option documented with its default, one
``error:`` line and exit status 2 for a user's mistake, the same metric column names everywhere."""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openood_diffguard.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=timeout)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_of_every_command_imports_no_torch():
    code = f"""
import sys
from openood_diffguard.cli import COMMANDS, build_parser
from openood_diffguard.openood.main import build_parser as eval_parser
for name in {list(COMMANDS)!r}:
    build_parser(only=name).format_help()
eval_parser().format_help()
heavy = sorted(m for m in ("torch", "torchvision", "diffusers", "sklearn", "openood") if m in sys.modules)
print("HEAVY", heavy)
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HEAVY []" in res.stdout, res.stdout


def test_help_answers_well_under_import_torch():
    def wall(args):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return time.perf_counter() - t0

    torch_s = min(wall(["-c", "import torch"]) for _ in range(2))
    help_s = min(wall(["-m", "openood_diffguard.cli", "train-lfdn", "--help"]) for _ in range(2))
    assert help_s < 0.5 * torch_s, (help_s, torch_s)


def test_every_option_has_help_and_says_its_default():
    parser = build_parser()
    parsers = {name: p for name, p in _subparsers(parser).items()}
    for group in ("convert", "ncis"):
        parsers.update({f"{group} {k}": v for k, v in _subparsers(parsers[group]).items()})
    assert set(COMMANDS) <= set(parsers)
    for name, p in parsers.items():
        text = p.format_help()
        one_of_required = {a for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
                continue
            what = f"{name} {action.option_strings[-1]}"
            assert action.help, f"{what} has no help"
            if action.required or action in one_of_required or isinstance(action, argparse._StoreTrueAction):
                continue
            if action.default is None:
                assert "default" in action.help, f"{what}: defaults to None and its help does not say what that means"
            else:
                assert "(default: %(default)s)" in p.formatter_class(name)._get_help_string(action) \
                    or "%(default)" in action.help, what
        assert "--device" not in text or "auto, cpu, cuda" in text, name


@pytest.mark.parametrize("argv, expect", [
    (["demo", "--device", "mps"], "'mps' is not a supported device"),
    (["demo", "--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["demo", "--seed", "-1"],
     "CUDA is not available" if not __import__("torch").cuda.is_available() else "--seed must be"),
    (["train-diffusion", "--imglist", "missing.txt", "--out", "OUT", "--device", "cpu"], "missing.txt not found"),
    (["train-lfdn", "--imglist", "x.txt", "--network", "nosuch", "--classifier", "c.pt", "--num-classes", "3",
      "--out", "OUT/x.pt", "--device", "cpu"], "unknown network 'nosuch'"),
    (["train-lfdn", "--imglist", "x.txt", "--network", "nosuch", "--classifier", "c.pt", "--num-classes", "3",
      "--out", "OUT/x.pt", "--layers", "0,1"], "--layers '0,1'"),
    (["fuse", "--scores", "a.npz", "b.npz"], "score file not found: a.npz"),
    (["fuse", "--scores", "a.npz"], "at least two score files"),
    (["convert", "adm", "--src", "missing.pt", "--out", "OUT"], "missing.pt"),
    (["eval", "--config", "no_such_preset"], None),  # OpenOOD missing -> install command; present -> the config
    (["eval", "--config", "diffnb", "--postprocessor.postprocessor_args.timesteps"], None),
    (["eval"], "--config"),
    (["nosuch"], "invalid choice"),
])
def test_user_errors_give_one_error_line_and_status_2(argv, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("openood-diffguard"), err
    assert expect is None or expect in errors[0], err
    assert not (tmp_path / "OUT").exists()  # nothing written before the mistake is found


def _rc(argv) -> int:
    """main()'s exit status, also when argparse exits (usage errors, --help)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_eval_help_needs_no_openood_and_version(capsys):
    assert _rc(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--postprocessor.postprocessor_args.model_path" in out and "--device" in out and "--merge_option" in out
    assert _rc(["--version"]) == 0
    assert "openood-diffguard 0." in capsys.readouterr().out


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("OPENOOD_DIFFGUARD_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["convert", "adm", "--src", "missing.pt", "--out", "o"])


def test_overrides_take_yaml_values_and_new_keys():
    from openood_diffguard.openood.main import split_overrides

    ours, rest = split_overrides([
        "--network.checkpoint", "c.ckpt", "--postprocessor.postprocessor_args.model_path", "models/x",
        "--postprocessor.postprocessor_args.detector_args.num_steps=25", "--postprocessor.APS_mode", "False",
        "--postprocessor.postprocessor_args.timesteps", "[120, 240]", "--postprocessor.postprocessor_args.unet_path",
        "null"])
    assert rest == ["--network.checkpoint", "c.ckpt"]
    assert ours == {"postprocessor": {"postprocessor_args": {"model_path": "models/x", "detector_args": {"num_steps": 25},
                                                            "timesteps": [120, 240], "unet_path": None},
                                      "APS_mode": False}}
    for bad in (["x.yml"], ["--a.b"], ["--postprocessor.postprocessor_args.x", "[1,"]):
        with pytest.raises(ValueError):
            split_overrides(bad)


def test_one_column_naming_everywhere():
    from openood_diffguard.demo.run import BASELINES
    from openood_diffguard.fusion.cli import METRIC_COLUMNS as FUSE_COLUMNS
    from openood_diffguard.metrics import METRIC_COLUMNS, OODMetrics, format_table

    columns = list(METRIC_COLUMNS)
    assert columns == ["AUROC", "AUPR_IN", "AUPR_OUT", "FPR@95_OpenOOD", "FPR@95_IDpos", "ACC"]
    assert list(FUSE_COLUMNS) == columns[:5]  # fuse has no classifier accuracy
    assert format_table({"x": OODMetrics(0.1, 0.9, 0.8, 0.7, 0.6, 0.2)}).splitlines()[0] == \
        "| method | " + " | ".join(columns) + " |"
    assert list(BASELINES.values()) == ["EBO", "MLS", "KNN", "ViM"]  # OpenOOD's spelling
