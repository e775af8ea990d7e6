"""
Reduced-precision helpers: precision resolution, autocast, and a small mixed-precision
trainer with the upstream ``MixedPrecisionTrainer`` interface.

Precisions are named ``"fp32"``, ``"bf16"`` and ``"fp16"``. Weights stay float32 (they
are the "master" parameters); reduced precision comes from ``torch.autocast``. fp16 is
CUDA-only (with loss scaling); on CPU ``--use_fp16 True`` falls back to bf16.
"""

import contextlib
import math
import warnings

import numpy as np
import torch as th
import torch.nn as nn

from . import logger

INITIAL_LOG_LOSS_SCALE = 20.0
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": th.bfloat16, "fp16": th.float16}


def convert_module_to_f16(module):
    """Convert the weights of a convolution module to float16 (others untouched)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Convert a convolution module back to float32, undoing convert_module_to_f16()."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def cpu_has_fast_bf16(cpuinfo="/proc/cpuinfo"):
    """True where the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16 in ``cpuinfo``'s
    flags). Elsewhere (AVX2-only x86, or no ``cpuinfo``) bf16 convolutions are emulated and
    run many times slower than fp32 (BENCHMARKS.md), so ``auto`` picks fp32 there."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_cpu_precision():
    """``--precision auto`` on a CPU: bf16 where :func:`cpu_has_fast_bf16`, else fp32."""
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_precision(use_fp16, device, requested=None):
    """
    Decide the compute precision for `device`.

    :param use_fp16: the upstream ``--use_fp16`` flag (used when `requested` is empty).
    :param device: a torch.device or device string.
    :param requested: "fp32", "bf16", "fp16", or None/"" to follow `use_fp16`.
    :return: "fp32", "bf16" or "fp16"; fp16 only on CUDA. A fp16 request on another
        device becomes "bf16" with a one-line warning.
    """
    device = th.device(device)
    precision = (requested or ("fp16" if use_fp16 else "fp32")).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; expected one of {PRECISIONS}")
    if precision == "fp16" and device.type != "cuda":
        warnings.warn(
            f"fp16 needs CUDA; using bf16 autocast on {device.type} instead", stacklevel=2
        )
        return "bf16"
    return precision


def autocast(device, precision):
    """
    Context manager running the enclosed forward pass in `precision` on `device`.

    fp32 -> no-op context; bf16 -> ``torch.autocast(device_type, torch.bfloat16)``
    (CPU or CUDA); fp16 -> ``torch.autocast("cuda", torch.float16)`` (CUDA only).
    """
    device = th.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 autocast needs a CUDA device, got {device}")
    return th.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def check_overflow(value):
    """True when `value` is inf or NaN."""
    return not math.isfinite(value)


class MixedPrecisionTrainer:
    """
    Gradient bookkeeping for training in fp32, bf16 or fp16 (upstream interface).

    Parameters stay float32, so ``master_params`` are the model's own parameters. The
    training loop runs the forward pass inside ``with trainer.autocast():``. For fp16 the
    loss is scaled by a dynamic factor ``2 ** lg_loss_scale`` that doubles every
    ``1 / fp16_scale_growth`` good steps and halves on overflow (step skipped).
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        precision=None,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(use_fp16, self.device, precision)
        self.use_fp16 = self.precision == "fp16"
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.scaler = None
        if self.use_fp16:
            self.scaler = th.amp.GradScaler(
                "cuda",
                init_scale=2.0**initial_lg_loss_scale,
                growth_interval=max(1, round(1.0 / fp16_scale_growth)),
            )

    def autocast(self):
        """The autocast context for this trainer's device and precision."""
        return autocast(self.device, self.precision)

    def zero_grad(self):
        for param in self.model_params:
            param.grad = None

    def backward(self, loss):
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def optimize(self, opt):
        """Take an optimizer step; returns False when fp16 overflow skipped the step."""
        if self.scaler is not None:
            logger.logkv_mean("lg_loss_scale", math.log2(self.scaler.get_scale()))
            self.scaler.unscale_(opt)
        grad_norm, param_norm = self._compute_norms()
        took_step = not check_overflow(grad_norm)
        if took_step:
            logger.logkv_mean("grad_norm", grad_norm)
            logger.logkv_mean("param_norm", param_norm)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        elif took_step:
            opt.step()
        return took_step

    def _compute_norms(self):
        grad_sq, param_sq = 0.0, 0.0
        with th.no_grad():
            for p in self.master_params:
                param_sq += th.norm(p, p=2, dtype=th.float32).item() ** 2
                if p.grad is not None:
                    grad_sq += th.norm(p.grad, p=2, dtype=th.float32).item() ** 2
        return float(np.sqrt(grad_sq)), float(np.sqrt(param_sq))

    def master_params_to_state_dict(self, master_params):
        """The model's state_dict with its parameters replaced by `master_params`."""
        state_dict = self.model.state_dict()
        for (name, _), value in zip(self.model.named_parameters(), master_params):
            state_dict[name] = value
        return state_dict

    def state_dict_to_master_params(self, state_dict):
        """The parameters of `state_dict`, in ``model.named_parameters()`` order."""
        return [state_dict[name] for name, _ in self.model.named_parameters()]
