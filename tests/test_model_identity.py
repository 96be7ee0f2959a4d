"""Score-cache identity follows the content of the models actually used (issue #14 item 1), and the
wrapper's ``cache`` / ``APS_mode`` switches parse strictly (item 5)."""
import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from digits_net import single_thread  # noqa: F401 (autouse: one CPU thread)
from ood_toys import ToyDetector, batches, tiny_net
from openood_diffguard.runtime.cache import ScoreCache, cached_statistics, loader_source, module_fingerprint, namespace
from openood_diffguard.detectors.diffguard import DiffGuard
from openood_diffguard.detectors.diffnb import DiffNB
from openood_diffguard.diffusion import NoiseSchedule, UNetAdapter
from test_backbone_runtime import SCHED, _unet

PARAMS = {"normalization": "unknown", "timesteps": [300], "repeats": 1, "stride": 100}


class Tiny3(torch.nn.Module):
    """3-class classifier on 3x16x16 images (the UNet's class count)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.fc = torch.nn.Linear(3 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _loader(n=6, bs=3):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return [{"data": x[i:i + bs], "label": torch.zeros(len(x[i:i + bs]), dtype=torch.long),
             "image_name": [f"im{j}.png" for j in range(i, min(i + bs, n))]} for i in range(0, n, bs)]


def _save(folder, seed):
    from diffusers import DDPMScheduler

    _unet(seed=seed).save_pretrained(folder / "unet")
    DDPMScheduler(**SCHED).save_pretrained(folder / "scheduler")


def _scored(det, net, root):
    """What the OpenOOD postprocessor and the demo do: namespace = detector key + classifier weights."""
    store = ScoreCache(root, namespace(det.cache_key(), module_fingerprint(net)))
    with torch.no_grad():
        out = cached_statistics(det, net, _loader(), store, progress=False)
    return store.dir.name, out.stats["distance"] if "distance" in out.stats else out.stats


def _direct(det, net):
    with torch.no_grad():
        return {k: torch.cat([det.statistics(net, b["data"])[k] for b in _loader()]).numpy()
                for k in det.statistics(net, _loader()[0]["data"])}


def test_retrain_into_the_same_folder_gives_new_scores_not_cached_ones(tmp_path):
    folder, root, net = tmp_path / "unet_run", tmp_path / "cache", Tiny3()
    _save(folder, seed=0)
    ns1, first = _scored(DiffNB(model_path=str(folder), **PARAMS), net, root)
    _save(folder, seed=1)  # train-diffusion resumed into the same --out: same path, other weights
    det = DiffNB(model_path=str(folder), **PARAMS)  # a new run with the same yml
    ns2, second = _scored(det, net, root)
    assert ns2 != ns1
    fresh = _direct(DiffNB(model_path=str(folder), **PARAMS), net)
    for k in fresh:
        np.testing.assert_allclose(second[k], fresh[k], rtol=1e-5, atol=1e-6)  # the new model's scores
    moved = [k for k in fresh if k != "pred" and not np.allclose(first[k], fresh[k])]
    assert moved  # and they differ from the old model's (the stale cache would have returned these)


def test_two_model_objects_two_namespaces_same_content_one(tmp_path):
    sched = NoiseSchedule.from_config(SCHED)
    a, b, a_again = (DiffNB(model=UNetAdapter(_unet(seed=s), sched), **PARAMS) for s in (0, 1, 0))
    assert a.cache_key() != b.cache_key()  # two different model= objects, same parameters
    assert a.cache_key() == a_again.cache_key()  # identity is content, not the Python object
    net, root = Tiny3(), tmp_path / "cache"
    _, rows_a = _scored(a, net, root)
    _, rows_b = _scored(b, net, root)
    fresh_b = _direct(DiffNB(model=UNetAdapter(_unet(seed=1), sched), **PARAMS), net)
    for k in fresh_b:
        np.testing.assert_allclose(rows_b[k], fresh_b[k], rtol=1e-5, atol=1e-6)
    guard = [DiffGuard(model=UNetAdapter(_unet(seed=s), sched), normalization="unknown").cache_key() for s in (0, 1)]
    assert guard[0] != guard[1]


def test_classifier_weights_are_part_of_the_key(tmp_path):
    det, data = ToyDetector(), batches()
    net = tiny_net(seed=0)
    before = namespace(det.cache_key(), module_fingerprint(net))
    net.load_state_dict(tiny_net(seed=1).state_dict())  # same object, other checkpoint
    assert namespace(det.cache_key(), module_fingerprint(net)) != before
    assert module_fingerprint(net.to(torch.bfloat16))  # any dtype hashes


# ------------------------------------------------------------------ item 5: strict booleans
@pytest.mark.parametrize("value,expected", [("false", False), ("False", False), ("no", False), ("0", False), (0, False),
                                            (False, False), ("true", True), ("YES", True), ("1", True), (True, True),
                                            (np.bool_(False), False)])
def test_cache_switch_parses_strictly(value, expected):
    from openood_diffguard.openood.sections import aps_flag, split_wrapper_args

    wrapper, args = split_wrapper_args({"postprocessor_args": {"cache": value, "steps": 3}})
    assert wrapper["cache"] is expected and args == {"steps": 3}
    assert aps_flag({"APS_mode": value}, {"sign_list": [1.0]}, "X") is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, None, 0.5, "off-ish"])
def test_cache_switch_rejects_anything_else_naming_the_key(value):
    from openood_diffguard.openood.sections import aps_flag, split_wrapper_args

    with pytest.raises(ValueError, match="postprocessor_args.cache must be true or false"):
        split_wrapper_args({"postprocessor_args": {"cache": value}})
    with pytest.raises(ValueError, match="APS_mode must be true or false"):
        aps_flag({"APS_mode": value}, {"sign_list": [1.0]}, "X")


def test_fusion_preset_aps_mode_string():
    from openood_diffguard.fusion.presets import parse_fusion_config

    cfg = {"postprocessor": {"name": "f", "APS_mode": "false",
                             "postprocessor_args": {"detector": "diffguard", "baseline": "ebo", "rule": "rank"},
                             "postprocessor_sweep": {}}}
    assert parse_fusion_config(cfg).aps_mode is False  # bool("false") was True: then "empty sweep" error


@pytest.mark.openood
def test_postprocessor_keys_on_classifier_content_and_honours_cache_false(tmp_path, monkeypatch):
    pytest.importorskip("openood")
    from openood.utils import Config

    from openood_diffguard.runtime import registry
    from openood_diffguard.openood.postprocessors import DetectorPostprocessor

    monkeypatch.setattr(registry, "DETECTORS", {**registry.DETECTORS, "toy": ToyDetector})

    def pp(**args):
        return DetectorPostprocessor(Config({"postprocessor": {"name": "toy", "APS_mode": False, "postprocessor_args":
                                                               {"cache_dir": str(tmp_path / "c"), **args}}}))

    on, net = pp(), tiny_net(seed=0)
    before = on.store(net).dir.name
    net.load_state_dict(tiny_net(seed=1).state_dict())  # same object, another checkpoint
    assert on.store(net).dir.name != before  # not the old classifier's rows
    off = pp(cache="false")  # a quoted yml value / command-line override
    assert off.use_disk_cache is False
    off.inference(net, batches(), progress=False)
    assert off.store(net).dir is None
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("chunk-*"))


# ------------------------------------------------------------------ fusion baselines' train-feature cache
def test_baseline_feature_cache_keys_on_content(tmp_path):
    from test_fusion_baselines import OpenOODStyleNet, loader, make_data

    from openood_diffguard.fusion import baselines as B

    net, (x, y) = OpenOODStyleNet(), make_data(120)
    B._TRAIN_FEATURES.clear()
    # a bf16 classifier is keyed by the one weights fingerprint (the baselines' own hash used to raise on bf16)
    half = B.train_features(copy.deepcopy(net).to(torch.bfloat16), loader(x.bfloat16(), y), cache_dir=tmp_path,
                            progress=False)
    assert half[0].dtype == torch.float32 and len(list(tmp_path.glob("train_features_*"))) == 1
    net.forwards = 0
    first = B.train_features(net, loader(x, y), cache_dir=tmp_path, progress=False)
    n = net.forwards
    B._TRAIN_FEATURES.clear()  # a later process: new loader object, same data
    again = B.train_features(net, loader(x.clone(), y.clone()), cache_dir=tmp_path, progress=False)
    assert net.forwards == n and torch.equal(again[0], first[0])  # found on disk by content
    B.train_features(net, loader(x[:60], y[:60]), cache_dir=tmp_path, progress=False)
    assert net.forwards > n  # other data, other entry
    tds = torch.utils.data.TensorDataset(x, y)
    same = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.clone(), y.clone()))
    assert loader_source(torch.utils.data.DataLoader(tds), content=True) == loader_source(same, content=True)


def test_baseline_feature_cache_without_content_identity_stays_in_memory(tmp_path):
    from test_fusion_baselines import OpenOODStyleNet, make_data

    from openood_diffguard.fusion import baselines as B

    class Opaque(torch.utils.data.Dataset):  # no imglist / samples / tensors: nothing to hash cheaply
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"data": self.x[i], "label": self.y[i]}

    net = OpenOODStyleNet()
    (x1, y1), (x2, y2) = make_data(40, seed=1), make_data(40, seed=2)
    B._TRAIN_FEATURES.clear()
    with pytest.warns(UserWarning, match="not cached on disk"):
        f1 = B.train_features(net, torch.utils.data.DataLoader(Opaque(x1, y1), batch_size=20), cache_dir=tmp_path,
                              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = B.train_features(net, torch.utils.data.DataLoader(Opaque(x2, y2), batch_size=20), cache_dir=tmp_path,
                              progress=False)
    assert not torch.equal(f1[0], f2[0])  # same type and length, other data: never served the first's features
    assert not list(tmp_path.glob("train_features_*"))


_IDENTITY_SCRIPT = """
import torch
from openood_diffguard.runtime.cache import loader_source, module_fingerprint

class Transform:  # default repr: carries a memory address that differs per process
    pass

class ImglistDataset:  # OpenOOD's attributes; no image is read
    def __init__(self):
        self.imglist, self.data_dir, self.transform_image = ["a.png 0\\n", "b.png 1\\n"], "images/", Transform()
    def __len__(self):
        return 2

loader = torch.utils.data.DataLoader(ImglistDataset())
torch.manual_seed(0)
net = torch.nn.Linear(3, 2)
wrapped = torch.nn.DataParallel(net)
print(loader_source(loader, content=True), loader_source(loader), module_fingerprint(net), module_fingerprint(wrapped))
"""


def test_loader_and_weights_identity_are_the_same_in_another_process(tmp_path):
    """The baselines' feature cache and the score cache must find a set again in a later process: the
    identity is computed from content, never from an object id or address; a relative folder is resolved."""
    import os

    def run(cwd):
        cwd.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, "-c", _IDENTITY_SCRIPT], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    first, again, elsewhere = run(tmp_path / "a"), run(tmp_path / "a"), run(tmp_path / "b")
    assert first == again and first[0].startswith("imglist-")
    assert first[2] == first[3]  # a DataParallel wrapper is the same checkpoint
    assert elsewhere[0] != first[0] and elsewhere[1] != first[1]  # "images/" under another directory: other data
