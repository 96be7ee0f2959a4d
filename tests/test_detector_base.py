import pickle

import pytest
import torch

from openood_diffguard.detectors.base import Detector, check_classifier_output


class Toy(Detector):
    name = "toy"
    DEFAULTS = {"sign": 1.0, "steps": 10}
    cheap_params = ("sign",)
    heavy_attributes = ("model",)

    def statistics(self, net, images, labels=None):
        logits = net(images)
        return {"pred": logits.argmax(1), "maxlogit": logits.max(1).values}

    def confidence(self, stats):
        return self.params["sign"] * stats["maxlogit"]


def test_params_cache_key_and_pickle():
    d = Toy(steps=5)
    with pytest.raises(TypeError, match="unknown parameter"):
        Toy(stepz=3)
    k = d.cache_key()
    assert d.set_params(sign=-1.0).cache_key() == k  # cheap parameter: same statistics
    assert d.set_params(steps=6).cache_key() != k
    d.model = torch.nn.Linear(3, 3)
    clone = pickle.loads(pickle.dumps(d))
    assert clone.model is None and clone.params == d.params


def test_predict_and_loader():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x = torch.randn(6, 3, 2, 2)
    pred, conf = Toy().predict(net, x)
    assert pred.shape == conf.shape == (6,)
    loader = [{"data": x[:3], "label": torch.zeros(3)}, (x[3:], torch.ones(3))]
    stats = Toy().statistics_loader(net, loader, progress=False)
    torch.testing.assert_close(stats["maxlogit"], conf)
    assert stats["label"].tolist() == [0, 0, 0, 1, 1, 1]


def test_classifier_output_checks():
    with pytest.raises(ValueError, match="classes"):
        check_classifier_output(torch.zeros(2, 5), 10)
    with pytest.raises(ValueError, match="NaN"):
        check_classifier_output(torch.full((2, 10), float("nan")), 10)


class LabelEcho(Toy):
    """Analysis-mode detector: its statistics need the test labels (like DiffGuard's oracle mode)."""

    @property
    def needs_labels(self):
        return True

    def statistics(self, net, images, labels=None):
        assert labels is not None, "loader did not pass labels to a detector that needs them"
        return {"pred": labels.clone(), "maxlogit": labels.float()}


def test_label_needing_detectors_get_labels_from_both_loader_paths(tmp_path):
    from openood_diffguard.runtime.cache import ScoreCache, cached_statistics

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x = torch.randn(4, 3, 2, 2)
    batch = {"data": x, "label": torch.tensor([0, -1, 2, -1]), "index": torch.arange(4), "image_name": [f"i{i}" for i in range(4)]}
    assert LabelEcho().statistics_loader(net, [batch], progress=False)["maxlogit"].tolist() == [0, -1, 2, -1]
    out = cached_statistics(LabelEcho(), net, [batch], ScoreCache(tmp_path, "ns"), progress=False)
    assert out.stats["maxlogit"].tolist() == [0, -1, 2, -1]


def test_validate_params_runs_on_construction_and_every_set_params():
    class Checked(Toy):
        def validate_params(self):
            if self.params["steps"] < 1:
                raise ValueError("steps must be >= 1")

    with pytest.raises(ValueError, match="steps"):
        Checked(steps=0)
    d = Checked()
    with pytest.raises(ValueError, match="steps"):
        d.set_params(steps=-3)
