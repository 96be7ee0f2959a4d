"""Class-conditional pixel diffusion model for DiffNB (``openood-diffguard train-diffusion``).

diffusers ``UNet2DModel`` with ``num_class_embeds = C + 1`` (row C = null class for classifier-free
guidance; the class embedding is added to the time embedding as in the DiffNB code), eps-prediction,
linear betas 1e-4 -> 0.02 over T = 1000. Training as the DiffNB code: AdamW lr 2e-4, wd 0, linear
warm-up, grad-norm clip 1.0, EMA 0.9999, horizontal flips, label dropout 0.1 (label -> null).
Differences: mean (not summed) eps-MSE, uniform (not antithetic) t.

The output directory is a diffusers model directory (``unet/`` = EMA weights, ``scheduler/``) that
``openood_diffguard.diffusion.load_unet`` loads; ``checkpoint.pt`` holds everything to resume exactly
(weights, EMA, optimizer, warm-up schedule, step; the random stream is a function of (seed, step), so a
resumed run draws the same noise, timesteps, flips, label drops, dropout masks and batches).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .defaults import CIFAR_UNET, TINY_UNET  # noqa: F401  (re-exported)
from .defaults import DIFFUSION_TRAIN as TRAIN_DEFAULTS

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "prediction_type": "epsilon", "clip_sample": False}
ARCH_KEYS = ("num_classes", "unet")


def build_unet(unet_cfg: dict, num_classes: int):
    from diffusers import UNet2DModel

    cfg = {**unet_cfg, "down_block_types": tuple(unet_cfg["down_block_types"]),
           "up_block_types": tuple(unet_cfg["up_block_types"]),
           "block_out_channels": tuple(unet_cfg["block_out_channels"])}
    return UNet2DModel(**cfg, out_channels=cfg["in_channels"], num_class_embeds=num_classes + 1)


class _Batches:
    """Deterministic batches of a map-style dataset: epoch e uses permutation(seed, e); step s takes the
    s-th batch of the concatenated epochs, so any step can be resumed without replaying earlier ones."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int) -> None:
        self.n, self.bs, self.seed, self.step = n, min(batch_size, n), seed, start_step
        self.per_epoch = n // self.bs

    def __iter__(self):
        while True:
            epoch, k = divmod(self.step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            yield perm[k * self.bs:(k + 1) * self.bs].tolist()
            self.step += 1


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def train_diffusion(data: Dataset | DataLoader, config: dict | None, out_dir: str | Path, resume: bool = True,
                    progress: bool = True, device: torch.device | str | None = None) -> dict[str, Any]:
    """Train (or resume) and write ``out_dir`` (diffusers dir + checkpoint.pt). ``data`` yields
    (image in [-1, 1] [C, H, W], label); a Dataset gives exact resumption, a DataLoader is iterated as is.
    Returns {"history": per-step losses of this call, "step": final step, "out_dir": Path}."""
    from diffusers import DDPMScheduler

    cfg = {**TRAIN_DEFAULTS, **(config or {})}
    unknown = set(cfg) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown train-diffusion option(s) {sorted(unknown)}; allowed: {sorted(TRAIN_DEFAULTS)}")
    if cfg["num_classes"] is None:
        cfg["num_classes"] = getattr(data, "num_classes", None) or getattr(getattr(data, "dataset", None), "num_classes", None)
    if not cfg["num_classes"]:
        raise ValueError("num_classes unknown: pass config['num_classes'] (C; the model gets C + 1 class rows)")
    C, seed = int(cfg["num_classes"]), int(cfg["seed"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"

    torch.manual_seed(seed)  # same initial weights for the same seed
    unet = build_unet(cfg["unet"], C).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warm = max(int(cfg["warmup"]), 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    step = 0
    if resume and ckpt_path.is_file():
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as err:
            raise RuntimeError(f"cannot read {ckpt_path}: {err}; delete it or pass resume=False / --no-resume") from err
        saved = state.get("config", {})
        if any(json.dumps(saved.get(k), sort_keys=True) != json.dumps(cfg[k], sort_keys=True) for k in ARCH_KEYS):
            raise ValueError(f"{ckpt_path} was trained with num_classes={saved.get('num_classes')} / "
                             f"unet={saved.get('unet')}, not the requested architecture; use another out_dir")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_schedule"])
        step = int(state["step"])

    sched = DDPMScheduler(**SCHEDULER)
    alphas = sched.alphas_cumprod.to(device)
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = DataLoader(data, batch_sampler=_Batches(len(data), int(cfg["batch_size"]), seed, step),
                            num_workers=int(cfg["num_workers"]))
    history: list[float] = []
    total = int(cfg["steps"])
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train-diffusion")
    it = iter(loader)
    unet.train()
    while step < total:
        try:
            x, y = next(it)
        except StopIteration:  # a finite DataLoader: start another pass
            it = iter(loader)
            x, y = next(it)
        x, y = x.to(device).float(), torch.as_tensor(y).to(device).long()
        if x.min() < -1.01 or x.max() > 1.01:
            raise ValueError("training images must lie in [-1, 1]")
        if int(y.max()) >= C or int(y.min()) < 0:
            raise ValueError(f"labels must lie in [0, {C - 1}], got [{int(y.min())}, {int(y.max())}]")
        g = _step_generator(seed, step)
        torch.manual_seed((seed * 1_000_003 + step) % (2**63))  # dropout masks
        B = x.shape[0]
        if cfg["hflip"]:
            flip = (torch.rand(B, generator=g) < 0.5).to(device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        drop = (torch.rand(B, generator=g) < cfg["label_dropout"]).to(device)
        y = torch.where(drop, torch.full_like(y, C), y)
        t = torch.randint(0, SCHEDULER["num_train_timesteps"], (B,), generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg["bf16"])):
            pred = unet(x_t, t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg["grad_clip"])
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - cfg["ema"])
            for be, b in zip(ema.buffers(), unet.buffers()):
                be.copy_(b)
        step += 1
        history.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if step % int(cfg["save_every"]) == 0 or step == total:
            _save(out, ckpt_path, unet, ema, opt, lr_sched, step, cfg, sched)
    bar.close()
    return {"history": history, "step": step, "out_dir": out}


def _save(out: Path, ckpt_path: Path, unet, ema, opt, lr_sched, step: int, cfg: dict, sched) -> None:
    state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "lr_schedule": lr_sched.state_dict(), "step": step, "config": json.loads(json.dumps(cfg))}
    tmp = ckpt_path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt_path)
    ema.save_pretrained(out / "unet")  # the EMA weights are what DiffNB samples with
    sched.save_pretrained(out / "scheduler")
    (out / "train_config.json").write_text(json.dumps({**cfg, "step": step}, indent=1))
