"""`tuneship loop ...` and `tuneship feedback import`: thin commands over the loop's modules."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from tuneship.train.distributed import Processes

loop_app = typer.Typer(no_args_is_help=True, help="The learning loop: status, cycles, versions, rollback.")
feedback_app = typer.Typer(no_args_is_help=True, help="Feedback collected outside `tuneship serve`.")
golden_app = typer.Typer(no_args_is_help=True, help="The golden set the gate checks: list, add, update, retire.")
loop_app.add_typer(golden_app, name="golden")
console = Console()

TargetArgument = typer.Argument(..., help="the base run directory (or its config file)")
SetOption = typer.Option(None, "--set", help="override a config key (repeatable)")
NprocOption = typer.Option(
    1, "--nproc", min=1, help="a fine-tune cycle's training processes on this machine (DDP via torchrun: one per GPU)"
)
AccelerateOption = typer.Option(
    None,
    "--accelerate-config",
    exists=True,
    dir_okay=False,
    help="start a fine-tune cycle's training with `accelerate launch --config_file FILE` (FSDP, DeepSpeed, GPUs)",
)


def _open(target: str, overrides: Optional[list[str]]):
    from tuneship.loop.registry import open_loop

    return open_loop(target, overrides)


@loop_app.command("status")
def status(target: str = TargetArgument, overrides: Optional[list[str]] = SetOption) -> None:
    """Champion, examples waiting / threshold, the running cycle and its stage, the last cycle, disk use."""
    from tuneship.loop.status import format_bytes, status_report

    info = status_report(_open(target, overrides))
    champion = info["champion"]
    console.print(
        f"champion: v{champion['id']} {champion['name']}  ({champion['gguf']})" if champion else "champion: none"
    )
    console.print(
        f"examples waiting: {info['examples_waiting']} / {info['threshold']}  "
        f"(pending review: {info['examples_pending_review']})"
    )
    running = info["cycle_running"]
    console.print(
        f"cycle running: {running['stage']} v{running['version']} ({running['holder']})"
        if running
        else "cycle running: no"
    )
    last = info["last_cycle"]
    console.print(
        f"last cycle: {last['kind']} v{last['version']} at {last['at']}: {escape(last['reason'])}"
        if last
        else "last cycle: none"
    )
    console.print(f"trigger: {'due' if info['trigger']['is_due'] else 'not due'} ({escape(info['trigger']['reason'])})")
    console.print(f"disk: {format_bytes(sum(info['disk'].values()))} in {len(info['disk'])} versions' files")
    console.print(
        f"cycles: {info['cycles']}" + (f"; artifacts: {info['artifacts_url']}" if info["artifacts_url"] else "")
    )
    for replica in info["replicas"]:
        served = f"v{replica['version']}" if replica["version"] else "nothing"
        problem = f"; [yellow]{escape(replica['problem'])}[/]" if replica["problem"] else ""
        console.print(
            f"replica {replica['host']} {replica['url'] or ''}: serves {served}, reported {replica['seconds_ago']:g} s "
            f"ago{problem}",
            highlight=False,
            soft_wrap=True,
        )
    for warning in info.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


@loop_app.command("cycle")
def cycle(
    target: str = TargetArgument,
    overrides: Optional[list[str]] = SetOption,
    actor: str = typer.Option("cli", "--actor", help="who started it (recorded in the events)"),
    reason: str = typer.Option("by hand", "--reason", help="why (recorded in the events)"),
    live_url: Optional[str] = typer.Option(None, "--live-url", help="smoke-test the promotion on this running server"),
    kind: str = typer.Option(
        "finetune", "--kind", help="finetune: train a challenger; fewshot: the newest corrections as example turns"
    ),
    nproc: int = NprocOption,
    accelerate_config: Optional[Path] = AccelerateOption,
) -> None:
    """Run one cycle now, in this process: examples, challenger run, gate, promotion (exit 4 when rejected)."""
    if kind not in ("finetune", "fewshot"):
        raise typer.BadParameter(f"{kind!r}: use finetune or fewshot", param_hint="--kind")
    _cycle_here(target, overrides, actor, reason, live_url, kind, Processes(nproc, accelerate_config))


@loop_app.command("worker")
def worker(
    target: str = TargetArgument,
    overrides: Optional[list[str]] = SetOption,
    every: Optional[float] = typer.Option(
        None, "--every", min=0.1, help="seconds between looks for a due cycle (default serve.trigger_every, or 30)"
    ),
    live_url: Optional[str] = typer.Option(None, "--live-url", help="smoke-test each promotion on this server"),
    cycles: Optional[int] = typer.Option(None, "--cycles", min=1, help="stop after this many cycles"),
    nproc: int = NprocOption,
    accelerate_config: Optional[Path] = AccelerateOption,
) -> None:
    """Run the loop's cycles here as they fall due, for servers with serve.cycles=external (any machine that
    reaches the store: a GPU box). Several workers may run: the lease lets one cycle run at a time."""
    from tuneship.loop.worker import run_worker

    loop = _open(target, overrides)
    seconds = every or loop.cfg.serve.trigger_every or 30.0
    try:
        run_worker(loop, console, seconds, live_url, cycles, train_processes=Processes(nproc, accelerate_config))
    except KeyboardInterrupt:
        console.print("worker stopped")


@loop_app.command("standby", hidden=True)
def standby(
    target: str = TargetArgument,
    overrides: Optional[list[str]] = SetOption,
    live_url: Optional[str] = typer.Option(None, "--live-url", help="smoke-test the promotion on this running server"),
) -> None:
    """The next cycle's process, started ahead by `tuneship serve` (serve.standby_cycle): it imports what a
    cycle needs, makes the champion's answers the next gate asks whatever the new examples (`warm_gate_answers`)
    and the base a challenger trains on in adapter format (`served_base`), then waits for one line on stdin,
    {"actor", "reason", "kind"} as JSON, and runs that cycle as `loop cycle` does. It ends without a cycle when
    stdin closes (the server stopped)."""
    import json
    import sys

    from tuneship.loop.adapter_form import is_adapter_format, served_base
    from tuneship.loop.cycle import preload, warm_gate_answers

    preload()
    loop = _open(target, overrides)
    try:
        warmed = warm_gate_answers(loop)
        console.print(f"the champion's answers to {warmed} prompts the next gate asks are ready")
    except Exception as exc:  # noqa: BLE001 (the cycle still runs: its gate asks the champion then)
        console.print(f"the champion's gate answers were not made ahead: {escape(str(exc))}")
    try:
        if is_adapter_format(loop.cfg):
            console.print(f"challengers train on {served_base(loop.cfg)}")
    except Exception as exc:  # noqa: BLE001 (the cycle tries again, and says why it trains on the base as it is)
        console.print(f"the base as it serves was not made ahead: {escape(str(exc))}")
    line = sys.stdin.readline()
    if line.strip():
        order = json.loads(line)
        _cycle_here(target, overrides, order["actor"], order["reason"], live_url, order["kind"])


def _cycle_here(
    target: str, overrides, actor: str, reason: str, live_url: Optional[str], kind: str, processes=Processes()
) -> None:
    from tuneship.loop.cycle import run_cycle

    result = run_cycle(_open(target, overrides), console, actor, reason, live_url, kind, processes)
    console.print(f"v{result.version_id}: {result.status}")
    for line in result.reasons:
        console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    if result.status != "promoted":
        raise typer.Exit(4)


@loop_app.command("versions")
def versions(target: str = TargetArgument, overrides: Optional[list[str]] = SetOption) -> None:
    """The registry: every version, its parent, status, gate numbers, what it serves from and its disk use."""
    from tuneship.loop.prune import disk_use
    from tuneship.loop.status import format_bytes

    loop = _open(target, overrides)
    disk = disk_use(loop)
    table = Table(
        *(Column(h, no_wrap=True) for h in ("version", "name", "status")),
        *("kind", "parent", "golden F1", "new F1"),
        *(Column(h, no_wrap=True) for h in ("format", "disk")),
    )
    for v in loop.store.versions():
        gate = v.metrics.get("gate", {}).get("challenger", {})
        table.add_row(
            f"v{v.id}",
            v.name,
            v.status,
            f"few-shot ({v.shot_count} shots)" if v.kind == "fewshot" else "fine-tune",
            f"v{v.parent_id}" if v.parent_id else "",
            _metric(gate.get("golden"), "f1"),
            _metric(gate.get("new"), "f1"),
            "adapter" if v.adapter else "merged" if v.gguf else "-",
            format_bytes(disk.get(v.id, 0)),
        )
    console.print(table)
    console.print(
        "format: adapter = a LoRA GGUF on the base model's quantized GGUF, merged = a GGUF of its own; disk: each "
        "version's own files (run and cycle folders), not the base GGUF the adapter versions share"
    )


def _metric(summary: dict | None, key: str) -> str:
    return f"{summary[key]:.3f}" if summary and key in summary else ""


@loop_app.command("publish")
def publish(
    target: str = TargetArgument,
    version: Optional[int] = typer.Option(None, "--version", help="the version (default: the champion)"),
    merged: bool = typer.Option(False, "--merged", help="merge the adapter and export GGUFs, as `tuneship export`"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """A version as a Modelfile (FROM the base GGUF, ADAPTER its LoRA GGUF in adapter format), or merged into
    GGUFs of its own (--merged); either checked in llama.cpp against the version as it serves."""
    from tuneship.loop.publish import publish_version

    published = publish_version(_open(target, overrides), version, merged, console)
    console.print(f"published {escape(published.detail)}")
    console.print(f"ollama create <name> -f {published.modelfile}")


@loop_app.command("history")
def history(
    target: str = TargetArgument,
    overrides: Optional[list[str]] = SetOption,
    limit: int = typer.Option(50, "--limit", help="how many events"),
) -> None:
    """Events, newest first: cycles, gate decisions, promotions and rollbacks, with who and why."""
    table = Table("at (UTC)", "event", "version", "who", "why")
    for event in _open(target, overrides).store.events(limit=limit):
        table.add_row(
            event.at.strftime("%Y-%m-%d %H:%M:%S"),
            event.kind,
            f"v{event.version_id}" if event.version_id else "",
            event.actor,
            escape(event.reason),
        )
    console.print(table)


@loop_app.command("rollback")
def rollback(
    target: str = TargetArgument,
    overrides: Optional[list[str]] = SetOption,
    reason: str = typer.Option("by hand", "--reason", help="why (recorded in the events)"),
) -> None:
    """Restore the previous champion."""
    from tuneship.loop.promotion import restore_previous

    restored = restore_previous(_open(target, overrides), "cli", reason)
    console.print(f"champion is now v{restored.id} ({restored.name})")


@loop_app.command("approve")
def approve(
    target: str = TargetArgument,
    overrides: Optional[list[str]] = SetOption,
    ids: Optional[list[str]] = typer.Option(None, "--id", help="example ids to approve (default: all pending)"),
) -> None:
    """Release examples waiting for review (conflicts, blamed ones, loop.review: required) into the next cycle."""
    from tuneship.loop.approval import review_examples

    loop = _open(target, overrides)
    pending = [e.id for e in loop.store.examples(status="pending_review")]
    chosen = [i for i in pending if not ids or i in ids]
    count = review_examples(loop, chosen, "approve", "cli")
    console.print(f"approved {count} of {len(pending)} pending examples")


@loop_app.command("prune")
def prune(target: str = TargetArgument, overrides: Optional[list[str]] = SetOption) -> None:
    """Delete old versions' heavy files (beyond loop.keep_versions) and old generations (loop.keep_generations_days)."""
    from tuneship.loop.prune import prune_loop
    from tuneship.loop.status import format_bytes

    loop = _open(target, overrides)
    result = prune_loop(loop, "cli")
    settings = loop.cfg.loop
    versions = ", ".join(f"v{i} {format_bytes(n)}" for i, n in sorted(result.freed.items()))
    freed = f"freed {format_bytes(result.bytes)}: {versions}" if versions else "freed 0 B: no version to prune"
    console.print(f"{freed} (loop.keep_versions={settings.keep_versions})", highlight=False, soft_wrap=True)
    days = settings.keep_generations_days
    kept = "kept every generation (loop.keep_generations_days is null)"
    console.print(f"deleted {result.generations} generations older than {days} days" if days else kept)
    for line in result.problems:
        console.print(f"  [yellow]not deleted:[/] {escape(line)}", highlight=False, soft_wrap=True)


@feedback_app.command("import")
def feedback_import(
    file: Path = typer.Argument(..., help="JSONL or CSV: generation_id, rating, correction, comment"),
    target: str = typer.Option(..., "--run", help="the base run directory (or its config file)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Import feedback records; the same file imported twice counts once; invalid records exit 1."""
    from tuneship.loop.feedback_import import import_feedback

    result = import_feedback(_open(target, overrides).store, file)
    console.print(f"imported {result.imported}, already there {result.already}, invalid {len(result.invalid)}")
    for line in result.invalid:
        console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    if result.invalid:
        raise typer.Exit(1)


@golden_app.command("list")
def golden_list(target: str = TargetArgument, overrides: Optional[list[str]] = SetOption) -> None:
    """The golden facts the next gate checks: id, question, answer, where each came from."""
    from tuneship.loop.golden import golden_rows

    rows = golden_rows(_open(target, overrides).store)
    table = Table(title=f"golden set: {len(rows)} facts")
    width = max((len(r.id) for r in rows), default=2)
    table.add_column("id", no_wrap=True, min_width=width)  # whole: update and retire take it
    for header in ("question", "answer", "source"):
        table.add_column(header)
    for row in rows:
        table.add_row(row.id, escape(row.question), escape(row.answer), escape(row.source))
    console.print(table)


@golden_app.command("add")
def golden_add(
    target: str = TargetArgument,
    question: str = typer.Option(..., "--question", help="the question (the user turn)"),
    answer: str = typer.Option(..., "--answer", help="the answer the gate expects"),
    system: Optional[str] = typer.Option(None, "--system", help="a system prompt for this fact"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Add a golden fact (audited; refused when a golden fact already asks the same)."""
    from tuneship.loop.golden import add_golden

    example = add_golden(_open(target, overrides), question, answer, system, "cli")
    console.print(f"added golden fact {example.id}", highlight=False)


@golden_app.command("update")
def golden_update(
    target: str = TargetArgument,
    golden_id: str = typer.Argument(..., metavar="ID", help="the golden fact's id (see `tuneship loop golden list`)"),
    answer: str = typer.Option(..., "--answer", help="the new answer"),
    reason: Optional[str] = typer.Option(None, "--reason", help="why (kept on the old row and in the events)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Change a golden fact's answer: a new row; the old one is kept as superseded, with the reason."""
    from tuneship.loop.golden import update_golden

    example = update_golden(_open(target, overrides), golden_id, answer, "cli", reason)
    console.print(f"golden fact {golden_id} superseded by {example.id}", highlight=False)


@golden_app.command("retire")
def golden_retire(
    target: str = TargetArgument,
    golden_id: str = typer.Argument(..., metavar="ID", help="the golden fact's id (see `tuneship loop golden list`)"),
    reason: Optional[str] = typer.Option(None, "--reason", help="why (kept on the row and in the events)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Take a golden fact out of the gate (its row is kept as superseded, with the reason)."""
    from tuneship.loop.golden import retire_golden

    retire_golden(_open(target, overrides), golden_id, "cli", reason)
    console.print(f"retired golden fact {golden_id}", highlight=False)
