"""What this CPU computes fastest, measured once and cached: bf16 autocast or fp32, and how many threads.

A flag list (avx512_bf16, amx) says what a CPU can do, not what it does fast: some CPUs emulate bf16
and run it slower than fp32. So `train.precision: auto` on CPU times one matmul of a small model's shape
in both precisions, the first time on this machine, and keeps the verdict in the tuneship cache.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneship.disk import written_atomically
from tuneship.paths import cache_dir

BF16_MIN_SPEEDUP = 1.15  # below this, bf16's rounding is not worth it
PROBE_SHAPE = (512, 576, 1536)  # tokens x hidden x intermediate: the MLP of SmolLM2-135M at one batch
PROBE_SECONDS = 0.25


@dataclass
class MatmulRates:
    """Measured matmul throughput in GFLOP/s at one shape."""

    fp32: float
    bf16: float

    @property
    def bf16_speedup(self) -> float:
        return self.bf16 / max(self.fp32, 1e-9)


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once (SMT siblings share its units)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
    return max(len(cores), 1)


def compute_threads(processes_per_machine: int = 1) -> int:
    """Threads for one process's compute (PyTorch, llama.cpp): one per physical core, shared among the processes
    on this machine. OMP_NUM_THREADS, when set, wins: it is how a person shares one machine among several jobs
    (more threads than cores spin-wait on each other)."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return max(physical_cores() // max(processes_per_machine, 1), 1)


def set_compute_threads(processes_per_machine: int = 1) -> int:
    """PyTorch's threads set to `compute_threads`; returns the count."""
    import torch

    threads = compute_threads(processes_per_machine)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def measure_matmul_rates(
    shape: tuple[int, int, int] = PROBE_SHAPE, seconds: float = PROBE_SECONDS, bf16: bool = True
) -> MatmulRates:
    """GFLOP/s of (m x k) @ (k x n) in fp32 and (unless `bf16` is False: where bf16 is emulated, one large
    product takes minutes) in bf16, each timed for about `seconds` after a warm-up; an unmeasured rate is 0."""
    import torch

    m, k, n = shape
    rates = {"bf16": 0.0}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[: 2 if bf16 else 1]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or count < 3:
            torch.mm(a, b)
            count += 1
        rates[name] = 2 * m * k * n * count / elapsed / 1e9
    return MatmulRates(**rates)


def cpu_matmul_rates() -> MatmulRates:
    """This machine's rates at the probe shape, measured on first use and cached per CPU, torch and threads."""
    return MatmulRates(**measured_once("cpu_precision.json", lambda: asdict(measure_matmul_rates())))


def measured_once(file_name: str, measure: Callable[[], dict]) -> dict:
    """`measure()` on first use on this machine, then its result from `<cache>/<file_name>`, kept per CPU model,
    torch version and thread count (what a measured speed depends on)."""
    import torch

    key = f"{_cpu_model()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = cache_dir() / file_name
    cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if key not in cached:
        cached[key] = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(path) as partial:  # other processes may read it meanwhile
            partial.write_text(json.dumps(cached, indent=2), encoding="utf-8")
    return cached[key]


def cpu_auto_precision() -> tuple[str, str]:
    """("bf16" | "fp32", why): bf16 autocast where it measured at least BF16_MIN_SPEEDUP faster."""
    rates = cpu_matmul_rates()
    measured = f"bf16 matmul {rates.bf16:.0f} vs fp32 {rates.fp32:.0f} GFLOP/s on this CPU"
    if rates.bf16_speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"CPU trains with bf16 autocast ({measured}); train.precision=fp32 to opt out"
    return "fp32", f"CPU trains in fp32 ({measured}); train.precision=bf16 to force bf16"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
