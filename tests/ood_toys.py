"""Toy detector, net and OpenOOD-style batches shared by the cache / registry / OpenOOD tests."""
import torch

from openood_diffguard.detectors.base import Detector


class ToyDetector(Detector):
    """conf = sign * max logit; 'steps' stands for an expensive parameter. Counts scored samples."""

    name = "toy"
    DEFAULTS = {"sign": 1.0, "steps": 10, "normalization": None, "delay": 0.0}
    cheap_params = ("sign",)
    heavy_attributes = ("model",)
    needs_grad = False

    def __init__(self, **params):
        super().__init__(**params)
        self.scored = 0

    def statistics(self, net, images, labels=None):
        import time

        if self.params["delay"]:
            time.sleep(self.params["delay"])
        self.scored += images.shape[0]
        logits = net(images)
        return {"pred": logits.argmax(1), "maxlogit": logits.max(1).values, "logits": logits.detach()}

    def confidence(self, stats):
        return self.params["sign"] * torch.as_tensor(stats["maxlogit"])


def tiny_net(seed=0, classes=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, classes))


def batches(n=20, bs=6, seed=1, prefix="img"):
    """OpenOOD-like batch dicts (data, label, image_name, index)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return [{"data": x[i:i + bs], "label": y[i:i + bs], "index": torch.arange(i, min(i + bs, n)),
             "image_name": [f"{prefix}/{j:04d}.png" for j in range(i, min(i + bs, n))]} for i in range(0, n, bs)]
