"""Checkpoint converters without the original code: original key layouts (tests/original_layouts.py) must
convert with nothing missing or left over, the converted models must run, the fused-qkv re-ordering must
match a hand-computed case, and bad files / flags must fail with messages naming the problem.
Numerical parity with the original implementations: benchmarks/results/converter_parity.md."""
import dataclasses

import pytest
import torch

from openood_diffguard.cli import main as cli_main
from openood_diffguard.convert import adm, diffnb, ldm
from openood_diffguard.diffusion import CrossAttnUNetAdapter, NoiseSchedule, UNetAdapter, load_ldm, load_unet

from original_layouts import adm_attention, ddpm_unet, openai_unet, random_state_dict, spatial_transformer, vq_autoencoder

TINY_ADM = adm.ADMFlags(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
                        num_head_channels=16, class_cond=True, num_classes=5)
TINY_NB = diffnb.DiffNBFlags(image_size=8, num_classes=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
TINY_LDM = ldm.LDMFlags(image_size=8, model_channels=32, attention_resolutions=(2,), num_res_blocks=1, channel_mult=(1, 2),
                        context_dim=8, n_classes=4, vq_n_embed=16, vq_ch=32, vq_ch_mult=(1, 2), vq_num_res_blocks=1,
                        vq_resolution=16)


def adm_layout(f: adm.ADMFlags) -> dict:
    return openai_unet(f.num_channels, f.resolved_mult(), f.num_res_blocks, {f.image_size // r for r in f.attention_resolutions},
                       out_ch=6 if f.learn_sigma else 3, scale_shift=f.use_scale_shift_norm, updown=f.resblock_updown,
                       num_classes=f.num_classes if f.class_cond else None, attention=adm_attention)


def ldm_checkpoint(f: ldm.LDMFlags, seed=0) -> dict:
    unet = openai_unet(f.model_channels, f.channel_mult, f.num_res_blocks, set(f.attention_resolutions),
                       attention=spatial_transformer, context_dim=f.context_dim)
    vq = vq_autoencoder(f.vq_ch, f.vq_ch_mult, f.vq_num_res_blocks, f.vq_z_channels, f.vq_embed_dim, f.vq_n_embed)
    sd = {f"model.diffusion_model.{k}": v for k, v in random_state_dict(unet, seed).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in random_state_dict(vq, seed + 1).items()})
    sd["cond_stage_model.embedding.weight"] = torch.randn(f.n_classes, f.context_dim)
    sd["alphas_cumprod"] = ldm.expected_alphas_cumprod(f).float()
    sd["scale_factor"] = torch.tensor(0.5)
    return sd


# ---------------------------------------------------------------- fused qkv: hand-computed re-ordering
def test_split_qkv_known_rows():
    rows = torch.arange(12.0)[:, None]  # 2 heads x (q, k, v) x d=2, row index = value
    q, k, v = adm.split_qkv(rows, heads=2, legacy=True)  # legacy: per head [q0 q1 k0 k1 v0 v1]
    assert q.flatten().tolist() == [0, 1, 6, 7] and k.flatten().tolist() == [2, 3, 8, 9] and v.flatten().tolist() == [4, 5, 10, 11]
    q, k, v = adm.split_qkv(rows, heads=2, legacy=False)  # new order: all q, then all k, then all v
    assert q.flatten().tolist() == [0, 1, 2, 3] and k.flatten().tolist() == [4, 5, 6, 7] and v.flatten().tolist() == [8, 9, 10, 11]


def _legacy_attention(x, qkv_w, qkv_b, heads):
    """QKVAttentionLegacy maths written out: per head the fused rows are [q; k; v]."""
    B, C, L = x.shape
    qkv = torch.einsum("oc,bcl->bol", qkv_w, x) + qkv_b[None, :, None]
    q, k, v = qkv.reshape(B * heads, 3 * C // heads, L).split(C // heads, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / (C // heads) ** 0.5, dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(B, C, L)


def test_converted_attention_equals_legacy_qkv_maths():
    flags = dataclasses.replace(TINY_ADM, class_cond=False)
    sd = random_state_dict(adm_layout(flags), seed=3)
    unet = adm.convert_state_dict(sd, flags)
    attn = unet.mid_block.attentions[0]
    x = torch.randn(2, 64, 4, 4)
    h = torch.nn.functional.group_norm(x, 32, sd["middle_block.1.norm.weight"], sd["middle_block.1.norm.bias"], 1e-5)
    ref = _legacy_attention(h.flatten(2), sd["middle_block.1.qkv.weight"][..., 0], sd["middle_block.1.qkv.bias"], heads=4)
    ref = x + (torch.einsum("oc,bcl->bol", sd["middle_block.1.proj_out.weight"][..., 0], ref)
               + sd["middle_block.1.proj_out.bias"][None, :, None]).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- layouts convert and run
@pytest.mark.parametrize("flags", [
    TINY_ADM,
    dataclasses.replace(TINY_ADM, class_cond=False, use_scale_shift_norm=False, resblock_updown=False, learn_sigma=False,
                        use_new_attention_order=True, noise_schedule="cosine"),
], ids=["cond-updown-scaleshift", "uncond-conv-neworder"])
def test_adm_layout_converts_and_loads(tmp_path, flags):
    src = tmp_path / "tiny_adm.pt"
    torch.save(random_state_dict(adm_layout(flags)), src)
    model = load_unet(adm.convert(src, tmp_path / "out", flags))
    assert isinstance(model, UNetAdapter)
    if flags.class_cond:  # ADM's table has no null row: all 5 rows are classes
        assert (model.num_classes, model.null_class) == (5, None)
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([0, 4]) if flags.class_cond else None
    with torch.no_grad():
        eps, var = model.predict(x, torch.tensor([3, 900]), y)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert (var is not None) == flags.learn_sigma
    ref = {"linear": ("linear", 1e-4, 0.02), "cosine": ("squaredcos_cap_v2", 0, 0)}[flags.noise_schedule]
    torch.testing.assert_close(model.schedule.alphas_cumprod,
                               NoiseSchedule.from_config(dict(zip(("beta_schedule", "beta_start", "beta_end"), ref))).alphas_cumprod)


def test_diffnb_layout_converts_with_null_class(tmp_path):
    src = tmp_path / "ema.ckpt"
    sd = random_state_dict(ddpm_unet(32, (1, 2), 1, {1}, num_classes=3))
    torch.save({f"module.{k}": v for k, v in sd.items()}, src)  # DDP-wrapped EMA copies carry 'module.'
    model = load_unet(diffnb.convert(src, tmp_path / "out", TINY_NB))
    assert (model.num_classes, model.null_class) == (3, 3)
    with torch.no_grad():
        eps = model.eps(torch.randn(2, 3, 8, 8), torch.tensor([0, 999]), torch.tensor([2, 3]))
    assert eps.shape == (2, 3, 8, 8) and torch.isfinite(eps).all()
    # label embedding is added to the time embedding: changing only the label changes the output
    with torch.no_grad():
        other = model.eps(torch.zeros(1, 3, 8, 8), torch.tensor([5]), torch.tensor([0]))
        same = model.eps(torch.zeros(1, 3, 8, 8), torch.tensor([5]), torch.tensor([1]))
    assert not torch.allclose(other, same)


def test_ldm_layout_converts_and_loads(tmp_path):
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_checkpoint(TINY_LDM), "global_step": 1}, src)
    model = load_ldm(ldm.convert(src, tmp_path / "out", TINY_LDM))
    assert isinstance(model, CrossAttnUNetAdapter) and (model.num_classes, model.null_class) == (3, 3)
    assert model.codec.scaling_factor == 0.5 and model.codec.is_vq
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.codec.encode(img)
        eps = model.eps(z, torch.tensor([1, 961]), None)  # None -> null class row
        rec = model.codec.decode(z)
    assert z.shape == (2, 3, 8, 8) and eps.shape == z.shape and rec.shape == img.shape
    torch.testing.assert_close(model.schedule.alphas_cumprod, ldm.expected_alphas_cumprod(TINY_LDM))


def test_cli_end_to_end(tmp_path, capsys):
    src = tmp_path / "tiny.pt"
    torch.save(random_state_dict(ddpm_unet(32, (1, 2), 1, {1}, num_classes=3)), src)
    rc = cli_main(["convert", "diffnb", "--src", str(src), "--out", str(tmp_path / "o"), "--image-size", "8",
                   "--num-classes", "3", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "4"])
    assert rc == 0 and "load_unet" in capsys.readouterr().out
    assert load_unet(tmp_path / "o").num_classes == 3


# ---------------------------------------------------------------- bad input
def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt.*docs/checkpoints.md"):
        adm.convert(tmp_path / "nothere.pt", tmp_path / "o", TINY_ADM)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable PyTorch checkpoint"):
        adm.convert(bad, tmp_path / "o", TINY_ADM)
    assert cli_main(["convert", "adm", "--src", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_mismatched_keys_are_listed():
    sd = random_state_dict(adm_layout(TINY_ADM))
    sd.pop("out.2.weight")
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)missing.*out\.2\.weight.*unexpected.*extra\.thing"):
        adm.convert_state_dict(sd, TINY_ADM)
    uncond = random_state_dict(adm_layout(dataclasses.replace(TINY_ADM, class_cond=False)))
    with pytest.raises(ValueError, match="missing.*label_emb.weight"):  # flags say class-conditional, file is not
        adm.convert_state_dict(uncond, TINY_ADM)
    with pytest.raises(ValueError, match="shape mismatches|rows, expected"):  # wrong width
        adm.convert_state_dict(sd | {"out.2.weight": torch.zeros(6, 32, 3, 3)}, dataclasses.replace(TINY_ADM, num_channels=64))


def test_unrepresentable_architectures_refused(tmp_path):
    with pytest.raises(ValueError, match="head widths"):  # 128x128 release: 4 heads of varying width
        adm.unet_config(adm.PRESETS["128x128_diffusion"])
    with pytest.raises(ValueError, match="not a LatentDiffusion checkpoint|unexpected keys"):
        ldm.split_checkpoint({"foo.weight": torch.zeros(1)})
    sd = ldm_checkpoint(TINY_LDM)
    sd["alphas_cumprod"] = NoiseSchedule.from_config({}).alphas_cumprod.float()  # ADM's linear, not LDM's
    torch.save(sd, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="alphas_cumprod differs"):
        ldm.convert(tmp_path / "model.ckpt", tmp_path / "out", TINY_LDM)


def test_presets_follow_file_names():
    assert adm.flags_for("/x/256x256_diffusion_uncond.pt").class_cond is False
    assert adm.flags_for("/x/256x256_diffusion.pt").class_cond is True
    f = adm.flags_for("/x/64x64_diffusion.pt")
    assert (f.num_channels, f.num_res_blocks, f.use_new_attention_order, f.noise_schedule) == (192, 3, True, "cosine")
    assert adm.flags_for("/x/256x256_diffusion.pt", num_channels=128).num_channels == 128


def test_pickled_training_objects_need_explicit_trust(tmp_path):
    import argparse

    src = tmp_path / "lightning_style.ckpt"
    torch.save({"state_dict": ldm_checkpoint(TINY_LDM), "hyper_parameters": argparse.Namespace(lr=1e-4)}, src)
    with pytest.raises(ValueError, match="--trust-pickle"):
        ldm.convert(src, tmp_path / "out", TINY_LDM)
    assert (ldm.convert(src, tmp_path / "out", TINY_LDM, trust_pickle=True) / "unet" / "config.json").is_file()


@pytest.mark.parametrize("preset, params", [("256x256_diffusion_uncond", 552_814_086), ("256x256_diffusion", 553_838_086)])
def test_released_adm_presets_have_the_original_parameter_count(preset, params):
    """Counts of the original guided-diffusion models (guided-diffusion's released 256x256 models), built on the meta device."""
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(**adm.unet_config(adm.PRESETS[preset]))
    assert sum(p.numel() for p in unet.parameters()) == params
