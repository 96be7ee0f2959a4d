"""Build parity fixtures with the ORIGINAL implementations (run outside CI; nothing of theirs is vendored).

Each fixture is ``{state_dict, flags, inputs, outputs}`` from a randomly initialised original model
(every parameter perturbed, so zero-initialised output layers are not trivially zero).

    python benchmarks/make_parity_fixtures.py --guided-diffusion <checkout> --latent-diffusion <checkout> \
        --diffood <checkout> --out <fixtures dir>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

EXACT = False


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def adm_fixtures(repo: Path, out: Path) -> None:
    sys.path.insert(0, str(repo))
    from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
    from guided_diffusion.script_util import create_model

    cases = {
        # structure of the released 256x256 models (scale-shift, resblock up/down, legacy qkv, learn sigma), reduced
        "adm_cond_updown_legacy": dict(image_size=64, num_channels=64, num_res_blocks=2, channel_mult="1,1,2,2",
                                       attention_resolutions="16,8", num_head_channels=32, learn_sigma=True,
                                       class_cond=True, use_scale_shift_norm=True, resblock_updown=True),
        # structure of the 64x64 model (new attention order), plus conv resampling and plain time-shift norm
        "adm_uncond_conv_neworder": dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                                         attention_resolutions="16,8", num_head_channels=16, learn_sigma=False,
                                         class_cond=False, use_scale_shift_norm=False, resblock_updown=False,
                                         use_new_attention_order=True),
    }
    if EXACT:  # the released 256x256_diffusion_uncond.pt architecture (DiffGuard's GDM model), 552.8 M params
        cases = {"adm_256_uncond_exact": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="1,1,2,2,4,4",
                                              attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                                              class_cond=False, use_scale_shift_norm=True, resblock_updown=True)}
    for seed, (name, kw) in enumerate(cases.items()):
        torch.manual_seed(seed)
        model = _perturb(create_model(**kw), seed)
        x = torch.randn(1 if EXACT else 2, 3, kw["image_size"], kw["image_size"])
        t = torch.tensor([17, 801][:x.shape[0]])
        y = torch.tensor([3, 998][:x.shape[0]]) if kw["class_cond"] else None
        with torch.no_grad():
            y_out = model(x, t, y)
        torch.save(dict(state_dict=model.state_dict(), flags=kw, x=x, t=t, y=y, out=y_out,
                        betas={s: torch.from_numpy(get_named_beta_schedule(s, 1000)) for s in ("linear", "cosine")}),
                   out / f"{name}.pt")
        print(name, sum(p.numel() for p in model.parameters()), "params", tuple(y_out.shape))


def diffnb_fixtures(repo: Path, out: Path) -> None:
    sys.path.insert(0, str(repo))
    from network.ddim.ddim import Model

    cases = {
        "diffnb_cifar_reduced": dict(type="simple", image_size=32, num_classes=10, in_channels=3, out_ch=3, ch=32,
                                     ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16], dropout=0.1,
                                     resamp_with_conv=True),
    }
    if EXACT:  # config/ddim_cifar10_cond.yml
        cases = {"diffnb_cifar10_exact": dict(cases["diffnb_cifar_reduced"], ch=128)}
    for seed, (name, kw) in enumerate(cases.items()):
        torch.manual_seed(seed)
        model = _perturb(Model(None, kw), seed)
        x = torch.randn(3, 3, 32, 32)
        t = torch.tensor([0, 299, 999])
        y = torch.tensor([0, 9, 10])  # 10 = the null label used for CFG
        with torch.no_grad():
            y_out = model(x, t, y)
        torch.save(dict(state_dict=model.state_dict(), flags=kw, x=x, t=t, y=y, out=y_out), out / f"{name}.pt")
        print(name, sum(p.numel() for p in model.parameters()), "params", tuple(y_out.shape))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guided-diffusion", type=Path)
    ap.add_argument("--latent-diffusion", type=Path)
    ap.add_argument("--diffood", type=Path)
    ap.add_argument("--taming", type=Path, help="CompVis/taming-transformers checkout (VectorQuantizer2)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--exact", action="store_true", help="full-size released architectures (slow on CPU, GBs)")
    args = ap.parse_args()
    global EXACT
    EXACT = args.exact
    args.out.mkdir(parents=True, exist_ok=True)
    if args.guided_diffusion:
        adm_fixtures(args.guided_diffusion, args.out)
    if args.diffood:
        diffnb_fixtures(args.diffood, args.out)
    if args.latent_diffusion:
        ldm_fixtures(args.latent_diffusion, args.out, args.taming)


def _stub_modules(names: dict) -> None:
    """Modules the original LDM files import but the parity path never uses (clip, kornia, lightning)."""
    import types

    for name, attrs in names.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules.setdefault(name, mod)


def ldm_fixtures(repo: Path, out: Path, taming: Path | None) -> None:
    sys.path.insert(0, str(repo))
    if taming is not None:
        sys.path.insert(0, str(taming))
    _stub_modules({"pytorch_lightning": {"LightningModule": torch.nn.Module}, "clip": {}, "kornia": {},
                   "ldm.modules.x_transformer": {"Encoder": object, "TransformerWrapper": object}})
    from ldm.models.autoencoder import VQModelInterface
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    from ldm.modules.encoders.modules import ClassEmbedder

    # cin256-v2 structure reduced: spatial transformers at ds 2 and 4, one head per level, class context
    lat, ch, mult, ctx, n_cls, n_embed, vq_ch = (64, 192, [1, 2, 3, 5], 512, 1001, 8192, 128) if EXACT else \
        (16, 32, [1, 2, 3], 16, 11, 64, 32)
    unet_kw = dict(image_size=lat, in_channels=3, out_channels=3, model_channels=ch,
                   attention_resolutions=[8, 4, 2] if EXACT else [4, 2], num_res_blocks=2, channel_mult=mult,
                   num_heads=1, use_spatial_transformer=True, transformer_depth=1, context_dim=ctx)
    vq_kw = dict(embed_dim=3, n_embed=n_embed, ddconfig=dict(double_z=False, z_channels=3, resolution=lat * 4, in_channels=3,
                 out_ch=3, ch=vq_ch, ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
                 lossconfig={"target": "torch.nn.Identity"})
    torch.manual_seed(0)
    unet = _perturb(UNetModel(**unet_kw), 0)
    vq = _perturb(VQModelInterface(**vq_kw), 1)
    embedder = _perturb(ClassEmbedder(embed_dim=ctx, n_classes=n_cls, key="class_label"), 2)
    scale_factor = 0.7  # cin256-v2 has none (1.0); a non-trivial value tests the latent scaling
    betas = torch.from_numpy(make_beta_schedule("linear", 1000, linear_start=0.0015, linear_end=0.0195))
    x = torch.randn(2, 3, lat, lat)
    t = torch.tensor([1, 961])
    y = torch.tensor([4, n_cls - 1])  # last row = null
    img = torch.rand(2, 3, lat * 4, lat * 4) * 2 - 1
    with torch.no_grad():
        eps = unet(x, t, context=embedder({"class_label": y}))  # DiffusionWrapper, conditioning_key crossattn
        z = scale_factor * vq.encode(img)                       # LatentDiffusion.get_first_stage_encoding
        dec = vq.decode(z / scale_factor)                       # decode_first_stage: quantise, then decode
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vq.state_dict().items()})
    sd.update({f"cond_stage_model.{k}": v for k, v in embedder.state_dict().items()})
    sd.update(betas=betas.float(), alphas_cumprod=torch.cumprod(1 - betas, 0).float(), scale_factor=torch.tensor(scale_factor))
    flags = {} if EXACT else dict(image_size=16, model_channels=32, attention_resolutions=(4, 2), num_res_blocks=2,
                                  channel_mult=(1, 2, 3), num_heads=1, context_dim=16, n_classes=11, vq_n_embed=64,
                                  vq_ch=32, vq_resolution=64)  # {} = LDMFlags defaults = cin256-v2
    name = "ldm_cin256v2_exact" if EXACT else "ldm_cin_reduced"
    torch.save(dict(state_dict=sd, flags=flags, x=x, t=t, y=y, out=eps, img=img, z=z, dec=dec), out / f"{name}.pt")
    print(name, sum(v.numel() for v in sd.values()), "tensors' elements", tuple(eps.shape), tuple(dec.shape))


if __name__ == "__main__":
    main()
