"""DiffGuard building blocks against independent implementations: piq's own DISTS/LPIPS forward,
the grad-cam package, and the official cutout loop (re-stated here with F.interpolate)."""
import math

import pytest
import torch
import torch.nn.functional as F

from openood_diffguard.guidance.cutouts import Cutouts
from openood_diffguard.guidance.gradcam import GradCAM, cam_mask
from openood_diffguard.similarity import PerceptualDistance, psnr, select_features
from openood_diffguard.similarity.logits import classifier_embedding, embedding_similarities



pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.fixture(scope="module")
def dists():
    return PerceptualDistance("dists", pretrained=False)


def test_dists_lpips_match_piq_and_cached_reference(dists):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    lp = dists.with_options()  # shares the network
    lpips = PerceptualDistance("lpips", pretrained=False)
    for metric in (lp, lpips):
        d = metric.distance(x, y)
        torch.testing.assert_close(d, metric.metric(x, y), rtol=1e-5, atol=1e-6)  # piq's own forward
        feats = metric.features(y)
        torch.testing.assert_close(metric.distance(x[1:], ref_features=select_features(feats, torch.tensor([1, 2]))), d[1:])
        assert d.shape == (3,) and (d > 0).all()
        assert metric.distance(x, x).abs().max() < 1e-5  # identity
    d = dists.distance(x, y)
    assert (d < 1).all()  # alpha + beta = 1 keeps DISTS in [0, 1]
    # a closer image is closer
    assert (dists.distance(x, (x + 0.05 * (y - x))) < d).all()


def test_perceptual_resize_and_bad_inputs(dists, tmp_path):
    sized = dists.with_options(size=16)
    x = torch.rand(2, 3, 32, 32)
    assert sized.features(x)[0].shape[-1] == 16
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dists.distance(x * 2 - 1, x)
    dists.with_options(check_range=False).distance(x * 2 - 1, x)  # allowed for the early-stop rule
    with pytest.raises(ValueError, match="NaN"):
        dists.distance(torch.full_like(x, float("nan")), x)
    with pytest.raises(ValueError, match="RGB"):
        dists.distance(x[:, :1], x[:, :1])
    with pytest.raises(FileNotFoundError) as err:
        PerceptualDistance("dists", weights_path=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "vgg16-397923af.pth") in msg and str(tmp_path / "dists_weights.pt") in msg
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "dists_weights.pt").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="replace it"):
        PerceptualDistance("dists", weights_path=tmp_path)


def test_psnr_peak_conventions():
    x = torch.zeros(2, 3, 4, 4)
    y = x + torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)
    torch.testing.assert_close(psnr(x, y, peak=2.0), 20 * torch.log10(2 / torch.tensor([0.1, 0.5])))
    # official 255-peak on [-1, 1] = true PSNR + 20 log10(127.5): 48.5 <-> 6.39 dB
    torch.testing.assert_close(psnr(x, y, peak=255.0) - psnr(x, y, peak=2.0), torch.full((2,), 20 * math.log10(127.5)))
    assert abs(48.5 - 20 * math.log10(127.5) - 6.39) < 0.01


def test_logit_similarities():
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 4.0]])
    out = embedding_similarities({"logits": a}, {"logits": b}, ["logits_l1", "logits_cos"])
    assert out["logits_l1"].item() == pytest.approx(-3.0)
    assert out["logits_cos"].item() == pytest.approx(F.cosine_similarity(a, b).item())
    with pytest.raises(ValueError, match="return_feature"):
        embedding_similarities({"logits": a}, {"logits": b}, ["feature_l2"])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert set(classifier_embedding(net, torch.rand(2, 3, 2, 2))) == {"logits"}


def test_classifier_outputs_is_the_one_forward():
    """features.classifier_outputs: what each mode asks the net for, the net's own tensors back, clear errors."""
    from digits_net import TinyConvNet

    from openood_diffguard.features import classifier_outputs, pooled_features

    torch.manual_seed(0)
    net = TinyConvNet().eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    logits, feat = net(x, return_feature=True)
    plain = classifier_outputs(net, x)
    assert torch.equal(plain.logits, net(x)) and plain.feature is None and plain.maps is None
    pen = classifier_outputs(net, x, "penultimate")
    assert torch.equal(pen.logits, logits) and torch.equal(pen.feature, feat.flatten(1)) and pen.feature.ndim == 2
    assert torch.equal(classifier_outputs(net, x, "optional").feature, pen.feature)
    listed = classifier_outputs(net, x, "list")
    assert len(listed.maps) == 5 and torch.equal(listed.maps[-1].flatten(1), pen.feature)
    assert torch.equal(pooled_features(net, x, [4])[1], listed.maps[3].flatten(2).mean(2))
    emb = classifier_embedding(net, x)
    assert torch.equal(emb["logits"], logits) and torch.equal(emb["feature"], pen.feature)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    assert classifier_outputs(mlp, x, "optional").feature is None  # plain classifiers: logits only

    class Swallows(torch.nn.Module):  # accepts any keyword, returns logits only
        def forward(self, x, **kwargs):
            return mlp(x)

    assert torch.equal(classifier_outputs(Swallows(), x, "optional").logits, mlp(x))
    with pytest.raises(TypeError, match="must return"):
        classifier_outputs(Swallows(), x, "penultimate")
    with pytest.raises(TypeError, match="does not accept return_feature=True; the baselines need"):
        classifier_outputs(mlp, x, "penultimate", owner="the baselines")
    with pytest.raises(TypeError, match="return_feature_list"):
        classifier_outputs(mlp, x, "list")
    with pytest.raises(ValueError, match="feature must be one of"):
        classifier_outputs(net, x, "logits")


def test_gradcam_matches_grad_cam_package():
    from pytorch_grad_cam import GradCAM as ReferenceCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=7).eval()
    x = torch.randn(3, 3, 96, 96)
    labels = torch.tensor([0, 3, 6])
    ours = GradCAM(net, "layer4.-1")(x, labels)
    with ReferenceCAM(model=net, target_layers=[net.layer4[-1]]) as ref_cam:
        ref = ref_cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in labels])
    assert ours.shape == (3, 1, 96, 96)
    torch.testing.assert_close(ours[:, 0], torch.from_numpy(ref), rtol=0, atol=1e-5)
    # frozen net + plain input still works (the hook makes the activation a graph leaf)
    for prm in net.parameters():
        prm.requires_grad_(False)
    torch.testing.assert_close(GradCAM(net, net.layer4[-1])(x, labels), ours)
    with pytest.raises(ValueError, match="layer9"):
        GradCAM(net, "layer9.0")
    m = cam_mask(ours, 0.3, 12)
    assert m.shape == (3, 1, 12, 12) and set(m.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(m, (F.interpolate(ours, size=12, mode="nearest") > 0.3).float())


def _official_cutouts(x, n, cut_size, seed, reps):
    """The official MakeCutouts loop (seeded CPU generator, one geometry per call)."""
    g = torch.Generator().manual_seed(seed)
    H, W = x.shape[2:]
    out = []
    for _ in range(reps):
        max_size, min_size = min(H, W), min(H, W, cut_size)
        views = []
        for _ in range(n):
            size = int(torch.rand([], generator=g) * (max_size - min_size) + min_size)
            ox = torch.randint(0, W - size + 1, (), generator=g)
            oy = torch.randint(0, H - size + 1, (), generator=g)
            views.append(F.interpolate(x[:, :, oy:oy + size, ox:ox + size], cut_size))
        out.append(torch.cat(views))
    return out


def test_cutouts_reproduce_official_sequence_and_per_sample_steps():
    x = torch.randn(2, 3, 64, 64)
    cut = Cutouts(n=4, min_fraction=56 / 64, seed=100)
    ref = _official_cutouts(x, 4, 56, 100, reps=3)
    for step in range(3):
        torch.testing.assert_close(cut(x, step), ref[step], rtol=0, atol=0)
    # per-sample steps: sample 0 at step 2, sample 1 at step 0, gathered in one call
    mixed = cut(x, torch.tensor([2, 0])).view(4, 2, 3, 56, 56)
    torch.testing.assert_close(mixed[:, 0], ref[2].view(4, 2, 3, 56, 56)[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[:, 1], ref[0].view(4, 2, 3, 56, 56)[:, 1], rtol=0, atol=0)
    # the 256 -> 224 ImageNet geometry: sides in [224, 255]
    geo = Cutouts().geometry(20, 256, 256)
    assert geo[..., 0].min() >= 224 and geo[..., 0].max() <= 255
    # a different output size resizes the official 224-crop once more (nearest)
    up = Cutouts(n=4, min_fraction=56 / 64, seed=100, out_size=64)(x, 1)
    torch.testing.assert_close(up, F.interpolate(ref[1], 64), rtol=0, atol=0)
    with pytest.raises(ValueError):
        Cutouts(n=0)


def test_classifier_guidance_clip_x0_keeps_raw_blend_for_the_classifier(linear_schedule):
    from openood_diffguard.guidance import ClassifierGuidance

    x = torch.full((2, 3, 2, 2), 0.9)
    e = torch.full_like(x, -2.0)  # x0 = (x + 2 sqrt(1-a)) / sqrt(a) > 1: clipping matters
    t = torch.tensor([500, 800])
    seen = {}

    def grad_fn(z, cond):
        seen["z"] = z
        return torch.ones_like(z)

    guided = ClassifierGuidance(lambda *_: e, linear_schedule, grad_fn, scale=2.0, target="x0_blend", clip_x0=1.0)
    out = guided(x, t, {})
    a = linear_schedule.alpha_bar(t, like=x).view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
    f = (1 - a).sqrt()
    torch.testing.assert_close(seen["z"], f * x0 + (1 - f) * x)  # classifier sees the unclipped x0 blend
    expected = (x - a.sqrt() * x0.clamp(-1, 1)) / (1 - a).sqrt() - 2.0 * (1 - a).sqrt()
    torch.testing.assert_close(out, expected)
