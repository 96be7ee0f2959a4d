"""The train-lfdn and train-diffusion commands end to end on a digits image list."""
import numpy as np
import pytest
import torch

from digits_net import digits_split, trained_digits_net, single_thread  # noqa: F401 (autouse)
from openood_diffguard.cli import main
from openood_diffguard.detectors.lfdn import LFDN, VARIANTS
from openood_diffguard.diffusion import load_unet
from openood_diffguard.training.lfdn import fit_lfdn, train_config


@pytest.fixture(scope="module")
def imglist(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("digits")
    x, y, _, _ = digits_split()
    lines = []
    for i in range(120):
        px = ((x[i, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(px, mode="L").save(root / f"{i}.png")
        lines.append(f"{i}.png {int(y[i])}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_train_lfdn_cli(imglist, tmp_path, capsys):
    net = trained_digits_net()
    torch.save(net.state_dict(), tmp_path / "clf.pt")
    out = tmp_path / "lfdn.pt"
    rc = main(["train-lfdn", "--imglist", str(imglist / "train.txt"), "--data-root", str(imglist),
               "--network", "digits_net:TinyConvNet", "--classifier", str(tmp_path / "clf.pt"), "--num-classes", "6",
               "--normalization", "unknown", "--image-size", "8", "--channels", "1", "--out", str(out),
               "--width", "32", "--blocks", "1", "--epochs", "2", "--device", "cpu"])
    assert rc == 0 and out.is_file()
    # the CLI = the library on the same pixels: the PNGs' 8-bit values, 'unknown' normalisation (mean = std =
    # 0.5) maps them back to [-1, 1]; default layers 1-4; the given training options
    px = ((digits_split()[0][:120, 0].numpy() + 1) * 127.5).round().clip(0, 255)
    pixels = torch.from_numpy((px / 127.5 - 1.0).astype(np.float32))[:, None]
    # the CLI's default --variant code: the released recipe and per-layer feature normalisation
    cfg = train_config({"width": 32, "blocks": 1, "epochs": 2}, "code")
    ref = fit_lfdn(net, [(pixels, None)], [1, 2, 3, 4], cfg, progress=False,
                   feature_norm=VARIANTS["code"]["feature_norm"])
    got = torch.load(out, map_location="cpu", weights_only=True)
    assert got["classifier_hash"] == ref["classifier_hash"] and got["layers"] == [1, 2, 3, 4]
    assert got["train_config"] == ref["train_config"] and got["final"].keys() == ref["final"].keys()
    assert got["history"] == pytest.approx(ref["history"], rel=1e-5)
    for k, v in ref["final"].items():
        torch.testing.assert_close(got["final"][k], v, rtol=1e-5, atol=1e-6)
    det = LFDN(checkpoint=str(out), normalization="unknown")  # 1-channel images, mean = std = 0.5
    det.setup(net)
    x = digits_split()[2][:3]
    assert det.predict(net, x)[1].shape == (3,)
    from openood_diffguard.training.lfdn import load_checkpoint

    raw = torch.load(out, weights_only=True)  # default --variant code: its normalisation and training recipe
    assert load_checkpoint(out)["feature_norm"] == "layer_code"
    assert (raw["train_config"]["lr"], raw["train_config"]["ema"], raw["train_config"]["width"]) == (1e-5, 0.9999, 32)
    with pytest.raises(ValueError, match="variant"):
        LFDN(checkpoint=str(out), variant="ours", normalization="unknown").setup(net)
    rc = main(["train-lfdn", "--imglist", str(imglist / "train.txt"), "--network", "digits_net:TinyConvNet",
               "--classifier", str(tmp_path / "clf.pt"), "--num-classes", "10", "--out", str(out)])
    assert rc == 2 and "does not fit --network digits_net:TinyConvNet with 10 classes" in capsys.readouterr().err


def test_train_diffusion_cli(imglist, tmp_path):
    rc = main(["train-diffusion", "--imglist", str(imglist / "train.txt"), "--data-root", str(imglist),
               "--preset", "tiny", "--channels", "1", "--sample-size", "8", "--steps", "2", "--batch-size", "8",
               "--out", str(tmp_path / "unet"), "--device", "cpu"])
    assert rc == 0
    assert load_unet(tmp_path / "unet").num_classes == 6
