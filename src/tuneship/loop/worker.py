"""`tuneship loop worker`: runs the loop's cycles on whatever machine it is started on (a GPU box), for servers
set to `serve.cycles: external`, which never start one.

Every `--every` seconds it harvests new feedback and asks the trigger whether a cycle is due, as a server's
trigger thread does; a cycle asked for through a server (POST /v1/loop/cycle: a `cycle_requested` event) is due
too, and so is a version another worker left in "training" (killed mid-cycle: its lease expired), which is resumed
from its checkpoints. The cycle runs in this process under the store's lease, so of several workers one runs it
and the others wait (with `--nproc N` its training runs in N DDP processes through torchrun, as `tuneship train
--nproc N`: the GPUs of one box; with `--accelerate-config FILE` through `accelerate launch`: FSDP, DeepSpeed).
With `loop.artifacts_url`, the champion's files are published at start and every promoted version's before its
promotion (loop/artifacts.py), so replicas on other machines can serve them.

A resumed version continues from the checkpoints in its run folder: workers that may take over each other's
cycles share the runs folder (one disk, or a network file system mounted at the same path).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from tuneship.errors import TuneshipError
from tuneship.loop.lease import CYCLE_LEASE, CycleBusy, new_holder
from tuneship.loop.registry import Loop, version_chat_format
from tuneship.loop.store import Store
from tuneship.loop.tables import Event, VersionKind
from tuneship.train.distributed import Processes

log = logging.getLogger("tuneship.loop")

REQUESTED = "cycle_requested"
TAKEN = "cycle_request_taken"


@dataclass
class Due:
    kind: VersionKind
    reason: str
    request: Event | None = None


def request_cycle(store: Store, actor: str, reason: str, kind: VersionKind) -> Event:
    """Ask the workers for a cycle (serve.cycles=external): the next one to look runs it."""
    return store.add_event(REQUESTED, actor, reason, {"kind": kind})


def pending_request(store: Store) -> Event | None:
    """The latest cycle asked for that no worker has taken yet."""
    requested = store.events(limit=1, kind=REQUESTED)
    if not requested:
        return None
    taken = store.events(limit=1, kind=TAKEN)
    if taken and taken[0].data.get("request", 0) >= requested[0].id:
        return None
    return requested[0]


def due_cycle(loop: Loop) -> Due | None:
    """What this worker should run now, if anything: a version left in training, a requested cycle, or what the
    trigger says is due (after harvesting new feedback)."""
    from tuneship.loop.signals import harvest
    from tuneship.loop.trigger import trigger_decision

    store = loop.store
    if store.lease(CYCLE_LEASE) is not None:
        return None
    interrupted = [v for v in store.versions() if v.status == "training"]
    if interrupted:
        return Due("finetune", f"resume v{interrupted[-1].id}, left in training by a cycle that stopped")
    request = pending_request(store)
    if request is not None:
        return Due(request.data.get("kind", "finetune"), request.reason, request)
    harvest(store, loop.cfg, version_chat_format(store.champion()).measure)
    decision = trigger_decision(store, loop.cfg.loop)
    return Due(decision.kind, decision.reason) if decision.is_due else None


def publish_champion(loop: Loop) -> None:
    """With loop.artifacts_url: the champion (in the loop's version format) published, so replicas can serve it."""
    from tuneship.loop.adapter_form import in_adapter_form
    from tuneship.loop.artifacts import publish_artifacts

    if loop.cfg.loop.artifacts_url:
        publish_artifacts(loop, in_adapter_form(loop, loop.store.champion()))


def run_worker(
    loop: Loop,
    console: Console,
    every: float,
    live_url: str | None = None,
    cycles: int | None = None,
    stopped: threading.Event | None = None,
    train_processes: Processes = Processes(),
) -> int:
    """Look for due cycles every `every` seconds and run them here (a fine-tune's training in `train_processes`),
    until `stopped` is set or `cycles` cycles ran; returns how many ran."""
    from tuneship.loop.cycle import NothingToTrain, preload, run_cycle

    stopped = stopped or threading.Event()
    me = new_holder()
    publish_champion(loop)
    preload()
    console.print(f"worker {me}: watching {loop.name} (store {loop.store.url}) every {every:g} s")
    ran = 0
    while not stopped.is_set() and (cycles is None or ran < cycles):
        due = due_cycle(loop)
        if due is None:
            stopped.wait(every)
            continue
        if due.request is not None:
            loop.store.add_event(TAKEN, f"worker {me}", due.request.reason, {"request": due.request.id})
        console.print(f"cycle ({due.kind}): {escape(due.reason)}")
        try:
            result = run_cycle(loop, console, f"worker {me}", due.reason, live_url, due.kind, train_processes)
        except (NothingToTrain, CycleBusy) as exc:
            console.print(f"  no cycle: {escape(str(exc))}")
            stopped.wait(every)
            continue
        except TuneshipError as exc:  # recorded by the cycle (backoff); the worker goes on watching
            console.print(f"  [red]cycle failed:[/] {escape(str(exc))}")
            continue
        ran += 1
        console.print(f"  v{result.version_id}: {result.status}")
    return ran
