import pytest
import torch

from openood_diffguard.space import ImageSpace, resolve_normalization


def test_round_trip_and_ranges():
    space = ImageSpace.for_dataset("cifar10", diffusion_size=16)
    u = torch.rand(2, 3, 8, 8)
    x = space.from_unit(u)
    torch.testing.assert_close(space.to_unit(x), u)
    px = space.to_pixels(x)
    assert px.shape == (2, 3, 16, 16) and px.min() >= -1 and px.max() <= 1
    smooth = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(2, 3, 8, 8)  # survives up/down-sampling
    back = space.to_classifier(space.to_pixels(space.from_unit(smooth)), size=8)
    assert back.shape == x.shape and (space.to_unit(back) - smooth).abs().max() < 0.05


def test_normalization_lookup():
    assert resolve_normalization("cifar6_seed1") == resolve_normalization("cifar10")
    assert resolve_normalization("mnist") == resolve_normalization(None) == ((0.5,) * 3, (0.5,) * 3)


def test_uniform_stats_fit_any_channel_count_but_per_channel_stats_do_not():
    gray = torch.rand(2, 1, 4, 4) * 2 - 1
    ImageSpace.for_dataset("digits").validate(gray)
    with pytest.raises(ValueError, match="channels"):
        ImageSpace.for_dataset("cifar10").to_unit(gray)


def test_validate_names_the_problem():
    space = ImageSpace.for_dataset("imagenet")
    with pytest.raises(ValueError, match="NaN"):
        space.validate(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="normalised"):
        space.validate(torch.rand(1, 3, 4, 4) * 255)  # raw pixels, not normalised
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        space.validate(torch.zeros(3, 4, 4))
