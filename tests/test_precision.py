"""Where MDRN's residual runs in bfloat16 (pipelines.models.precision), and that it stays close."""
from __future__ import annotations

import torch

from pipelines.models import mdrn, precision


def native(monkeypatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.delenv(precision.FP32_ENV, raising=False)


def test_bfloat16_only_for_inference_on_a_cpu_that_computes_it(monkeypatch):
    x = torch.zeros(1, 1, 4, 4)
    native(monkeypatch, frozenset({"avx512f", "avx512_bf16"}))
    assert precision.cpu_bf16()
    assert isinstance(precision.residual_precision(x, training=False), torch.autocast)
    assert not isinstance(precision.residual_precision(x, training=True), torch.autocast)  # training: float32
    assert not isinstance(precision.residual_precision(x.to("meta"), training=False), torch.autocast)  # not a CPU
    monkeypatch.setenv(precision.FP32_ENV, "1")
    assert not precision.cpu_bf16()
    native(monkeypatch, frozenset({"avx512f", "avx2"}))  # bfloat16 would be emulated: slower
    assert not precision.cpu_bf16()


def test_the_bfloat16_residual_stays_within_a_hair_of_float32(monkeypatch):
    torch.manual_seed(0)
    model = mdrn.MDRN(mdrn.MDRNConfig(channels=16, blocks=2)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 72, 72), 9, 1)
    x = (x - x.min()) / (x.max() - x.min())
    native(monkeypatch, frozenset())
    with torch.no_grad():
        full = model(x, 2)
        native(monkeypatch, frozenset({"avx512_bf16"}))
        reduced = model(x, 2)
    assert reduced.dtype == torch.float32
    residual = (full - mdrn.lanczos_at(x, mdrn.centres(64, 128), mdrn.centres(64, 128))).abs().mean()
    assert 0 < (full - reduced).abs().mean() < 0.02 * residual  # rounded, by about a hundredth of the residual
