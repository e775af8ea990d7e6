"""
UNet denoisers for 1D/2D/3D diffusion (upstream guided-diffusion names and key layout).

Tensor layout: ``(B, C, *spatial)``. For ``dims=3`` the spatial axes are ``(Z, X, Y)``
with Z axial; down/up-sampling acts only on the transaxial X and Y axes (stride
``(1, 2, 2)``), Z keeps its length through the network, so any Z is accepted while X and
Y must be multiples of ``2 ** (len(channel_mult) - 1)``.

Two decoder layouts share the encoder:

* ``layout="upstream"``: OpenAI guided-diffusion (decoder block ``i`` maps
  ``ch + skip -> model_channels * mult``; middle block ResBlock, attention, ResBlock).
* ``layout="published3d"``: the published 3D PET DDPM (Yu/Gong 2025): each decoder
  block takes ``2 * skip`` channels and emits the width of the *next* skip it will be
  concatenated with; the middle block has no attention. State-dict keys and shapes equal
  those of the published checkpoint.
"""

import warnings
from abc import abstractmethod

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

LAYOUTS = ("upstream", "published3d")


def resample_factor(dims):
    """Down/up-sampling factor per spatial axis: 2 everywhere, (1, 2, 2) for 3D (Z kept)."""
    return (1, 2, 2) if dims == 3 else 2


class TimestepBlock(nn.Module):
    """Any module where forward() takes timestep embeddings as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given `emb` timestep embeddings."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential module that passes timestep embeddings to the children that take them."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour upsampling by 2 (X and Y only for 3D), with an optional 3x3 conv.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a convolution is applied.
    :param dims: 1, 2 or 3.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        factor = resample_factor(self.dims)
        x = F.interpolate(x, scale_factor=factor, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """
    Downsampling by 2 (X and Y only for 3D): strided 3x3 conv, or average pooling.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a convolution is applied.
    :param dims: 1, 2 or 3.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = resample_factor(dims)
        if use_conv:
            self.op = conv_nd(
                dims, self.channels, self.out_channels, 3, stride=stride, padding=1
            )
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change channels")
            self.op = avg_pool_nd(dims, stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding, optionally resampling.

    :param channels: the number of input channels.
    :param emb_channels: the number of timestep embedding channels.
    :param dropout: the rate of dropout.
    :param out_channels: if specified, the number of out channels.
    :param use_conv: use a 3x3 instead of a 1x1 conv on the skip path when the
        channel count changes.
    :param use_scale_shift_norm: FiLM-like conditioning ``norm(h) * (1 + s) + b``.
    :param dims: 1, 2 or 3.
    :param use_checkpoint: if True, use gradient checkpointing on this module.
    :param up: if True, upsample (nearest) inside the block.
    :param down: if True, downsample (average pooling) inside the block.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(
                emb_channels,
                2 * self.out_channels if use_scale_shift_norm else self.out_channels,
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(
                conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)
            ),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(
                dims, channels, self.out_channels, 3, padding=1
            )
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        """
        :param x: an [N x C x ...] Tensor of features.
        :param emb: an [N x emb_channels] Tensor of timestep embeddings.
        :return: an [N x out_channels x ...] Tensor of outputs.
        """
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        # h is a fresh convolution output here and below: adding in place saves a tensor
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm.modulated(h, scale, shift))
        else:
            h = self.out_layers(h.add_(emb_out))
        skip = self.skip_connection(x)
        return h.add_(skip) if skip.dtype == h.dtype else skip + h


def _split_heads(qkv, n_heads, legacy_order):
    """
    Split ``qkv`` [N x 3*H*C x T] into q, k, v, each [N*H x T x C].

    Legacy order (upstream ``QKVAttentionLegacy``): heads first, then q/k/v inside each
    head; new order (``QKVAttention``): q/k/v first, then heads.
    """
    bs, width, length = qkv.shape
    if width % (3 * n_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * {n_heads} heads")
    ch = width // (3 * n_heads)
    if legacy_order:
        q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * n_heads, ch, length) for t in qkv.chunk(3, dim=1))
    return (t.transpose(1, 2) for t in (q, k, v))


class QKVAttentionLegacy(nn.Module):
    """Multi-head QKV attention, heads split before q/k/v (upstream legacy order)."""

    legacy_order = True

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        """
        :param qkv: an [N x (3 * H * C) x T] tensor of Qs, Ks and Vs.
        :return: an [N x (H * C) x T] tensor: softmax(q k^T / sqrt(C)) v per head.
        """
        bs, _, length = qkv.shape
        q, k, v = _split_heads(qkv, self.n_heads, self.legacy_order)
        a = F.scaled_dot_product_attention(q, k, v)
        return a.transpose(1, 2).reshape(bs, -1, length)


class QKVAttention(QKVAttentionLegacy):
    """Multi-head QKV attention, q/k/v split before heads (upstream new order)."""

    legacy_order = False


class AttentionBlock(nn.Module):
    """
    Self-attention over all spatial positions (flattened; Z*X*Y tokens in 3D).

    :param num_head_channels: if not -1, use ``channels // num_head_channels`` heads.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention channels {channels} not divisible by "
                    f"num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attention_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_cls(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """
    Attention pooling of a fixed-size 2D feature map (CLIP style, upstream classifier head).

    :param spacial_dim: side of the square input feature map.
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_spatial = x.shape
        x = x.reshape(b, c, -1)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class _ModelOptions:
    """The constructor options every block builder needs (keeps builder signatures short)."""

    def __init__(self, time_embed_dim, dropout, dims, use_checkpoint,
                 use_scale_shift_norm, num_heads, num_head_channels,
                 use_new_attention_order):
        self.time_embed_dim = time_embed_dim
        self.dropout = dropout
        self.dims = dims
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.use_new_attention_order = use_new_attention_order

    def resblock(self, channels, out_channels=None, up=False, down=False):
        return ResBlock(
            channels,
            self.time_embed_dim,
            self.dropout,
            out_channels=out_channels,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def attention(self, channels, num_heads=None):
        return AttentionBlock(
            channels,
            use_checkpoint=self.use_checkpoint,
            num_heads=self.num_heads if num_heads is None else num_heads,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )


def _build_encoder(opts, in_channels, model_channels, num_res_blocks,
                   attention_resolutions, channel_mult, conv_resample, resblock_updown):
    """
    Build the shared encoder.

    :return: (input_blocks, skip widths in push order, bottom width, bottom ds).
    """
    ch = int(channel_mult[0] * model_channels)
    input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(conv_nd(opts.dims, in_channels, ch, 3, padding=1))]
    )
    skip_widths = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out_ch = int(mult * model_channels)
            layers = [opts.resblock(ch, out_ch)]
            ch = out_ch
            if ds in attention_resolutions:
                layers.append(opts.attention(ch))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_widths.append(ch)
        if level != len(channel_mult) - 1:
            down = (
                opts.resblock(ch, ch, down=True)
                if resblock_updown
                else Downsample(ch, conv_resample, dims=opts.dims, out_channels=ch)
            )
            input_blocks.append(TimestepEmbedSequential(down))
            skip_widths.append(ch)
            ds *= 2
    return input_blocks, skip_widths, ch, ds


def _build_middle(opts, ch, with_attention):
    """Middle block: ResBlock, [AttentionBlock], ResBlock."""
    layers = [opts.resblock(ch)]
    if with_attention:
        layers.append(opts.attention(ch))
    layers.append(opts.resblock(ch))
    return TimestepEmbedSequential(*layers)


def _decoder_widths(layout, skip_widths, bottom_ch, model_channels, channel_mult,
                    num_res_blocks):
    """
    Input/output channel counts of the decoder blocks, in forward order.

    :return: list of (level, i, block_in, block_out); block ``i == num_res_blocks`` of a
        level > 0 ends with an upsampling layer.
    """
    stack = list(skip_widths)
    widths = []
    ch = bottom_ch
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            skip = stack.pop()
            if layout == "upstream":
                block_in, ch = ch + skip, int(model_channels * mult)
            else:  # published3d: 2 * skip in, width of the next skip out
                block_in, ch = 2 * skip, (stack[-1] if stack else skip)
            widths.append((level, i, block_in, ch))
    return widths


def check_spatial_shape(x, dims, num_levels, what="input"):
    """
    Raise ValueError unless the resampled axes of `x` divide by ``2 ** (num_levels - 1)``.

    :param x: [N x C x *spatial]; for dims=3 spatial is (Z, X, Y) and only X, Y are
        checked (Z is never resampled).
    """
    if x.ndim != dims + 2:
        raise ValueError(
            f"{what} must have {dims + 2} dimensions (B, C, *spatial), got shape "
            f"{tuple(x.shape)}"
        )
    factor = 2 ** (num_levels - 1)
    axes = (3, 4) if dims == 3 else tuple(range(2, x.ndim))
    bad = [x.shape[a] for a in axes if x.shape[a] % factor]
    if bad:
        names = "X, Y axes (dims 3, 4 of (B, C, Z, X, Y))" if dims == 3 else "spatial axes"
        raise ValueError(
            f"{what} shape {tuple(x.shape)}: the {names} must be multiples of {factor} "
            f"(2 ** (len(channel_mult) - 1)); got sizes {bad}. Pad or crop the volume."
        )


class UNetModel(nn.Module):
    """
    The full UNet model with attention and timestep embedding.

    :param image_size: nominal training size (kept for upstream compatibility).
    :param in_channels: channels in the input Tensor.
    :param model_channels: base channel count for the model.
    :param out_channels: channels in the output Tensor.
    :param num_res_blocks: number of residual blocks per downsample.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which attention is
        used in the encoder and decoder; an empty collection disables it.
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier for each level of the UNet.
    :param conv_resample: if True, use learned convolutions for up/downsampling.
    :param dims: 1, 2 or 3 (3: layout (B, C, Z, X, Y), resampling only on X and Y).
    :param num_classes: if specified (as an int), the model is class-conditional.
    :param use_checkpoint: use gradient checkpointing to reduce memory usage.
    :param use_fp16: remembered for ``convert_to_fp16`` callers; weights stay float32
        until ``convert_to_fp16()`` is called (prefer autocast, see fp16_util).
    :param num_heads: the number of attention heads in each attention layer.
    :param num_head_channels: if not -1, a fixed channel width per attention head.
    :param num_heads_upsample: heads for decoder attention (-1: same as num_heads).
    :param use_scale_shift_norm: use a FiLM-like conditioning mechanism.
    :param resblock_updown: use residual blocks for up/downsampling.
    :param use_new_attention_order: split q/k/v before heads.
    :param layout: "upstream" or "published3d" (see module docstring).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        layout="upstream",
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown UNet layout {layout!r}; expected one of {LAYOUTS}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.dtype = th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.layout = layout

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        opts = _ModelOptions(time_embed_dim, dropout, dims, use_checkpoint,
                             use_scale_shift_norm, num_heads, num_head_channels,
                             use_new_attention_order)
        self.input_blocks, skip_widths, ch, ds = _build_encoder(
            opts, in_channels, model_channels, num_res_blocks, attention_resolutions,
            channel_mult, conv_resample, resblock_updown)
        self.middle_block = _build_middle(opts, ch, with_attention=layout == "upstream")

        self.output_blocks = nn.ModuleList([])
        for level, i, block_in, ch in _decoder_widths(
                layout, skip_widths, ch, model_channels, channel_mult, num_res_blocks):
            layers = [opts.resblock(block_in, ch)]
            if ds in attention_resolutions:
                layers.append(opts.attention(ch, num_heads=num_heads_upsample))
            if level and i == num_res_blocks:
                layers.append(
                    opts.resblock(ch, ch, up=True)
                    if resblock_updown
                    else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                ds //= 2
            self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )

    def _torso(self):
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def convert_to_fp16(self):
        """
        Convert the torso's convolutions to float16 (CUDA only, as upstream).

        On a CPU model this keeps float32 weights and warns once: CPU half-precision
        convolutions are slow or unsupported; use bf16 autocast (fp16_util.autocast).
        """
        if next(self.parameters()).device.type != "cuda":
            warnings.warn(
                "convert_to_fp16: model is not on CUDA; keeping float32 weights "
                "(use bf16 autocast for reduced precision on CPU)",
                stacklevel=2,
            )
            return
        for part in self._torso():
            part.apply(convert_module_to_f16)
        self.dtype = th.float16

    def convert_to_fp32(self):
        """Convert the torso of the model back to float32."""
        for part in self._torso():
            part.apply(convert_module_to_f32)
        self.dtype = th.float32

    def forward(self, x, timesteps, y=None):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] Tensor of inputs ((N, C, Z, X, Y) for dims=3).
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] Tensor of labels, if class-conditional.
        :return: an [N x out_channels x ...] Tensor of outputs, in x's dtype.
        """
        check_spatial_shape(x, self.dims, len(self.channel_mult))
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"input has {x.shape[1]} channels, model expects {self.in_channels}"
            )
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("must specify y if and only if the model is class-conditional")

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)

        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(th.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype)).type(x.dtype)


class SuperResModel(UNetModel):
    """
    A UNetModel conditioned on a paired image `low_res` concatenated to x on channels.

    ``in_channels`` is the channel count of x (and of low_res); the network sees twice
    as many. For dims=3 (paired PET denoising) low_res must have x's spatial shape (no
    interpolation); for dims=2 a differently-sized low_res is resized bilinearly, as
    upstream super-resolution does.

    :param predict_residual: add ``low_res`` to the first ``in_channels`` output channels, so
        the network learns the correction to the low-dose image (use with ``predict_xstart``:
        the x0 prediction starts as the low-dose image instead of 0; off for the published
        weights).
    """

    def __init__(self, image_size, in_channels, *args, predict_residual=False, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)
        self.predict_residual = predict_residual

    def forward(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError("SuperResModel needs the conditioning image `low_res`")
        if low_res.shape[2:] != x.shape[2:]:
            if self.dims != 2:
                raise ValueError(
                    f"low_res spatial shape {tuple(low_res.shape[2:])} differs from x "
                    f"{tuple(x.shape[2:])}; paired {self.dims}D conditioning needs equal shapes"
                )
            low_res = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        out = super().forward(th.cat([x, low_res.type(x.dtype)], dim=1), timesteps, **kwargs)
        if self.predict_residual:
            channels = low_res.shape[1]
            out = th.cat([out[:, :channels] + low_res.type(out.dtype), out[:, channels:]], dim=1)
        return out


class EncoderUNetModel(nn.Module):
    """
    The half UNet (encoder + middle block) with a pooled head, e.g. a noisy classifier.

    Parameters as UNetModel, plus ``pool`` in {"adaptive", "attention", "spatial",
    "spatial_v2"}. "attention" pooling needs a fixed square 2D map (dims=2 only).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = tuple(channel_mult)
        self.dims = dims
        self.use_fp16 = use_fp16
        self.dtype = th.float32
        self.pool = pool

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        opts = _ModelOptions(time_embed_dim, dropout, dims, use_checkpoint,
                             use_scale_shift_norm, num_heads, num_head_channels,
                             use_new_attention_order)
        self.input_blocks, skip_widths, ch, ds = _build_encoder(
            opts, in_channels, model_channels, num_res_blocks, attention_resolutions,
            channel_mult, conv_resample, resblock_updown)
        self.middle_block = _build_middle(opts, ch, with_attention=True)
        feature_size = sum(skip_widths) + ch

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if dims != 2 or num_head_channels == -1:
                raise ValueError("attention pooling needs dims=2 and num_head_channels")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, self.out_channels),
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, self.out_channels),
            )
        else:
            raise ValueError(f"unexpected pool {pool!r}")

    def convert_to_fp16(self):
        """Convert the torso to float16 on CUDA; keep float32 with a warning on CPU."""
        if next(self.parameters()).device.type != "cuda":
            warnings.warn("convert_to_fp16: model is not on CUDA; keeping float32 weights",
                          stacklevel=2)
            return
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.dtype = th.float16

    def convert_to_fp32(self):
        """Convert the torso of the model back to float32."""
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.dtype = th.float32

    def forward(self, x, timesteps):
        """
        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :return: an [N x K] Tensor of outputs.
        """
        check_spatial_shape(x, self.dims, len(self.channel_mult))
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial_axes = tuple(range(2, x.ndim))
        results = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                results.append(h.type(x.dtype).mean(dim=spatial_axes))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            results.append(h.type(x.dtype).mean(dim=spatial_axes))
            return self.out(th.cat(results, dim=-1))
        return self.out(h.type(x.dtype))
