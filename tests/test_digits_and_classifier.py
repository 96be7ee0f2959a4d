import numpy as np
import torch

from openood_diffguard.data import DigitsOpenSet
from openood_diffguard.networks import SmallResNet
from openood_diffguard.training.classifier import _random_shift, accuracy, train_classifier


def test_digits_open_set_splits_are_disjoint_and_labelled():
    d = DigitsOpenSet()
    names = [set(d.dataset(k, s).names) for k, s in d.splits]
    assert sum(map(len, names)) == len(set().union(*names)) == 1797
    assert set(d.dataset("id", "test").labels.tolist()) == set(range(6))
    assert set(d.dataset("ood", "test").labels.tolist()) == {-1}
    x = d.dataset("id", "train").images
    assert x.shape[1:] == (1, 16, 16) and -1.0 <= x.min() and x.max() <= 1.0
    assert DigitsOpenSet(seed=1).dataset("id", "train").names != d.dataset("id", "train").names


def _shift_offsets(x: torch.Tensor, out: torch.Tensor, s: int) -> np.ndarray:
    """Index (dy * (2s+1) + dx) of the crop of numpy's reflect-padded ``x`` that equals ``out``, per image;
    asserts exactly one crop matches (an independent statement of the augmentation)."""
    H, W = x.shape[-2:]
    pad = np.pad(x.numpy(), ((0, 0), (0, 0), (s, s), (s, s)), mode="reflect")
    crops = np.stack([pad[:, :, dy:dy + H, dx:dx + W] for dy in range(2 * s + 1) for dx in range(2 * s + 1)], 1)
    match = (crops == out.numpy()[:, None]).all((2, 3, 4))  # [B, (2s+1)^2]
    assert (match.sum(1) == 1).all(), "every output must be exactly one reflect-padded crop of its input"
    return match.argmax(1)


def test_random_shift_is_one_reflect_padded_crop_per_image():
    s = 2
    x = torch.randn(400, 3, 7, 9, generator=torch.Generator().manual_seed(0))  # random content: crops differ
    out = _random_shift(x, s, torch.Generator().manual_seed(1))
    offsets = _shift_offsets(x, out, s)
    counts = np.bincount(offsets, minlength=(2 * s + 1) ** 2)
    assert counts.size == 25 and counts.min() >= 4  # one uniform draw per image over all of [-s, s]^2 (~16 each)
    torch.testing.assert_close(_random_shift(x, s, torch.Generator().manual_seed(1)), out, rtol=0, atol=0)
    assert _random_shift(x, 0, torch.Generator()) is x


def test_random_shift_matches_roll_for_interior_content():
    s = 2
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)) + 0.5
    out = _random_shift(x, s, torch.Generator().manual_seed(0))
    dy, dx = np.divmod(_shift_offsets(x, out, s), 2 * s + 1)
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 10  # not one shift for the batch
    for b in range(len(x)):  # known answer: content at (i, j) moves to (i + s - dy, j + s - dx)
        torch.testing.assert_close(out[b], torch.roll(x[b], (s - int(dy[b]), s - int(dx[b])), (1, 2)), rtol=0, atol=0)


def test_small_resnet_learns_digits_quickly():
    torch.manual_seed(0)
    d = DigitsOpenSet()
    net = SmallResNet(d.num_classes, in_channels=1, widths=(8, 16, 16, 16))
    hist = train_classifier(net, d.loader("id", "train", 64, shuffle=True), epochs=6, progress=False)
    assert hist[-1] < hist[0]
    assert accuracy(net, d.loader("id", "test")) > 0.85
    logits, feats = net(d.dataset("id", "test").images[:4], return_feature_list=True)
    assert logits.shape == (4, 6) and feats[-1].shape == (4, 16, 1, 1)
    W, b = net.get_fc()
    assert W.shape == (6, 16) and b.shape == (6,)
