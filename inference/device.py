"""Device and dtype choice: bf16 where the hardware runs it natively, fp16 on other GPUs, else fp32."""

from __future__ import annotations

import functools

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with AMX or AVX-512 BF16 (read from /proc/cpuinfo where it exists)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` becomes bf16, fp16 or fp32 for ``device``."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if dtype == "int8":  # bench/README.md: slower than bf16 and below the fidelity gate on MiniLM
        raise ValueError("--dtype int8 is no longer offered (slower than bf16 and below the fidelity gate); use bf16")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, fp32, bf16 or fp16")
    return dtype


def attention_for(device: torch.device) -> str:
    """Attention kernel per device, as measured by bench/hardware.py: eager on CPUs, SDPA on GPUs.

    On short queries the CPU's eager matmuls beat SDPA's kernels (bench/README.md); answers agree
    within float rounding, so the choice is not part of the fingerprint.
    """
    return "eager" if device.type == "cpu" else "sdpa"


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per batch: small on CPUs (cache-friendly), large on GPUs."""
    return 16384 if device.type == "cuda" else 1024
