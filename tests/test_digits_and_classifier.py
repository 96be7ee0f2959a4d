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


def test_random_shift_matches_roll_for_interior_content():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    out = _random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)))


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
