"""benchmarks/cifar_osr.py and the speed scripts: data handling (checksum, split, held-out val), the speed scripts'
one CLI, the forward counts speed.py reports against their known minimal values, and (slow) the whole CPU smoke runs."""
import hashlib
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

import cifar_osr  # noqa: E402


def fake_archive(folder: Path, per_class: int = 3) -> Path:
    """A CIFAR-10-JPEG-shaped archive: <top>/{train,test}/<class>/<nnnn>.jpg, pixel value = class index * 20."""
    from PIL import Image

    archive = folder / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for k, name in enumerate(cifar_osr.CLASSES):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 20 * k + i, np.uint8)).save(buf, "JPEG", quality=100)
                    info = tarfile.TarInfo(f"CIFAR-10-images/{split}/{name}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (folder / "sha256sums.txt").write_text(f"{digest}  cifar10-jpeg.tar.gz\n")
    return archive


def test_extract_checks_the_checksum_and_splits_are_disjoint(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    fake_archive(data, per_class=4)
    root = cifar_osr.extract(data, work)
    assert (root / "train" / "airplane" / "0000.jpg").is_file() and (root / ".extracted").is_file()
    o = {"train_per_class": None, "val_per_class": 1, "test_per_class": 2}
    s = cifar_osr.load_splits(root, work, o)
    assert sorted(set(s["train"][1])) == cifar_osr.KNOWN and sorted(set(s["ood"][1])) == cifar_osr.UNKNOWN
    assert len(s["train"][1]) == 6 * 3 and len(s["val"][1]) == 6 and len(s["test"][1]) == 12
    # val = the last train image of each known class, never in train (pixel value 20 k + i identifies it)
    val_ids = {int(x[0, 0, 0].round()) for x in s["val"][0].astype(float)}
    train_ids = {int(x[0, 0, 0].round()) for x in s["train"][0].astype(float)}
    assert val_ids == {20 * k + 3 for k in cifar_osr.KNOWN} and not val_ids & train_ids


def test_extract_refuses_a_wrong_checksum(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    fake_archive(data)
    (data / "sha256sums.txt").write_text("0" * 64 + "  cifar10-jpeg.tar.gz\n")
    with pytest.raises(ValueError, match="sha256"):
        cifar_osr.extract(data, tmp_path / "work")
    with pytest.raises(FileNotFoundError, match="data-dir"):
        cifar_osr.extract(tmp_path / "nowhere", tmp_path / "work")


SHARED_SPEED_FLAGS = ("--full", "--tiny", "--dtype", "--batch-sizes", "--compile", "--device", "--threads", "--out")


@pytest.mark.parametrize("script", ["speed", "diffguard_speed", "diffnb_speed", "lfdn_speed"])
def test_speed_scripts_share_one_cli(script, capsys):
    """One CLI style: every speed script takes the shared flags (``_speed.speed_parser``), spelled the same."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--help"])
    text = capsys.readouterr().out
    for flag in SHARED_SPEED_FLAGS:
        assert f"[{flag}" in text or f" {flag} " in text or f"| {flag}" in text, (script, flag)
    assert ("--seconds" in text) == (script != "diffguard_speed")  # it times a fixed number of batches (--batches)


def test_speed_cli_parses_batch_sizes_and_dtypes_and_writes_the_report(tmp_path, single_thread):
    import lfdn_speed
    from _speed import parse_speed_args, speed_parser

    args, device = parse_speed_args(speed_parser("x", batch_sizes=[4]), ["--batch-sizes", "2,8", "32", "--tiny"])
    assert args.batch_sizes == [2, 8, 32] and not args.full and args.dtype == ["fp32"] and device.type == "cpu"
    assert parse_speed_args(speed_parser("x", batch_sizes=[4]), [])[0].batch_sizes == [4]
    with pytest.raises(SystemExit):
        parse_speed_args(speed_parser("x"), ["--full", "--tiny"])
    out = tmp_path / "lfdn.md"
    assert lfdn_speed.main(["--tiny", "--dtype", "fp32", "bf16", "--batch-sizes", "8", "--seconds", "0.01",
                            "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| fp32 | 8 |" in text and "| bf16 | 8 |" in text and "width 64, 2 blocks" in text


def test_speed_lfdn_row_counts_the_minimal_forwards(single_thread):
    import speed

    cfg = {**speed.ROWS["lfdn_cifar10"], **speed.ROWS["lfdn_cifar10"]["tiny"], "batches": [64]}
    r = speed.lfdn_row("lfdn_cifar10", cfg, "fp32", True, speed.pick_device("cpu"), 0.05)
    assert r["fwd"] == cfg["minimal"] == 4  # variant code, t = 3: 2 LFDN calls, final + first-epoch model
    assert r["img_s"] > 0 and r["bare"] > 0


def test_speed_diffnb_row_with_cast_weights_and_compile(single_thread):
    """bf16 weights + a compiled backbone (dynamo with the eager backend: no codegen on CI) still count
    exactly the minimal UNet rows: the counter sits outside the compiled region."""
    import diffnb_speed
    import speed
    from _speed import compile_option

    assert compile_option(None) is False and compile_option("default") is True
    assert compile_option("max-autotune") == {"mode": "max-autotune"}
    assert compile_option("backend=eager,mode=default") == {"backend": "eager", "mode": "default"}
    cfg = {**speed.ROWS["diffnb_cifar10"], **speed.ROWS["diffnb_cifar10"]["tiny"]}
    r = speed.diffnb_row("diffnb_cifar10", cfg, "bf16-cast", True, speed.pick_device("cpu"), 0.05, "backend=eager")
    assert r["fwd"] == cfg["minimal"] == 4 and r["img_s"] > 0
    _, _, _, model, _ = diffnb_speed.build(False, "bf16-cast", [40], 1, speed.pick_device("cpu"), {"backend": "eager"})
    assert model.weights_dtype == torch.bfloat16 and model.compile_options == {"backend": "eager"}


@pytest.mark.slow
@pytest.mark.parametrize("row, minimal", [("diffguard_cifar10", 12), ("diffguard_gdm_imagenet_speedcfg", 8)])
def test_speed_diffguard_rows_count_the_minimal_forwards(row, minimal):
    """cifar: 4 inversion steps (null class) + 4 CFG steps x 2; GDM speed config: 3 fixed inversion steps +
    5 guided steps (forback_skip 3), no unconditional twin."""
    import speed

    cfg = {**speed.ROWS[row], **speed.ROWS[row]["tiny"]}
    r = speed.diffguard_row(row, cfg, "fp32", True, speed.pick_device("cpu"), 0.1)
    assert r["fwd"] == cfg["minimal"] == minimal


@pytest.mark.slow
def test_cifar_osr_tiny_runs_end_to_end(tmp_path):
    if not (cifar_osr.DATA / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"no CIFAR-10 JPEG archive in {cifar_osr.DATA}: set $OPENOOD_DIFFGUARD_CIFAR10 to its folder")
    out = tmp_path / "osr.md"
    assert cifar_osr.main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "CPU smoke run, not a result" in text and "| DiffGuard |" in text and "| DiffGuard + EBO (cascade) |" in text
    assert (tmp_path / "osr_roc.png").is_file()


def _speed_row(method: str, official: float, ours: float) -> dict:
    return {"method": method, "n": 8, "times": {"official": {"wall": official, "cpu": official},
                                                "ours": {"wall": ours, "cpu": ours}},
            "counts": {s: {"diffusion": 3.0, "classifier": 1.0} for s in ("official", "ours")},
            "why": f"why {method} {official}", "config": f"config {method}", "agreement": "n/a"}


def test_official_speed_report_re_run_of_one_method_keeps_the_others(tmp_path):
    import argparse

    import official_speed

    args = argparse.Namespace(n=8, repeats=3, threads=1)
    out = tmp_path / "speed.md"
    official_speed.report([_speed_row(m, 2.0, 1.0) for m in official_speed.METHODS], args, out)
    first = out.read_text()
    official_speed.report([_speed_row("LFDN (DLSR)", 4.0, 1.0)], args, out)  # LFDN alone, other numbers
    text = out.read_text()
    for m in ("DiffGuard GDM", "DiffNB"):  # kept verbatim, with their measurement line
        assert [ln for ln in text.splitlines() if m in ln] == [ln for ln in first.splitlines() if m in ln]
    lfdn = [ln for ln in text.splitlines() if ln.startswith("| LFDN (DLSR) | ours")]
    assert len(lfdn) == 1 and "**4.00× / 4.00×**" in lfdn[0]
    assert "why LFDN (DLSR) 4.0" in text and "why LFDN (DLSR) 2.0" not in text
    assert text.count("| LFDN (DLSR) |") == 2 and text.count("- measured:") == 3


def test_budget_subsample_is_a_fixed_subset():
    import budget

    a = budget.subsample(100, 30, seed=1)
    assert len(a) == 30 and len(set(a)) == 30 and (np.diff(a) > 0).all() and a.max() < 100
    np.testing.assert_array_equal(a, budget.subsample(100, 30, seed=1))
    assert not np.array_equal(a, budget.subsample(100, 30, seed=2))
    np.testing.assert_array_equal(budget.subsample(10, None, seed=0), np.arange(10))
    np.testing.assert_array_equal(budget.subsample(10, 50, seed=0), np.arange(10))
