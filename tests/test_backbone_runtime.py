"""Precision and compilation of the diffusion backbone (``DiffusionModel.configure`` and the detectors'
``dtype`` / ``cast_weights`` / ``compile`` parameters): casts only the backbone, keeps the scheduler maths,
the DDIM state and the latent codec in fp32, is idempotent, and switching back reloads exact fp32 weights."""
import pytest
import torch

from digits_net import single_thread  # noqa: F401 (autouse: one CPU thread)
from openood_diffguard.detectors.diffguard import DiffGuard
from openood_diffguard.detectors.diffnb import DiffNB
from openood_diffguard.diffusion import DiTAdapter, FunctionAdapter, LatentCodec, NoiseSchedule, UNetAdapter

SCHED = {"beta_schedule": "linear", "num_train_timesteps": 1000}


def _unet(num_classes=3, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=num_classes + 1)
    return unet.eval()


def _inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.tensor([10, 300, 600, 900][:n]), torch.arange(n) % 3


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("unet")
    _unet().save_pretrained(root / "unet")
    DDPMScheduler(**SCHED).save_pretrained(root / "scheduler")
    return root


def test_cast_weights_keeps_io_in_fp32_and_is_reversible():
    model = UNetAdapter(_unet(), NoiseSchedule.from_config(SCHED))
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model.eps(x, t, y)
        model.configure("bf16", cast_weights=True)
        assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16} and model.autocast_dtype is None
        low = model.eps(x, t, y)
        assert low.dtype == torch.float32  # the scheduler maths never sees bf16
        err = (low - ref).norm() / ref.norm()
        assert 1e-5 < err < 0.05, err  # really ran in bf16, and close to fp32
        model.configure("bf16", cast_weights=True)  # idempotent: no second cast, no warning
        with pytest.warns(UserWarning, match="reload"):
            model.configure("bf16", cast_weights=False)  # back to fp32 weights + autocast
        assert {p.dtype for p in model.backbone.parameters()} == {torch.float32}
        assert model.weights_dtype is None and model.autocast_dtype == torch.bfloat16
        auto = model.eps(x, t, y)
        assert auto.dtype == torch.float32 and (auto - ref).norm() / ref.norm() < 0.05


def test_codec_and_class_table_stay_fp32(schedule=NoiseSchedule.from_config(SCHED)):
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                sample_size=4, patch_size=2, num_embeds_ada_norm=5)
    for prm in dit.parameters():
        prm.data.add_(0.02 * torch.randn_like(prm))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    model = DiTAdapter(dit.eval(), schedule, codec=LatentCodec(vae.eval()))
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([100, 500])
    with torch.no_grad():
        ref, var_ref = model.predict(z, t, torch.tensor([1, 5]))
        model.configure("bf16", cast_weights=True)
        out, var = model.predict(z, t, torch.tensor([1, 5]))
    assert {p.dtype for p in model.codec.parameters()} == {torch.float32}
    assert out.dtype == var.dtype == torch.float32 and var_ref is not None
    assert (out - ref).norm() / ref.norm() < 0.05


def test_compile_is_in_place_and_undone():
    model = UNetAdapter(_unet(), NoiseSchedule.from_config(SCHED))
    x, t, y = _inputs()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model.eps(x, t, y)
        model.configure(compile={"backend": "eager"})  # dynamo trace without codegen: fast on CPU
        assert model.backbone._compiled_call_impl is not None and list(model.state_dict()) == keys
        torch.testing.assert_close(model.eps(x, t, y), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.eps(x[:3], t[:3], y[:3]), ref[:3], rtol=0, atol=1e-5)  # new batch size (fp32 GEMM order)
        model.configure()
        assert model.backbone._compiled_call_impl is None and model.compile_options is None


def test_models_without_a_backbone_refuse_clearly():
    f = FunctionAdapter(lambda x, t, y: x, NoiseSchedule.from_config(SCHED))
    f.configure("bf16")  # autocast is fine for any callable
    with pytest.raises(ValueError, match="no backbone"):
        f.configure("bf16", cast_weights=True)
    with pytest.raises(ValueError, match="no backbone"):
        f.configure(compile=True)


def test_detector_parameters_drive_the_backbone(unet_dir):
    x = torch.rand(3, 3, 16, 16) * 2 - 1  # normalisation "unknown": images in [-1, 1] are the model's space
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    kw = dict(model_path=str(unet_dir), normalization="unknown", timesteps=[100], repeats=2)
    ref = DiffNB(**kw).statistics(net, x)["dist_t100"]
    det = DiffNB(**kw, dtype="bf16", cast_weights=True)
    low = det.statistics(net, x)["dist_t100"]
    assert det.model.weights_dtype == torch.bfloat16
    assert not torch.equal(low, ref) and torch.allclose(low, ref, atol=0.05 * float(ref.mean()))
    det.set_params(cast_weights=False, dtype=None)  # leaving the cast reloads the exact fp32 weights
    torch.testing.assert_close(det.statistics(net, x)["dist_t100"], ref, rtol=0, atol=1e-6)
    det.set_params(compile={"backend": "eager"})
    torch.testing.assert_close(det.statistics(net, x)["dist_t100"], ref, rtol=0, atol=1e-6)
    assert det.model.compile_options == {"backend": "eager"}
    assert det.cache_key() != DiffNB(**kw).cache_key()  # a compiled / cast model is another cache entry
    with pytest.raises(ValueError, match="compile"):
        DiffNB(**kw, compile="yes")
    with pytest.raises(ValueError, match="cast_weights"):
        DiffNB(**kw, cast_weights="true")
    with pytest.raises(ValueError, match="dtype"):
        DiffNB(**kw, dtype="int8")


def test_diffguard_user_model_is_configured_not_reloaded():
    model = UNetAdapter(_unet(), NoiseSchedule.from_config(SCHED))
    det = DiffGuard(model=model, guidance="cfg", dtype="bf16", cast_weights=True)
    det.setup(torch.nn.Identity())
    assert det.model is model and model.weights_dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="reload"):
        det.set_params(cast_weights=False)
        det.setup(torch.nn.Identity())
    assert det.model is model and model.weights_dtype is None and model.autocast_dtype == torch.bfloat16


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    """The real compiler (inductor, C++ codegen on CPU: about a minute per shape here)."""
    model = UNetAdapter(_unet(), NoiseSchedule.from_config(SCHED))
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model.eps(x, t, y)
        model.configure(compile=True)
        torch.testing.assert_close(model.eps(x, t, y), ref, rtol=1e-4, atol=1e-4)


def test_cast_keeps_diffusers_fp32_modules():
    unet = _unet()
    unet._keep_in_fp32_modules = ["time_embedding"]  # as diffusers models that need it declare
    model = UNetAdapter(unet, NoiseSchedule.from_config(SCHED)).configure("bf16", cast_weights=True)
    assert {p.dtype for p in unet.time_embedding.parameters()} == {torch.float32}
    assert unet.conv_in.weight.dtype == torch.bfloat16
