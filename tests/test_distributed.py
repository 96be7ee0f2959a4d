"""torchrun-style sharding with the gloo backend on CPU, 2 processes."""
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from ood_toys import ToyDetector, batches, tiny_net  # noqa: E402
from openood_diffguard.runtime.cache import ScoreCache, cached_statistics, sample_keys  # noqa: E402
from openood_diffguard.runtime.distributed import owned  # noqa: E402


def _worker(rank, world, init_file, cache_root, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        det = ToyDetector()
        data = batches(n=22, bs=5)
        if rank == 1:
            data = list(reversed(data))  # ranks may see different orders (shuffling loaders)
        out = cached_statistics(det, tiny_net(), data, ScoreCache(cache_root, "ns"), progress=False)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), maxlogit=out.stats["maxlogit"], scored=det.scored)
    finally:
        dist.destroy_process_group()


def test_two_rank_sharding_gathers_everything(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "cache"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    keys = [k for b in batches(n=22, bs=5) for k in sample_keys(b, "batches")]
    share = [int(owned(keys, r, 2).sum()) for r in (0, 1)]
    assert int(r0["scored"]) == share[0] and int(r1["scored"]) == share[1] and sum(share) == 22
    assert 0 < share[0] < 22
    assert not (owned(keys, 0, 2) & owned(keys, 1, 2)).any()
    net = tiny_net()
    ref = torch.cat([net(b["data"]).max(1).values for b in batches(n=22, bs=5)]).detach().numpy()
    np.testing.assert_allclose(r0["maxlogit"], ref, rtol=1e-6)  # rank 0 has every sample, in its loader order
    ref1 = torch.cat([net(b["data"]).max(1).values for b in reversed(batches(n=22, bs=5))]).detach().numpy()
    np.testing.assert_allclose(r1["maxlogit"], ref1, rtol=1e-6)
    det = ToyDetector()  # the shared cache holds every row: a single-process rerun computes nothing
    cached_statistics(det, net, batches(n=22, bs=5), ScoreCache(tmp_path / "cache", "ns"), progress=False)
    assert det.scored == 0
