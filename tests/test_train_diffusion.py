"""train-diffusion: a tiny class-conditional UNet on CPU learns, resumes exactly and loads with load_unet."""
import pytest
import torch

from digits_net import digits_split, single_thread  # noqa: F401 (autouse)
from openood_diffguard.diffusion import load_unet
from openood_diffguard.training.data import ImageListDataset, TensorImages
from openood_diffguard.training.diffusion import TINY_UNET, train_diffusion

CFG = {"unet": TINY_UNET, "steps": 20, "batch_size": 32, "lr": 2e-3, "warmup": 2, "ema": 0.9, "save_every": 10}


@pytest.fixture(scope="module")
def digits():
    x, y, _, _ = digits_split()
    return TensorImages(x.clamp(-1, 1), y)  # digits are stored normalised with mean = std = 0.5 = [-1, 1]


def test_loss_decreases_resume_exact_and_loads(digits, tmp_path):
    full = train_diffusion(digits, CFG, tmp_path / "a", progress=False, device="cpu")
    h = full["history"]
    assert len(h) == 20 and sum(h[-5:]) / 5 < 0.8 * sum(h[:5]) / 5, h
    # 10 steps, then resume to 20 from the step-10 checkpoint: identical weights and losses
    part = train_diffusion(digits, {**CFG, "steps": 10}, tmp_path / "b", progress=False, device="cpu")
    rest = train_diffusion(digits, CFG, tmp_path / "b", progress=False, device="cpu")
    assert rest["step"] == 20 and len(rest["history"]) == 10
    assert part["history"] + rest["history"] == pytest.approx(h, rel=1e-5, abs=1e-6)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=1e-5, atol=1e-6)
    model = load_unet(tmp_path / "a")
    assert model.num_classes == 6 and model.null_class == 6
    assert model.schedule.num_train_timesteps == 1000
    x = torch.randn(2, 1, 8, 8)
    eps = model.eps(x, torch.tensor([10, 500]), torch.tensor([0, 6]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_errors(digits, tmp_path):
    train_diffusion(digits, {**CFG, "steps": 1, "save_every": 1}, tmp_path, progress=False, device="cpu")
    with pytest.raises(ValueError, match="architecture"):
        train_diffusion(digits, {**CFG, "num_classes": 9}, tmp_path, progress=False, device="cpu")
    with pytest.raises(TypeError, match="unknown"):
        train_diffusion(digits, {"stepz": 3}, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="image list"):
        ImageListDataset(tmp_path / "none.txt", tmp_path, 8)


def test_image_list(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (i * 100, 0, 255)).save(tmp_path / "img" / f"{i}.png")
    lst = tmp_path / "train.txt"
    lst.write_text("img/0.png 0\nimg/1.png 1\nimg/2.png 2\n")
    ds = ImageListDataset(lst, tmp_path, 8)
    x, y = ds[2]
    assert x.shape == (3, 8, 8) and y == 2 and ds.num_classes == 3
    assert float(x[2].mean()) == pytest.approx(1.0) and float(x[1].mean()) == pytest.approx(-1.0)
    lst.write_text("img/0.png zero\n")
    with pytest.raises(ValueError, match="relpath"):
        ImageListDataset(lst, tmp_path, 8)
