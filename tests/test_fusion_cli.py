"""``fuse`` CLI, score-file loaders (ours and OpenOOD's pickles) and the fusion presets."""
import itertools
import json
import pickle

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from openood_diffguard.cli import main
from openood_diffguard.fusion import ScoreFusion
from openood_diffguard.fusion.cli import _ood_metrics
from openood_diffguard.fusion.presets import load_fusion_preset, parse_fusion_config, preset_dir
from openood_diffguard.fusion.scores_io import UnsafePickleError, align, load_scores, save_scores_npz

N = 600


def synthetic(seed=0):
    """Per split: (baseline conf, diffusion conf, label); half the OOD fools each detector."""
    rng = np.random.default_rng(seed)
    fool = rng.random(N) < 0.5

    def ood(far):
        return (np.where(fool, rng.normal(0, 1, N), rng.normal(-far, 1, N)),
                np.where(fool, rng.normal(-far, 1, N), rng.normal(0, 1, N)), -np.ones(N, int))

    def idd():
        return rng.normal(0, 1, N), rng.normal(0, 1, N), rng.integers(0, 10, N)

    return {"id_val": idd(), "id_test": idd(), "ood_val": ood(3), "near/cifar100": ood(3), "far/mnist": ood(5)}


def write_pair(tmp_path, data):
    save_scores_npz(tmp_path / "ebo.npz", {k: {"conf": v[0], "label": v[2]} for k, v in data.items()})
    save_scores_npz(tmp_path / "diffguard.npz", {k: {"conf": v[1], "label": v[2]} for k, v in data.items()})
    return tmp_path / "ebo.npz", tmp_path / "diffguard.npz"


def test_metrics_known_answers_both_fpr_conventions():
    # the table's columns come from openood_diffguard.metrics (itself checked against OpenOOD in test_metrics)
    conf_id, conf_ood = np.arange(100.0), np.arange(200.0) - 150.5  # OOD in [-150.5, 48.5], no ties
    m = _ood_metrics(conf_id, conf_ood)
    assert m["FPR@95_IDpos"] == pytest.approx(44 / 200)     # ID accepted at >= 5 lets OOD 5.5..48.5 through
    assert m["FPR@95_OpenOOD"] == pytest.approx(39 / 100)   # 95 % of OOD (<= 38.5) caught flags ID 0..38
    assert m["AUROC"] == pytest.approx(roc_auc_score(np.r_[np.ones(100), np.zeros(200)], np.r_[conf_id, conf_ood]))
    perfect = _ood_metrics(np.arange(10.0), np.arange(10.0) - 20)
    assert [perfect[k] for k in ("AUROC", "AUPR_IN", "AUPR_OUT", "FPR@95_OpenOOD")] == pytest.approx([1, 1, 1, 0])


def test_fuse_cli_on_npz(tmp_path, capsys):
    data = synthetic()
    a, b = write_pair(tmp_path, data)
    out_json = tmp_path / "m.json"
    assert main(["fuse", "--scores", str(a), str(b), "--rule", "cascade", "--param", "alpha_out=0.02",
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "FPR@95_OpenOOD" in text and "FPR@95_IDpos" in text and "cascade routed" in text
    rows = {(r["dataset"], r["score"]): r for r in json.loads(out_json.read_text())["rows"]}
    # independent recomputation of the fused row
    fusion = ScoreFusion("cascade", baseline="ebo", diffusion="diffguard", alpha_out=0.02)
    fusion.fit({"ebo": data["id_val"][0], "diffguard": data["id_val"][1]})
    fid = fusion({"ebo": data["id_test"][0], "diffguard": data["id_test"][1]})
    food = fusion({"ebo": data["near/cifar100"][0], "diffguard": data["near/cifar100"][1]})
    assert rows[("near/cifar100", "fused")]["AUROC"] == pytest.approx(
        roc_auc_score(np.r_[np.ones(N), np.zeros(N)], np.r_[fid, food]))
    for ds in ("near/cifar100", "far/mnist", "nearood", "farood"):
        assert rows[(ds, "fused")]["AUROC"] > max(rows[(ds, "ebo")]["AUROC"], rows[(ds, "diffguard")]["AUROC"])
    assert rows[("nearood", "fused")]["AUROC"] == rows[("near/cifar100", "fused")]["AUROC"]  # one-set group mean
    # --sweep (APS on ID-val vs OOD-val) reports that it used OOD-val
    assert main(["fuse", "--scores", str(a), str(b), "--rule", "rank", "--sweep", "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert res["uses_ood_val"] and res["params"]["w"] in ScoreFusion.sweep("rank")["w"]


def openood_pickle(path, data):
    """The structure of OpenOOD's evaluator.scores as scripts/eval_ood.py pickles it (val never filled)."""
    leaf = lambda s: [np.zeros(N, int), data[s][0], data[s][2]]  # noqa: E731  [pred, conf, gt]
    scores = {"id": {"train": None, "val": None, "test": leaf("id_test")}, "csid": {"cifar10c": None},
              "ood": {"val": None, "near": {"cifar100": leaf("near/cifar100"), "tin": None},
                      "far": {"mnist": leaf("far/mnist")}},
              "id_preds": None, "id_labels": None, "csid_preds": {"cifar10c": None}, "csid_labels": {"cifar10c": None}}
    with open(path, "wb") as f:
        pickle.dump(scores, f)


def test_openood_pickle_loader_and_fit_on_id_test_half(tmp_path, capsys):
    data = synthetic(1)
    openood_pickle(tmp_path / "ebo.pkl", data)
    loaded = load_scores(tmp_path / "ebo.pkl")
    assert set(loaded) == {"id_test", "near/cifar100", "far/mnist"}
    np.testing.assert_array_equal(loaded["near/cifar100"]["conf"], data["near/cifar100"][0])
    assert (loaded["far/mnist"]["label"] == -1).all()
    _, b = write_pair(tmp_path, data)
    # OpenOOD pickles hold no ID-val: a clear error, then the documented fallback works
    assert main(["fuse", "--scores", str(tmp_path / "ebo.pkl"), str(b)]) == 2
    assert "id_test_half" in capsys.readouterr().err
    assert main(["fuse", "--scores", str(tmp_path / "ebo.pkl"), str(b), "--fit-on", "id_test_half"]) == 0
    assert "far/mnist" in capsys.readouterr().out


class _Payload:
    """Unpickling this runs ``os.system`` (what a hostile 'score file' would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"echo pwned > {self.marker}",)


class _StoragePayload:
    """Hidden one level down: a 'tensor storage' whose bytes are themselves a hostile pickle (the stock
    ``torch.storage._load_from_bytes`` runs a full ``torch.load`` on them)."""

    def __init__(self, marker):
        self.inner = pickle.dumps(_Payload(marker))

    def __reduce__(self):
        import torch.storage

        return torch.storage._load_from_bytes, (self.inner,)


def _hostile_scores(tmp_path, payload):
    data = synthetic(4)
    path = tmp_path / "evil.pkl"
    openood_pickle(path, data)
    scores = pickle.loads(path.read_bytes())
    scores["id_preds"] = payload  # anywhere in the structure
    path.write_bytes(pickle.dumps(scores))
    return path, data


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", [_Payload, _StoragePayload])
def test_hostile_pickle_is_refused_not_executed(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    path, data = _hostile_scores(tmp_path, kind(marker))
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        load_scores(path)
    assert not marker.exists()  # nothing ran
    _, b = write_pair(tmp_path, data)
    assert main(["fuse", "--scores", str(path), str(b), "--fit-on", "id_test_half"]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "--trust-pickle" in err and not marker.exists()
    # the explicit opt-in is plain pickle.load: it does run the payload (the refusal above is not vacuous)
    try:
        load_scores(path, trust_pickle=True)
    except Exception:  # noqa: BLE001 - the storage payload then fails torch's magic-number check
        pass
    assert marker.read_text().strip() == "pwned"


def test_trust_pickle_opt_in_for_other_objects(tmp_path, capsys):
    from fractions import Fraction

    data = synthetic(5)
    path = tmp_path / "other.pkl"
    openood_pickle(path, data)
    scores = pickle.loads(path.read_bytes())
    scores["note"] = Fraction(1, 3)  # harmless, but not plain data: refused unless trusted
    path.write_bytes(pickle.dumps(scores))
    with pytest.raises(UnsafePickleError, match="fractions.Fraction"):
        load_scores(path)
    _, b = write_pair(tmp_path, data)
    assert main(["fuse", "--scores", str(path), str(b), "--fit-on", "id_test_half", "--trust-pickle"]) == 0
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle|refused"):
        load_scores(tmp_path / "junk.pkl")


# OpenOOD v1.5's evaluator.scores as scripts/eval_ood.py --save-score writes it (pickle.HIGHEST_PROTOCOL),
# written by numpy 1.26 + torch 2.13 in OpenOOD's environment: 4 samples per filled split, conf float32, and
# id_preds / id_labels as torch tensors (Evaluator.eval_acc stores them so). zlib + base64.
GENUINE_OPENOOD_PICKLE = (
    "eNrdVE9r1EAUz7+17a6VWrzYUy9CvCzdbi1d0C2oeDDrVuvBXErIJpNmJM3sTCaFCgu9FFuZm2Ox4gfw7pfwEL+G0I8gCPUl2aVWVrqHnnyQvOT"
    "NL7957/feZL/y4bSiFDaQptCwL3Nf4czFsewKfdeNwBkcJVxuwcp8nO709+oeYagOj4hhT4qaEzCy00uDADH5XprHiyWloioXTfsrLkWl4APv870+go"
    "8hhzV5dPhWbkrT0oV6X3a73adnYMXNUrjsWcaBFOojyQEUzpjHc0O6IAjWv2ed9WazCVeyLsNZoQUr53ThzfFk4a0R1WWZj7wM584/RKkwvKTQTkx7O"
    "HBZY8mT3UTohBSChgZoGCOXFeqOIEu5opNsqo7b9M/Csyxrfzo5aWdZpx0EP9oyXBhf1tkldrEsofN8ClKhB0XqorIT43IQriTtj8OUv2XZg+Xm16tK"
    "O0nFNPadPkN+IsV1TpgX1p2U4whe5x2GeimOfIejOCHM2V3OR1bMlrAEnLuNpJhzIuL6xWA7vT2Yf0A9XICS9rV31ejX5yc/F19/eX67vq89O9XhPqC"
    "KaeeF9RnhxCORs4tYgklMVQDYs7ASYc4j5KDYx25MtUO7CsF87J0Ev0EJ1QfUMO38OCYhYZxWLM3W4Q3HnF6zDNvIOUi8TacsI01hT9OeysFlylTxih"
    "KqHYC8LGNVqto3ANJaWWk0W2utRqO12lqlJa3XT6luGV1OjRdAtkWVcVjVrRuT9vkA1LeUvBOWeiCPRA1kiJDHQQVQvrbBfAQ9eYw9DmLe3SzOr5iBV"
    "kVuD0Fzwo4ZbvwPIq/dm1zkHDuByNo/RA5fjYSs5r+g4dQPZHgH/j+1IjRUt4yl9d9Oots/")


def test_genuine_openood_pickle_from_numpy1_loads(tmp_path, recwarn):
    import base64
    import zlib

    path = tmp_path / "ebo.pkl"
    path.write_bytes(zlib.decompress(base64.b64decode(GENUINE_OPENOOD_PICKLE)))
    loaded = load_scores(path)
    assert set(loaded) == {"id_test", "near/cifar100", "far/mnist"}
    np.testing.assert_array_equal(loaded["id_test"]["conf"], np.float32([0.9, 0.8, 0.7, 0.95]))
    np.testing.assert_array_equal(loaded["id_test"]["label"], [1, 0, 2, 2])
    np.testing.assert_array_equal(loaded["far/mnist"]["conf"], np.float32([0.9, 0.8, 0.7, 0.95]) - np.float32(0.6))
    assert (loaded["near/cifar100"]["label"] == -1).all()
    from openood_diffguard.fusion.scores_io import load_pickle

    raw = load_pickle(path)
    import torch

    assert torch.equal(raw["id_preds"], torch.tensor([1, 0, 2, 1])) and raw["csid"] == {"cifar10c": None}
    assert not [w for w in recwarn if "numpy.core" in str(w.message)]  # no numpy-1 deprecation noise


def test_tensor_and_protocol_variants_load(tmp_path):
    import torch

    obj = {"id": {"test": [torch.arange(3), np.float64([1.5, 2, 3]), np.array([0, 1, 2])]},
           "ood": {"near": {"a": [np.zeros(2, int), np.float16([0.5, 0.25]), -np.ones(2, int)]}},
           "extra": (1 + 2j, {1, 2}, frozenset({3}), b"bytes", bytearray(b"x"), None, True, np.float32(1.0),
                     torch.ones(2, dtype=torch.bfloat16)[1:], [np.array(["s"]), np.array([{"k": 1}], dtype=object)])}
    from openood_diffguard.fusion.scores_io import load_pickle

    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{proto}.pkl"
        path.write_bytes(pickle.dumps(obj, proto))
        got = load_pickle(path)
        assert got["extra"][:8] == obj["extra"][:8]
        assert torch.equal(got["extra"][8], obj["extra"][8]) and got["extra"][9][1][0] == {"k": 1}
        assert load_scores(path)["near/a"]["conf"].tolist() == [0.5, 0.25]


def test_align_by_key_and_refuse_misaligned(tmp_path):
    rng = np.random.default_rng(2)
    conf, label, key = rng.normal(size=50), rng.integers(0, 5, 50), np.array([f"img{i}.png" for i in range(50)])
    perm = rng.permutation(50)
    save_scores_npz(tmp_path / "a.npz", {"id_test": {"conf": conf, "label": label, "key": key}})
    save_scores_npz(tmp_path / "b.npz", {"id_test": {"conf": 2 * conf[perm], "label": label[perm], "key": key[perm]}})
    got = align({"a": load_scores(tmp_path / "a.npz"), "b": load_scores(tmp_path / "b.npz")})["id_test"]
    np.testing.assert_array_equal(got["b"], 2 * got["a"])
    # without keys a shuffled run cannot be fused: labels disagree position by position
    save_scores_npz(tmp_path / "c.npz", {"id_test": {"conf": conf[perm], "label": label[perm]}})
    save_scores_npz(tmp_path / "d.npz", {"id_test": {"conf": conf, "label": label}})
    with pytest.raises(ValueError, match="not aligned"):
        align({"c": load_scores(tmp_path / "c.npz"), "d": load_scores(tmp_path / "d.npz")})
    np.savez(tmp_path / "bad.npz", conf=conf)
    with pytest.raises(ValueError, match="missing key"):
        load_scores(tmp_path / "bad.npz")


@pytest.mark.parametrize("stem", ["fusion_diffguard_ebo_cifar10", "fusion_diffguard_knn_imagenet",
                                  "fusion_diffguard_vim_imagenet", "fusion_diffguard_mls_imagenet"])
def test_presets_parse_and_build(stem):
    assert (preset_dir() / f"{stem}.yml").is_file()
    cfg = load_fusion_preset(stem)
    assert cfg.baseline == stem.split("_")[2] and cfg.detector == "diffguard" and cfg.aps_mode
    assert cfg.detector_preset == ("diffguard_cifar10" if "cifar10" in stem else "diffguard_gdm_imagenet")
    # CIFAR presets take the class count from the classifier (null: CIFAR-100 checkpoints work unchanged)
    assert cfg.resolved_detector_args()["num_classes"] == (None if "cifar10" in stem else 1000)
    fusion = cfg.build_fusion()
    for values in itertools.product(*cfg.sweep.values()):
        fusion.set_params(**dict(zip(cfg.sweep, values)))  # every sweep point is a valid parameter set
    # the documented budget switch: budget set, alpha_in dropped from rule_args and sweep
    raw = yaml.safe_load((preset_dir() / f"{stem}.yml").read_text())
    pp = raw["postprocessor"]
    assert "budget" in pp["postprocessor_args"]["rule_args"]
    pp["postprocessor_args"]["rule_args"] = {"alpha_out": 0.02, "budget": 0.3}
    del pp["postprocessor_sweep"]["alpha_in_list"]
    assert parse_fusion_config(raw).build_fusion().expected_routed_fraction == pytest.approx(0.3)
    if cfg.baseline == "vim":
        assert cfg.baseline_args["dim"] < 2048


def test_preset_schema_errors():
    good = {"postprocessor": {"name": "diffguard_fusion", "APS_mode": True,
                              "postprocessor_args": {"detector": "diffguard_cifar10", "baseline": "ebo",
                                                     "rule": "rank", "rule_args": {"w": 0.5}},
                              "postprocessor_sweep": {"w_list": [0.3, 0.5]}}}
    assert parse_fusion_config(good).sweep == {"w": [0.3, 0.5]}

    def bad(**change):
        cfg = json.loads(json.dumps(good))
        for k, v in change.items():
            section, key = k.split("__")
            cfg["postprocessor"][section][key] = v
        return cfg

    with pytest.raises(ValueError, match="unknown postprocessor_args"):
        parse_fusion_config(bad(postprocessor_args__fit_on="test"))
    # a sweep key that is no rule parameter is left to the detector (its cheap parameters)
    assert parse_fusion_config(bad(postprocessor_sweep__similarity_list=["dists"])).detector_sweep == {
        "similarity": ["dists"]}
    with pytest.raises(ValueError, match="non-empty list"):
        parse_fusion_config(bad(postprocessor_sweep__w_list=[]))
    with pytest.raises(ValueError, match="not supported"):
        parse_fusion_config(bad(postprocessor_args__baseline="odin"))
    with pytest.raises(ValueError, match="unknown for 'ebo'"):
        parse_fusion_config(bad(postprocessor_args__baseline_args={"K": 5}))
    with pytest.raises(ValueError, match="w must be"):
        parse_fusion_config(bad(postprocessor_args__rule_args={"w": 2.0}))
    empty = json.loads(json.dumps(good))
    empty["postprocessor"]["postprocessor_sweep"] = {}
    with pytest.raises(ValueError, match="empty postprocessor_sweep"):
        parse_fusion_config(empty)
    # budget: a rule argument; never swept, and no sweep candidate may contradict it
    budgeted = bad(postprocessor_args__rule_args={"w": 0.5, "budget": 0.2},
                   postprocessor_sweep__alpha_out_list=[0.01, 0.02])
    assert parse_fusion_config(budgeted).build_fusion().expected_routed_fraction == pytest.approx(0.2)
    with pytest.raises(ValueError, match="budget is a compute limit"):
        parse_fusion_config(bad(postprocessor_sweep__budget_list=[0.1, 0.2]))
    with pytest.raises(ValueError, match="budget .* must be in"):
        parse_fusion_config(bad(postprocessor_args__rule_args={"budget": 0.0}))
    with pytest.raises(ValueError, match="alpha_out_list value 1.5"):
        parse_fusion_config(bad(postprocessor_args__rule_args={"budget": 0.2},
                                postprocessor_sweep__alpha_out_list=[0.01, 1.5]))
    cascade = bad(postprocessor_args__rule="cascade", postprocessor_args__rule_args={"budget": 0.2},
                  postprocessor_sweep__alpha_in_list=[0.0, 0.1])
    del cascade["postprocessor"]["postprocessor_sweep"]["w_list"]
    with pytest.raises(ValueError, match="alpha_in_list value 0.1: .*either budget or alpha_in"):
        parse_fusion_config(cascade)


def test_detector_preset_resolution(tmp_path):
    from openood_diffguard.fusion.presets import resolve_detector_args

    (tmp_path / "diffguard_toy.yml").write_text(
        "postprocessor:\n  name: diffguard\n  postprocessor_args:\n    cfg_scale: 3.0\n    num_steps: 50\n")
    args = {"detector": "diffguard", "detector_preset": "diffguard_toy", "detector_args": {"num_steps": 10}}
    assert resolve_detector_args(args, tmp_path) == {"cfg_scale": 3.0, "num_steps": 10}
    assert resolve_detector_args({"detector": "diffguard", "detector_args": {"a": 1}}) == {"a": 1}
    with pytest.raises(ValueError, match="configures 'diffguard', not detector 'diffnb'"):
        resolve_detector_args({**args, "detector": "diffnb"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="diffguard_nope"):
        resolve_detector_args({**args, "detector_preset": "diffguard_nope"}, tmp_path)


def test_fuse_cli_budget_reads_only_routed_diffusion_scores(tmp_path, capsys):
    """--budget: the diffusion file may hold NaN outside the band (a routed run); the table is the same as with
    every diffusion score, and the routed share of every split is reported."""
    data = synthetic(3)
    a, b = write_pair(tmp_path, data)
    full_json, sparse_json = tmp_path / "full.json", tmp_path / "sparse.json"
    assert main(["fuse", "--scores", str(a), str(b), "--rule", "rank", "--budget", "0.3", "--json", str(full_json)]) == 0
    assert "rank routed" in capsys.readouterr().out
    fusion = ScoreFusion("rank", baseline="ebo", diffusion="diffguard", budget=0.3)
    fusion.fit({"ebo": data["id_val"][0], "diffguard": data["id_val"][1]})
    routed = {k: (v[0], np.where(fusion.route(v[0]), v[1], np.nan), v[2]) for k, v in data.items() if k != "ood_val"}
    save_scores_npz(tmp_path / "diffguard.npz", {k: {"conf": v[1], "label": v[2]} for k, v in routed.items()})
    save_scores_npz(tmp_path / "ebo.npz", {k: {"conf": v[0], "label": v[2]} for k, v in routed.items()})
    assert main(["fuse", "--scores", str(a), str(b), "--rule", "rank", "--param", "budget=0.3",
                 "--json", str(sparse_json)]) == 0
    full, sparse = json.loads(full_json.read_text()), json.loads(sparse_json.read_text())
    fused = lambda res: {r["dataset"]: r for r in res["rows"] if r["score"] == "fused"}  # noqa: E731
    for ds in ("near/cifar100", "far/mnist"):
        assert fused(sparse)[ds]["AUROC"] == fused(full)[ds]["AUROC"]
        assert fused(sparse)[ds]["routed"] == pytest.approx(float(fusion.route(data[ds][0]).mean()))
        assert fused(sparse)[ds]["routed"] < 0.5  # OOD that EBO already rejects never reaches diffusion
    assert sparse["routed_id_test"] == pytest.approx(0.3, abs=4 * np.sqrt(0.21 / N))
    assert sparse["expected_routed_id"] == pytest.approx(0.3) and sparse["params"]["budget"] == 0.3
    capsys.readouterr()
    assert main(["fuse", "--scores", str(a), str(b), "--budget", "0.3", "--param", "budget=0.2"]) == 2
    assert main(["fuse", "--scores", str(a), str(b), "--budget", "1.5"]) == 2
    assert "budget" in capsys.readouterr().err
