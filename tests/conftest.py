"""Shared fixtures and the suite's skip policy.

Tests marked ``openood`` need a real OpenOOD v1.5 (docs/openood.md, "Install"). When OpenOOD is not
installed they are skipped with that reason; when it is installed but does not import, they fail (a broken
install must not pass as "skipped"). ``OPENOOD_DIFFGUARD_NO_SKIP=1`` (CI sets it) turns every skip, of a test
or of a whole module at collection, into a failure: CI cannot go green while silently not running a test.
"""
import importlib.util
import os
from functools import lru_cache

import pytest
import torch

import openood_diffguard  # noqa: F401  (imported first: repairs torchvision before pytorch-ood / piq import it)

torch.set_num_threads(2)

NO_SKIP_ENV = "OPENOOD_DIFFGUARD_NO_SKIP"
OPENOOD_MISSING = "OpenOOD is not installed (install: docs/openood.md; CI installs the vendored 3c35632)"


def _no_skip() -> bool:
    return os.environ.get(NO_SKIP_ENV, "").strip() not in ("", "0")


@lru_cache(maxsize=None)
def _openood_status() -> str | None:
    """None when OpenOOD (with its Evaluator) imports; the skip reason when it is not installed. An installed
    OpenOOD that fails to import raises here, so its tests error instead of skipping."""
    if importlib.util.find_spec("openood") is None:
        return OPENOOD_MISSING
    import openood.evaluation_api  # noqa: F401
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("openood") is not None:
        reason = _openood_status()
        if reason is not None:
            pytest.skip(reason)


def _forbid_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and _no_skip():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped while {NO_SKIP_ENV}=1 forbids skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _forbid_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _forbid_skip(outcome.get_result())


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
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress", "--device", "cpu"]) == 0
    return out, cache
