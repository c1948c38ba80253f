"""Where inference may run in bfloat16: the residual branch of a network, on a CPU that computes
bfloat16 natively (AVX512-BF16 or AMX).

MDRN's 16 blocks x 64 channels cost ~100 s for a 2048-px film at x2 on 2 cores in float32; its
convolutions in bfloat16 (oneDNN, float32 accumulation) take 2.3x less time. Only the residual added to
the float32 Lanczos base is computed that way (a residual is ~1 % of the intensity range, so its
bfloat16 rounding is ~0.004 % of it): on a 400-px image the output moved by 0.0005 of [0, 1] on
average (64 dB PSNR against float32). The model cards' metrics are measured on this path
(``srnode eval``). ``SRNODE_FP32=1`` keeps everything in float32; without native support (another CPU,
a GPU) nothing changes.
"""
from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path

import torch

FP32_ENV = "SRNODE_FP32"
NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no native bfloat16 assumed
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_bf16() -> bool:
    """This CPU computes bfloat16 natively and float32 was not asked for."""
    if os.environ.get(FP32_ENV, "") not in ("", "0"):
        return False
    return torch.backends.mkldnn.is_available() and any(flag in _cpu_flags() for flag in NATIVE_FLAGS)


def residual_precision(x: torch.Tensor, training: bool):
    """The context a network's residual branch runs in for input ``x``: bfloat16 autocast for
    inference on such a CPU, else full precision."""
    if training or x.device.type != "cpu" or not cpu_bf16():
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)
