"""Which device and precision to train on, and whether the run will fit in memory."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tuneship.errors import ModelError, TuneshipError

BYTES_PER = {"fp32": 4, "bf16": 2, "fp16": 2, "nf4": 0.5}
GIB = 1024**3


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
    """Bytes a training run needs, estimated from config.json before anything is loaded."""

    parameters: int
    weights: int
    adapter_and_optimizer: int
    activations: int
    available: int | None
    device: str

    @property
    def total(self) -> int:
        return self.weights + self.adapter_and_optimizer + self.activations

    def describe(self) -> str:
        available = f"{self.available / GIB:.1f} GiB available" if self.available is not None else "unknown free"
        return (
            f"memory estimate {self.total / GIB:.2f} GiB for {self.parameters / 1e6:.0f}M parameters (weights "
            f"{self.weights / GIB:.2f}, adapter + optimizer {self.adapter_and_optimizer / GIB:.2f}, activations "
            f"{self.activations / GIB:.2f}) vs {available} on {self.device}"
        )

    def to_json(self) -> dict:
        return asdict(self) | {"total": self.total}


def estimate_memory(
    model_dir: str, precision: str, *, lora_r: int, batch_size: int, seq_len: int, is_qlora: bool, device: str
) -> MemoryEstimate:
    """A rough upper estimate from the model's config.json (resolve a hub id to its snapshot first)."""
    config = _model_config(Path(model_dir))
    hidden = config["hidden_size"]
    layers = config["num_hidden_layers"]
    vocab = config["vocab_size"]
    inner = config.get("intermediate_size", 4 * hidden)
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or hidden // heads
    kv_width = config.get("num_key_value_heads", heads) * head_dim
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_width  # q, o and k, v projections
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    norms = (2 * layers + 1) * hidden
    params = layers * (attention + 3 * hidden * inner) + embeddings + norms
    weight_bytes = BYTES_PER["nf4" if is_qlora else precision]
    lora_params = layers * 7 * 2 * lora_r * hidden
    act_bytes = BYTES_PER.get(precision, 4)
    activations = batch_size * seq_len * (layers * hidden * 20 + vocab * 2) * act_bytes
    return MemoryEstimate(
        params, int(params * weight_bytes), lora_params * 16, int(activations), _available_memory(device), device
    )


# Sequences one example puts through the trained model in a step (the reference forward keeps no activations):
# a DPO pair's chosen and rejected answers, a KTO answer and its KL (mismatched) answer.
SEQUENCES_PER_EXAMPLE = {"sft": 1, "dpo": 2, "kto": 2}


def estimate_for_run(model_dir: str, cfg, device: DeviceChoice) -> MemoryEstimate:
    return estimate_memory(
        model_dir,
        device.precision,
        lora_r=cfg.lora.r,
        batch_size=cfg.train.batch_size * SEQUENCES_PER_EXAMPLE[cfg.train.objective],
        seq_len=cfg.train.max_seq_len,
        is_qlora=cfg.lora.qlora,
        device=device.kind,
    )


def _model_config(folder: Path) -> dict:
    """The sizes from config.json (a multimodal model's text_config); no guessing when they are missing."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no config.json, so the memory a run needs cannot be estimated")
    config = json.loads(path.read_text(encoding="utf-8"))
    config = config.get("text_config") or config
    missing = [key for key in ("hidden_size", "num_hidden_layers", "vocab_size") if key not in config]
    if missing:
        raise ModelError(f"{path}: no {', '.join(missing)}, so the memory a run needs cannot be estimated")
    return config


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
    message = (
        f"estimated memory {estimate.total / GIB:.1f} GiB (weights {estimate.weights / GIB:.1f}, activations "
        f"{estimate.activations / GIB:.1f}) vs {estimate.available / GIB:.1f} GiB available; lower "
        "train.batch_size or train.max_seq_len, or use lora.qlora on CUDA"
    )
    if estimate.total > estimate.available:
        return "error", message
    if estimate.total > 0.8 * estimate.available:
        return "warning", message
    return None


def check_memory(estimate: MemoryEstimate, console) -> None:
    """Stop before loading anything when the run cannot fit; warn when it is tight."""
    verdict = memory_verdict(estimate)
    if verdict and verdict[0] == "error":
        raise TuneshipError(f"the run will not fit in memory: {verdict[1]}")
    if verdict:
        console.print(f"[yellow]warning:[/] {verdict[1]}")


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def measured_peak_memory(device: str) -> dict:
    """The peak actually used: allocated CUDA memory on a GPU, else the process's peak resident set."""
    if device == "cuda":
        import torch

        return {"bytes": torch.cuda.max_memory_allocated(), "measured_as": "torch.cuda.max_memory_allocated"}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": peak if sys.platform == "darwin" else peak * 1024, "measured_as": "peak RSS of the process"}
