"""Tiny random DiffGuard stand-ins shared by the DiffGuard tests: an OpenOOD-like classifier, images whose
noisy states cross the AES thresholds at different steps, and tiny UNet / DiT / LDM adapters (fixtures)."""
import pytest
import torch
from torch import nn

from analytic import GaussianMixtureModel
from openood_diffguard.diffusion import CrossAttnUNetAdapter, DiTAdapter, LatentCodec, NoiseSchedule, UNetAdapter
from openood_diffguard.space import ImageSpace

IMAGENET = ImageSpace.for_dataset("imagenet")


class TinyNet(nn.Module):
    """OpenOOD-like classifier: net(x) -> logits, net(x, return_feature=True) -> (logits, feature), layer4."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x, return_feature=False):
        f = self.layer4(self.stem(x)).mean((2, 3))
        return (self.fc(f), f) if return_feature else self.fc(f)


def _images(n, side=16, seed=0):
    """Random images of decreasing contrast: their noisy states cross the PSNR threshold at different steps."""
    g = torch.Generator().manual_seed(seed)
    contrast = torch.linspace(0.1, 1.0, n).view(n, 1, 1, 1)
    return IMAGENET.from_unit(0.5 + (torch.rand(n, 3, side, side, generator=g) - 0.5) * contrast)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})


@pytest.fixture(scope="module")
def tiny_unet(schedule):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    return UNetAdapter(unet.eval(), schedule)


@pytest.fixture(scope="module")
def tiny_dit(schedule):
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                sample_size=4, patch_size=2, num_embeds_ada_norm=5)
    for prm in dit.parameters():  # AdaLN-zero init makes a fresh DiT output exact zeros: perturb it
        prm.data.add_(0.02 * torch.randn_like(prm))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    return DiTAdapter(dit.eval(), schedule, codec=LatentCodec(vae.eval()))


@pytest.fixture(scope="module")
def tiny_ldm(schedule):
    """cin256-v2-like: UNet2DConditionModel with a class-embedding table as cross-attention context, VQ codec."""
    from diffusers import UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=8)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8, 8),
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 layers_per_block=1, norm_num_groups=4, num_vq_embeddings=32, vq_embed_dim=3, sample_size=16)
    return CrossAttnUNetAdapter(unet.eval(), nn.Embedding(6, 16), schedule, codec=LatentCodec(vq.eval()))


def _mixture(schedule, sigma=0.12):
    """Known classes k = 0..2: +0.45 on channel k, -0.45 elsewhere; the held-out component (-0.45
    everywhere) lies between them. Returns the ideal class-conditional eps model of the known mixture and
    its Bayes classifier (equal weights, shared isotropic sigma: linear logits)."""
    means = torch.full((4, 3, 2, 2), -0.45, dtype=torch.float64)
    for k in range(3):
        means[k, k] = 0.45
    known = GaussianMixtureModel(means[:3], sigma, schedule)
    held_out = GaussianMixtureModel(means[3:], sigma, schedule)
    mu = means[:3].flatten(1).float()
    clf = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        clf[1].weight.copy_(mu / sigma**2)
        clf[1].bias.copy_(-(mu**2).sum(1) / (2 * sigma**2))
    g = torch.Generator().manual_seed(3)
    x_id, y_id = known.sample_data(90, labels=torch.arange(3).repeat(30), generator=g)
    x_ood, _ = held_out.sample_data(90, generator=g)
    x = torch.cat([x_id, x_ood]).clamp(-1, 1)  # pixels in [-1, 1] == images normalised with mean = std = 0.5
    return known, clf.eval(), x, y_id
