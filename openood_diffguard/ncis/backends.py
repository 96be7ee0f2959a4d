"""Diffusion back-ends for NCIS behind one interface: a conditioning embedding e (one row of the model's
conditioning table) -> noise prediction, differentiable in e, plus CFG generation from embeddings.

- ``PixelUNetBackend``: this package's class-conditional pixel UNet (diffusers ``UNet2DModel`` with
  ``num_class_embeds = C + 1``, last row = null class). Its class-embedding table plays the token table:
  e replaces the class row that is added to the time embedding. Generation uses the package's DDIM loop.
- ``StableDiffusionBackend``: Stable Diffusion v1.x from a local diffusers directory (never downloaded).
  e replaces the CLIP token-embedding row of the class-name token inside a class prompt; generation is
  diffusers' ``StableDiffusionPipeline`` with a ``DDIMScheduler`` fed with the prompt embeddings.

Both substitute e per sample with a forward hook on the embedding table (``substitute_rows``), which gives
exactly what patching the table row (the released code) gives, for a whole batch of different embeddings
at once; ``patched_row`` is the literal patch-and-restore (reference path, tests).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..diffusion.ddim import DDIM
from ..diffusion.schedule import NoiseSchedule


@contextlib.contextmanager
def substitute_rows(table: nn.Embedding, ids_to_replace: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """While active, ``table(ids)`` returns ``vectors[b]`` wherever ``ids[b, ...] == ids_to_replace[b]``
    (batch b), and the table's own rows elsewhere; gradients flow into ``vectors``, never into the table."""
    def hook(module, inputs, out):
        ids = inputs[0]
        if ids.shape[0] != vectors.shape[0]:
            raise ValueError(f"substitution for {vectors.shape[0]} samples, embedding called with batch {ids.shape[0]}")
        target = ids_to_replace.to(ids.device).view(-1, *([1] * (ids.ndim - 1)))
        mask = (ids == target).unsqueeze(-1)
        vec = vectors.to(out.dtype).view(vectors.shape[0], *([1] * (ids.ndim - 1)), -1)
        return torch.where(mask, vec, out)

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def patched_row(table: nn.Embedding, row: int, vector: torch.Tensor) -> Iterator[None]:
    """Overwrite one row of the table in place and restore it afterwards (the released code's mechanism)."""
    with torch.no_grad():
        saved = table.weight[row].clone()
        table.weight[row] = vector.to(table.weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            table.weight[row] = saved


def _cfg_eps(backend: "EmbeddingBackend", scale: float):
    """Classifier-free guidance over conditions: eps_u + w (eps_c - eps_u), one batched forward."""
    def eps_fn(x, t, cond):
        both = backend.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond["c"], cond["u"]]))
        eps_c, eps_u = both.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn


class EmbeddingBackend:
    """Interface. ``condition(e, y)`` -> per-sample conditioning (differentiable in e); ``eps(x_t, t, cond)``;
    ``encode(images in [-1, 1])`` -> the model's clean sample; ``generate(e, y, ...)`` -> images in [-1, 1]."""

    schedule: NoiseSchedule
    dim: int
    num_classes: int
    device: torch.device

    def class_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def condition(self, e: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def null_condition(self, batch: int) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_timesteps(self, num_steps: int) -> torch.Tensor:
        """The sampler's timesteps: the embedding loss draws t from these (released code: SD's 50 DDIM steps)."""
        return self.schedule.timesteps(num_steps)

    def generate(self, e: torch.Tensor, labels: torch.Tensor, guidance_scale: float, num_steps: int,
                 generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def requires_grad_(self, flag: bool) -> None:
        for m in self.modules():
            m.requires_grad_(flag)

    def modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}], got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return labels


class PixelUNetBackend(EmbeddingBackend):
    """Class-conditional ``UNet2DModel`` (C + 1 class rows, last = null): e is a class-embedding row."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, device: str | torch.device = "cpu") -> None:
        table = getattr(unet, "class_embedding", None)
        if not isinstance(table, nn.Embedding):
            raise ValueError("PixelUNetBackend needs a class-conditional UNet2DModel (num_class_embeds = C + 1)")
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.table, self.schedule = table, schedule
        self.num_classes, self.dim = table.num_embeddings - 1, table.embedding_dim

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "PixelUNetBackend":
        from ..diffusion import load_unet

        adapter = load_unet(path)
        return cls(adapter.unet, adapter.schedule, device)

    def modules(self) -> list[nn.Module]:
        return [self.unet]

    def class_embeddings(self, labels):
        return self.table.weight[self._check_labels(labels).to(self.device)].detach().clone()

    def condition(self, e, labels):
        return e

    def null_condition(self, batch):
        return self.table.weight[self.num_classes].detach().expand(batch, -1)

    def eps(self, x_t, t, cond):
        rows = torch.zeros(len(x_t), dtype=torch.long, device=x_t.device)
        with substitute_rows(self.table, rows, cond):  # every sample's class row becomes its own vector
            return self.unet(x_t, t, class_labels=rows).sample

    def encode(self, images):
        return images.to(self.device)

    def generate(self, e, labels, guidance_scale, num_steps, generator):
        cfg = self.unet.config
        x = torch.randn(len(e), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator).to(self.device)
        levels = self.schedule.levels(self.schedule.timesteps(num_steps))
        cond = {"c": self.condition(e.to(self.device), labels), "u": self.null_condition(len(e))}
        with torch.no_grad():
            return DDIM(self.schedule).sample(_cfg_eps(self, guidance_scale), x, levels, cond=cond).clamp(-1, 1)


class StableDiffusionBackend(EmbeddingBackend):
    """Stable Diffusion v1.x (``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``).

    ``class_tokens[c]``: the word whose first BPE token carries class c's embedding (released code: short
    single-token names such as 'fish', 'mower'); ``prompts[c]``: the prompt that contains it. The released
    code embeds with "An image of a <name>" and generates with "A high-quality image of the <name>"
    (``embed_template`` / ``generate_template``). A prompt without the class token would ignore e: error.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler_config: dict, class_tokens: Sequence[str],
                 embed_template: str = "An image of a {}", generate_template: str = "A high-quality image of the {}",
                 generate_names: Sequence[str] | None = None, image_size: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.vae, self.text_encoder, self.unet = (m.to(self.device).eval().requires_grad_(False)
                                                  for m in (vae, text_encoder, unet))
        self.tokenizer, self.scheduler_config = tokenizer, dict(scheduler_config)
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.table = text_encoder.get_input_embeddings()
        self.dim, self.num_classes = self.table.embedding_dim, len(class_tokens)
        if self.num_classes == 0:
            raise ValueError("class_tokens is empty: give one class word per class")
        self.image_size = int(image_size or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1))
        self.token_ids = torch.tensor([self._first_token(w) for w in class_tokens])
        names = list(generate_names or class_tokens)
        if len(names) != self.num_classes:
            raise ValueError(f"generate_names has {len(names)} entries for {self.num_classes} classes")
        self.embed_ids = self._prompt_ids([embed_template.format(w) for w in class_tokens])
        self.generate_ids = self._prompt_ids([generate_template.format(n) for n in names])
        self.null_ids = self._prompt_ids([""])
        self.sampler_timesteps = None

    @classmethod
    def from_pretrained(cls, path: str | Path, class_tokens: Sequence[str], device: str | torch.device = "cpu",
                        **kwargs) -> "StableDiffusionBackend":
        """Load a local diffusers SD v1.x directory (e.g. a copy of CompVis/stable-diffusion-v1-4)."""
        root = Path(path).expanduser()
        needed = ["vae", "text_encoder", "tokenizer", "unet", "scheduler"]
        missing = [s for s in needed if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"Stable Diffusion directory {root} lacks {missing}: weights are never downloaded; give a local "
                f"diffusers copy of CompVis/stable-diffusion-v1-4 (sub-folders {needed})")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:
            raise ImportError("the Stable Diffusion back-end needs transformers: pip install 'openood-diffguard[sd]'") from err
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        kw = {"local_files_only": True}
        return cls(AutoencoderKL.from_pretrained(root, subfolder="vae", **kw),
                   CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
                   CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
                   UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw),
                   dict(DDIMScheduler.from_pretrained(root, subfolder="scheduler", **kw).config), class_tokens,
                   device=device, **kwargs)

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"class word {word!r} has no tokens")
        return int(ids[0])

    def _prompt_ids(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")["input_ids"]
        return ids

    def modules(self):
        return [self.vae, self.text_encoder, self.unet]

    def class_embeddings(self, labels):
        return self.table.weight[self.token_ids[self._check_labels(labels)].to(self.device)].detach().clone()

    def _encode_text(self, ids: torch.Tensor, e: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        ids = ids.to(self.device)
        if e is None:
            return self.text_encoder(ids)[0]
        tok = self.token_ids[labels.cpu()]
        if not bool((ids.cpu() == tok[:, None]).any(1).all()):
            raise ValueError("a class prompt does not contain its class token: the embedding would be ignored "
                             "(check class_tokens against the prompt template / generate_names)")
        with substitute_rows(self.table, tok.to(self.device), e):
            return self.text_encoder(ids)[0]

    def condition(self, e, labels, which: str = "embed"):
        labels = self._check_labels(labels)
        ids = (self.embed_ids if which == "embed" else self.generate_ids)[labels]
        return self._encode_text(ids, e.to(self.device), labels)

    def null_condition(self, batch):
        return self._encode_text(self.null_ids, None, None).expand(batch, -1, -1)

    def eps(self, x_t, t, cond):
        return self.unet(x_t, t, encoder_hidden_states=cond).sample

    def encode(self, images):
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # released code: Resize(512) + CenterCrop(512) of PIL images; here the tensor is resized (square inputs)
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          align_corners=False, antialias=True)
        dist = self.vae.encode(x).latent_dist
        return dist.mode() * self.vae.config.scaling_factor

    def embed_timesteps(self, num_steps):
        # SD's DDIM grid: leading spacing with steps_offset (1 for SD v1.x): 1, 21, ..., 981 for 50 steps
        return self.schedule.timesteps(num_steps, steps_offset=int(self.scheduler_config.get("steps_offset", 0)))

    def pipeline(self):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=DDIMScheduler.from_config(self.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def generate(self, e, labels, guidance_scale, num_steps, generator):
        with torch.no_grad():
            cond = self.condition(e, labels, which="generate")
            out = self.pipeline()(prompt_embeds=cond, negative_prompt_embeds=self.null_condition(len(e)),
                                  guidance_scale=guidance_scale, num_inference_steps=num_steps, generator=generator,
                                  height=self.image_size, width=self.image_size, output_type="pt").images
        return (out.to(self.device) * 2 - 1).clamp(-1, 1)
