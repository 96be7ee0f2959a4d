import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ood_toys import ToyDetector, batches, tiny_net
from openood_diffguard.runtime.cache import (ScoreCache, cached_statistics, module_fingerprint, namespace, sample_keys)

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
    from openood_diffguard.runtime.cache import ScoreCache, cached_statistics
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
    assert not list(cache.dir.glob(".tmp*"))  # opening the cache removed the killed writer's temp file, if any
    det, net = ToyDetector(), tiny_net()
    stats, *_ = cached_statistics(det, net, batches(n=60, bs=5), cache, progress=False)
    assert det.scored == 60 - survived  # resume computes only what is missing
    ref = torch.cat([net(b["data"]).max(1).values for b in batches(n=60, bs=5)]).detach().numpy()
    np.testing.assert_allclose(stats["maxlogit"], ref, rtol=1e-6)
    assert not list(cache.dir.glob("claim-*")) and not list(cache.dir.glob(".tmp*"))


def _start(script, *args):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.PIPE, cwd=HERE.parent)


def _reference(n, bs):
    net = tiny_net()
    return torch.cat([net(b["data"]).max(1).values for b in batches(n=n, bs=bs)]).detach().numpy()


MID_WRITE_KILL = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {here!r})
    import openood_diffguard
    from openood_diffguard.runtime import cache as C
    from ood_toys import ToyDetector, batches, tiny_net
    real, calls = C.np.savez, []
    def slow_savez(f, **arrays):  # the 4th chunk hangs half-written: the kill lands inside the write
        calls.append(1)
        if len(calls) == 4:
            f.write(b"PK partial chunk"); f.flush(); print("writing", flush=True); time.sleep(60)
        real(f, **arrays)
    C.np.savez = slow_savez
    C.cached_statistics(ToyDetector(), tiny_net(), batches(n=60, bs=5), C.ScoreCache({root!r}, "ns"), progress=False)
""")


def test_kill_9_mid_write_leaves_no_temp_file_after_next_open(tmp_path):
    proc = _start(MID_WRITE_KILL.format(here=str(HERE), root=str(tmp_path)))
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ns = tmp_path / "ns"
    assert len(list(ns.glob(".tmp*"))) == 1 and len(list(ns.glob("claim-*.lock"))) == 1  # what the kill left
    cache = ScoreCache(tmp_path, "ns")
    assert not list(ns.glob(".tmp*")) and not list(ns.glob("claim-*"))  # dead writer's files removed on open
    assert len(cache) == 15  # the three chunks written before the kill are intact
    det = ToyDetector()
    stats, *_ = cached_statistics(det, tiny_net(), batches(n=60, bs=5), cache, progress=False)
    assert det.scored == 45
    np.testing.assert_allclose(stats["maxlogit"], _reference(60, 5), rtol=1e-6)


def _hold(root, keys):
    """Hold the claim on ``keys`` through a second open file (flock conflicts between open files even in one
    process, so this stands for another process). ``_die(claim)`` drops the lock but leaves the file: what
    the kernel does when a holder is killed."""
    claim = ScoreCache(root, "ns").claim(keys)
    assert claim is not None and claim.fd is not None
    return claim


def _die(claim):
    os.close(claim.fd)
    claim.fd = None


def test_clean_removes_only_abandoned_files(tmp_path):
    from openood_diffguard.runtime.cache import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held = _hold(tmp_path, ["held"])
    abandoned = _hold(tmp_path, ["abandoned"])
    _die(abandoned)
    ns = tmp_path / "ns"
    old = time.time() - 7200
    files = {
        "dead_writer": (f".tmp~{_HOST}~{dead.pid}~ab12.npz", None, False),
        "live_writer": (f".tmp~{_HOST}~{os.getpid()}~ab13.npz", None, True),  # this process: alive
        "other_host_fresh": (".tmp~elsewhere~1~ab14.npz", None, True),  # cannot check the pid: age decides
        "other_host_old": (".tmp~elsewhere~1~ab15.npz", old, False),
        "legacy_fresh": (".tmp-chunk-1-ab16.npz", None, True),
        "legacy_old": (".tmp-chunk-1-ab17.npz", old, False),
    }
    for name, mtime, _ in files.values():
        (ns / name).write_bytes(b"x")
        if mtime:
            os.utime(ns / name, (mtime, mtime))
    ScoreCache(tmp_path, "ns")  # opening cleans
    for what, (name, _, kept) in files.items():
        assert (ns / name).exists() == kept, what
    assert held.path.exists() and not abandoned.path.exists()
    held.release()
    assert not list(ns.glob("claim-*"))


SHARER = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {here!r})
    import openood_diffguard
    from pathlib import Path
    from ood_toys import ToyDetector, batches, tiny_net
    from openood_diffguard.runtime.cache import ScoreCache, cached_statistics
    go = Path({go!r})
    print("ready", flush=True)
    while not go.exists():  # start both processes together
        time.sleep(0.01)
    det = ToyDetector(delay=0.1)
    out = cached_statistics(det, tiny_net(), batches(n=60, bs=5), ScoreCache({root!r}, "ns"), progress=False)
    np.savez(sys.argv[1], maxlogit=out.stats["maxlogit"], scored=det.scored)
""")


def test_two_processes_on_one_cache_split_the_work(tmp_path):
    """Two independent processes, same loader, one cache: every sample computed exactly once in total, and
    both return every row, equal to a single process's result."""
    script = SHARER.format(here=str(HERE), root=str(tmp_path / "cache"), go=str(tmp_path / "go"))
    procs = [_start(script, tmp_path / f"p{i}.npz") for i in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    (tmp_path / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    outs = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    scored = [int(o["scored"]) for o in outs]
    assert sum(scored) == 60, scored  # without claims: 120 (each process computes everything)
    ref = _reference(60, 5)
    for o in outs:
        np.testing.assert_allclose(o["maxlogit"], ref, rtol=1e-6)
    single = ToyDetector()
    alone, *_ = cached_statistics(single, tiny_net(), batches(n=60, bs=5), ScoreCache(tmp_path / "alone", "ns"),
                                  progress=False)
    np.testing.assert_array_equal(outs[0]["maxlogit"], alone["maxlogit"])
    assert not list((tmp_path / "cache" / "ns").glob("claim-*"))


def _batch_keys(i, n=20, bs=5):
    return sample_keys(batches(n=n, bs=bs)[i], "batches")


def test_batch_of_a_dead_holder_is_computed_by_the_waiter(tmp_path):
    holder = _hold(tmp_path, _batch_keys(1))
    threading.Timer(0.5, _die, (holder,)).start()  # dies holding batch 1
    det = ToyDetector()
    t0 = time.monotonic()
    stats, *_ = cached_statistics(det, tiny_net(), batches(n=20, bs=5), ScoreCache(tmp_path, "ns", poll=0.05),
                                  progress=False)
    assert time.monotonic() - t0 >= 0.45  # it waited for the holder instead of computing batch 1 at once
    assert det.scored == 20  # then computed batch 1 itself, once
    np.testing.assert_allclose(stats["maxlogit"], _reference(20, 5), rtol=1e-6)
    assert not list((tmp_path / "ns").glob("claim-*"))


def test_rows_of_a_live_holder_are_awaited_not_recomputed(tmp_path):
    holder = _hold(tmp_path, _batch_keys(2))

    def finish():  # the other process computes batch 2 and releases its claim
        net, b = tiny_net(), batches(n=20, bs=5)[2]
        ScoreCache(tmp_path, "ns").put(_batch_keys(2), ToyDetector().statistics(net, b["data"]))
        holder.release()

    threading.Timer(0.5, finish).start()
    det = ToyDetector()
    stats, *_ = cached_statistics(det, tiny_net(), batches(n=20, bs=5), ScoreCache(tmp_path, "ns", poll=0.05),
                                  progress=False)
    assert det.scored == 15  # batch 2 came from the other process
    np.testing.assert_allclose(stats["maxlogit"], _reference(20, 5), rtol=1e-6)


def test_batch_held_too_long_is_computed_here_after_the_timeout(tmp_path):
    holder = _hold(tmp_path, _batch_keys(2))
    det = ToyDetector()
    with pytest.warns(UserWarning, match="more than 0.3 s"):
        stats, *_ = cached_statistics(det, tiny_net(), batches(n=20, bs=5),
                                      ScoreCache(tmp_path, "ns", claim_timeout=0.3, poll=0.05), progress=False)
    assert det.scored == 20
    np.testing.assert_allclose(stats["maxlogit"], _reference(20, 5), rtol=1e-6)
    holder.release()


def test_one_shot_iterator_computes_without_claims(tmp_path):
    """A generator cannot be read twice (no second pass possible): claims are off for it."""
    holder = _hold(tmp_path, _batch_keys(0))
    det = ToyDetector()
    stats, *_ = cached_statistics(det, tiny_net(), iter(batches(n=20, bs=5)), ScoreCache(tmp_path, "ns"),
                                  progress=False)
    assert det.scored == 20
    np.testing.assert_allclose(stats["maxlogit"], _reference(20, 5), rtol=1e-6)
    holder.release()


def test_batch_hook_selects_and_returns_extras(tmp_path):
    net, det, data = tiny_net(), ToyDetector(), batches(n=12, bs=4)
    hook = lambda x: (torch.arange(x.shape[0]) % 2 == 0, {"s": x.sum((1, 2, 3))})  # noqa: E731
    out = cached_statistics(det, net, data, None, progress=False, batch_hook=hook)
    assert det.scored == 6 and out.selected.tolist() == [True, False] * 6
    assert np.isnan(out.stats["maxlogit"][1]) and out.stats["pred"][1] == -1 and not np.isnan(out.stats["maxlogit"][0])
    np.testing.assert_allclose(out.extras["s"], torch.cat([b["data"].sum((1, 2, 3)) for b in data]).numpy(), rtol=1e-6)
