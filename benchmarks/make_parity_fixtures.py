"""Build parity fixtures with the ORIGINAL implementations (run outside CI; nothing of theirs is vendored).

Each fixture is ``{state_dict, flags, inputs, outputs}`` from a randomly initialised original model
(every parameter perturbed, so zero-initialised output layers are not trivially zero).

    python benchmarks/make_parity_fixtures.py --guided-diffusion <checkout> --latent-diffusion <checkout> \
        --diffood <checkout> --out /work/scratch/conv/fixtures
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


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
    for seed, (name, kw) in enumerate(cases.items()):
        torch.manual_seed(seed)
        model = _perturb(create_model(**kw), seed)
        x = torch.randn(2, 3, kw["image_size"], kw["image_size"])
        t = torch.tensor([17, 801])
        y = torch.tensor([3, 998]) if kw["class_cond"] else None
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
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.guided_diffusion:
        adm_fixtures(args.guided_diffusion, args.out)
    if args.diffood:
        diffnb_fixtures(args.diffood, args.out)
    if args.latent_diffusion:
        ldm_fixtures(args.latent_diffusion, args.out)


def ldm_fixtures(repo: Path, out: Path) -> None:
    raise NotImplementedError


if __name__ == "__main__":
    main()
