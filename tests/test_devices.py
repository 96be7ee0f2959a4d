"""The --device option and the CPU routing of OpenOOD's hard-coded .cuda() calls (no OpenOOD needed)."""
import argparse

import pytest
import torch

from openood_diffguard.runtime.devices import (device_argument, openood_device, release_openood_device, resolve_device,
                                       use_openood_device)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_device_spelling_is_checked_without_torch_semantics():
    assert [device_argument(s) for s in ("auto", "CPU", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    for bad in ("mps", "gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not a supported device"):
            device_argument(bad)


@needs_no_cuda
def test_resolve_device_without_cuda():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")


@needs_no_cuda
def test_cpu_routing_is_scoped(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()
    with openood_device("auto") as device:
        assert device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu" and net.cuda() is net
        assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == {"weight", "bias"}
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()


@needs_no_cuda
def test_process_wide_routing_leaves_other_patches_alone(monkeypatch):
    """A test fixture's own .cuda() shim installed before use_openood_device and undone after it must not be
    brought back when the routing is released later."""
    original = torch.Tensor.cuda
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: "shim")
        use_openood_device("cpu")
        assert torch.ones(1).cuda().device.type == "cpu"  # ours, on top of the shim
    assert torch.Tensor.cuda is original  # the fixture restored the original over ours
    use_openood_device("cpu")  # releases the stale install (without restoring the shim), installs again
    assert torch.ones(1).cuda().device.type == "cpu"
    release_openood_device()
    assert torch.Tensor.cuda is original
