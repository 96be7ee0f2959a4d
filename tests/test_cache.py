import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ood_toys import ToyDetector, batches, tiny_net
from openood_diffguard.cache import (ScoreCache, cached_statistics, module_fingerprint, namespace, sample_keys)

HERE = Path(__file__).parent


def test_put_lookup_roundtrip_and_other_process_sees_it(tmp_path):
    c = ScoreCache(tmp_path, "ns")
    c.put(["a", "b"], {"pred": torch.tensor([1, 2]), "s": torch.tensor([[0.5, 1.0], [2.0, 3.0]])})
    found, rows = c.lookup(["b", "x", "a"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(rows["s"], [[2.0, 3.0], [0.5, 1.0]])
    other = ScoreCache(tmp_path, "ns")  # a second reader (another rank / a resumed run)
    assert len(other) == 2 and "a" in other
    c.put(["c"], {"pred": np.array([0]), "s": np.array([[9.0, 9.0]])})
    assert "c" in other  # refresh picks up new chunks
    other.compact()
    assert len(list(other.dir.glob("chunk-*.npz"))) == 1 and len(ScoreCache(tmp_path, "ns")) == 3
    with pytest.raises(ValueError, match="leading dim"):
        c.put(["d", "e"], {"s": np.zeros(3)})


def test_unreadable_chunk_is_skipped_with_warning(tmp_path):
    c = ScoreCache(tmp_path, "ns")
    c.put(["a"], {"pred": np.array([1])})
    (c.dir / "chunk-garbage.npz").write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable chunk"):
        assert len(ScoreCache(tmp_path, "ns")) == 1


def test_cached_statistics_reuses_rows_and_cheap_params(tmp_path):
    net, det, data = tiny_net(), ToyDetector(), batches()
    cache = ScoreCache(tmp_path, namespace(det.cache_key(), module_fingerprint(net)))
    stats, labels, _, _ = cached_statistics(det, net, data, cache, progress=False)
    assert det.scored == 20 and labels.shape == (20,) and cache.computed_rows == 20
    ref = torch.cat([net(b["data"]).max(1).values for b in data]).detach().numpy()
    np.testing.assert_allclose(stats["maxlogit"], ref, rtol=1e-6)
    again, *_ = cached_statistics(det, net, list(reversed(data)), cache, progress=False)  # other order
    assert det.scored == cache.computed_rows == 20  # nothing recomputed (OpenOOD's duplicate ID pass, APS grid points)
    np.testing.assert_allclose(again["maxlogit"][-6:], ref[:6], rtol=1e-6)  # rows follow loader order
    det.set_params(sign=-1.0)
    assert namespace(det.cache_key(), module_fingerprint(net)) == cache.dir.name  # cheap: same rows
    det.set_params(steps=3)
    assert namespace(det.cache_key(), module_fingerprint(net)) != cache.dir.name  # expensive: new rows
    assert module_fingerprint(tiny_net(seed=1)) != module_fingerprint(net)


def test_sample_keys():
    b = batches(n=3, bs=3)[0]
    assert sample_keys(b, "src") == ["src::img/0000.png", "src::img/0001.png", "src::img/0002.png"]
    assert sample_keys({"index": torch.tensor([4])}, "s") == ["s::#4"]
    with pytest.raises(KeyError, match="image_name"):
        sample_keys({"data": 1}, "s")


WORKER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {here!r})
    import openood_diffguard
    from ood_toys import ToyDetector, batches, tiny_net
    from openood_diffguard.cache import ScoreCache, cached_statistics
    det = ToyDetector(delay=0.15)
    cache = ScoreCache({root!r}, "ns")
    class Loud(list):
        def __iter__(self):
            for i, b in enumerate(list.__iter__(self)):
                yield b
                print("batch", i, len(cache), flush=True)
    cached_statistics(det, tiny_net(), Loud(batches(n=60, bs=5)), cache, progress=False)
    print("finished", flush=True)
""")


def test_kill_9_resume_loses_nothing_and_recomputes_nothing(tmp_path):
    script = WORKER.format(here=str(HERE), root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL, cwd=HERE.parent)
    stored_before_kill = 0
    for line in proc.stdout:
        if line.startswith("batch"):
            stored_before_kill = int(line.split()[2])
            if stored_before_kill >= 15:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and 15 <= stored_before_kill < 60
    cache = ScoreCache(tmp_path, "ns")
    survived = len(cache)
    assert stored_before_kill <= survived < 60  # every row written before the kill survived
    assert not list(cache.dir.glob("chunk-*.tmp*"))
    det, net = ToyDetector(), tiny_net()
    stats, *_ = cached_statistics(det, net, batches(n=60, bs=5), cache, progress=False)
    assert det.scored == 60 - survived  # resume computes only what is missing
    ref = torch.cat([net(b["data"]).max(1).values for b in batches(n=60, bs=5)]).detach().numpy()
    np.testing.assert_allclose(stats["maxlogit"], ref, rtol=1e-6)


def test_batch_hook_selects_and_returns_extras(tmp_path):
    net, det, data = tiny_net(), ToyDetector(), batches(n=12, bs=4)
    hook = lambda x: (torch.arange(x.shape[0]) % 2 == 0, {"s": x.sum((1, 2, 3))})  # noqa: E731
    out = cached_statistics(det, net, data, None, progress=False, batch_hook=hook)
    assert det.scored == 6 and out.selected.tolist() == [True, False] * 6
    assert np.isnan(out.stats["maxlogit"][1]) and out.stats["pred"][1] == -1 and not np.isnan(out.stats["maxlogit"][0])
    np.testing.assert_allclose(out.extras["s"], torch.cat([b["data"].sum((1, 2, 3)) for b in data]).numpy(), rtol=1e-6)
