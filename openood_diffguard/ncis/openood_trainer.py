"""NCIS as an OpenOOD trainer (``trainer.name: ncis``), used by OpenOOD's ``train_oe`` pipeline exactly as
its OE trainer is: an ID loader plus an outlier ("oe") loader, here the generated NCIS outliers.

Differences from ``OETrainer``: the loss is NCIS's energy regulariser (``ncis.train.energy_regularised_loss``)
with its head phi in the optimizer; the outlier loader's images get the released script's random
NEAREST/BILINEAR resize + crop + flip (OpenOOD gives every non-train split the test transform);
tensors go to the network's device instead of a hard-coded ``.cuda()``. Importing this module imports
OpenOOD (an optional dependency). Config keys (``trainer.*``): ``beta`` (1.0), ``head_hidden`` (null:
Linear(1, 2); 512: the ImageNet-100 MLP), ``head_init`` (oriented | random: see ``EnergyHead``),
``ood_transform`` (both | nearest | bilinear | none).
"""
from __future__ import annotations

import torch
from openood.trainers.base_trainer import BaseTrainer
from openood.trainers.lr_scheduler import cosine_annealing
from openood.utils import comm
from tqdm.auto import tqdm

from .train import EnergyHead, energy_regularised_loss, ood_transform


def _normalisation(config) -> tuple[list[float], list[float]]:
    from openood.preprocessors.transform import normalization_dict

    kind = config.dataset.normalization_type
    return tuple(normalization_dict.get(kind, [[0.5] * 3, [0.5] * 3]))


class NCISTrainer(BaseTrainer):
    def __init__(self, net, train_loader, train_unlabeled_loader, config) -> None:
        super().__init__(net, train_loader, config)
        tcfg = config.trainer
        self.beta = float(tcfg.beta if "beta" in tcfg else 1.0)
        hidden = tcfg.head_hidden if "head_hidden" in tcfg else None
        self.device = next(net.parameters()).device
        init = str(tcfg.head_init) if "head_init" in tcfg else "oriented"
        self.head = EnergyHead(int(hidden) if hidden else None, init).to(self.device)
        self.train_unlabeled_loader = train_unlabeled_loader
        if train_unlabeled_loader is None:
            raise ValueError("the NCIS trainer needs the outlier loader: add the 'oe' split (the openood_oe.yml "
                             "written by `openood-diffguard ncis generate`) and use pipeline train_oe")
        kind = str(tcfg.ood_transform) if "ood_transform" in tcfg else "both"
        if kind != "none":
            mean, std = _normalisation(config)
            tf = ood_transform(kind, int(config.dataset.image_size), mean, std)
            ds = train_unlabeled_loader.dataset  # ImglistDataset: workers copy it when iteration starts
            ds.transform_image = ds.preprocessor = tf
        # the head is trained jointly: same SGD settings and schedule as OpenOOD's BaseTrainer
        self.optimizer = torch.optim.SGD(list(net.parameters()) + list(self.head.parameters()), config.optimizer.lr,
                                         momentum=config.optimizer.momentum,
                                         weight_decay=config.optimizer.weight_decay, nesterov=True)
        steps = config.optimizer.num_epochs * len(train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=lambda s: cosine_annealing(s, steps, 1, 1e-6 / config.optimizer.lr))

    def train_epoch(self, epoch_idx):
        self.net.train()
        loss_avg = reg_avg = 0.0
        out_iter = iter(self.train_unlabeled_loader)
        for batch in tqdm(self.train_loader, desc=f"Epoch {epoch_idx:03d}", disable=not comm.is_main_process()):
            try:
                out_batch = next(out_iter)
            except StopIteration:  # fewer outliers than ID batches: start the outliers again
                out_iter = iter(self.train_unlabeled_loader)
                out_batch = next(out_iter)
            n = len(batch["data"])
            data = torch.cat([batch["data"], out_batch["data"]]).to(self.device)
            logits = self.net(data)
            loss, parts = energy_regularised_loss(logits[:n], batch["label"].to(self.device), logits[n:], self.head, self.beta)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            loss_avg = loss_avg * 0.8 + float(loss.detach()) * 0.2
            reg_avg = reg_avg * 0.8 + parts["energy_reg"] * 0.2
        return self.net, {"epoch_idx": epoch_idx, "loss": self.save_metrics(loss_avg), "energy_reg": reg_avg,
                          "head_id_slope": self.head.id_slope()}
