"""Which device and precision to train on, and whether the run will fit in memory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.errors import TuneshipError

BYTES_PER = {"fp32": 4, "bf16": 2, "fp16": 2, "nf4": 0.5}


class DeviceError(TuneshipError):
    """The requested device or precision is not available here."""


@dataclass
class DeviceChoice:
    kind: str
    precision: str
    notes: list[str] = field(default_factory=list)


def detect_device(preference: str = "auto", precision: str = "auto") -> DeviceChoice:
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device=cuda but no CUDA GPU is visible to PyTorch; use train.device=auto or cpu")
    if preference == "mps" and not has_mps:
        raise DeviceError("train.device=mps but Apple MPS is not available; use train.device=auto or cpu")
    kind = preference
    if preference == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if kind == "cpu" and precision == "auto":
        from tuneship.train.precision import cpu_auto_precision

        chosen, why = cpu_auto_precision()
        return DeviceChoice(kind, chosen, [why])
    choice = DeviceChoice(kind, _precision(kind, precision))
    if kind == "mps":
        choice.notes.append("MPS trains in fp32 (fp16 on MPS often gives NaN); the NaN guard is on")
    return choice


def _precision(kind: str, requested: str) -> str:
    import torch

    if kind == "cuda":
        best = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if requested == "bf16" and best != "bf16":
            raise DeviceError("train.precision=bf16 but this GPU has no bf16; use fp16 or auto")
        return best if requested == "auto" else requested
    if kind == "mps":
        if requested in ("fp16", "bf16"):
            raise DeviceError(f"train.precision={requested} on MPS gives NaN losses; use fp32 or auto")
        return "fp32"
    if requested == "fp16":
        raise DeviceError("train.precision=fp16 is not supported on CPU; use fp32, bf16 or auto")
    return requested


@dataclass
class MemoryEstimate:
    weights: int
    adapter_and_optimizer: int
    activations: int
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.adapter_and_optimizer + self.activations


def estimate_memory(
    model_dir: str, precision: str, *, lora_r: int, batch_size: int, seq_len: int, is_qlora: bool, device: str
) -> MemoryEstimate:
    """A rough upper estimate from config.json, before anything is loaded."""
    config = json.loads((Path(model_dir) / "config.json").read_text()) if Path(model_dir).is_dir() else {}
    hidden = config.get("hidden_size", 4096)
    layers = config.get("num_hidden_layers", 32)
    vocab = config.get("vocab_size", 32000)
    inner = config.get("intermediate_size", 4 * hidden)
    per_layer = 4 * hidden * hidden + 3 * hidden * inner
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    params = layers * per_layer + embeddings
    weight_bytes = BYTES_PER["nf4" if is_qlora else precision]
    lora_params = layers * 7 * 2 * lora_r * hidden
    act_bytes = BYTES_PER.get(precision, 4)
    activations = batch_size * seq_len * (layers * hidden * 20 + vocab * 2) * act_bytes
    return MemoryEstimate(int(params * weight_bytes), lora_params * 16, int(activations), _available_memory(device))


def _available_memory(device: str) -> int | None:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_verdict(estimate: MemoryEstimate) -> tuple[str, str] | None:
    """("error"|"warning", message) when the estimate does not fit comfortably."""
    if estimate.available is None:
        return None
    gib = 1024**3
    message = (
        f"estimated memory {estimate.total / gib:.1f} GiB (weights {estimate.weights / gib:.1f}, activations "
        f"{estimate.activations / gib:.1f}) vs {estimate.available / gib:.1f} GiB available; lower "
        "train.batch_size or train.max_seq_len, or use lora.qlora on CUDA"
    )
    if estimate.total > estimate.available:
        return "error", message
    if estimate.total > 0.8 * estimate.available:
        return "warning", message
    return None


def free_disk_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
