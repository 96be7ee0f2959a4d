"""NCIS embedding back-ends: the batched, per-image-vector embedding learner equals the released code's
one-image masked-table optimisation; substitution equals patching the row; generation is deterministic.
Pixel UNet (always) and Stable Diffusion on tiny random diffusers / transformers components."""
import json

import pytest
import torch

from openood_diffguard.diffusion import NoiseSchedule
from openood_diffguard.ncis import (PixelUNetBackend, StableDiffusionBackend, embed_batch, generate_outliers,
                                    learn_embeddings, patched_row, substitute_rows)
from openood_diffguard.ncis.embed import image_generator
from openood_diffguard.training.diffusion import SCHEDULER, TINY_UNET, build_unet


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


@pytest.fixture(scope="module")
def pixel():
    torch.manual_seed(0)
    return PixelUNetBackend(build_unet(TINY_UNET, 3), NoiseSchedule.from_config(SCHEDULER))


def _images(n, c=1, size=8, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _reference_masked_table(backend, table, row_of, call_eps, image, label, index, steps, lr, copies, seed):
    """The released procedure for one image: Adam on the whole table, other rows' gradients zeroed."""
    original = table.weight.detach().clone()
    table.weight.requires_grad_(True)
    opt = torch.optim.Adam([table.weight], lr=lr)
    g = image_generator(seed, index)
    grid = backend.embed_timesteps(50)
    z = backend.encode(image[None]).repeat(copies, 1, 1, 1)
    row = row_of(label)
    try:
        for _ in range(steps):
            t = grid[torch.randint(len(grid), (copies,), generator=g)]
            noise = torch.randn((copies, *z.shape[1:]), generator=g)
            x_t = backend.schedule.add_noise(z, noise, t).float()
            loss = ((call_eps(x_t, t, label) - noise) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            keep = torch.arange(len(table.weight)) == row
            table.weight.grad[~keep] = 0
            opt.step()
        learned = table.weight[row].detach().clone()
        changed = torch.nonzero((table.weight.detach() != original).any(1)).flatten().tolist()
    finally:
        with torch.no_grad():
            table.weight.copy_(original)
        table.weight.requires_grad_(False)
    return learned, changed


def test_pixel_batched_embedding_equals_masked_table_reference(pixel):
    x, y = _images(3), torch.tensor([0, 2, 2])
    table_before = pixel.table.weight.detach().clone()
    e, _ = embed_batch(pixel, x, y, torch.tensor([5, 6, 7]), steps=3, lr=0.05, copies=4, seed=1)
    torch.testing.assert_close(pixel.table.weight, table_before, atol=0, rtol=0)  # the model is never modified
    for b in range(3):
        ref, changed = _reference_masked_table(
            pixel, pixel.table, lambda lab: lab, lambda xt, t, lab: pixel.unet(xt, t, class_labels=torch.full((len(xt),), lab)).sample,
            x[b], int(y[b]), 5 + b, steps=3, lr=0.05, copies=4, seed=1)
        assert changed == [int(y[b])]  # only the class row moved in the reference
        torch.testing.assert_close(e[b], ref, atol=2e-5, rtol=0)
        assert (e[b] - table_before[y[b]]).abs().max() > 0.01


def test_pixel_embeddings_do_not_depend_on_batching_and_resume(pixel):
    x, y = _images(5, seed=1), torch.tensor([0, 1, 2, 0, 1])
    cfg = {"steps": 2, "lr": 0.05, "copies": 3, "seed": 4}
    one = learn_embeddings(pixel, x, y, {**cfg, "batch_images": 1}, progress=False)
    many = learn_embeddings(pixel, x, y, {**cfg, "batch_images": 4}, progress=False)
    torch.testing.assert_close(one, many, atol=2e-5, rtol=0)
    done = torch.tensor([True, False, True, False, False])
    seen = []
    part = learn_embeddings(pixel, x, y, {**cfg, "batch_images": 2}, done=done, progress=False,
                            on_batch=lambda idx, e, loss: seen.append(idx.tolist()))
    assert seen == [[1, 3], [4]] and torch.isnan(part[done]).all()
    torch.testing.assert_close(part[~done], one[~done], atol=2e-5, rtol=0)
    # lr 0 leaves every image at its class row
    zero = learn_embeddings(pixel, x, y, {**cfg, "lr": 0.0}, progress=False)
    torch.testing.assert_close(zero, pixel.table.weight[y].detach(), atol=0, rtol=0)


def test_learn_embeddings_errors(pixel):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        learn_embeddings(pixel, _images(2) * 3, torch.tensor([0, 1]), progress=False)
    with pytest.raises(ValueError, match="class labels must lie in"):
        learn_embeddings(pixel, _images(2), torch.tensor([0, 3]), progress=False)
    with pytest.raises(TypeError, match="unknown embedding option"):
        learn_embeddings(pixel, _images(2), torch.tensor([0, 1]), {"step": 1}, progress=False)


def test_pixel_generation_is_deterministic_and_uses_the_embedding(pixel, tmp_path):
    e = pixel.class_embeddings(torch.tensor([0, 1]))
    cfg = {"guidance_scale": 2.0, "num_steps": 4, "images_per_embedding": 2, "batch_size": 3, "seed": 5}
    a, ya = generate_outliers(pixel, e, torch.tensor([0, 1]), cfg, progress=False)
    b, _ = generate_outliers(pixel, e, torch.tensor([0, 1]), cfg, progress=False)
    assert a.shape == (4, 1, 8, 8) and ya.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c, _ = generate_outliers(pixel, e + 3.0, torch.tensor([0, 1]), cfg, progress=False)
    assert (a - c).abs().max() > 1e-3
    # substituting row y's own vector == the model conditioned on class y (guidance-free eps)
    xt, t = _images(2, seed=3), torch.tensor([10, 500])
    torch.testing.assert_close(pixel.eps(xt, t, e), pixel.unet(xt, t, class_labels=torch.tensor([0, 1])).sample,
                               atol=1e-6, rtol=0)
    # written to disk and resumed: a deleted image is regenerated identically, the others are kept
    generate_outliers(pixel, e, torch.tensor([0, 1]), cfg, out_dir=tmp_path, progress=False)
    files = sorted((tmp_path / "images").rglob("*.png"))
    assert len(files) == 4
    before = {f: f.read_bytes() for f in files}
    files[3].unlink()
    files[0].write_bytes(b"kept")  # a finished batch is not regenerated
    generate_outliers(pixel, e, torch.tensor([0, 1]), cfg, out_dir=tmp_path, progress=False)
    assert files[0].read_bytes() == b"kept"
    assert {f: f.read_bytes() for f in files[1:]} == {f: before[f] for f in files[1:]}


# ------------------------------------------------------------------------------------- Stable Diffusion
def _tiny_tokenizer(tmp_path):
    """A CLIP BPE tokenizer without merges: every word is split into characters, the last one marked
    '</w>', so a one-letter class word ('x') is one token that no other word of the prompts produces."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["-"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=40)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=40, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=8)
    sched = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "prediction_type": "epsilon"}
    return StableDiffusionBackend(vae, text, tok, unet, sched, class_tokens=["x", "y", "z"],
                                  generate_names=["x", "y", "big z"])


def test_sd_substitution_equals_patching_one_row_and_restores(sd):
    y = torch.tensor([0, 2])
    e = torch.randn(2, sd.dim, generator=torch.Generator().manual_seed(0))
    before = sd.table.weight.detach().clone()
    got = sd.condition(e, y)
    torch.testing.assert_close(sd.table.weight, before, atol=0, rtol=0)
    for b in range(2):
        row = int(sd.token_ids[y[b]])
        with patched_row(sd.table, row, e[b]):
            changed = torch.nonzero((sd.table.weight != before).any(1)).flatten().tolist()
            ref = sd.text_encoder(sd.embed_ids[y[b]][None])[0]
        assert changed == [row]
        torch.testing.assert_close(got[b:b + 1], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sd.table.weight, before, atol=0, rtol=0)  # round trip
    # the embedding is what conditions the prompt: another vector, another context
    assert (sd.condition(e.flip(1), y) - got).abs().max() > 1e-3
    # the generation prompt of class 2 ('big z') carries the class token 'z' too
    assert (sd.generate_ids[2] == sd.token_ids[2]).any()


def test_sd_timesteps_are_the_50_ddim_steps_and_class_rows(sd):
    assert sd.embed_timesteps(50).tolist() == list(range(1, 1000, 20))
    torch.testing.assert_close(sd.class_embeddings(torch.tensor([1])), sd.table.weight[sd.token_ids[1]][None].detach())


def test_sd_batched_embedding_equals_masked_table_reference(sd):
    x, y = _images(2, c=3, size=8, seed=2), torch.tensor([1, 0])
    e, _ = embed_batch(sd, x, y, torch.tensor([0, 1]), steps=3, lr=1e-2, copies=3, seed=0)

    def call_eps(xt, t, lab):
        ctx = sd.text_encoder(sd.embed_ids[lab][None])[0].repeat(len(xt), 1, 1)
        return sd.unet(xt, t, encoder_hidden_states=ctx).sample

    for b in range(2):
        ref, changed = _reference_masked_table(sd, sd.table, lambda lab: int(sd.token_ids[lab]), call_eps, x[b],
                                               int(y[b]), b, steps=3, lr=1e-2, copies=3, seed=0)
        assert changed == [int(sd.token_ids[y[b]])]
        torch.testing.assert_close(e[b], ref, atol=2e-5, rtol=0)


def test_sd_generation_is_deterministic_and_errors(sd, tmp_path):
    e = sd.class_embeddings(torch.tensor([0, 2]))
    cfg = {"guidance_scale": 7.5, "num_steps": 3, "images_per_embedding": 1, "batch_size": 2, "seed": 42}
    a, _ = generate_outliers(sd, e, torch.tensor([0, 2]), cfg, progress=False)
    b, _ = generate_outliers(sd, e, torch.tensor([0, 2]), cfg, progress=False)
    assert a.shape == (2, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        StableDiffusionBackend.from_pretrained(tmp_path / "sd-v1-4", class_tokens=["x"])
    bad = StableDiffusionBackend(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, sd.scheduler_config,
                                 class_tokens=["x"], generate_names=["y"])
    with pytest.raises(ValueError, match="does not contain its class token"):
        bad.condition(e[:1], torch.tensor([0]), which="generate")
