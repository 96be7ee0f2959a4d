"""ResNet18_32x32: the state-dict layout OpenOOD checkpoints have (derived here from the architecture facts)
and OpenOOD's calling conventions; with OpenOOD importable, strict loading of its own network's weights and
identical outputs on every interface."""
import pytest
import torch

from openood_diffguard.networks import ResNet18_32x32, SmallResNet


def published_layout(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """Key -> shape of OpenOOD's ResNet18_32x32 state dict, from its description: 3x3 stem to 64 channels,
    4 stages x 2 basic blocks (64/128/256/512, first strides 1/2/2/2), 1x1 conv + BN shortcut where the
    shape changes, global pool, linear head; BatchNorm keeps weight/bias/running stats/num_batches_tracked."""
    out: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{k}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    out["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    cin = 64
    for stage, (w, s) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), 1):
        for j in range(2):
            p = f"layer{stage}.{j}"
            out[f"{p}.conv1.weight"] = (w, cin, 3, 3)
            bn(f"{p}.bn1", w)
            out[f"{p}.conv2.weight"] = (w, w, 3, 3)
            bn(f"{p}.bn2", w)
            if j == 0 and (s != 1 or cin != w):
                out[f"{p}.shortcut.0.weight"] = (w, cin, 1, 1)
                bn(f"{p}.shortcut.1", w)
            cin = w
    out["fc.weight"] = (num_classes, 512)
    out["fc.bias"] = (num_classes,)
    return out


@pytest.mark.parametrize("num_classes", [10, 6, 100])
def test_state_dict_matches_published_layout(num_classes):
    sd = ResNet18_32x32(num_classes=num_classes).state_dict()
    expected = published_layout(num_classes)
    assert list(sd) == list(expected)  # same keys in the same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_parameter_count_is_the_known_cifar_resnet18():
    net = ResNet18_32x32(num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962


def test_forward_interfaces(single_thread):
    torch.manual_seed(0)
    net = ResNet18_32x32(num_classes=6).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = net(x)
        l2, feat = net(x, return_feature=True)
        l3, flist = net(x, return_feature_list=True)
        assert logits.shape == (2, 6) and feat.shape == (2, 512)
        assert torch.equal(logits, l2) and torch.equal(logits, l3)
        assert [tuple(f.shape) for f in flist] == [(2, 64, 32, 32), (2, 64, 32, 32), (2, 128, 16, 16),
                                                   (2, 256, 8, 8), (2, 512, 1, 1)]
        assert torch.equal(flist[-1].flatten(1), feat)
        W, b = net.get_fc()
        assert torch.allclose(torch.as_tensor(W) @ feat.T + torch.as_tensor(b)[:, None], logits.T, atol=1e-5)
        assert net.get_fc_layer() is net.fc
        # ReAct clip: a huge threshold changes nothing, threshold 0 leaves only the bias
        assert torch.allclose(net.forward_threshold(x, 1e9), logits)
        assert torch.allclose(net.forward_threshold(x, 0.0), net.fc.bias.expand(2, 6))
        assert tuple(net.intermediate_forward(x, 3).shape) == (2, 256, 8, 8)
    with pytest.raises(ValueError, match="layer_index"):
        net.intermediate_forward(x, 5)


def test_small_resnet_keeps_its_layout():
    keys = list(SmallResNet(num_classes=3, in_channels=1).state_dict())
    assert keys[0] == "conv1.weight" and "layer4.0.conv2.weight" in keys and "layer4.1.conv1.weight" not in keys
    assert "layer2.0.shortcut.0.weight" in keys and "layer4.0.shortcut.0.weight" not in keys


@pytest.mark.openood
def test_openood_checkpoint_loads_strictly_and_agrees(single_thread):
    networks = pytest.importorskip("openood.networks", reason="OpenOOD not installed")
    torch.manual_seed(1)
    theirs = networks.ResNet18_32x32(num_classes=6).eval()
    for m in theirs.modules():  # non-trivial BN statistics so a mis-wired layer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = ResNet18_32x32(num_classes=6).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
        (_, a), (_, b) = ours(x, return_feature=True), theirs(x, return_feature=True)
        assert torch.allclose(a, b, atol=1e-5)
        for fa, fb in zip(ours(x, return_feature_list=True)[1], theirs(x, return_feature_list=True)[1]):
            assert torch.allclose(fa, fb, atol=1e-5)
        assert torch.allclose(ours.forward_threshold(x, 0.5), theirs.forward_threshold(x, 0.5), atol=1e-5)
        assert torch.allclose(ours.intermediate_forward(x, 2), theirs.intermediate_forward(x, 2), atol=1e-5)
