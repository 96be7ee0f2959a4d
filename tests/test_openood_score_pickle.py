"""A score pickle written by OpenOOD itself (the Evaluator's ``scores``, dumped as ``scripts/eval_ood.py
--save-score`` does) loads through the restricted unpickler of ``fuse`` (no ``--trust-pickle``)."""
import pickle
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.openood

from openood_bench import openood_root, build_bench, cpu_shim, load_net  # noqa: E402,F401


def test_evaluator_scores_pickle_loads_without_trust(tmp_path, no_download):
    import torch
    from openood.evaluation_api import Evaluator

    from openood_diffguard.fusion.scores_io import load_pickle, load_scores

    bench = build_bench(tmp_path)
    shutil.copy(openood_root() / "configs" / "postprocessors" / "msp.yml", bench / "configs" / "postprocessors")
    ev = Evaluator(load_net(bench), id_name="cifar10", data_root=str(bench / "data"),
                   config_root=str(bench / "configs"), postprocessor_name="msp", batch_size=16, num_workers=0)
    ev.eval_ood()
    path = tmp_path / "scores" / "msp.pkl"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump(ev.scores, f, pickle.HIGHEST_PROTOCOL)  # scripts/eval_ood.py, line for line
    assert torch.is_tensor(ev.scores["id_preds"])  # a genuine pickle holds tensors, not only numpy arrays
    raw = load_pickle(path)
    assert torch.equal(raw["id_preds"], ev.scores["id_preds"])
    loaded = load_scores(path)
    expected = {"id_test": ev.scores["id"]["test"],
                **{f"{g}/{n}": ev.scores["ood"][g][n] for g in ("near", "far") for n in ev.scores["ood"][g]}}
    assert set(loaded) == set(expected)
    for name, (pred, conf, gt) in expected.items():
        np.testing.assert_array_equal(loaded[name]["conf"], conf)
        np.testing.assert_array_equal(loaded[name]["pred"], pred)
        np.testing.assert_array_equal(loaded[name]["label"], gt if name == "id_test" else -np.ones_like(gt))
