"""OpenOOD on a machine without CUDA, through the product alone (no test shim): ``python -m openood_diffguard.openood.main``
with a built-in (MSP) and one of ours (LFDN, sized from the command line), the Evaluator after ``register()``,
and a custom image-list benchmark through the Evaluator, offline. The tiny benchmark: ``openood_bench.build_bench``.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.openood

from openood_bench import (build_bench, check_evaluator_rows, check_main_py_csv, load_net, main_py_argv,  # noqa: E402
                           openood_root)

if torch.cuda.is_available():  # pragma: no cover - the point is a machine without CUDA
    pytest.skip("this machine has CUDA", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_bench(tmp_path_factory.mktemp("cpu_bench"))


@pytest.fixture
def console(monkeypatch):
    """main.py's setup_logger swaps sys.stdout for a Logger that closes pytest's capture on __del__ (not .cuda())."""
    from openood.utils import logger

    monkeypatch.setattr(logger.Logger, "__del__", lambda self: None)
    stdout = sys.stdout
    yield
    sys.stdout = stdout


def test_cuda_calls_fail_here_without_the_launcher():
    """The premise: on this machine OpenOOD's .cuda() calls raise, so the runs below need the device option."""
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()


def test_main_py_builtin_postprocessor_on_cpu(bench, monkeypatch, console):
    from openood_diffguard.openood.main import main

    cuda_before = torch.Tensor.cuda
    monkeypatch.chdir(bench)
    argv = main_py_argv(bench, openood_root() / "configs" / "postprocessors" / "msp.yml", "--mark", "cpu_msp")
    assert main(argv) == 0  # --device auto: no CUDA here, so OpenOOD runs on the CPU
    assert torch.Tensor.cuda is cuda_before  # the CPU routing ends with the run
    check_main_py_csv(next(p for p in (bench / "results").rglob("ood.csv") if "cpu_msp" in str(p)))


def test_python_m_main_runs_our_preset_on_cpu_with_cli_overrides(bench, tmp_path):
    """The documented command, in its own process: an LFDN preset by name, trained in setup at a size given on
    the command line (nested keys the yml's types would refuse in OpenOOD's own parser), on the CPU."""
    argv = main_py_argv(bench, Path("lfdn_cifar10"), "--mark", "cpu_lfdn")
    argv = [a for a in argv if a not in ("--merge_option", "merge")]  # the launcher's default
    args = "--postprocessor.postprocessor_args"
    argv += [f"{args}.train", "{width: 32, blocks: 1, epochs: 2, batch_size: 8}", f"{args}.cache_dir", str(tmp_path),
             "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # the rerun into the same output directory must not stop to ask (merge_option)
        res = subprocess.run([sys.executable, "-m", "openood_diffguard.openood.main", *argv], cwd=bench, env=env,
                             capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    out = next(p for p in (bench / "results").rglob("ood.csv") if "cpu_lfdn" in str(p))
    check_main_py_csv(out)
    assert list(tmp_path.glob("lfdn_*.pt"))  # the on-the-fly checkpoint went to the cache_dir given


def test_evaluator_on_cpu_after_register(bench, no_download):
    from openood.evaluation_api import Evaluator

    from openood_diffguard.runtime.devices import release_openood_device
    from openood_diffguard.openood import register

    register()  # device="auto": no CUDA, so OpenOOD's .cuda() calls go to the CPU from now on
    try:
        ev = Evaluator(load_net(bench), id_name="cifar10", data_root=str(bench / "data"),
                       config_root=str(openood_root() / "configs"), postprocessor_name="msp", batch_size=16,
                       num_workers=0)
        check_evaluator_rows(ev, ev.eval_ood(progress=False))
    finally:
        release_openood_device()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()  # released


def _write_custom_benchmark(root: Path) -> dict:
    """Own layout (not OpenOOD's folders): images/<set>/<i>.png and lists/<split>.txt."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    up = np.kron(digits.images / 16.0, np.ones((4, 4)))
    rgb = (np.stack([up] * 3, -1) * 255).astype(np.uint8)
    known = np.flatnonzero(digits.target < 6)
    unknown = np.flatnonzero(digits.target >= 6)
    sets = {"train": known[:24], "val": known[24:36], "test": known[36:60], "val_ood": unknown[:8],
            "test_ood": unknown[8:32]}
    (root / "lists").mkdir(parents=True)
    for name, idx in sets.items():
        (root / "images" / name).mkdir(parents=True)
        lines = []
        for i in idx:
            Image.fromarray(rgb[i]).save(root / "images" / name / f"{i}.png")
            lines.append(f"{name}/{i}.png {int(digits.target[i]) if 'ood' not in name else -1}")
        (root / "lists" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    noise = (np.random.default_rng(0).random((12, 32, 32, 3)) * 255).astype(np.uint8)
    (root / "images" / "noise").mkdir()
    for i, im in enumerate(noise):
        Image.fromarray(im).save(root / "images" / "noise" / f"{i}.png")
    (root / "lists" / "noise.txt").write_text("".join(f"noise/{i}.png -1\n" for i in range(12)))
    return {"data_dir": "images", "id": {s: f"lists/{s}.txt" for s in ("train", "val", "test")},
            "ood_val": "lists/val_ood.txt", "near": {"digits6to9": "lists/test_ood.txt"}, "far": {"noise": "lists/noise.txt"}}


def test_custom_image_list_benchmark_through_the_evaluator_offline(tmp_path, no_download, monkeypatch):
    import openood.evaluation_api.datasets as ds
    from openood.evaluation_api import Evaluator
    from openood.networks import ResNet18_32x32

    from openood_diffguard.runtime.devices import release_openood_device
    from openood_diffguard.metrics import benchmark_table
    from openood_diffguard.openood import register, register_benchmark
    from openood_diffguard.space import resolve_normalization

    monkeypatch.setattr(ds.gdown, "download", lambda *a, **k: pytest.fail("download attempted"))
    spec = _write_custom_benchmark(tmp_path / "my_data")
    register_benchmark("digits6", num_classes=6, normalization="cifar10", **spec)
    assert resolve_normalization("digits6") == resolve_normalization("cifar10")  # what our detectors un-normalise with
    torch.manual_seed(0)
    net = ResNet18_32x32(num_classes=6).eval()
    register()
    try:
        ev = Evaluator(net, id_name="digits6", data_root=str(tmp_path / "my_data"), postprocessor_name="msp",
                       config_root=str(openood_root() / "configs"), batch_size=8, num_workers=0)
        table = ev.eval_ood(progress=False)
    finally:
        release_openood_device()
    assert list(table.index) == ["digits6to9", "nearood", "noise", "farood"]
    assert len(ev.dataloader_dict["id"]["test"].dataset) == 24
    id_t = ev.scores["id"]["test"]
    ours = benchmark_table(id_t, {n: ev.scores["ood"][g][n] for g, n in (("near", "digits6to9"), ("far", "noise"))})
    for row in ("digits6to9", "noise"):
        np.testing.assert_allclose(table.loc[row, ["FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT"]].to_numpy(dtype=float),
                                   np.array(ours[row].as_openood()[:4]) * 100, atol=1e-9)
    (tmp_path / "my_data" / "lists" / "noise.txt").unlink()
    with pytest.raises(FileNotFoundError, match="noise.txt.*never downloaded"):
        Evaluator(net, id_name="digits6", data_root=str(tmp_path / "my_data"), postprocessor_name="msp",
                  config_root=str(openood_root() / "configs"), batch_size=8, num_workers=0)


def test_register_benchmark_refuses_bad_input():
    from openood_diffguard.openood import register_benchmark

    good = dict(num_classes=2, normalization="cifar10", data_dir="x", id={"train": "a", "val": "b", "test": "c"},
                ood_val="d", near={"n": "e"}, far={"f": "g"})
    for bad, match in [({"name": "cifar10"}, "not one of OpenOOD's"), ({"name": "my_imagenet"}, "imagenet"),
                       ({"num_classes": 0}, "num_classes"), ({"normalization": "nope"}, "normalization 'nope'"),
                       ({"normalization": ([0.5], [0.0])}, "std > 0"), ({"id": {"train": "a"}}, "val"),
                       ({"far": {}}, "far needs at least one")]:
        with pytest.raises(ValueError, match=match):
            register_benchmark(**{"name": "ok_name", **good, **bad})
