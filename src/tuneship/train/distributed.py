"""Several training processes (DDP under Accelerate): which one writes, global counts, and the launcher.

`tuneship train CONFIG --nproc N` starts N copies of itself through torchrun (`torch.distributed.run`), the
same as `torchrun --nproc-per-node N -m tuneship.cli train CONFIG` or `accelerate launch --num_processes N
-m tuneship.cli train CONFIG`. Every process prepares the same data in memory; only rank 0 writes the run
directory (config, data, chat format, manifest, checkpoints, reports, adapter), except the HF Trainer's
per-rank RNG state inside each checkpoint. torchrun stops all processes when one dies. With an accelerate config
file (`--accelerate-config`: FSDP, DeepSpeed, the GPUs of a box) the processes are started by `accelerate launch
--config_file FILE -m tuneship.cli train CONFIG` instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def global_sum(value: int) -> int:
    """The sum of `value` over all processes (a collective: every process must call it)."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_available() or not dist.is_initialized():
        return value
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


@dataclass(frozen=True)
class Processes:
    """How a training is started: `count` processes on this machine through torchrun, or through `accelerate
    launch` with `accelerate_config` (its `num_processes`, unless `count` is more than 1)."""

    count: int = 1
    accelerate_config: Path | None = None

    def __post_init__(self) -> None:
        if self.accelerate_config is not None:
            _check_accelerate_config(Path(self.accelerate_config))

    @property
    def several(self) -> bool:
        """True when a launcher starts the training (else this process trains)."""
        return self.count > 1 or self.accelerate_config is not None

    def command(self, cli_args: list[str]) -> list[str]:
        """The launcher's command line that runs `tuneship <cli_args>` in every process."""
        if self.accelerate_config is None:
            launcher = ["torch.distributed.run", "--standalone", f"--nproc-per-node={self.count}"]
        else:
            count = ["--num_processes", str(self.count)] if self.count > 1 else []
            launcher = ["accelerate.commands.launch", "--config_file", str(self.accelerate_config), *count]
        return [sys.executable, "-m", *launcher, "-m", "tuneship.cli", *cli_args]

    def describe(self) -> str:
        if self.accelerate_config is None:
            return f"--nproc {self.count}"
        return f"--accelerate-config {self.accelerate_config}" + (f" --nproc {self.count}" if self.count > 1 else "")


def _check_accelerate_config(path: Path) -> None:
    """An accelerate config file is a YAML (or JSON) mapping: anything else stops here, saying where, instead of
    as a traceback from inside `accelerate launch`."""
    import yaml

    from tuneship.errors import ConfigError

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        raise ConfigError(f"--accelerate-config {path}{line}: not a readable YAML or JSON file ({exc})") from None
    if not isinstance(settings, dict):
        raise ConfigError(
            f"--accelerate-config {path}: an accelerate config is a mapping of settings (see `accelerate config`, "
            "or examples/accelerate/)"
        )


def launch(cli_args: list[str], processes: Processes) -> int:
    """Run `tuneship <cli_args>` in the processes of `processes`; returns the launcher's exit code. On Linux the
    launcher is told to stop (SIGTERM: it stops its processes) if this process dies, even of kill -9: a killed
    loop worker leaves no training behind to race the worker that resumes its version."""
    return subprocess.run(processes.command(cli_args), check=False, preexec_fn=_terminated_with_parent).returncode


def _terminated_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing).
    Linux counts the thread that started the child as its parent: `launch` runs in the caller's main thread."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def train_run_in_processes(cfg, processes: Processes) -> None:
    """The train stage of `cfg`'s run in `processes` (`tuneship train CONFIG --nproc N`, or with
    `--accelerate-config FILE`; resumes from the run's checkpoints): a pipeline run after it finds the stage done
    with the same inputs."""
    from tuneship.errors import TrainingStopped
    from tuneship.run import Run

    config = Run.create(cfg).path / "config.yaml"
    code = launch(["train", str(config)], processes)
    if code != 0:
        raise TrainingStopped(f"training (tuneship train {config} {processes.describe()}) exited {code}")
