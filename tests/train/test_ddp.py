"""`tuneship train --nproc 2`: DDP on CPU (gloo) with the tiny model, real processes through torchrun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, start_until_checkpoint, tiny_config_file

# fp32 and no LoRA dropout, so the only difference between 1 and 2 processes is the order of float sums
SETTINGS = ["--set", "train.precision=fp32", "--set", "lora.dropout=0.0", "--set", "data.eval_ratio=0.0"]
LOSS_TOLERANCE = 1e-4  # relative, per logged step


def train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuneship.cli", "train", str(config), *SETTINGS, *extra]


def logged_losses(run_dir: Path) -> list[float]:
    metrics = json.loads((run_dir / "reports" / "experiment.json").read_text())["metrics"]
    return [entry["loss"] for entry in metrics if "loss" in entry]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_two_processes_follow_the_one_process_loss_curve_and_only_rank_0_reports(tmp_path, tiny_model_dir):
    one = tiny_config_file(tmp_path / "one", tiny_model_dir, max_steps=6, batch_size=4, save_steps=3)
    two = tiny_config_file(tmp_path / "two", tiny_model_dir, max_steps=6, batch_size=2, save_steps=3)
    run(train_command(one))
    result = run(train_command(two, "--nproc", "2"))
    single, double = (
        logged_losses(tmp_path / "one" / "runs" / "tiny"),
        logged_losses(tmp_path / "two" / "runs" / "tiny"),
    )
    assert len(single) == len(double) == 6
    assert double == pytest.approx(single, rel=LOSS_TOLERANCE)
    run_dir = tmp_path / "two" / "runs" / "tiny"
    experiment = json.loads((run_dir / "reports" / "experiment.json").read_text())
    assert experiment["processes"] == 2 and experiment["status"] == "done"
    # the global batch of 2 x 2 packed examples: both processes' tokens are counted
    assert (
        experiment["tokens"]
        == json.loads((tmp_path / "one" / "runs" / "tiny" / "reports" / "experiment.json").read_text())["tokens"]
    )
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "manifest.json").read_text())["train"]["status"] == "done"
    assert result.stdout.count("tokens/s (non-pad, supervised)") == 1  # one summary, from rank 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def rank_process(pid: int, rank: int) -> int | None:
    for child in descendants(pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return child
    return None


def test_kill_9_of_one_rank_stops_all_and_the_rerun_resumes(tmp_path, tiny_model_dir):
    config = tiny_config_file(tmp_path, tiny_model_dir, max_steps=200, batch_size=2, save_steps=5)
    command = train_command(config, "--nproc", "2")
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    launcher = start_until_checkpoint(command, checkpoints)
    victim = rank_process(launcher.pid, 1)
    assert victim is not None
    workers = [p for p in descendants(launcher.pid) if p != victim]
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # the launcher reports the failure ...
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and b"Z" not in _state(p)]  # ... and no rank lives on
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert killed_at < 200
    rerun = run(command)
    assert "resuming from" in rerun.stdout and f"checkpoint-{killed_at}" in rerun.stdout.replace("\n", "")
    assert json.loads((checkpoints / "checkpoint-200" / "trainer_state.json").read_text())["global_step"] == 200


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"


def launch_args(name: str):
    """`accelerate launch --config_file examples/accelerate/<name>.yaml -m tuneship.cli train ...`, validated
    the way accelerate validates it before starting any process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    config = REPO / "examples" / "accelerate" / f"{name}.yaml"
    args = parser.parse_args(["--config_file", str(config), "-m", "tuneship.cli", "train", "run.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config) if defaults else []
    return args


def test_an_accelerate_config_and_nproc_become_accelerate_launch_arguments():
    """`--accelerate-config FILE [--nproc N]` (tuneship train, loop worker, loop cycle) runs `accelerate launch`
    with the file, N overriding its num_processes; `--nproc N` alone runs torchrun."""
    from accelerate.commands.launch import launch_command_parser

    from tuneship.train.distributed import Processes

    config = REPO / "examples" / "accelerate" / "fsdp.yaml"
    command = Processes(4, config).command(["train", "run.yaml"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(command[3:])
    assert args.config_file == str(config) and args.num_processes == 4 and args.module
    assert [args.training_script, *args.training_script_args] == ["tuneship.cli", "train", "run.yaml"]
    assert launch_command_parser().parse_args(Processes(1, config).command(["train"])[3:]).num_processes is None
    torchrun = Processes(2).command(["train", "run.yaml"])
    assert torchrun[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert not Processes(1).several and Processes(1, config).several and Processes(2).several


def test_an_accelerate_config_that_is_not_a_mapping_of_settings_stops_before_any_launch(tmp_path):
    from tuneship.errors import ConfigError
    from tuneship.train.distributed import Processes

    broken = tmp_path / "broken.yaml"
    broken.write_text("num_processes: 2\nx: [\n")
    with pytest.raises(ConfigError, match=f"{broken}:3: not a readable YAML"):
        Processes(2, broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 2\n")
    with pytest.raises(ConfigError, match="a mapping of settings"):
        Processes(1, listed)


def test_ddp_accelerate_config_runs_one_process_per_gpu():
    args = launch_args("ddp")
    assert args.num_processes == 2 and args.multi_gpu and not args.use_fsdp and not args.use_deepspeed


def test_fsdp_accelerate_config_builds_the_fsdp_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_args("fsdp")
    assert args.use_fsdp
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.auto_wrap_policy is not None


def test_deepspeed_zero3_accelerate_config_builds_the_deepspeed_plugin(monkeypatch):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_args("deepspeed_zero3")
    assert args.use_deepspeed
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "DEEPSPEED_")):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag and plugin.zero3_save_16bit_model
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 3


def test_only_rank_0_checks_the_checkpoints_inputs(tmp_path):
    """The other ranks hash <run>/data/train.jsonl while rank 0 may still be writing it: their hash is not
    checked (rank 0's mismatch stops every process), so a stale read cannot stop a good run."""
    from tuneship.train.trainer import ResumeMismatch, _prepare_checkpoints

    checkpoint = tmp_path / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    for marker in ("trainer_state.json", "adapter_model.safetensors"):
        (checkpoint / marker).write_text("{}")
    (tmp_path / "checkpoints" / "inputs.json").write_text(json.dumps({"inputs": "rank-0-inputs"}))

    assert _prepare_checkpoints(tmp_path / "checkpoints", "partial-read", False, is_writer=False) == checkpoint
    with pytest.raises(ResumeMismatch, match="--fresh"):
        _prepare_checkpoints(tmp_path / "checkpoints", "other-inputs", False, is_writer=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_training_processes_stop_when_their_launcher_is_killed(tmp_path):
    """launch() starts torchrun so that it gets SIGTERM when the process that launched it dies, even of kill -9
    (a killed loop worker must leave no training behind to race the worker that resumes its version)."""
    import time

    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import subprocess, sys\n"
        "from tuneship.train.distributed import _terminated_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " preexec_fn=_terminated_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, str(launcher)], stdout=subprocess.PIPE, text=True, env=os.environ)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child_pid}").exists() and b"Z" not in _state(child_pid):
        assert time.monotonic() < deadline, "the child outlived its killed parent"
        time.sleep(0.1)
