import pytest
import torch

import openood_diffguard  # noqa: F401  (imported first: repairs torchvision before pytorch-ood / piq import it)

torch.set_num_threads(2)


@pytest.fixture
def linear_schedule():
    from openood_diffguard.diffusion import NoiseSchedule

    return NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's small models single-threaded: on the shared 2-core CI box two OpenMP threads spin
    against other processes (a 16x16 conv measured 76 ms with 2 threads vs 0.7 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything (OpenOOD's Evaluator config fetch) tries to download."""
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, *a, **k: pytest.fail(f"download attempted: {url}"))


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``openood-diffguard demo --quick`` run once per session: (output folder, cache folder). Shared by the
    demo's tests and the report's browser test (the run takes about a minute and a half on 2 cores)."""
    from openood_diffguard.cli import main

    out = tmp_path_factory.mktemp("demo_out")
    cache = tmp_path_factory.mktemp("demo_cache")
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]) == 0
    return out, cache
