"""The built wheel, not the source tree: metadata (one version, dependencies where they are used, the extras),
the presets as real package data, and (slow) an install into a fresh virtual environment that runs."""
import email
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import openood_diffguard

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.name for p in (REPO / "openood_diffguard" / "configs" / "postprocessors").glob("*.yml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                          str(REPO)], capture_output=True, text=True, timeout=600, cwd=out)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = out.glob("openood_diffguard-*.whl")
    return path


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_string(z.read(name).decode())


def test_wheel_carries_presets_license_and_one_version(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        shipped = sorted(Path(n).name for n in names if n.startswith("openood_diffguard/configs/postprocessors/"))
        assert shipped == PRESETS and len(PRESETS) >= 12
        for n in names:  # real files, not links (a symlink in a zip would be a mode bit on an entry)
            assert (z.getinfo(n).external_attr >> 16) & 0o170000 != 0o120000, n
        assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names)
    meta = _metadata(wheel)
    assert meta["Version"] == openood_diffguard.__version__ and f"-{openood_diffguard.__version__}-" in wheel.name
    cfg = (REPO / "setup.cfg").read_text()  # the version is written once, in openood_diffguard/__init__.py
    assert "version = attr: openood_diffguard.__version__" in cfg and openood_diffguard.__version__ not in cfg


def test_dependencies_sit_where_they_are_used(wheel):
    requires = _metadata(wheel).get_all("Requires-Dist")
    core = {r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert core == {"torch", "torchvision", "diffusers", "piq", "pyyaml", "scikit-learn", "numpy", "tqdm"}
    extras = {}
    for r in requires:
        if "extra ==" in r:
            name = r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip()
            extras.setdefault(r.split("extra ==")[1].strip().strip("'\""), set()).add(name)
    assert set(extras) == {"demo", "baselines", "openood", "test", "sd"}
    assert "grad-cam" in extras["test"] and not any("grad-cam" in v for k, v in extras.items() if k != "test")
    assert {"matplotlib", "pytorch-ood"} <= extras["demo"] and {"matplotlib", "pytorch-ood"} <= extras["test"]
    assert {"numpy", "faiss-cpu", "imgaug", "statsmodels", "timm", "foolbox"} <= extras["openood"]
    assert "faiss-gpu" not in extras["openood"]


@pytest.mark.slow
def test_installed_wheel_runs_in_a_fresh_venv(wheel, tmp_path):
    """Installed (not editable) into a new venv that sees this environment's torch & co: the command line, the
    packaged presets and a detector built from one, run from a folder that is not the source tree."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    script = env_dir / "bin" / "openood-diffguard"
    for args in (["--version"], ["--help"], ["demo", "--help"], ["eval", "--help"], ["info"]):
        res = subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, (args, res.stderr[-3000:])
    assert openood_diffguard.__version__ in subprocess.run([str(script), "--version"], env=env, capture_output=True,
                                                           text=True, cwd=tmp_path).stdout
    code = """
import openood_diffguard, sys
from pathlib import Path
assert Path(openood_diffguard.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), openood_diffguard.__file__
from openood_diffguard.openood.registration import packaged_configs, read_postprocessor_section
from openood_diffguard.openood.sections import detector_from_section
assert len(packaged_configs()) >= 16
det, _ = detector_from_section(read_postprocessor_section(packaged_configs()["diffnb_cifar10"]))
print("OK", type(det).__name__)
"""
    res = subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0 and "OK DiffNB" in res.stdout, res.stderr[-3000:]
    res = subprocess.run([str(script), "eval", "--config", "nope"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("error:") == 1, res.stderr
