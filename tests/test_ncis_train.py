"""NCIS energy regulariser (known answer), outlier resizing, and the CPU training loop."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from openood_diffguard.ncis import EnergyHead, energy_regularised_loss, ood_transform, random_interpolation_resize, train_with_outliers


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


def test_energy_regularised_loss_known_answer():
    head = EnergyHead()
    with torch.no_grad():
        head.net.weight.copy_(torch.tensor([[-1.0], [2.0]]))
        head.net.bias.copy_(torch.tensor([0.5, -1.0]))
    li = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    lo = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([0, 1])
    loss, parts = energy_regularised_loss(li, y, lo, head, beta=0.5)
    ce = np.mean([-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.e / (1 + math.e))])
    s = [math.log(math.exp(2) + 1), math.log(1 + math.e), math.log(2)]
    def nll(v, target):  # phi(s) = (-s + 0.5, 2 s - 1), class 1 = ID
        z = np.array([-v + 0.5, 2 * v - 1])
        return -(z[target] - np.log(np.exp(z).sum()))
    reg = np.mean([nll(s[0], 1), nll(s[1], 1), nll(s[2], 0)])
    assert parts["ce"] == pytest.approx(ce, rel=1e-6) and parts["energy_reg"] == pytest.approx(reg, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(ce + 0.5 * reg, rel=1e-6)
    assert EnergyHead(hidden=8)(torch.zeros(3)).shape == (3, 2)


def test_random_interpolation_resize_uses_both_modes_per_image():
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = random_interpolation_resize(x, 8, torch.Generator().manual_seed(1))
    near = torch.nn.functional.interpolate(x, size=(8, 8), mode="nearest")
    bil = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    is_near = (out - near).flatten(1).abs().amax(1) < 1e-6
    is_bil = (out - bil).flatten(1).abs().amax(1) < 1e-6
    assert bool((is_near ^ is_bil).all()) and 10 < int(is_near.sum()) < 54
    assert random_interpolation_resize(x, 16, torch.Generator()) is x


def test_ood_transform_pil_both_modes_and_errors():
    from PIL import Image

    im = Image.fromarray((np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8))  # checkerboard: modes differ
    t = ood_transform("both", 8, (0.5,), (0.5,), crop_padding=0)
    torch.manual_seed(0)
    outs = {round(float(t(im).std()), 3) for _ in range(30)}
    assert len(outs) == 2  # nearest keeps the checkerboard, bilinear averages it away
    with pytest.raises(ValueError, match="ood_transform must be one of"):
        ood_transform("bicubic", 8, (0.5,), (0.5,))


EPOCHS = 10


def test_training_with_outliers_separates_their_energy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 8, 8, generator=g) * 0.3
    y = torch.arange(128) % 2
    x[y == 1] += 1.0
    outliers = torch.randn(128, 1, 8, 8, generator=g) * 0.3 - 2.0
    data = [{"data": x[i], "label": int(y[i])} for i in range(128)]
    from openood_diffguard.networks import SmallResNet

    def run(out):
        torch.manual_seed(0)
        net = SmallResNet(2, in_channels=1, widths=(8, 8, 8, 8))
        res = train_with_outliers(net, DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)),
                                  out, epochs=EPOCHS, progress=False)
        with torch.no_grad():
            s_in, s_out = torch.logsumexp(net(x), 1), torch.logsumexp(net(outliers), 1)
        return res, s_in, s_out
    res, s_in, s_out = run(outliers)
    res_plain, p_in, p_out = run(None)
    assert "energy_reg" in res["history"][-1] and "energy_reg" not in res_plain["history"][-1]
    # the regulariser separates ID from outliers along logsumexp, in the orientation its head learned
    slope = res["history"][-1]["head_id_slope"]
    assert slope == pytest.approx(res["head"].id_slope())
    sign = 1 if slope > 0 else -1
    head_acc = ((sign * s_in[:, None] > sign * s_out[None, :]).float().mean())
    plain_acc = max(float((p_in[:, None] > p_out[None, :]).float().mean()), float((p_in[:, None] < p_out[None, :]).float().mean()))
    assert float(head_acc) > 0.99 and float(head_acc) > plain_acc


def test_energy_head_init_orientation():
    slopes = {init: [] for init in ("oriented", "random")}
    for seed in range(20):
        for init in slopes:
            torch.manual_seed(seed)
            slopes[init].append(EnergyHead(init=init).id_slope())
    assert all(s > 0 for s in slopes["oriented"])
    assert any(s < 0 for s in slopes["random"])  # PyTorch's init: either orientation
    assert [abs(s) for s in slopes["oriented"]] == pytest.approx([abs(s) for s in slopes["random"]])
    torch.manual_seed(3)
    assert EnergyHead(hidden=16).id_slope() > 0
    with pytest.raises(ValueError, match="init must be one of"):
        EnergyHead(init="zeros")
