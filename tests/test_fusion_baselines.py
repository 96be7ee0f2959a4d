"""Standalone baselines: pytorch-ood's EBO / MLS / KNN / ViM, negated to OpenOOD's higher = ID convention."""
import numpy as np
import pytest
import torch
from pytorch_ood.detector import KNN, EnergyBased, MaxLogit

from openood_diffguard.fusion import baselines as B
from openood_diffguard.fusion.baselines import Baselines, check_vim_dim, vim_default_dim


class OpenOODStyleNet(torch.nn.Module):
    """net(x, return_feature=True) -> (logits, feat); get_fc() -> numpy (W, b), like OpenOOD's ResNets."""

    def __init__(self, d_in=8, d_feat=16, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(d_in, d_feat), torch.nn.ReLU())
        self.fc = torch.nn.Linear(d_feat, classes)
        self.forwards = 0

    def forward(self, x, return_feature=False):
        self.forwards += 1
        feat = self.body(x)
        logits = self.fc(feat)
        return (logits, feat) if return_feature else logits

    def get_fc(self):
        return self.fc.weight.detach().numpy(), self.fc.bias.detach().numpy()


def make_data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


def loader(x, y, batch=100):
    return [{"data": x[i:i + batch], "label": y[i:i + batch]} for i in range(0, len(x), batch)]


def test_signs_match_openood_convention():
    """Known answers: OpenOOD's EBO/MLS formulas, and ID-like inputs score higher than far-away ones."""
    net = OpenOODStyleNet()
    x_train, y_train = make_data(600)
    base = Baselines({"ebo": {"temperature": 2.0}, "mls": {}, "knn": {"K": 5}, "vim": {"dim": 8}})
    base.setup(net, loader(x_train, y_train), cache_key="signs")
    x, _ = make_data(50, seed=1)
    logits, feat = net(x, return_feature=True)
    s = base.predict_features(logits, feat)
    forward = base.forward(net, x)  # the image path: one forward, then predict_features
    assert all(torch.equal(forward[n], s[n]) for n in base.names) and torch.equal(forward["features"], feat)
    torch.testing.assert_close(s["ebo"], 2.0 * torch.logsumexp(logits / 2.0, 1))
    torch.testing.assert_close(s["mls"], logits.max(1).values)
    # parity with pytorch-ood itself (negated; KNN squared like OpenOOD's faiss distances)
    knn = KNN(None, k=5).fit_features(*B.train_features(net, loader(x_train, y_train), cache_key="signs"))
    torch.testing.assert_close(s["knn"].double(), -knn.predict_features(feat) ** 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["ebo"], -EnergyBased(None, t=2.0).predict_logits(logits))
    torch.testing.assert_close(s["mls"], -MaxLogit(None).predict_logits(logits))
    # direction: a training feature (ID) vs the same feature pushed far off the train manifold (OOD)
    f_train = B.train_features(net, loader(x_train, y_train), cache_key="signs")[0][:50]
    w, _ = net.get_fc()
    null = torch.linalg.svd(torch.as_tensor(w)).Vh[-1]  # direction the classifier ignores: logits unchanged
    f_far = f_train + 50 * null
    lg_train, lg_far = net.fc(f_train), net.fc(f_far)
    torch.testing.assert_close(lg_train, lg_far, atol=1e-3, rtol=1e-3)
    near, far = base.predict_features(lg_train, f_train), base.predict_features(lg_far, f_far)
    assert (near["knn"] > far["knn"]).all() and (near["vim"] > far["vim"]).all()
    peaked = lg_train + 10 * torch.nn.functional.one_hot(lg_train.argmax(1), 4)  # confident: more ID
    big = base.predict_features(peaked, f_train)
    assert (big["ebo"] > near["ebo"]).all() and (big["mls"] > near["mls"]).all()


def test_vim_dim_default_and_errors():
    assert vim_default_dim(512) == 256 and vim_default_dim(2048) == 1000
    with pytest.raises(ValueError, match="dim=512 must be in"):
        check_vim_dim(512, 512)
    with pytest.raises(ValueError, match="dim_list: \\[256\\]"):
        check_vim_dim(1000, 512)
    net = OpenOODStyleNet()
    x, y = make_data(200)
    with pytest.raises(ValueError, match="dim=16 must be in"):
        Baselines({"vim": {"dim": 16}}).setup(net, loader(x, y), cache_key="vimdim")
    vim = Baselines(["vim"]).setup(net, loader(x, y), cache_key="vimdim")
    assert vim.detectors["vim"].d == 8
    with pytest.raises(TypeError, match="unknown argument"):
        Baselines({"knn": {"k": 5}})
    with pytest.raises(ValueError, match="unknown baseline"):
        Baselines(["odin"])
    with pytest.raises(RuntimeError, match="not fitted"):
        Baselines(["knn"]).predict_features(torch.zeros(2, 4), torch.zeros(2, 16))


def test_train_features_cached_per_checkpoint_and_loader(tmp_path):
    net = OpenOODStyleNet()
    x, y = make_data(200)
    ld = loader(x, y)
    B._TRAIN_FEATURES.clear()
    net.forwards = 0
    f1 = B.train_features(net, ld, cache_dir=tmp_path, progress=False)
    n = net.forwards
    f2 = B.train_features(net, ld, cache_dir=tmp_path, progress=False)
    assert net.forwards == n and f2[0] is f1[0]                      # memory cache
    B._TRAIN_FEATURES.clear()
    f3 = B.train_features(net, ld, cache_dir=tmp_path, progress=False)
    assert net.forwards == n and torch.equal(f3[0], f1[0])           # disk cache
    with torch.no_grad():
        net.fc.bias += 1.0                                            # another checkpoint -> new extraction
    B.train_features(net, ld, cache_dir=tmp_path, progress=False)
    assert net.forwards > n


def test_score_loader_shares_one_forward_and_routes():
    from openood_diffguard.fusion import ScoreFusion

    net = OpenOODStyleNet()
    x_train, y_train = make_data(400)
    base = Baselines({"ebo": {}, "knn": {"K": 5}}).setup(net, loader(x_train, y_train), cache_key="loader")
    x, y = make_data(300, seed=2)
    val = base.score_loader(net, loader(x, y), progress=False)
    fusion = ScoreFusion("cascade", baseline="ebo", diffusion="diff", alpha_out=0.1, alpha_in=0.2)
    fusion.fit({"ebo": val["ebo"], "diff": val["knn"]})
    calls = []

    def diffusion_on_routed(xb, out):
        def detector(x_routed, knn_routed):  # stand-in for the diffusion detector on the routed images
            calls.append(len(x_routed))
            return knn_routed

        _, conf = fusion.fuse_batch(out["ebo"], detector, xb, out["knn"])
        return {"diff": conf}

    net.forwards = 0
    test = base.score_loader(net, loader(x, y), progress=False, extra=diffusion_on_routed)
    assert net.forwards == 3                     # one classifier forward per batch for every baseline
    assert set(test) == {"pred", "label", "ebo", "knn", "diff"} and len(test["ebo"]) == 300
    np.testing.assert_array_equal(test["label"], y.numpy())
    assert sum(calls) == np.isfinite(test["diff"]).sum() == pytest.approx(0.7 * 300, abs=3)
    routed = np.isfinite(test["diff"])
    np.testing.assert_array_equal(test["diff"][routed], test["knn"][routed])
    assert np.isfinite(fusion({"ebo": test["ebo"], "diff": test["diff"]})).all()
