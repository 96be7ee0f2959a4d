"""LFDN on features of a small digits classifier (known digits 0-5 vs unknown 6-9): variants, the released
code's sampler written out, batch invariance, model identity in the cache keys, validation."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from digits_net import TinyConvNet, digits_split, trained_digits_net, single_thread  # noqa: F401 (autouse)
from openood_diffguard.runtime.cache import ScoreCache, cached_statistics, module_fingerprint
from openood_diffguard.detectors.base import ParameterError
from openood_diffguard.detectors.lfdn import LFDN, VARIANTS
from openood_diffguard.features import FeatureStandardizer, layer_normalize, pooled_features
from openood_diffguard.networks import LFDNet, lfdn_schedule
from openood_diffguard.networks.lfdn import from_released_state_dict, to_released_state_dict
from openood_diffguard.training.lfdn import (CODE_TRAIN, legacy_classifier_hash, load_checkpoint, loader_identity,
                                             save_checkpoint, train_config, train_lfdn)

TRAIN = {"width": 64, "blocks": 2, "epochs": 20, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "ema": 0.0}
DIGITS = {"normalization": "digits", "layers": [1, 2, 3, 4]}


def _loader(x, y, bs=128):
    return [{"data": x[i:i + bs], "label": y[i:i + bs]} for i in range(0, len(y), bs)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One on-the-fly trained detector per variant (shared cache directory)."""
    net = trained_digits_net()
    x, y, x_id, x_ood = digits_split()
    cache = str(tmp_path_factory.mktemp("cache"))
    dets = {}
    for variant in VARIANTS:
        det = LFDN(variant=variant, train=TRAIN, cache_dir=cache, **DIGITS)
        det.setup(net, {"train": _loader(x, y)})
        dets[variant] = det
    return dets, net, x_id, x_ood


def _auroc(det, net, x_id, x_ood, **params):
    det.set_params(**params)
    c_id, c_ood = det.predict(net, x_id)[1], det.predict(net, x_ood)[1]
    return roc_auc_score([1] * len(c_id) + [0] * len(c_ood), torch.cat([c_id, c_ood]))


def test_network_layout_size_and_released_names():
    net = LFDNet(720)  # paper size: width 1440, 16 blocks, 720-d input
    assert abs(sum(p.numel() for p in net.parameters()) - 86.7e6) < 0.1e6
    z = torch.randn(3, 720)
    assert torch.all(net(z, torch.tensor([1, 2, 3])) == 0)  # zero-initialised head
    s = lfdn_schedule()
    assert s.num_train_timesteps == 100 and abs(float(s.alpha_bar(3)) - 0.99353) < 1e-4
    small = LFDNet(10, 8, 2)
    released = to_released_state_dict(small.state_dict())
    assert {"input_proj.1.weight", "time_embed.2.bias", "res_blocks.1.in_layers.2.weight",
            "res_blocks.0.emb_layers.1.weight", "res_blocks.1.out_layers.3.bias", "out.2.weight"} <= set(released)
    # a whole LFDM state dict: prefix stripped, the EMA copy taken (as the released test code uses it)
    lfdm = {"model.diffusion_model." + k: v for k, v in released.items()}
    lfdm["model_ema.diffusion_modelout2bias"] = torch.full_like(released["out.2.bias"], 7.0)
    back = from_released_state_dict(lfdm)
    assert list(back) == list(small.state_dict()) and torch.all(back["head.2.bias"] == 7.0)
    assert torch.equal(from_released_state_dict(lfdm, use_ema=False)["head.2.bias"], small.state_dict()["head.2.bias"])
    with pytest.raises(KeyError, match="unexpected"):
        from_released_state_dict({"cond_stage_model.embedding.weight": torch.zeros(1)})


def test_layer_normalisations_known_answers():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(5, 3 + 4, generator=g) * 3
    widths = [3, 4]
    paper = layer_normalize(f, widths, "layer_paper")
    ref = torch.cat([F.layer_norm(f[:, :3], (3,), eps=1e-5), F.layer_norm(f[:, 3:], (4,), eps=1e-5)], 1)
    torch.testing.assert_close(paper, ref)  # (x - mean) / sqrt(biased var + eps) = layer_norm
    code = layer_normalize(f, widths, "layer_code")
    a = f[:, 3:].double().numpy()
    expected = (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-5)  # unbiased std + eps
    torch.testing.assert_close(code[:, 3:].double(), torch.from_numpy(expected))
    with pytest.raises(ValueError, match="widths"):
        layer_normalize(f, [3, 3], "layer_code")


def test_variants_detect_unknown_digits(trained):
    dets, net, x_id, x_ood = trained
    for variant, det in dets.items():
        hist = load_checkpoint(det._loaded_from)["history"]
        assert hist[-1] < 0.7 * hist[0], (variant, hist)
        scores = {s: _auroc(det, net, x_id, x_ood, score=s) for s in ("mse", "mfsim")}
        assert min(scores.values()) > 0.85, (variant, scores)
        det.set_params(score="mfsim")
    # LR: the released code ranks higher LR as OOD; on these digits that ranking is below chance, the
    # paper's reading (higher LR = ID) above it (measured 0.18 vs 0.80 for code / paper)
    code, paper = dets["code"], dets["paper"]
    assert _auroc(code, net, x_id, x_ood, score="lr") < 0.4
    assert _auroc(code, net, x_id, x_ood, score="lr", lr_sign=1) > 0.6
    assert _auroc(paper, net, x_id, x_ood, score="lr") > 0.6
    code.set_params(score="mfsim", lr_sign=None)
    paper.set_params(score="mfsim")


@pytest.mark.parametrize("noise", ["shared", "per_sample"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_score_does_not_depend_on_the_batch(trained, variant, noise):
    """A sample's statistics are the same alone, in any batch, order or chunking (batch sizes, torchrun shards,
    cache resumes and cascade routing all reduce to this), with shared or per-sample noise."""
    dets, net, x_id, x_ood = trained
    det = dets[variant]
    det.set_params(timesteps=[3, 6], noise=noise)
    try:
        x = torch.cat([x_id[:20], x_ood[:20]])
        full = det.statistics(net, x)
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
        shuffled = det.statistics(net, x[perm])
        chunks = [det.statistics(net, x[i:i + 7]) for i in range(0, 40, 7)]
        single = det.statistics(net, x[13:14])
        for k in full:
            torch.testing.assert_close(shuffled[k], full[k][perm], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat([c[k] for c in chunks]), full[k], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(single[k], full[k][13:14], rtol=1e-5, atol=1e-5)
        assert {"mse_t3", "mse_t6", "first_mse_t6", "cos_l2_t3"} <= set(full)
        torch.testing.assert_close(det.set_params(timesteps=[3]).statistics(net, x)["mse_t3"], full["mse_t3"])
    finally:
        det.set_params(timesteps=[3], noise="shared")


@pytest.mark.parametrize("noise", ["shared", "per_sample"])
@pytest.mark.parametrize("variant", ["code", "ours"])
def test_predict_features_equals_the_image_path(trained, variant, noise):
    """Precomputed pooled features (pytorch-ood's ``predict_features`` entry) score exactly as the images."""
    dets, net, x_id, x_ood = trained
    det = dets[variant]
    det.set_params(noise=noise, score="lr" if variant == "code" else "mfsim")
    try:
        x = torch.cat([x_id[:10], x_ood[:10]])
        f = pooled_features(net, x, det.params["layers"])[1]
        keys = det.sample_keys(x)
        assert torch.equal(det.predict_features(f, noise_keys=keys), det.predict(net, x)[1])
        if noise == "per_sample":
            with pytest.raises(ValueError, match="noise_keys"):
                det.predict_features(f)
        with pytest.raises(ValueError, match=r"pooled features \[B, 160\]"):
            det.predict_features(f[:, :100], noise_keys=keys)
    finally:
        det.set_params(noise="shared", score="mfsim")


def test_per_sample_noise_is_keyed_by_the_image():
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[7] = x[3]
    det = LFDN(variant="code", noise="per_sample", normalization="digits")
    keys = det.sample_keys(x)
    assert torch.equal(keys[4:9], det.sample_keys(x[4:9])) and torch.equal(keys[7], keys[3])
    a, b = det.noise(3, 5, keys=keys), det.noise(3, 5, "first", keys=keys)
    assert a["q"].shape == (12, 5) and a["steps"].shape == (5, 12, 5)
    assert torch.equal(a["q"][7], a["q"][3]) and not torch.allclose(a["q"][0], a["q"][1])  # per sample
    assert not torch.allclose(a["q"], b["q"])  # the first-epoch model's own draw (code / paper LR)
    assert det.set_params(noise="shared").sample_keys(x) is None and det.noise(3, 5)["q"].shape == (5,)


def _released_code_sampler(model, z_t, t, steps, eta=1.0):
    """The released DDIMSampler for S = 100 DDIM steps and ``subset_timesteps_num`` t, written out
    (ldm/models/diffusion/ddim.py: make_schedule, ddim_sampling, p_sample_ddim; x0-parameterised model)."""
    a = lfdn_schedule().alphas_cumprod.float()
    alphas = a                                  # ddim_alphas = alphacums[ddim_timesteps - 1], timesteps 1..100
    alphas_prev = torch.cat([a[:1], a[:-1]])    # [alphacums[0]] + alphacums[ddim_timesteps[:-1] - 1]
    x = z_t
    for i, step in enumerate(range(t, 0, -1)):  # time_range = flip(timesteps[:t]) = t, ..., 1
        index = t - i - 1
        ts = torch.full((len(x),), step)
        x0 = model(x, ts)
        e_t = (x / a[step].sqrt() - x0) / (1 / a[step] - 1).sqrt()  # _predict_eps_from_xstart at the model's t
        a_t, a_prev = alphas[index], alphas_prev[index]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma ** 2).sqrt() * e_t + sigma * steps[step]
    return x


@pytest.mark.parametrize("t", [1, 3, 5])
def test_code_sampler_equals_the_released_sampler_written_out(t):
    """variant code = the released sampler (noise level one step below the model's time, the still-noisy
    output), given the same noise; its skipped last call is an identity."""
    torch.manual_seed(0)
    model = LFDNet(12, 16, 2)
    for m in model.modules():  # non-zero output layers: a real function of the input
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    det = LFDN(variant="code", timesteps=[t], layers=[1, 2]).set_models(model.eval(), widths=[5, 7])
    z_t = torch.randn(6, 12)
    noise = det.noise(t, 12)
    ours = det._denoise(model, z_t, t, noise)
    # the released step told time k leaves our path index k - 1 (its step k = 1 has sigma 0)
    steps = {k: noise["steps"][k - 1].expand(6, -1) for k in range(1, t + 1)}
    with torch.no_grad():
        ref = _released_code_sampler(model, z_t, t, steps)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    if t > 1:  # the output is still noisy: not the model's x0 estimate (the paper's / ours)
        assert (ours - det.set_params(variant="ours").set_models(model, widths=[5, 7], standardizer=FeatureStandardizer(
            torch.zeros(12), torch.ones(12), [5, 7]))._denoise(model, z_t, t, noise)).abs().max() > 1e-3


def test_paper_sampler_takes_its_random_stride_to_the_clean_level():
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x, t):
            calls.append(int(t[0]))
            return torch.zeros_like(x)  # x0 prediction 0: the output at the clean level must be 0

    det = LFDN(variant="paper", timesteps=[7], layers=[1]).set_models(Counting(), widths=[4])
    strides = set()
    for seed in range(12):
        det.set_params(seed=seed)
        noise = det.noise(7, 4)
        s = int(noise["stride"])
        calls.clear()
        out = det._denoise(det.final, torch.randn(3, 4), 7, noise)
        assert calls == list(range(7, -1, -s)), (s, calls)  # t, t - s, ..., >= 0, then the clean level
        assert out.abs().max() < 1e-6  # z0_hat, not a noisy state
        strides.add(s)
    assert strides <= set(range(1, 9)) and len(strides) > 2


def test_confidence_per_variant(trained):
    dets, net, x_id, _ = trained
    stats = {"cos_l1_t3": torch.tensor([0.0]), "cos_l2_t3": torch.tensor([0.5]), "cos_l3_t3": torch.tensor([1.0]),
             "mse_t3": torch.tensor([2.0]), "first_mse_t3": torch.tensor([5.0])}
    code, paper = LFDN(variant="code", score="mfsim"), LFDN(variant="paper", score="mfsim")
    assert float(code.confidence(stats)) == 0.75 and float(paper.confidence(stats)) == 0.5  # layer 1 skipped / kept
    assert float(code.set_params(score="lr").confidence(stats)) == -3.0  # code: higher LR = OOD
    assert float(paper.set_params(score="lr").confidence(stats)) == 3.0
    assert float(code.set_params(lr_sign=1).confidence(stats)) == 3.0
    # the statistics from their definition: MSE summed over dimensions (code, ours) or averaged (paper),
    # cosine per layer, the first-epoch model with its own noise (code, paper) or the same (ours)
    for variant, det in dets.items():
        s = det.statistics(net, x_id[:4])
        _, z0, widths = det.features(net, x_id[:4])
        for prefix, model, stream in (("", det.final, "final"),
                                      ("first_", det.first, "final" if variant == "ours" else "first")):
            noise = det.noise(3, z0.shape[1], stream)
            z_t = det._schedule.add_noise(z0, noise["q"].expand_as(z0), torch.full((4,), 3))
            err = (det._denoise(model, z_t, 3, noise) - z0) ** 2
            torch.testing.assert_close(s[prefix + "mse_t3"], err.mean(1) if variant == "paper" else err.sum(1))


def test_cache_key_follows_the_weights_not_the_path(trained, tmp_path):
    dets, net, x_id, _ = trained
    det = dets["code"]
    path = tmp_path / "lfdn.pt"
    raw = torch.load(det._loaded_from, weights_only=True)
    save_checkpoint(raw, path)
    a = LFDN(variant="code", checkpoint=str(path), **DIGITS)
    a.setup(net)
    key_a, conf_a = a.cache_key(), a.predict(net, x_id[:8])[1]
    assert LFDN(variant="code", checkpoint=str(path), **DIGITS).cache_key() == key_a  # same weights, same key
    other = copy.deepcopy(raw)
    other["final"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in raw["final"].items()}
    save_checkpoint(other, path)  # replaced in place, same path
    b = LFDN(variant="code", checkpoint=str(path), **DIGITS)
    b.setup(net)
    assert b.cache_key() != key_a
    assert not torch.allclose(b.predict(net, x_id[:8])[1], conf_a)
    # through the score cache: the replaced checkpoint's scores, never the old ones
    loader = [{"data": x_id[:8], "label": torch.zeros(8, dtype=torch.long), "index": torch.arange(8)}]
    root = tmp_path / "scores"
    for det_, conf in ((a, conf_a), (b, b.predict(net, x_id[:8])[1])):
        out = cached_statistics(det_, net, loader, ScoreCache(root, det_.cache_key()), progress=False)
        torch.testing.assert_close(det_.confidence({k: torch.as_tensor(v) for k, v in out.stats.items()}), conf)
    # set_params(checkpoint=...) reloads (it used to keep scoring with the model loaded first)
    a.set_params(checkpoint=str(save_checkpoint(other, tmp_path / "copy.pt")))
    assert a.fingerprint() == b.fingerprint()


def test_on_the_fly_model_file_follows_the_training_data(tmp_path):
    net = trained_digits_net()
    x, y, _, _ = digits_split()
    small = {**TRAIN, "epochs": 1, "width": 16, "blocks": 1}
    det = LFDN(variant="code", train=small, cache_dir=str(tmp_path), **DIGITS)
    det.setup(net, {"train": _loader(x[:200], y[:200])})
    first = det._loaded_from
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    det2 = LFDN(variant="code", train=small, cache_dir=str(tmp_path), **DIGITS)
    det2.setup(net, {"train": _loader(x[:200][perm], y[:200][perm], bs=50)})  # same data, shuffled, rebatched
    assert det2._loaded_from == first
    det3 = LFDN(variant="code", train=small, cache_dir=str(tmp_path), **DIGITS)
    det3.setup(net, {"train": _loader(x[200:400], y[200:400])})  # other data: its own model file
    assert det3._loaded_from != first and len(list(tmp_path.glob("lfdn_*.pt"))) == 2
    det4 = LFDN(variant="ours", train=small, cache_dir=str(tmp_path), **DIGITS)  # other feature normalisation
    det4.setup(net, {"train": _loader(x[:200], y[:200])})
    assert len(list(tmp_path.glob("lfdn_*.pt"))) == 3


def test_loader_identity_of_openood_image_lists():
    class Compose:
        def __init__(self, *ops):
            self.ops = ops

        def __repr__(self):
            return f"Compose({', '.join(self.ops)})"

    class Pre:  # OpenOOD preprocessors wrap a torchvision Compose as .transform
        def __init__(self, *ops):
            self.transform = Compose(*ops)

    class ImglistDataset:  # the attributes OpenOOD's ImglistDataset has (no image is read)
        def __init__(self, lines, pre, data_dir="./data/images_classic/"):
            self.imglist, self.data_dir, self.transform_image = lines, data_dir, pre

        def __len__(self):
            return len(self.imglist)

    class Loader:
        def __init__(self, ds):
            self.dataset = ds

        def __iter__(self):
            raise AssertionError("an image list is identified without loading images")

    lines = ["cifar10/train/a.png 0\n", "cifar10/train/b.png 1\n"]
    test = loader_identity(Loader(ImglistDataset(lines, Pre("Resize(32)", "Normalize"))))
    assert test == loader_identity(Loader(ImglistDataset(list(lines), Pre("Resize(32)", "Normalize"))))
    train = loader_identity(Loader(ImglistDataset(lines, Pre("RandomCrop(32, padding=4)", "RandomHorizontalFlip"))))
    assert train != test  # main.py's augmented train loader vs the Evaluator's: two models, two files
    assert loader_identity(Loader(ImglistDataset(lines[:1], Pre("Resize(32)", "Normalize")))) != test
    assert loader_identity(Loader(ImglistDataset(lines, Pre("Resize(32)", "Normalize"), "/other/root"))) != test


def test_checkpoint_for_another_classifier_or_variant_is_refused(trained, tmp_path):
    dets, net, x_id, _ = trained
    path = dets["code"]._loaded_from
    assert load_checkpoint(path)["classifier_hash"] == module_fingerprint(net)  # the one weights fingerprint
    same_arch = TinyConvNet().eval()  # same widths, other weights
    # a checkpoint written before format v3 stored another hash of the weights: still checked with it
    raw = torch.load(path, weights_only=True)
    v2 = save_checkpoint({**raw, "format": "openood-diffguard/lfdn-v2", "classifier_hash": legacy_classifier_hash(net)},
                         tmp_path / "v2.pt")
    LFDN(variant="code", checkpoint=str(v2), **DIGITS).setup(net)
    with pytest.raises(ValueError, match="another classifier"):
        LFDN(variant="code", checkpoint=str(v2), **DIGITS).setup(same_arch)
    det = LFDN(variant="code", checkpoint=path, **DIGITS)
    with pytest.raises(ValueError, match="another classifier"):
        det.setup(same_arch)
    det.setup(net)
    with pytest.raises(ValueError, match="another classifier"):  # statistics with another net, without setup
        det.statistics(same_arch, x_id[:2])
    wide = TinyConvNet()
    wide.layer4 = torch.nn.Sequential(torch.nn.Conv2d(48, 32, 3, 2, 1), torch.nn.ReLU())
    wide.fc = torch.nn.Linear(32, 6)
    with pytest.raises(ValueError, match="another classifier"):
        LFDN(variant="code", checkpoint=path, **DIGITS).setup(wide.eval())
    with pytest.raises(ValueError, match="variant"):  # trained on layer_code features, scored as 'ours'
        LFDN(variant="ours", checkpoint=path, **DIGITS).setup(net)
    with pytest.raises(ValueError, match="layers"):
        LFDN(variant="code", checkpoint=path, normalization="digits", layers=[1, 2]).setup(net)


def test_checkpoint_round_trip_pickling_and_errors(trained, tmp_path):
    dets, net, x_id, _ = trained
    det = dets["ours"]
    other = LFDN(variant="ours", checkpoint=det._loaded_from, **DIGITS)
    other.setup(net)
    torch.testing.assert_close(other.predict(net, x_id[:5])[1], det.predict(net, x_id[:5])[1])
    clone = pickle.loads(pickle.dumps(other))
    assert clone.final is None and clone.cache_key() == other.cache_key()  # reloads lazily for the key
    raw = torch.load(det._loaded_from, weights_only=True)
    # a version-1 checkpoint (standardised features, no widths / feature_norm) still loads
    v1 = {k: v for k, v in raw.items() if k not in ("widths", "feature_norm")}
    v1["format"] = "openood-diffguard/lfdn-v1"
    ck = load_checkpoint(save_checkpoint(v1, tmp_path / "v1.pt"))
    assert ck["feature_norm"] == "standardize" and ck["widths"] == [16, 32, 48, 64]
    raw["final"].pop(next(iter(raw["final"])))  # a corrupted state dict: error naming the path
    bad = save_checkpoint(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="train-lfdn"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_features_interface():
    net = trained_digits_net()
    x = digits_split()[2][:4]
    logits, f, widths = pooled_features(net, x, [1, 2, 3, 4])
    assert f.shape == (4, 160) and widths == [16, 32, 48, 64]
    torch.testing.assert_close(f[:, -64:], net(x, return_feature=True)[1])  # pooled f4 = penultimate
    with pytest.raises(TypeError, match="return_feature_list"):
        pooled_features(torch.nn.Flatten(), x, [1])


def test_bad_images_are_refused_before_anything_is_cached(trained, tmp_path):
    dets, net, x_id, _ = trained
    det = dets["code"]
    nan = x_id[:4].clone()
    nan[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        det.statistics(net, nan)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # un-normalised [0, 255] pixels
        det.statistics(net, (x_id[:4] * 0.5 + 0.5) * 255)
    with pytest.raises(ValueError, match="empty"):
        det.statistics(net, x_id[:0])
    store = ScoreCache(tmp_path, "ns")
    loader = [{"data": nan, "label": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}]
    with pytest.raises(ValueError, match="NaN"):
        cached_statistics(det, net, loader, store, progress=False)
    assert len(ScoreCache(tmp_path, "ns")) == 0


@pytest.mark.parametrize("params, match", [
    ({"variant": "official"}, "variant"), ({"score": "auroc"}, "score"), ({"timesteps": [3, 3]}, "timesteps"),
    ({"timesteps": [100]}, "timesteps"), ({"timesteps": [0]}, "timesteps"),  # the code's sampler needs t >= 1
    ({"timesteps": ["3"]}, "timesteps"), ({"eta": -1.0}, "eta"), ({"eta": "1"}, "eta"), ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"), ({"lr_sign": 2}, "lr_sign"), ({"mfsim_layer1": "yes"}, "mfsim_layer1"),
    ({"layers": [0, 1]}, "layers"), ({"layers": [1, 1]}, "layers"), ({"dtype": "int8"}, "dtype"),
    ({"train": {"epochs": 0}}, "epochs"), ({"train": {"lr": "1e-3"}}, "lr"), ({"train": {"size": 3}}, "size"),
    ({"train": {"ema": 1.0}}, "ema"), ({"train": {"blocks": 2.5}}, "blocks"), ({"checkpoint": 3}, "checkpoint"),
])
def test_parameters_are_validated_with_their_name(params, match):
    with pytest.raises(ParameterError, match=match):
        LFDN(**params)
    det = LFDN()
    with pytest.raises(ParameterError, match=match):
        det.set_params(**params)
    assert det.params == LFDN().params  # a rejected change changes nothing
    LFDN(variant="paper", timesteps=[0])  # t = 0 is fine for the other samplers


def test_training_recipes_and_ema_warm_up():
    assert train_config(None, "code") == {**train_config(None), **{k: CODE_TRAIN[k] for k in
                                                                   ("lr", "weight_decay", "batch_size", "ema")}}
    assert train_config({"lr": 3e-4}, "code")["lr"] == 3e-4
    z0 = torch.randn(96, 6, generator=torch.Generator().manual_seed(0))
    cfg = {"width": 16, "blocks": 1, "epochs": 1, "batch_size": 16, "lr": 1e-2, "weight_decay": 0.0}
    init = LFDNet(6, 16, 1)
    torch.manual_seed(0)
    raw = train_lfdn(z0, {**cfg, "ema": 0.0}, progress=False)
    ema = train_lfdn(z0, {**cfg, "ema": 0.9999}, progress=False)
    torch.manual_seed(0)
    init = LFDNet(6, 16, 1)
    # LitEma's warm-up: after 6 updates the EMA has moved most of the way (a fixed 0.9999 stays at the init)
    dist = lambda a, b: sum(float((p - q).detach().norm()) for p, q in zip(a.parameters(), b.parameters()))  # noqa
    assert dist(ema["final"], init) > 0.3 * dist(raw["final"], init)
    # the first-epoch model is the EMA copy when EMA is on (the code's checkpoint-0 read through ema_scope)
    assert all(torch.equal(p, q) for p, q in zip(ema["first"].parameters(), ema["final"].parameters()))


def test_bf16_autocast_is_close_to_fp32(trained):
    dets, net, x_id, _ = trained
    det = dets["ours"]
    ref = det.statistics(net, x_id[:16])
    det.set_params(dtype="bf16")
    try:
        low = det.statistics(net, x_id[:16])
    finally:
        det.set_params(dtype=None)
    assert low["mse_t3"].dtype == torch.float32 and not torch.equal(low["mse_t3"], ref["mse_t3"])  # ran in bf16
    torch.testing.assert_close(low["mse_t3"], ref["mse_t3"], rtol=0.05, atol=0.05 * float(ref["mse_t3"].mean()))
    torch.testing.assert_close(low["cos_l2_t3"], ref["cos_l2_t3"], rtol=0, atol=0.02)
