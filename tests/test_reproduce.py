"""benchmarks/reproduce: every README command parses, every config it names resolves and builds its
detector / fusion object (no weights are loaded); with OpenOOD importable, through OpenOOD's own
``setup_config`` merge (run from its checkout's configs) and our main.py factory."""
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from openood_diffguard.fusion.presets import parse_fusion_config
from openood_diffguard.metrics import ood_metrics
from openood_diffguard.openood.registration import packaged_configs
from openood_diffguard.runtime.registry import build_detector

ROOT = Path(__file__).resolve().parents[1]
REPRO = ROOT / "benchmarks" / "reproduce"
OPENOOD_POSTPROCESSORS = {"ebo", "knn", "mls", "vim"}
WRAPPER_KEYS = ("cache_dir", "cache", "detector")


def commands() -> list[list[str]]:
    text = (REPRO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    cmds = [shlex.split(ln.replace("$REPRO", str(REPRO))) for ln in lines if ln.startswith("python -m openood_diffguard.openood.main")]
    return cmds


def split_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(--config entries, {key: value} overrides) of a main.py command line, as OpenOOD reads it."""
    assert argv[:3] == ["python", "-m", "openood_diffguard.openood.main"] and argv[3] == "--config", argv[:4]
    configs, i = [], 4
    while i < len(argv) and not argv[i].startswith("--"):
        configs.append(argv[i])
        i += 1
    rest = argv[i:]
    assert len(rest) % 2 == 0 and all(k.startswith("--") and not v.startswith("--") for k, v in zip(rest[::2], rest[1::2])), rest
    return configs, {k[2:]: v for k, v in zip(rest[::2], rest[1::2])}


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def our_postprocessor(configs: list[str]) -> dict | None:
    """Merged ``postprocessor`` section of our presets + stacked override ymls (None for OpenOOD's own)."""
    merged, ours = {}, False
    for c in configs:
        if c in packaged_configs():
            ours = True
            merged = deep_merge(merged, yaml.safe_load(packaged_configs()[c].read_text()))
        elif c.startswith(str(REPRO)):
            assert Path(c).is_file(), c
            merged = deep_merge(merged, yaml.safe_load(Path(c).read_text()))
        else:
            assert c.startswith("configs/") and c.endswith(".yml"), f"not an OpenOOD config path: {c}"
    return merged["postprocessor"] if ours else None


CMDS = commands()


def test_readme_has_every_row():
    runs = [(split_args(c)[0][0], split_args(c)[1]["mark"]) for c in CMDS]
    assert len(runs) == len(set(runs)) == 13  # unique output folders (dataset, mark)
    presets = {cfg for c in CMDS for cfg in split_args(c)[0] if cfg in packaged_configs()}
    assert presets == {"diffguard_cifar10", "fusion_diffguard_ebo_cifar10", "diffnb_cifar10", "lfdn_cifar10",
                       "diffguard_gdm_imagenet", "diffguard_ldm_imagenet", "fusion_diffguard_knn_imagenet",
                       "fusion_diffguard_vim_imagenet", "fusion_diffguard_mls_imagenet"}
    used = {Path(cfg).name for c in CMDS for cfg in split_args(c)[0] if cfg.startswith(str(REPRO))}
    assert used == {p.name for p in (REPRO / "configs").glob("*.yml")}  # no stale override file
    text = (REPRO / "README.md").read_text()
    parts = re.split(r"(```bash\n.*?```)", text, flags=re.S)
    for prose, block in zip(parts[::2], parts[1::2]):  # every run command has expected numbers right above it
        if "openood_diffguard.openood.main" in block:
            assert "expected" in prose and re.search(r"\d+\.\d+ / \d+\.\d+", prose), prose


@pytest.mark.parametrize("argv", CMDS, ids=lambda c: Path(split_args(c)[0][0]).parent.name + "-" + split_args(c)[1]["mark"])
def test_command_resolves_and_builds(argv):
    configs, over = split_args(argv)
    assert over["network.pretrained"] == "True" and over["network.checkpoint"]
    imagenet = "configs/networks/resnet50.yml" in configs
    assert ("imagenet" in over["network.checkpoint"] or "resnet50" in over["network.checkpoint"]) == imagenet
    pp = our_postprocessor(configs)
    if pp is None:
        name = Path(configs[-1]).stem
        assert name in OPENOOD_POSTPROCESSORS
        return
    args = pp["postprocessor_args"]
    if "baseline" in args:
        fusion = parse_fusion_config(pp)
        det_args = fusion.resolved_detector_args()
        assert det_args["model_path"].startswith("./models/")
        assert det_args["num_classes"] == (1000 if imagenet else None)  # CIFAR: from the logits, any class count
        fusion.build_fusion()
        det = build_detector(fusion.detector, **det_args)
    else:
        kwargs = {k: v for k, v in args.items() if k not in WRAPPER_KEYS}
        det = build_detector(pp["name"], **kwargs)
        path = kwargs.get("model_path") or kwargs.get("checkpoint")
        assert path and path.startswith("./models/"), path
    assert det.params.get("normalization", "imagenet" if imagenet else "cifar10") == ("imagenet" if imagenet else "cifar10")


def test_paper_metrics_script(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    id_conf, ood_conf = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    np.savez(tmp_path / "cifar10.npz", pred=np.zeros(300, int), conf=id_conf, label=np.zeros(300, int))
    np.savez(tmp_path / "tin.npz", pred=np.zeros(200, int), conf=ood_conf, label=-np.ones(200, int))
    monkeypatch.syspath_prepend(str(REPRO))
    import paper_metrics

    assert paper_metrics.main([str(tmp_path), "--id", "cifar10", "--near", "tin"]) == 0
    m = ood_metrics(np.r_[id_conf, ood_conf], np.r_[np.zeros(300, int), -np.ones(200, int)])
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tin"))
    assert f"{100 * m.fpr95_id_positive:.2f}" in row and f"{100 * m.auroc:.2f}" in row
    with pytest.raises(FileNotFoundError, match="save_scores"):
        paper_metrics.main([str(tmp_path), "--id", "cifar10", "--near", "ninco"])


@pytest.mark.openood
@pytest.mark.parametrize("argv", CMDS, ids=lambda c: Path(split_args(c)[0][0]).parent.name + "-" + split_args(c)[1]["mark"])
def test_command_through_openood_setup_config(argv, monkeypatch):
    openood = pytest.importorskip("openood", reason="OpenOOD not installed")
    checkout = Path(openood.__file__).resolve().parent.parent
    if not (checkout / "configs" / "datasets").is_dir():
        pytest.skip(f"no OpenOOD configs/ next to {openood.__file__}")
    from openood.utils import setup_config

    from openood_diffguard.openood.main import resolve_config_args
    from openood_diffguard.openood import register
    from openood_diffguard.openood.registration import build_postprocessor

    register(evaluator=False)
    monkeypatch.chdir(checkout)
    for cfg in split_args(argv)[0]:
        assert cfg in packaged_configs() or Path(cfg).is_file(), f"{cfg} does not resolve in {checkout}"
    monkeypatch.setattr(sys, "argv", ["main.py", *resolve_config_args(argv[3:])])
    config = setup_config()
    assert config.network.pretrained is True and config.network.checkpoint == split_args(argv)[1]["network.checkpoint"]
    pp = build_postprocessor(config)
    if pp is None:
        from openood.postprocessors import get_postprocessor

        pp = get_postprocessor(config)
        assert type(pp).__name__.lower().startswith(config.postprocessor.name[:3])
        return
    det = getattr(pp, "diffusion", pp).detector
    path = det.params.get("model_path") or det.params.get("checkpoint")
    assert path.startswith("./models/")
    assert os.path.basename(path) in {"diffnb-cifar10", "adm256-uncond", "ldm-cin256-v2", "lfdn_cifar10_resnet18.pt"}
    if "ldm" in split_args(argv)[1]["mark"]:
        assert det.params["model_type"] == "ldm"
