"""NCIS trainer inside a real OpenOOD checkout: OpenOOD's train_oe pipeline through our launcher with the
packaged ``train_ncis`` config and the outlier split written by ``write_openood_files``."""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.openood

from openood_bench import openood_root, build_bench, cpu_shim  # noqa: E402,F401

from openood_diffguard.ncis.generate import _save_pngs, outlier_path, write_openood_files  # noqa: E402


def _outliers(work: Path, n: int = 12) -> Path:
    x = torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _save_pngs(x, [outlier_path(work, i % 3, i) for i in range(n)])
    return write_openood_files(work, n, batch_size=5)["openood_yml"]


def test_trainer_registered_in_every_binding_and_openood_names_delegate():
    from openood_diffguard.openood import register

    register(evaluator=False)
    import openood.pipelines.train_oe_pipeline as oe_pipe
    import openood.pipelines.train_pipeline as train_pipe
    import openood.trainers as T
    import openood.trainers.utils as U

    assert len({id(m.get_trainer) for m in (T, U, oe_pipe, train_pipe)}) == 1
    assert U.get_trainer.openood_original.__module__ == "openood.trainers.utils"
    from openood.utils import Config

    with pytest.raises(ValueError, match="needs an ID and an outlier loader"):
        U.get_trainer(torch.nn.Linear(2, 2), object(), None, Config({"trainer": {"name": "ncis"}}))


def test_ncis_training_through_the_launcher(tmp_path, monkeypatch):
    from openood_diffguard.openood.main import main
    from openood_diffguard.ncis.openood_trainer import NCISTrainer

    bench = build_bench(tmp_path / "bench")
    oe_yml = _outliers(tmp_path / "ncis_work")
    assert (tmp_path / "ncis_work" / "outliers.txt").read_text().count(" -1\n") == 12
    seen = {}
    orig_init, orig_epoch = NCISTrainer.__init__, NCISTrainer.train_epoch

    def spy_init(self, *a, **k):
        orig_init(self, *a, **k)
        seen["trainer"] = self

    def spy_epoch(self, epoch_idx):
        net, metrics = orig_epoch(self, epoch_idx)
        seen.setdefault("metrics", []).append(metrics)
        return net, metrics

    monkeypatch.setattr(NCISTrainer, "__init__", spy_init)
    monkeypatch.setattr(NCISTrainer, "train_epoch", spy_epoch)
    monkeypatch.chdir(bench)
    cfg = openood_root() / "configs"
    argv = ["--config", str(cfg / "datasets/cifar10/cifar10.yml"), str(cfg / "networks/resnet18_32x32.yml"),
            str(cfg / "pipelines/train/baseline.yml"), str(cfg / "preprocessors/base_preprocessor.yml"),
            "train_ncis", str(oe_yml), "--optimizer.num_epochs", "2", "--num_workers", "0",
            "--dataset.train.batch_size", "4", "--output_dir", str(tmp_path / "results"), "--merge_option", "merge"]
    assert main(argv) == 0
    trainer = seen["trainer"]
    assert len(seen["metrics"]) == 2 and all("energy_reg" in m and "head_id_slope" in m for m in seen["metrics"])
    # the outlier loader got the released script's transform; phi is optimised with the network
    oe_ds = trainer.train_unlabeled_loader.dataset
    assert "RandomChoice" in repr(oe_ds.transform_image) and oe_ds.preprocessor is oe_ds.transform_image
    assert oe_ds[0]["data"].shape == (3, 32, 32)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in trainer.head.parameters())
    assert list((tmp_path / "results").rglob("best*.ckpt")), "OpenOOD's recorder saved no checkpoint"
    sys.stdout = sys.__stdout__
