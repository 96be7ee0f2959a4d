import pytest
import torch

import openood_diffguard  # noqa: F401  (imported first: repairs torchvision before pytorch-ood / piq import it)

torch.set_num_threads(2)


@pytest.fixture
def linear_schedule():
    from openood_diffguard.diffusion import NoiseSchedule

    return NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})
