"""Content-keyed per-sample noise (``diffusion/noise.py``, DiffNB's ``noise: per_sample``): the hash is the
published triple32, the draws are standard normal and independent across samples, repeats and seeds, and a
sample's draw depends on its content only (never on its batch, position or a normalisation round trip)."""
import numpy as np
import pytest
import torch
from scipy import stats

from openood_diffguard.diffusion.noise import content_key, hash32, keyed_normal
from openood_diffguard.space import ImageSpace


def _triple32(x: int) -> int:
    """Chris Wellons' triple32 in plain Python integers (the reference the int64 version must equal)."""
    m = 0xFFFFFFFF
    x ^= x >> 17
    x = (x * 0xED5AD4BB) & m
    x ^= x >> 11
    x = (x * 0xAC4C1B51) & m
    x ^= x >> 15
    x = (x * 0x31848BAB) & m
    return x ^ (x >> 14)


def test_hash32_is_triple32_without_overflow():
    words = torch.cat([torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
                       torch.randint(0, 2 ** 32, (3000,), generator=torch.Generator().manual_seed(0))])
    got = hash32(words).tolist()
    assert got == [_triple32(int(w)) for w in words]
    assert min(got) >= 0 and max(got) < 2 ** 32


def _images(n, seed=0, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=g) * 255).round() / 255


def test_draws_are_standard_normal_and_independent():
    keys = content_key(_images(48))
    z = keyed_normal(keys, (4, 3, 16, 16), seed=0)
    assert z.shape == (48, 4, 3, 16, 16) and z.dtype == torch.float32
    flat = z.flatten().double().numpy()
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    per_sample = z.flatten(1)
    corr = torch.corrcoef(per_sample)[~torch.eye(48, dtype=torch.bool)]
    bound = 5 / per_sample.shape[1] ** 0.5  # 5 standard errors of a correlation of independent draws
    assert corr.abs().max() < bound
    lag = np.corrcoef(per_sample[:, :-1].flatten(), per_sample[:, 1:].flatten())[0, 1]
    assert abs(lag) < 5 / per_sample.numel() ** 0.5  # neighbouring elements (one Box-Muller pair) uncorrelated
    repeats = z[:, 0].flatten(), z[:, 1].flatten()
    assert abs(np.corrcoef(*repeats)[0, 1]) < 5 / repeats[0].numel() ** 0.5
    other = keyed_normal(keys, (4, 3, 16, 16), seed=1)
    assert abs(np.corrcoef(other.flatten(), z.flatten())[0, 1]) < 5 / z.numel() ** 0.5
    big_seed = keyed_normal(keys, (4, 3, 16, 16), seed=1 << 40)  # the high 32 bits of the seed count too
    assert abs(np.corrcoef(big_seed.flatten(), z.flatten())[0, 1]) < 5 / z.numel() ** 0.5


def test_a_samples_draw_depends_on_its_content_only():
    x = _images(6)
    keys = content_key(x)
    z = keyed_normal(keys, (2, 5, 5))
    order = [4, 0, 5]
    torch.testing.assert_close(keyed_normal(content_key(x[order]), (2, 5, 5)), z[order], rtol=0, atol=0)
    torch.testing.assert_close(keyed_normal(keys, (2, 5, 5), chunk=7), z, rtol=0, atol=0)  # chunking
    # a normalisation round trip (float rounding) keeps the key; one 8-bit level in one pixel changes it
    space = ImageSpace.for_dataset("cifar10")
    assert torch.equal(content_key(space.to_unit(space.from_unit(x))), keys)
    y = x.clone()
    y[0, 2, 7, 7] = (y[0, 2, 7, 7] + 1 / 255) % 1
    assert not torch.equal(content_key(y)[0], keys[0]) and torch.equal(content_key(y)[1:], keys[1:])
    # swapping two pixels changes the key (position matters, not only the histogram)
    s = x.clone()
    s[0, 0, 0, 0], s[0, 0, 0, 1] = x[0, 0, 0, 1], x[0, 0, 0, 0]
    assert not torch.equal(content_key(s)[0], keys[0]) or torch.equal(x[0, 0, 0, 0], x[0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"keys must be \[B, 2\]"):
        keyed_normal(keys[:, 0], (3,))
