import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="torchvision's C extension", category=RuntimeWarning)
import openood_diffguard  # noqa: E402,F401  (repairs torchvision before pytorch-ood / piq import it)

torch.set_num_threads(2)


@pytest.fixture
def linear_schedule():
    from openood_diffguard.diffusion import NoiseSchedule

    return NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})
