"""Numerical parity of LFDN ``variant: code`` with the released DLSR code (xbyym/DLSR).

    python benchmarks/lfdn_parity.py --official /path/to/DLSR-checkout [--out benchmarks/results/lfdn_parity.md]

The released code is imported from a local checkout (never vendored here; it needs ``omegaconf`` and
``einops``). Both sides get the same LFDN weights (the released ``LFDM`` + ``LFDN`` built from its own
``config/Config.yaml`` and source, our ``LFDNet`` weights loaded through ``networks.lfdn.to_released_state_dict``,
strict), the same pooled features (EfficientNet-b4 widths 24/32/56/160/448 = 720-d, the released indices) and
the same noise (the package's, injected into the released code): the released side runs ``Generative_Mul_Feature.forward`` (CustomGroupNorm, its DDIMSampler with
100 DDIM steps and its 3 hard-coded sampling steps, ``calculate_similarity``), with its ``q_sample`` noise and
its per-step ``noise_like`` draws replaced by ours; LR = MSE(first) - MSE(end) as ``test_LR.py``. Ours: one
``LFDN(variant="code").statistics`` call per batch of images that encode the features.

Settings: paper-size random LFDN (width 1440, 16 blocks; the zero-initialised layers and GroupNorm affines
randomised too, or every output would be 0), and a small LFDN trained briefly on the ID group (so the AUROCs are
far from chance). Noise: ``noise: shared`` (one draw used by every sample, the default) and ``noise: per_sample``
(a draw per sample keyed by its content, as the code's independent draws). t = 3 (what the code runs) and t = 5 (the
``subset_timesteps_num`` the code's argument meant to set; here set on the sampler directly).

Run-time patches of the released code (nothing of it is changed on disk): ``.cuda()`` is a no-op (CPU);
``DDIMSampler.register_buffer`` stores without moving to CUDA; ``pytorch_lightning``'s ``rank_zero_only``
is stubbed; ``update_config`` and the encoder are bypassed (a stub returns the given features as
``feature_align``); the LFDN gets the ``in_channels`` / ``image_size`` attributes ``Gen_Model.gen_image``
reads (missing in the release: AttributeError); ``LFDM`` is built with ``ckpt_path: null`` and no encoder.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import openood_diffguard  # noqa: E402,F401  (repairs torchvision before anything imports it)

from openood_diffguard.detectors.lfdn import LFDN  # noqa: E402
from openood_diffguard.networks import LFDNet, lfdn_schedule  # noqa: E402
from openood_diffguard.networks.lfdn import to_released_state_dict  # noqa: E402

WIDTHS = [24, 32, 56, 160, 448]  # EfficientNet-b4 blocks 1, 5, 9, 21, 31 (released indices 24, 56, 112, 272, 720)
COMMIT = "96d8bef"


# ---------------------------------------------------------------------------------------------- inputs
class FeatureNet(torch.nn.Module):
    """An OpenOOD-style classifier stub: images [B, 3, 1, D/3] carry the pooled features; returns them per layer."""

    def __init__(self, widths=tuple(WIDTHS)) -> None:
        super().__init__()
        self.widths = list(widths)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, return_feature_list=False):
        f = x.flatten(1)
        maps = [g[:, :, None, None] for g in f.split(self.widths, 1)]
        return (f[:, :10], maps) if return_feature_list else f[:, :10]


def make_features(n: int, ood: bool, gen: torch.Generator) -> torch.Tensor:
    """Positive pooled-activation-like features in (0, 2.2) (inside the image-range check of ImageNet-normalised
    input): a fixed channel profile per layer + per-sample variation; the OOD group has another profile mix."""
    D = sum(WIDTHS)
    base = torch.randn(D, generator=torch.Generator().manual_seed(123))
    other = torch.randn(D, generator=torch.Generator().manual_seed(321))
    mix = 0.15 if ood else 0.0
    scale = 0.6 + 0.8 * torch.rand(n, 1, generator=gen)  # per-sample contrast: scores vary
    f = (1 - mix) * base + mix * other + scale * torch.randn(n, D, generator=gen)
    return 2.2 * torch.sigmoid(f)


def as_images(f: torch.Tensor) -> torch.Tensor:
    return f.view(len(f), 3, 1, -1)


def randomise(net: LFDNet, seed: int) -> LFDNet:
    """Non-degenerate random weights: default init everywhere (the zero-initialised output layers included)."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
        elif isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    return net.eval()


def brief_training(f_id: torch.Tensor, width: int, blocks: int, steps_first: int, steps_final: int, seed: int):
    """(first, final): a small LFDN trained on the ID group's code-normalised features (x0 objective)."""
    from openood_diffguard.features import layer_normalize

    torch.manual_seed(seed)
    z0 = layer_normalize(f_id, WIDTHS, "layer_code")
    net, sched = LFDNet(z0.shape[1], width, blocks), lfdn_schedule()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    first = None
    for step in range(steps_final):
        idx = torch.randint(0, len(z0), (64,))
        t = torch.randint(0, 100, (64,))
        z = z0[idx]
        loss = torch.nn.functional.mse_loss(net(sched.add_noise(z, torch.randn_like(z), t), t), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 == steps_first:
            first = LFDNet(z0.shape[1], width, blocks)
            first.load_state_dict(net.state_dict())
    return first.eval(), net.eval()


# ---------------------------------------------------------------------------------------------- released side
@contextlib.contextmanager
def released_code(checkout: Path):
    """Import the released modules with the run-time patches listed in the module docstring."""
    sys.path.insert(0, str(checkout))
    pl = types.ModuleType("pytorch_lightning")
    pl.utilities = types.ModuleType("pytorch_lightning.utilities")
    pl.utilities.distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    pl.utilities.distributed.rank_zero_only = lambda f: f
    sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": pl.utilities,
                        "pytorch_lightning.utilities.distributed": pl.utilities.distributed})
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        import Gen_Model
        from ldm.models.diffusion import ddim as ddim_mod
        from ldm.models.diffusion import ddpm as ddpm_mod

        ddim_mod.DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)
        ddpm_mod.LFDM.instantiate_pretrained_enc = lambda self, cfg: None
        Gen_Model.update_config = lambda cfg: cfg
        yield types.SimpleNamespace(Gen_Model=Gen_Model, ddim=ddim_mod, ddpm=ddpm_mod)
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved
        sys.path.remove(str(checkout))


class _Encoder(torch.nn.Module):
    def forward(self, inputs):  # the released ModelHelper's output key; GAP of [B, D, 1, 1] is the identity
        return {"feature_align": inputs["image"]}


def released_model(rc, checkout: Path, tmp: Path, net: LFDNet, name: str, subset_steps: int, similarity: str):
    """A released ``Generative_Mul_Feature`` whose LFDM holds ``net``'s weights (checked key by key)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(checkout / "config" / "Config.yaml")
    c, D = net.config, net.config["in_dim"]
    p = cfg.model.params
    p.ckpt_path = None
    p.indices = [int(i) for i in np.cumsum(WIDTHS)]
    p.unet_config.params.update(in_channels=D, time_embed_dim=D, out_channels=D, model_channels=c["width"],
                                bottleneck_channels=c["width"], num_res_blocks=c["blocks"])
    p.cond_stage_config.params.embed_dim = D
    cfg_path = tmp / f"{name}.yaml"
    OmegaConf.save(cfg, cfg_path)
    from ldm.modules.ema import LitEma
    from ldm.util import instantiate_from_config

    lfdm = instantiate_from_config(cfg.model)
    lfdm.model.diffusion_model.load_state_dict(to_released_state_dict(net.state_dict()), strict=True)
    lfdm.model_ema = LitEma(lfdm.model)  # the EMA copy the test code swaps in (ema_scope) = these weights
    ckpt = tmp / f"{name}.pth"
    torch.save({"state_dict": lfdm.state_dict()}, ckpt)

    def stub_encoder(self, enc_cfg):
        self.pretrained_encoder = _Encoder()

    rc.Gen_Model.Generative_Mul_Feature.instantiate_pretrained_enc = stub_encoder
    gm = rc.Gen_Model.Generative_Mul_Feature(use_Mul_feature=True, pretrained_ldm_ckpt=str(ckpt),
                                             pretrained_ldm_cfg=str(cfg_path), subset_timesteps_num=subset_steps,
                                             similarity_type=similarity)
    lfdn = gm.ldm_sampler.model.model.diffusion_model
    lfdn.in_channels, lfdn.image_size = D, 1  # read by Gen_Model.gen_image, absent from the released LFDN
    # the released constructor passes subset_timesteps_num into DDIMSampler's `schedule` slot: the sampler keeps
    # its default 3; set the attribute to run what the argument meant (t = 5 below)
    gm.ldm_sampler.subset_timesteps_num = subset_steps
    model = gm.ldm_sampler.model
    loaded = model.model.diffusion_model.state_dict()
    ema = dict(model.model_ema.named_buffers())
    for k, v in to_released_state_dict(net.state_dict()).items():
        if not torch.equal(loaded[k], v) or not torch.equal(ema[("diffusion_model." + k).replace(".", "")], v):
            raise AssertionError(f"released model did not load {k}")
    return gm


def run_released(rc, gm, f: torch.Tensor, q: torch.Tensor, steps: list[torch.Tensor], similarity: str) -> torch.Tensor:
    """gm.forward on features f with our noise: q for q_sample, steps[k] for the sampling step told time k."""
    calls = []
    sampler = gm.ldm_sampler
    original_q = sampler.model.q_sample

    def q_sample(x_start, t, noise=None):
        return original_q(x_start, t, noise=q.expand_as(x_start) if noise is None else noise)

    def noise_like(shape, device, repeat=False):
        k = int(sampler._time[0])
        calls.append(k)
        return steps[k].expand(shape).clone()

    original_p = sampler.p_sample_ddim

    def p_sample_ddim(x, c, t, index, **kw):
        sampler._time = t
        return original_p(x, c, t, index, **kw)

    sampler.model.q_sample, sampler.p_sample_ddim = q_sample, p_sample_ddim
    rc.ddim.noise_like = noise_like
    gm.similarity_type = similarity
    try:
        with torch.no_grad():
            out = gm(f[:, :, None, None], torch.zeros(len(f), dtype=torch.long))
    finally:
        del sampler.model.q_sample, sampler.p_sample_ddim
    return out.float()


# ---------------------------------------------------------------------------------------------- comparison
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def auroc_ood(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC in % with OOD = positive and higher score = OOD (the released code's roc_auc_score call)."""
    from sklearn.metrics import roc_auc_score

    return 100 * float(roc_auc_score(labels, scores))


def compare(rc, checkout, tmp, setting, first, final, f, labels, t, per_sample, batch) -> list[dict]:
    D, B = f.shape[1], len(f)
    det = LFDN(variant="code", layers=[1, 2, 3, 4, 5], timesteps=[t], normalization="imagenet",
               noise="per_sample" if per_sample else "shared")
    det.set_models(final, first, widths=WIDTHS)
    keys = det.sample_keys(as_images(f))  # None: one draw shared by every sample
    noise = {stream: det.noise(t, D, stream, keys) for stream in ("final", "first")}  # what statistics() draws
    ours = {}
    for i in range(0, B, batch):
        s = det.statistics(FeatureNet(), as_images(f[i:i + batch]))
        for k, v in s.items():
            ours.setdefault(k, []).append(v)
    ours = {k: torch.cat(v) for k, v in ours.items()}
    conf = {}
    for score in ("mse", "mfsim", "lr"):
        det.set_params(score=score)
        conf[score] = det.confidence(ours)
    released = {}
    for stream, model in (("final", final), ("first", first)):
        gm = released_model(rc, checkout, tmp, model, f"{setting}_{stream}_t{t}", t, "MSE")
        n = noise[stream]
        # the released step told time k moves from our path index k - 1; its last step (k = 1) is an identity
        # whose noise is multiplied by sigma = 0
        for sim in ("MSE", "MFsim"):
            vals = []
            for i in range(0, B, batch):
                q = n["q"] if n["q"].ndim == 1 else n["q"][i:i + batch]
                st = {k: (n["steps"][k - 1] if n["steps"].ndim == 2 else n["steps"][k - 1][i:i + batch])
                      for k in range(1, t + 1)}
                vals.append(run_released(rc, gm, f[i:i + batch], q, st, sim))
            released[(stream, sim)] = torch.cat(vals)
    rel = {"mse": released[("final", "MSE")], "mfsim": released[("final", "MFsim")],
           "lr": released[("first", "MSE")] - released[("final", "MSE")]}  # test_LR.py:158, higher = OOD
    rows = []
    for score in ("mse", "mfsim", "lr"):
        a, b = (-conf[score]).double().numpy(), rel[score].double().numpy()  # both: higher = OOD
        rows.append({"setting": setting, "t": t, "noise": "per_sample" if per_sample else "shared",
                     "score": score, "n": B, "spearman": spearman(a, b), "max_abs": float(np.abs(a - b).max()),
                     "rel": float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)), "std": float(b.std()),
                     "auroc_ours": auroc_ood(a, labels), "auroc_released": auroc_ood(b, labels)})
    return rows


#: deliberate deviations from the released pipeline (applied to our side only): the check must catch each
ABLATIONS = {
    "per-sample z-score with the biased variance inside the sqrt (the paper's)": {"feature_norm": "layer_paper"},
    "deterministic steps (eta 0)": {"eta": 0.0},
    "DDIM to the clean level, output z0_hat (variant ours' sampler)": {"sampler": "ddim"},
    "MFsim over all 5 layers": {"mfsim_layer1": True},
    "the same noise for both LR models": {"lr_shared_noise": True},
    "noise level of the model's own time input (no one-step offset)": {"shift": 0},
}


@contextlib.contextmanager
def ablation(change: dict):
    from openood_diffguard.detectors import lfdn as mod

    saved, path = dict(mod.VARIANTS["code"]), mod.LFDN._path
    mod.VARIANTS["code"].update({k: v for k, v in change.items() if k != "shift"})
    if "shift" in change:
        mod.LFDN._path = lambda self, t, noise: path(self, t, noise)[:2] + (change["shift"],)
    try:
        yield
    finally:
        mod.VARIANTS["code"].clear()
        mod.VARIANTS["code"].update(saved)
        mod.LFDN._path = path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="local checkout of xbyym/DLSR")
    ap.add_argument("--n", type=int, default=64, help="samples per group (ID and OOD)")
    ap.add_argument("--batch", type=int, default=64, help="batch size: the released sampler only works with 64 "
                    "(its hard-coded bsz; the test loaders use 64 with drop_last)")
    ap.add_argument("--timesteps", default="3,5", help="start timesteps to compare (the code runs 3)")
    ap.add_argument("--ablations", action="store_true", help="also run deliberate deviations (t = 3, shared noise): "
                    "each must fail the bars")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    checkout = Path(args.official).resolve()
    gen = torch.Generator().manual_seed(0)
    f = torch.cat([make_features(args.n, False, gen), make_features(args.n, True, gen)])
    labels = np.r_[np.zeros(args.n), np.ones(args.n)]
    D = sum(WIDTHS)
    big_first, big_final = randomise(LFDNet(D), 1), randomise(LFDNet(D), 2)
    train = make_features(512, False, torch.Generator().manual_seed(7))  # ID-like, disjoint from the test samples
    small_first, small_final = brief_training(train, 256, 4, 30, 300, 3)
    rows = []
    with released_code(checkout) as rc, tempfile.TemporaryDirectory() as tmp:
        for setting, (first, final) in (("random, width 1440, 16 blocks", (big_first, big_final)),
                                        ("trained 300 steps, width 256, 4 blocks", (small_first, small_final))):
            for t in [int(x) for x in args.timesteps.split(",")]:
                for per_sample in (False, True):
                    rows += compare(rc, checkout, Path(tmp), setting, first, final, f, labels, t, per_sample,
                                    args.batch)
                    r = rows[-3:]
                    print(f"{setting} | t={t} | per-sample noise={per_sample} | "
                          + "; ".join(f"{x['score']}: rho {x['spearman']:.6f}, AUROC {x['auroc_ours']:.2f} vs "
                                      f"{x['auroc_released']:.2f}" for x in r), flush=True)
    passes = lambda rs: all(r["spearman"] >= 0.999 and abs(r["auroc_ours"] - r["auroc_released"]) <= 0.1  # noqa: E731
                            for r in rs)
    ok = passes(rows)
    print("PASS" if ok else "FAIL", f"(worst Spearman {min(r['spearman'] for r in rows):.6f}, worst AUROC delta "
          f"{max(abs(r['auroc_ours'] - r['auroc_released']) for r in rows):.3f} points)")
    caught = []
    if args.ablations:
        with released_code(checkout) as rc, tempfile.TemporaryDirectory() as tmp:
            for name, change in ABLATIONS.items():
                with ablation(change):
                    rs = [r for setting, (first, final) in (("random", (big_first, big_final)),
                                                            ("trained", (small_first, small_final)))
                          for r in compare(rc, checkout, Path(tmp), setting, first, final, f, labels, 3, False,
                                           args.batch)]
                caught.append((name, min(r["spearman"] for r in rs),
                               max(abs(r["auroc_ours"] - r["auroc_released"]) for r in rs), not passes(rs)))
                print(f"ablation {name}: worst Spearman {caught[-1][1]:.6f}, worst AUROC delta {caught[-1][2]:.2f}, "
                      f"{'caught' if caught[-1][3] else 'NOT caught'}", flush=True)
    if args.out:
        write_report(Path(args.out), rows, args, ok, caught)
    return 0 if ok and all(c[3] for c in caught) else 1


def write_report(path: Path, rows: list[dict], args, ok: bool, caught: list) -> None:
    lines = [
        "# LFDN `variant: code` vs the released DLSR code (numerical parity)", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}"
        f" CPU, 1 thread, torch {torch.__version__}, fp32",
        f"- released code: xbyym/DLSR `{COMMIT}` (a local checkout, imported at run time, not part of this repository):"
        " `Gen_Model.Generative_Mul_Feature.forward` (CustomGroupNorm, `DDIMSampler.sample` with 100 DDIM steps and "
        "its 3 sampling steps, `calculate_similarity`), LR = MSE(first) − MSE(end) as `test_LR.py`",
        f"- command: `python benchmarks/lfdn_parity.py --official <DLSR checkout> --n {args.n} --batch {args.batch} "
        f"--timesteps {args.timesteps}{' --ablations' if args.ablations else ''}"
        f"{' --out ' + str(path) if path else ''}` (needs `pip install omegaconf einops`)",
        f"- inputs: {2 * args.n} samples ({args.n} from an ID-like and {args.n} from an OOD-like feature distribution, "
        "720-d = EfficientNet-b4 widths 24/32/56/160/448, each sample with its own contrast so the scores vary), "
        f"batches of {args.batch}; both sides get the same features, LFDN weights and noise",
        "- settings: a paper-size LFDN with random weights (every layer randomised) and a small LFDN trained for 300 "
        "steps on the ID group (first-epoch model = step 30); t = 3 (what the code runs) and t = 5 (the code's "
        "`subset_timesteps_num` as it was meant); noise: `noise: shared` (one draw used by every sample) or "
        "`noise: per_sample` (a draw per sample), the package's draws injected into the released code",
        "- compared: our score (higher = OOD: −confidence) with the released score (MSE sum, MFsim = −mean cos over "
        "layers 2–5, LR = MSE_first − MSE_end); AUROC with OOD positive as `test_LR.py` / `test_mse_mfsim.py`",
        "- run-time patches of the released code: `.cuda()` no-op, `register_buffer` without CUDA, "
        "`pytorch_lightning` stub, encoder bypassed (features fed as `feature_align`), the `in_channels` / "
        "`image_size` attributes `Gen_Model.gen_image` reads (AttributeError as shipped), `ckpt_path: null`", "",
        f"**Result: {'PASS' if ok else 'FAIL'}** (bars: Spearman ≥ 0.999 and |AUROC Δ| ≤ 0.1 points in every row)", "",
        "| setting | t | noise | score | n | Spearman | max abs diff | max rel diff | score std | AUROC ours | AUROC released | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['t']} | {r['noise']} | {r['score']} | {r['n']} | {r['spearman']:.6f} | "
                     f"{r['max_abs']:.2e} | {r['rel']:.1e} | {r['std']:.3g} | {r['auroc_ours']:.2f} | "
                     f"{r['auroc_released']:.2f} | {r['auroc_ours'] - r['auroc_released']:+.2f} |")
    if caught:
        lines += ["", "**The check can fail.** Each deliberate deviation below, applied to our side only (t = 3, shared "
                  "noise, both settings), must break the bars:", "",
                  "| deviation | worst Spearman | worst AUROC Δ (points) | caught |", "|---|---|---|---|"]
        lines += [f"| {n} | {rho:.6f} | {d:.2f} | {'yes' if c else 'NO'} |" for n, rho, d, c in caught]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
