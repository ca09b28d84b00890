"""The vocabulary projection's forward in fp32 through oneDNN where this CPU computes it faster than PyTorch's
default (MKL's sgemm), measured once.

With supervised logits (train/loss.py) the projection runs at the ~100 positions a batch supervises, a skinny
product with a wide weight: 100 x 576 x 49,152 on SmolLM2. MKL runs its AVX2 code on AMD CPUs, and there it reached
92-94 GFLOP/s at this shape (60 ms) where oneDNN, which PyTorch ships, reached 158-171 (34-36 ms), natively on a
2-core AMD EPYC Zen 4 and with AVX2 only (`ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`); in training
there (AVX2, fp32, the quickstart at batch 8, 64-118 positions a step) 76 -> 38 ms a step of about 1.15 s. The
backward (the positions' gradient, g W) stays MKL's: no faster by oneDNN there. The layers' products stay MKL's
too: one at a time oneDNN was 5-20 % faster, but in training (200 cold weights, a new row count every step) not
(benchmarks/README.md). Other CPUs (an Intel CPU's MKL, an ARM build) may differ, so both are timed in turns at
VOCAB_SHAPE the first time on a machine and oneDNN is used where it measured at least as fast (kept in the
tuneship cache as `cpu_gemm.json`). The logits are the same to fp32 rounding.
"""

from __future__ import annotations

import platform
import time
import types
from functools import cache

from tuneship.train.precision import measured_once

VOCAB_SHAPE = (100, 576, 49152)  # supervised positions x hidden x vocabulary: SmolLM2-135M at one batch
PROBE_SECONDS = 0.5


def use_onednn_projection(model) -> bool:
    """`model`'s vocabulary projection (a frozen `nn.Linear`) computed by oneDNN in fp32 on a CPU where it measured
    faster; returns whether it was given that forward."""
    import torch

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or "forward" in vars(head):
        return False
    if (head.bias is not None and head.bias.requires_grad) or head.weight.device.type != "cpu":
        return False
    if not onednn_is_faster():
        return False
    head.forward = types.MethodType(_projection_forward, head)
    return True


def onednn_is_faster() -> bool:
    return measured_once("cpu_gemm.json", measure_projection)["onednn_speedup"] >= 1.0


def measure_projection(shape: tuple[int, int, int] = VOCAB_SHAPE, seconds: float = PROBE_SECONDS) -> dict:
    """The best seconds of the projection's product at `shape` (positions x hidden x vocabulary) by MKL (PyTorch's
    default) and by oneDNN, taken in turns (a shared host's speed drifts), and oneDNN's speedup (0 where PyTorch
    has no oneDNN here)."""
    import torch

    positions, hidden, vocabulary = shape
    x, weight = torch.randn(positions, hidden), torch.randn(vocabulary, hidden)
    kernels = {"mkl": lambda: torch.nn.functional.linear(x, weight)}
    product = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() and product:
        try:  # an internal op of PyTorch's: another version may not take these arguments
            product(x[:1], weight[:8], None, "none", [], "")
            kernels["onednn"] = lambda: product(x, weight, None, "none", [], "")
        except (RuntimeError, TypeError):
            pass
    best, rounds, started = dict.fromkeys(kernels, float("inf")), 0, time.perf_counter()
    while time.perf_counter() - started < seconds or rounds < 3:
        rounds += 1
        for name, run in kernels.items():
            began = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - began)
    onednn = best.get("onednn")
    speedup = best["mkl"] / onednn if onednn else 0.0
    return {"mkl_seconds": best["mkl"], "onednn_seconds": onednn, "onednn_speedup": speedup}


def _projection_forward(self, hidden):
    import torch

    if hidden.dtype != torch.float32 or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return torch.nn.functional.linear(hidden, self.weight, self.bias)
    rows = _onednn_projection().apply(hidden.reshape(-1, hidden.shape[-1]), self.weight, self.bias)
    return rows.view(*hidden.shape[:-1], rows.shape[-1])


@cache
def _onednn_projection():
    import torch

    class OneDNNProjection(torch.autograd.Function):
        """y = x W^T + bias by oneDNN, with W and bias frozen: only x's gradient, g W by PyTorch's own product."""

        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(weight)
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")

        @staticmethod
        def backward(ctx, grad_out):
            (weight,) = ctx.saved_tensors
            return grad_out @ weight, None, None

    return OneDNNProjection
