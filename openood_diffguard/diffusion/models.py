"""Model adapters: every diffusion backbone is seen through one protocol

    model.eps(x_t, t, y=None) -> eps          (and ``model.predict`` for the raw output + variance)

with its ``schedule`` (prediction type included), ``num_classes`` and ``null_class`` (the label that
means "unconditional" for classifier-free guidance). Latent models carry a ``codec`` that maps images
in [-1, 1] to latents and back. Loading is from local paths only: nothing is fetched from a hub.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .schedule import NoiseSchedule

#: inference dtypes by name (detector ``dtype`` parameters)
COMPUTE_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "fp32": None, "bf16": torch.bfloat16,
                                                        "fp16": torch.float16}
_HALF = (torch.bfloat16, torch.float16)


def _cast_backbone(net: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters/buffers, keeping the modules a diffusers model lists in
    ``_keep_in_fp32_modules`` in fp32 (as ``from_pretrained(torch_dtype=...)`` does). nn.Module.to is
    called directly: diffusers' own ``to`` warns about that list even when it is empty."""
    nn.Module.to(net, dtype)
    keep = getattr(net, "_keep_in_fp32_modules", None) or []
    if keep:
        for name, module in net.named_modules():
            if any(k in name.split(".") for k in keep):
                nn.Module.to(module, torch.float32)


class DiffusionModel(nn.Module):
    """Base adapter. Subclasses implement ``_raw(x, t, y)`` returning the network output and name their
    ``backbone_attr`` (the network ``configure`` casts / compiles)."""

    backbone_attr: ClassVar[str | None] = None

    def __init__(self, schedule: NoiseSchedule, num_classes: int | None = None, null_class: int | None = None,
                 codec: Optional["LatentCodec"] = None, sample_size: int | None = None, in_channels: int | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.schedule = schedule
        self.num_classes = num_classes
        self.null_class = null_class
        self.codec = codec
        self.sample_size = sample_size
        self.in_channels = in_channels
        self.autocast_dtype = autocast_dtype
        self.weights_dtype: torch.dtype | None = None  # backbone stored in this dtype (configure(cast_weights=True))
        self.compile_options: dict[str, Any] | None = None

    @property
    def backbone(self) -> nn.Module | None:
        return getattr(self, self.backbone_attr) if self.backbone_attr else None

    def configure(self, dtype: str | torch.dtype | None = None, cast_weights: bool = False,
                  compile: bool | dict[str, Any] = False) -> "DiffusionModel":
        """Inference precision and compilation of the backbone; idempotent, returns self.

        ``dtype`` (None/"fp32", "bf16", "fp16"): with ``cast_weights=False`` the fp32 weights run under
        autocast (norms and softmax stay fp32 by autocast's policy); ``cast_weights=True`` stores the
        backbone's weights in ``dtype`` (less memory traffic than autocast on GPUs; not timed with our
        pipelines yet). Either way the schedule maths, the DDIM state,
        the outputs (returned as fp32) and the latent codec stay fp32. Casting back to fp32 keeps the bf16
        rounding: reload the weights for exact fp32 results.
        ``compile``: False, True, or ``torch.compile`` keyword arguments (mode, backend, dynamic, ...);
        the backbone's forward is compiled in place (state-dict keys unchanged).
        """
        dt = COMPUTE_DTYPES[dtype] if not isinstance(dtype, torch.dtype) else (None if dtype == torch.float32 else dtype)
        net = self.backbone
        if net is None and (cast_weights or compile):
            raise ValueError(f"{type(self).__name__} has no backbone network to cast or compile")
        target = dt if cast_weights else None
        if net is not None and target != self.weights_dtype:
            if target is None:
                warnings.warn("casting a low-precision backbone back to fp32 keeps its rounding; reload the "
                              "weights for exact fp32 results", stacklevel=2)
            _cast_backbone(net, target or torch.float32)
            self.weights_dtype = target
        self.autocast_dtype = None if cast_weights else dt
        options = None if compile is False else ({} if compile is True else dict(compile))
        if net is not None and options != self.compile_options:
            if options is None:
                net._compiled_call_impl = None  # back to eager (what nn.Module.compile set)
            else:
                net.compile(**options)
            self.compile_options = options
        return self

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def _labels(self, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if y is None:
            if self.null_class is None:
                raise ValueError("this class-conditional model has no null class: pass labels")
            return torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        y = y.to(device=x.device, dtype=torch.long)
        allowed = self.num_classes + (self.null_class is not None and self.null_class >= self.num_classes)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= allowed):
            raise ValueError(f"class labels must lie in [0, {allowed - 1}] for this model, got "
                             f"[{int(y.min())}, {int(y.max())}]")
        return y

    def _raw(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance channels or None); models with learned sigma output 2C channels."""
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        y = self._labels(y, x_t)
        x_in = x_t if self.weights_dtype is None else x_t.to(self.weights_dtype)
        if self.autocast_dtype is not None:
            with torch.autocast(x_t.device.type, dtype=self.autocast_dtype):
                out = self._raw(x_in, t, y)
        else:
            out = self._raw(x_in, t, y)
        if out.dtype in _HALF:
            out = out.float()  # eps / variance leave the network in fp32: scheduler maths never runs in half
        C = x_t.shape[1]
        if out.shape[1] == 2 * C:
            return out[:, :C], out[:, C:]
        if out.shape[1] != C:
            raise ValueError(f"model output has {out.shape[1]} channels for a {C}-channel input")
        return out, None

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.predict(x_t, t, y)
        if self.schedule.prediction_type == "epsilon":
            return out
        return self.schedule.split_prediction(out, x_t, torch.as_tensor(t).expand(x_t.shape[0]))[0]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.eps(x_t, t, y)


class UNetAdapter(DiffusionModel):
    """diffusers ``UNet2DModel``; class-conditional when ``num_class_embeds`` is set.

    Convention for self-trained class-conditional models (DiffNB, our ``train-diffusion``):
    ``num_class_embeds = C + 1`` and the last row is the null class. ``has_null_class=False`` is for
    tables without one (class-conditional ADM: 1000 rows, all real classes).
    """

    backbone_attr = "unet"

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, null_class: int | None = None,
                 autocast_dtype: torch.dtype | None = None, codec: Optional["LatentCodec"] = None,
                 has_null_class: bool = True) -> None:
        cfg = unet.config
        n_embeds = cfg.get("num_class_embeds") if hasattr(cfg, "get") else getattr(cfg, "num_class_embeds", None)
        num_classes = None
        if n_embeds and not has_null_class:
            num_classes, null_class = n_embeds, None
        elif n_embeds:
            null_class = n_embeds - 1 if null_class is None else null_class
            num_classes = n_embeds - 1 if null_class == n_embeds - 1 else n_embeds
        super().__init__(schedule, num_classes, null_class, codec=codec, sample_size=cfg.sample_size,
                         in_channels=cfg.in_channels, autocast_dtype=autocast_dtype)
        self.unet = unet

    def _raw(self, x, t, y):
        return self.unet(x, t, class_labels=y).sample


class CrossAttnUNetAdapter(DiffusionModel):
    """diffusers ``UNet2DConditionModel`` conditioned through a class-embedding table used as the
    cross-attention context (LDM ``cin256-v2``: 1001 rows, row 1000 = null)."""

    backbone_attr = "unet"

    def __init__(self, unet: nn.Module, class_embedding: nn.Embedding, schedule: NoiseSchedule,
                 null_class: int | None = None, codec: Optional["LatentCodec"] = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        rows = class_embedding.num_embeddings
        super().__init__(schedule, rows - 1, rows - 1 if null_class is None else null_class, codec=codec,
                         sample_size=unet.config.sample_size, in_channels=unet.config.in_channels,
                         autocast_dtype=autocast_dtype)
        self.unet, self.class_embedding = unet, class_embedding

    def _raw(self, x, t, y):
        ctx = self.class_embedding(y)[:, None, :].to(x.dtype)  # the table stays fp32; the UNet may be cast
        return self.unet(x, t, encoder_hidden_states=ctx).sample


class DiTAdapter(DiffusionModel):
    """diffusers ``DiTTransformer2DModel`` (class-conditional, learned sigma; null class = ``num_embeds_ada_norm``)."""

    backbone_attr = "transformer"

    def __init__(self, transformer: nn.Module, schedule: NoiseSchedule, codec: Optional["LatentCodec"] = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        n = transformer.config.num_embeds_ada_norm
        super().__init__(schedule, n, n, codec=codec, sample_size=transformer.config.sample_size,
                         in_channels=transformer.config.in_channels, autocast_dtype=autocast_dtype)
        self.transformer = transformer

    def _raw(self, x, t, y):
        return self.transformer(x, timestep=t, class_labels=y).sample


class FunctionAdapter(DiffusionModel):
    """Wrap a plain callable ``f(x_t, t, y) -> prediction`` (analytic models, tests)."""

    def __init__(self, fn, schedule: NoiseSchedule, num_classes: int | None = None, null_class: int | None = None) -> None:
        super().__init__(schedule, num_classes, null_class)
        self.fn = fn

    def _raw(self, x, t, y):
        return self.fn(x, t, y)


class LatentCodec(nn.Module):
    """Image [-1, 1] <-> latent for ``AutoencoderKL`` (mean of the posterior) and ``VQModel``
    (pre-quantisation latents in; quantised on decode, as LDM does)."""

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None) -> None:
        super().__init__()
        self.vae = vae
        sf = scaling_factor if scaling_factor is not None else getattr(vae.config, "scaling_factor", 1.0)
        self.scaling_factor = float(sf)
        self.is_vq = hasattr(vae, "quantize")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.vae.encode(x)
        z = enc.latents if self.is_vq else enc.latent_dist.mean
        return z * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scaling_factor
        out = self.vae.decode(z, force_not_quantize=False) if self.is_vq else self.vae.decode(z)
        return out.sample


# ---------------------------------------------------------------------------------------- loading
#: written by ``openood-diffguard convert`` next to the diffusers sub-folders: adapter settings that
#: diffusers configs cannot express (e.g. whether the class table has a null row).
CONVERSION_SIDECAR = "openood_diffguard.json"


def read_conversion_info(root: str | Path) -> dict:
    p = Path(root) / CONVERSION_SIDECAR
    return json.loads(p.read_text()) if p.is_file() else {}

def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} not found at {p}. Weights are never downloaded: put a local diffusers model directory "
            f"there (config.json + diffusion_pytorch_model.safetensors), or convert an original checkpoint "
            f"with `openood-diffguard convert`."
        )
    return p


def load_unet(path: str | Path, schedule: NoiseSchedule | None = None, subfolder: str | None = None,
              **adapter_kwargs) -> UNetAdapter:
    """Load a local diffusers ``UNet2DModel`` directory (or a pipeline dir with ``unet/``) as an adapter."""
    from diffusers import UNet2DModel

    root = _require_dir(path, "diffusion UNet")
    if subfolder is None and (root / "unet" / "config.json").is_file():
        subfolder = "unet"
    try:
        unet = UNet2DModel.from_pretrained(root, subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as err:
        raise RuntimeError(f"could not load a UNet2DModel from {root} (subfolder={subfolder}): {err}") from err
    if schedule is None:
        schedule = NoiseSchedule.from_pretrained(root)
    info = read_conversion_info(root)
    if info.get("num_classes") and info.get("null_class") is None:
        adapter_kwargs.setdefault("has_null_class", False)
    return UNetAdapter(unet.eval(), schedule, **adapter_kwargs)


def load_dit(path: str | Path, **adapter_kwargs) -> DiTAdapter:
    """Load a local DiT pipeline directory (``transformer/``, ``vae/``, ``scheduler/``)."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    root = _require_dir(path, "DiT pipeline")
    for sub in ("transformer", "vae"):
        if not (root / sub / "config.json").is_file():
            raise FileNotFoundError(f"{root / sub / 'config.json'} missing: expected a DiT pipeline directory "
                                    "(e.g. a local copy of facebook/DiT-XL-2-256)")
    transformer = DiTTransformer2DModel.from_pretrained(root, subfolder="transformer", local_files_only=True, low_cpu_mem_usage=False)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True, low_cpu_mem_usage=False)
    schedule = NoiseSchedule.from_pretrained(root)
    return DiTAdapter(transformer.eval(), schedule, codec=LatentCodec(vae.eval()), **adapter_kwargs)


def load_ldm(path: str | Path, **adapter_kwargs) -> CrossAttnUNetAdapter:
    """Load a directory written by ``openood-diffguard convert ldm`` (``unet/``, ``vqvae/``,
    ``class_embedding.safetensors``, ``scheduler/``): class-conditional LDM with a VQ latent codec."""
    from diffusers import UNet2DConditionModel, VQModel
    from safetensors.torch import load_file

    root = _require_dir(path, "LDM model directory")
    needed = [root / "unet" / "config.json", root / "vqvae" / "config.json", root / "class_embedding.safetensors"]
    for p in needed:
        if not p.is_file():
            raise FileNotFoundError(f"{p} missing: expected a directory made by `openood-diffguard convert ldm "
                                    "--src model.ckpt --out DIR` (LDM cin256-v2)")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False)
    vq = VQModel.from_pretrained(root, subfolder="vqvae", local_files_only=True, low_cpu_mem_usage=False)
    table = load_file(str(root / "class_embedding.safetensors"))["weight"]
    class_embedding = nn.Embedding.from_pretrained(table, freeze=True)
    return CrossAttnUNetAdapter(unet.eval(), class_embedding, NoiseSchedule.from_pretrained(root),
                                codec=LatentCodec(vq.eval()), **adapter_kwargs)

