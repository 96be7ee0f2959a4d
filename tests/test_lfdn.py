"""LFDN on features of a small digits classifier: known digits 0-5 vs unknown 6-9."""
import pickle

import pytest
import torch
from sklearn.metrics import roc_auc_score

from digits_net import TinyConvNet, digits_split, trained_digits_net, single_thread  # noqa: F401 (autouse)
from openood_diffguard.detectors.lfdn import LFDN
from openood_diffguard.features import pooled_features
from openood_diffguard.networks import LFDNet, lfdn_schedule
from openood_diffguard.training.lfdn import load_checkpoint, save_checkpoint

TRAIN = {"width": 128, "blocks": 2, "epochs": 25, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    net = trained_digits_net()
    x, y, x_id, x_ood = digits_split()
    loader = [{"data": x[i:i + 128], "label": y[i:i + 128]} for i in range(0, len(y), 128)]
    det = LFDN(layers=[1, 2, 3, 4], train=TRAIN, cache_dir=str(tmp_path_factory.mktemp("cache")))
    det.setup(net, {"train": loader})
    return det, net, x_id, x_ood


def _auroc(det, net, x_id, x_ood, **params):
    det.set_params(**params)
    c_id, c_ood = det.predict(net, x_id)[1], det.predict(net, x_ood)[1]
    return roc_auc_score([1] * len(c_id) + [0] * len(c_ood), torch.cat([c_id, c_ood]))


def test_network_layout_and_size():
    net = LFDNet(720)  # paper size: width 1440, 16 blocks, 720-d input
    assert abs(sum(p.numel() for p in net.parameters()) - 86.7e6) < 0.1e6
    z = torch.randn(3, 720)
    assert torch.all(net(z, torch.tensor([1, 2, 3])) == 0)  # zero-initialised head
    s = lfdn_schedule()
    assert s.num_train_timesteps == 100 and abs(float(s.alpha_bar(3)) - 0.99353) < 1e-4


def test_lfdn_detects_unknown_digits(trained):
    det, net, x_id, x_ood = trained
    hist = load_checkpoint(det._loaded_from)["history"]
    assert hist[-1] < 0.7 * hist[0], hist  # the training loss decreases
    scores = {s: _auroc(det, net, x_id, x_ood, score=s) for s in ("mse", "mfsim", "lr")}
    assert scores["mse"] > 0.8 and scores["mfsim"] > 0.8, scores
    # LR sign from the maths (first-epoch minus final error, higher = ID) beats the released code's sign
    # (measured here: 0.80 vs 0.20)
    assert scores["lr"] > 0.6, scores
    det.set_params(score="mfsim")


def test_determinism_shapes_and_multiple_timesteps(trained):
    det, net, x_id, _ = trained
    det.set_params(timesteps=[3, 10])
    s1, s2 = det.statistics(net, x_id[:7]), det.statistics(net, x_id[:7])
    assert {"mse_t3", "mse_t10", "first_mse_t3", "cos_l2_t10"} <= set(s1)
    for k in s1:
        assert s1[k].shape == (7,)
        torch.testing.assert_close(s1[k], s2[k])
    both = det.confidence(s1)
    det.set_params(timesteps=[3])
    torch.testing.assert_close(det.statistics(net, x_id[:7])["mse_t3"], s1["mse_t3"])  # batched t = separate t
    det.set_params(eta=1.0)
    assert torch.isfinite(det.confidence(det.statistics(net, x_id[:7]))).all()
    det.set_params(eta=0.0)
    assert both.shape == (7,)


def test_checkpoint_round_trip_and_errors(trained, tmp_path):
    det, net, x_id, _ = trained
    ck = load_checkpoint(det._loaded_from)
    other = LFDN(checkpoint=det._loaded_from, layers=[1, 2, 3, 4])
    other.setup(net)
    torch.testing.assert_close(other.predict(net, x_id[:5])[1], det.predict(net, x_id[:5])[1])
    clone = pickle.loads(pickle.dumps(other))
    assert clone.final is None
    # mismatched classifier (different widths) -> clear error, never silent
    wide = TinyConvNet()
    wide.layer4 = torch.nn.Sequential(torch.nn.Conv2d(48, 32, 3, 2, 1), torch.nn.ReLU())
    wide.fc = torch.nn.Linear(32, 6)
    with pytest.raises(ValueError, match="another classifier"):
        other.statistics(wide.eval(), x_id[:2])
    with pytest.raises(ValueError, match="layers"):
        LFDN(checkpoint=det._loaded_from, layers=[1, 2]).setup(net)
    # a corrupted state dict -> error naming the path, not strict=False
    raw = torch.load(det._loaded_from, weights_only=True)
    raw["final"].pop(next(iter(raw["final"])))
    bad = save_checkpoint(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="train-lfdn"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    assert ck["standardizer"].mean.shape == (16 + 32 + 48 + 64,)


def test_features_interface():
    net = trained_digits_net()
    x = digits_split()[2][:4]
    logits, f, widths = pooled_features(net, x, [1, 2, 3, 4])
    assert f.shape == (4, 160) and widths == [16, 32, 48, 64]
    torch.testing.assert_close(f[:, -64:], net(x, return_feature=True)[1])  # pooled f4 = penultimate
    with pytest.raises(TypeError, match="return_feature_list"):
        pooled_features(torch.nn.Flatten(), x, [1])


def test_stochastic_path_equals_the_released_codes_step(trained):
    """eta = 1 runs through the core DDIM loop; it must equal the code's step written out here
    (x_s = sqrt(a_s) z0 + sqrt(1 - a_s - s^2) eps + s * noise, full-batch noise per step)."""
    det, net, x_id, _ = trained
    det.set_params(eta=1.0)
    try:
        sched, t = det._schedule, torch.tensor([3, 3, 5, 1])
        z_t = torch.randn(4, det.final.config["in_dim"], generator=torch.Generator().manual_seed(0))
        got = det._denoise(det.final, z_t, t, torch.Generator().manual_seed(7))
        gen, x = torch.Generator().manual_seed(7), z_t.clone()
        levels = sched.levels(torch.arange(int(t.max()) + 1))
        for i in range(int(t.max()) + 1, 0, -1):
            tt = levels[i].expand(4)
            eps, z0 = sched.split_prediction(det.final(x, tt), x, tt)
            a_t, a_s = sched.alpha_bar(levels[i]).float(), sched.alpha_bar(levels[i - 1]).float()
            sig = ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
            noise = torch.randn(x.shape, generator=gen)
            new = a_s.sqrt() * z0 + (1 - a_s - sig**2).clamp(min=0).sqrt() * eps + sig * noise
            x = torch.where((t + 1 >= i).view(-1, 1), new, x)
        torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    finally:
        det.set_params(eta=0.0)


def test_bf16_autocast_is_close_to_fp32(trained):
    det, net, x_id, _ = trained
    ref = det.statistics(net, x_id[:16])
    det.set_params(dtype="bf16")
    try:
        low = det.statistics(net, x_id[:16])
    finally:
        det.set_params(dtype=None)
    assert low["mse_t3"].dtype == torch.float32 and not torch.equal(low["mse_t3"], ref["mse_t3"])  # ran in bf16
    torch.testing.assert_close(low["mse_t3"], ref["mse_t3"], rtol=0.05, atol=0.05 * float(ref["mse_t3"].mean()))
    torch.testing.assert_close(low["cos_l2_t3"], ref["cos_l2_t3"], rtol=0, atol=0.02)
    with pytest.raises(ValueError, match="dtype"):
        det.set_params(dtype="int8", timesteps=[5])
    assert det.params["dtype"] is None and det.params["timesteps"] == [3]  # a rejected change changes nothing
