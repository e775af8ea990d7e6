"""Tests for guided_diffusion.unet / nn / fp16_util (tiny models, CPU)."""

import io
import math
import warnings

import pytest
import torch as th

from guided_diffusion import fp16_util
from guided_diffusion.nn import AvgPoolNd, normalization, timestep_embedding
from guided_diffusion.unet import (
    AttentionBlock,
    Downsample,
    EncoderUNetModel,
    SuperResModel,
    UNetModel,
    Upsample,
)

th.set_num_threads(1)

# The published 3D PET DDPM (sr flags --attention_resolutions 1000 --large_size 96
# --num_channels 128 --num_head_channels 64 --learn_sigma True --resblock_updown True
# --use_scale_shift_norm True): attention rate 96 // 1000 = 0 never occurs.
PUBLISHED = dict(
    image_size=96, in_channels=1, model_channels=128, out_channels=2, num_res_blocks=2,
    attention_resolutions=(0,), channel_mult=(1, 1, 2, 3, 4), dims=3, num_heads=4,
    num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
    layout="published3d",
)


def tiny(**overrides):
    """A small published-layout 3D SuperResModel (16 base channels, 2 levels)."""
    kwargs = dict(PUBLISHED, model_channels=16, channel_mult=(1, 2), num_res_blocks=1)
    kwargs.update(overrides)
    return SuperResModel(**kwargs)


def randomize_(model, seed=0):
    """Give every parameter non-trivial values (zero_module would make outputs 0)."""
    gen = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, p in model.named_parameters():
            noise = th.randn(p.shape, generator=gen) * 0.1
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(noise + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def test_published_config_structure():
    with th.device("meta"):
        model = SuperResModel(**PUBLISHED)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 206_964_610
    assert len(shapes) == 396
    # Shapes checked against the published unet.py (SuperResModel_noatt).
    assert shapes["input_blocks.0.0.weight"] == (128, 2, 3, 3, 3)
    assert shapes["input_blocks.13.0.in_layers.2.weight"] == (512, 384, 3, 3, 3)
    assert shapes["middle_block.1.emb_layers.1.weight"] == (1024, 512)
    assert shapes["output_blocks.0.0.in_layers.0.weight"] == (1024,)
    assert shapes["output_blocks.2.1.in_layers.2.weight"] == (384, 384, 3, 3, 3)
    assert shapes["output_blocks.5.0.skip_connection.weight"] == (256, 512, 1, 1, 1)
    assert shapes["output_blocks.14.0.in_layers.2.weight"] == (128, 256, 3, 3, 3)
    assert shapes["out.2.weight"] == (2, 128, 3, 3, 3)
    assert not any(".qkv." in k for k in shapes)
    assert "middle_block.2.in_layers.0.weight" not in shapes
    down = model.input_blocks[3][0]
    assert down.h_upd.op.kernel_size == (1, 2, 2)


def test_tiny_forward_keeps_z_and_resamples_xy_only():
    model = randomize_(tiny(channel_mult=(1, 2, 2)))
    z_sizes, xy_sizes = set(), set()

    def record(_module, _inputs, output):
        if th.is_tensor(output) and output.ndim == 5:
            z_sizes.add(output.shape[2])
            xy_sizes.add(output.shape[3:])

    for m in model.modules():
        m.register_forward_hook(record)
    x, low_res = th.randn(1, 1, 5, 16, 12), th.randn(1, 1, 5, 16, 12)
    with th.no_grad():
        out = model(x, th.tensor([10]), low_res=low_res)
    assert out.shape == (1, 2, 5, 16, 12)
    assert z_sizes == {5}
    assert xy_sizes == {(16, 12), (8, 6), (4, 3)}


def test_downsample_and_upsample_values():
    x = th.arange(2 * 4 * 4, dtype=th.float32).reshape(1, 1, 2, 4, 4)
    pooled = Downsample(1, use_conv=False, dims=3)(x)
    expected = th.stack([x[0, 0, :, i:i + 2, j:j + 2].mean(dim=(1, 2))
                         for i in (0, 2) for j in (0, 2)], dim=-1).reshape(1, 1, 2, 2, 2)
    assert th.equal(pooled, expected)
    up = Upsample(1, use_conv=False, dims=3)(pooled)
    assert up.shape == (1, 1, 2, 4, 4)
    assert th.equal(up, pooled.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4))


@pytest.mark.parametrize("dims,kernel", [(1, 2), (2, 2), (3, (1, 2, 2)), (3, 2)])
def test_avg_pool_matches_torch_pooling(dims, kernel):
    gen = th.Generator().manual_seed(dims)
    x = th.randn(2, 3, *([6] * dims), generator=gen)
    reference = getattr(th.nn, f"AvgPool{dims}d")(kernel)(x)
    assert th.allclose(AvgPoolNd(dims, kernel)(x), reference, atol=1e-6)
    # bf16 channels-last: the float32 average rounded once, layout kept
    if dims == 3:
        x16 = x.to(th.bfloat16).contiguous(memory_format=th.channels_last_3d)
        pooled = AvgPoolNd(dims, kernel)(x16)
        assert pooled.dtype == th.bfloat16
        assert pooled.is_contiguous(memory_format=th.channels_last_3d)
        expected = getattr(th.nn, f"AvgPool{dims}d")(kernel)(x16.float()).to(th.bfloat16)
        assert th.equal(pooled, expected)
    with pytest.raises(ValueError, match="dimensions"):
        AvgPoolNd(3, (2, 2))


def test_group_norm_bf16_cpu_equals_upstream_cast():
    norm = normalization(32)
    with th.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = th.randn(2, 32, 3, 5, 4).to(th.bfloat16).contiguous(memory_format=th.channels_last_3d)
    upstream = th.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias).to(th.bfloat16)
    for grad in (False, True):  # sampling: the mixed-precision kernel; training: upstream's casts
        with th.set_grad_enabled(grad), fp16_util.autocast("cpu", "bf16"):
            out = norm(x)
        assert out.dtype == th.bfloat16
        assert th.equal(out.detach(), upstream.detach())


@pytest.mark.parametrize("batch", [1, 2])
def test_group_norm_modulated_matches_formula(batch):
    norm = normalization(16)
    gen = th.Generator().manual_seed(batch)
    with th.no_grad():
        norm.weight.copy_(1 + 0.1 * th.randn(16, generator=gen))
        norm.bias.copy_(0.1 * th.randn(16, generator=gen))
    x = th.randn(batch, 16, 3, 5, 4, generator=gen)
    scale, shift = (0.3 * th.randn(batch, 16, 1, 1, 1, generator=gen) for _ in range(2))
    expected = norm(x) * (1 + scale) + shift
    assert th.allclose(norm.modulated(x, scale, shift), expected, atol=1e-5)
    x16 = x.to(th.bfloat16)
    with th.no_grad():
        fast = norm.modulated(x16, scale.to(th.bfloat16), shift.to(th.bfloat16))
    assert fast.dtype == th.bfloat16
    assert th.allclose(fast.float(), expected, atol=0.05)


def test_superres_concatenates_low_res_on_channels():
    sr = randomize_(tiny())
    plain = UNetModel(**dict(PUBLISHED, model_channels=16, channel_mult=(1, 2),
                             num_res_blocks=1, in_channels=2))
    plain.load_state_dict(sr.state_dict(), strict=True)
    x, low_res, t = th.randn(2, 1, 3, 8, 8), th.randn(2, 1, 3, 8, 8), th.tensor([1, 500])
    with th.no_grad():
        assert th.equal(sr(x, t, low_res=low_res), plain.eval()(th.cat([x, low_res], 1), t))
        with pytest.raises(ValueError, match="low_res spatial shape"):
            sr(x, t, low_res=th.randn(2, 1, 3, 4, 4))
        with pytest.raises(ValueError, match="low_res"):
            sr(x, t)


def test_superres_2d_interpolates_low_res():
    model = SuperResModel(32, 3, 32, 3, 1, (), channel_mult=(1, 2), dims=2).eval()
    with th.no_grad():
        out = model(th.randn(1, 3, 16, 16), th.tensor([5]), low_res=th.randn(1, 3, 8, 8))
    assert out.shape == (1, 3, 16, 16)


def test_bad_transaxial_size_raises_before_compute():
    model = tiny(channel_mult=(1, 1, 2, 3, 4))
    calls = []
    model.input_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    x = th.randn(1, 1, 4, 24, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(x, th.tensor([0]), low_res=x)
    assert calls == []
    with pytest.raises(ValueError, match="5 dimensions"):
        model(th.randn(1, 1, 16, 16), th.tensor([0]), low_res=th.randn(1, 1, 16, 16))


def _reference_attention(block, x):
    """Upstream QKVAttentionLegacy written out with einsum (heads split first)."""
    b, c, *spatial = x.shape
    flat = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(flat))
    heads = block.num_heads
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    weight = th.softmax(th.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    h = th.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    return (flat + block.proj_out(h)).reshape(b, c, *spatial)


def test_attention_block_3d_matches_reference():
    block = randomize_(AttentionBlock(64, num_head_channels=32))
    x = th.randn(2, 64, 3, 4, 5)
    with th.no_grad():
        assert th.allclose(block(x), _reference_attention(block, x), atol=1e-5)


def test_attention_in_3d_unet():
    model = randomize_(UNetModel(32, 1, 32, 2, 1, attention_resolutions=(2,),
                                 channel_mult=(1, 2), dims=3, num_head_channels=16))
    assert any(isinstance(m, AttentionBlock) for m in model.input_blocks.modules())
    assert isinstance(model.middle_block[1], AttentionBlock)
    with th.no_grad():
        out = model(th.randn(1, 1, 3, 8, 8), th.tensor([7]))
    assert out.shape == (1, 2, 3, 8, 8) and th.isfinite(out).all()


def test_upstream_2d_unet_shapes():
    model = UNetModel(32, 3, 32, 6, 2, attention_resolutions=(2,), channel_mult=(1, 2, 2),
                      num_heads=4, num_classes=10).eval()
    with th.no_grad():
        out = model(th.randn(2, 3, 16, 16), th.tensor([0, 999]), y=th.tensor([1, 9]))
    assert out.shape == (2, 6, 16, 16)
    assert model.output_blocks[0][0].in_layers[0].num_channels == 64 + 64


def test_encoder_unet_3d():
    model = EncoderUNetModel(32, 1, 32, 5, 1, (), channel_mult=(1, 2), dims=3).eval()
    with th.no_grad():
        out = model(th.randn(2, 1, 3, 8, 8), th.tensor([3, 4]))
    assert out.shape == (2, 5)


def test_timestep_embedding_values():
    emb = timestep_embedding(th.tensor([0.0, 1.0]), 4)
    expected = th.tensor([[1.0, 1.0, 0.0, 0.0],
                          [math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)]])
    assert th.allclose(emb, expected, atol=1e-6)


def test_normalization_groups():
    assert normalization(128).num_groups == 32
    assert normalization(16).num_groups == 16


def test_channels_last_bf16_matches_fp32():
    model = randomize_(tiny(channel_mult=(1, 2, 2)))
    x, low_res, t = th.randn(1, 1, 4, 16, 16), th.randn(1, 1, 4, 16, 16), th.tensor([30])
    with th.no_grad():
        reference = model(x, t, low_res=low_res)
        model = model.to(memory_format=th.channels_last_3d)
        with fp16_util.autocast("cpu", "bf16"):
            fast = model(x.contiguous(memory_format=th.channels_last_3d), t,
                         low_res=low_res.contiguous(memory_format=th.channels_last_3d))
    assert fast.dtype == th.float32
    rel = (fast - reference).norm() / reference.norm()
    assert 0 < rel < 0.05


def test_state_dict_round_trip():
    model = randomize_(tiny(), seed=1)
    buffer = io.BytesIO()
    th.save(model.state_dict(), buffer)
    buffer.seek(0)
    copy = tiny()
    copy.load_state_dict(th.load(buffer, weights_only=True), strict=True)
    x, t = th.randn(1, 1, 2, 8, 8), th.tensor([9])
    with th.no_grad():
        assert th.equal(copy.eval()(x, t, low_res=x), model(x, t, low_res=x))


def test_convert_to_fp16_on_cpu_keeps_fp32():
    model = tiny()
    with pytest.warns(UserWarning, match="not on CUDA"):
        model.convert_to_fp16()
    assert all(p.dtype == th.float32 for p in model.parameters())
    x = th.randn(1, 1, 2, 8, 8)
    assert model(x, th.tensor([1]), low_res=x).dtype == th.float32


def test_resolve_precision():
    assert fp16_util.resolve_precision(False, "cpu") == "fp32"
    assert fp16_util.resolve_precision(False, "cpu", "bf16") == "bf16"
    assert fp16_util.resolve_precision(True, "cuda") == "fp16"
    with pytest.warns(UserWarning, match="bf16"):
        assert fp16_util.resolve_precision(True, "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        fp16_util.resolve_precision(False, "cpu", "fp8")
    with pytest.raises(ValueError, match="CUDA"):
        fp16_util.autocast("cpu", "fp16")


def test_mixed_precision_trainer_step_and_overflow():
    layer = th.nn.Linear(3, 1)
    trainer = fp16_util.MixedPrecisionTrainer(model=layer)
    opt = th.optim.SGD(trainer.master_params, lr=0.5)
    before = [p.detach().clone() for p in layer.parameters()]
    trainer.zero_grad()
    with trainer.autocast():
        loss = layer(th.ones(1, 3)).sum()
    trainer.backward(loss)
    assert trainer.optimize(opt)
    # d(w.x + b)/dw = x = 1, d/db = 1: SGD subtracts lr * 1 from every entry.
    for b, p in zip(before, layer.parameters()):
        assert th.allclose(p, b - 0.5)
    layer.weight.grad = th.full_like(layer.weight, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not trainer.optimize(opt)
    assert th.allclose(layer.weight, before[0] - 0.5)
    restored = trainer.master_params_to_state_dict(trainer.master_params)
    assert th.equal(restored["weight"], layer.weight)


def test_predict_residual_starts_from_the_low_dose_image():
    from guided_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults

    flags = dict(sr_model_and_diffusion_defaults(), num_channels=16, channel_mult="1,2",
                 num_res_blocks=1, num_head_channels=-1, large_size=16, learn_sigma=True,
                 predict_residual=True)
    model, _ = sr_create_model_and_diffusion(**flags)
    x, low = th.randn(1, 1, 3, 16, 16), th.randn(1, 1, 3, 16, 16)
    out = model(x, th.tensor([5]), low_res=low)
    # zero-initialised output layer: x0 channel = low_res exactly, variance channel = 0
    assert th.equal(out[:, :1], low) and th.equal(out[:, 1:], th.zeros_like(low))
    with th.no_grad():
        model.out[-1].weight.normal_(0, 0.1)
    plain = dict(flags, predict_residual=False)
    reference, _ = sr_create_model_and_diffusion(**plain)
    reference.load_state_dict(model.state_dict())
    expected = reference(x, th.tensor([5]), low_res=low)
    assert th.allclose(model(x, th.tensor([5]), low_res=low)[:, :1], expected[:, :1] + low, atol=1e-6)
