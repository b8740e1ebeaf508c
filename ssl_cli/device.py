"""Where tensors run and at what precision: CUDA when present; training in channels_last with bf16 autocast
where measured to win (CUDA, and CPUs with native bf16), inference (extract, finetune's embedding) in bf16 on CUDA only."""

from __future__ import annotations

import contextlib

import torch

from ssl_cli.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# What the training loop runs with, per device type, chosen by bench/speed.py's measurement (the figures are
# in bench/README.md, "Memory format, precision, compilation"): channels_last won on CUDA and on this
# project's x86 CPU (oneDNN's convolutions run NHWC natively: 1.2-1.4x on alexnet_bn_lowres/convnet_bn_lowres);
# bf16 autocast on CUDA and on CPUs whose oneDNN has native bf16 (AVX512-BF16 or AMX), where it was about
# 2x faster at the same accuracy; elsewhere a CPU emulates bf16 and loses.
def training_channels_last(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu")


def training_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and native_cpu_bf16()


def native_cpu_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `bf16`, else full precision (the loop's precision)."""
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module = module.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device)


def inference_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch (B, C, H, W) on `device` in the layout inference runs fastest in: channels_last on CUDA and on
    CPUs where training uses it (oneDNN's NHWC convolutions: alexnet_bn_lowres at 32 px extracted 1.9x faster
    on this project's 2-core x86 than from NCHW, the same model). The values are the same; the features differ
    from NCHW's in their last bits (another convolution algorithm), the same run to run."""
    if device.type == "cpu" and images.dim() == 4 and training_channels_last(device):
        return images.contiguous(memory_format=torch.channels_last)
    return to_device(images, device)  # channels_last on CUDA too
