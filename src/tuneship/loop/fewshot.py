"""The loop's fast path: before `loop.min_examples` new examples exist, a few-shot candidate goes through the
same gate as a fine-tuned challenger.

A few-shot version is its parent's run unchanged (GGUF, adapter, ChatFormat: the same `run_dir` and `gguf`) plus
`shots`: the turns of the best corrections, put before every conversation it answers (after the system prompt,
as ordinary turns rendered by the run's ChatFormat, so the template contract holds): in llama.cpp by
`with_shots` (serving, gate, smoke test) and in Ollama as the Modelfile's `MESSAGE` lines (`/api/create`
`messages`). The shots are the same for every conversation, so what the gate measured is what serves.

Which corrections: accepted SFT examples made from corrections that no version trained on yet (thumbs-up answers
are left out: the model already answers those), newest first, one per prompt (the newest correction of a prompt
wins; older ones are recorded as superseded). Each is added while the shot turns, counted with the run's
tokenizer as the tokens they add to a rendered prompt, stay within

    budget = min(loop.fast_path_budget, context - answer room - prompt room)

context: `serve.n_ctx` (the smaller of it and `deploy.num_ctx` when Ollama serves and that is set); answer room:
max(serve.max_tokens, eval.max_new_tokens); prompt room: the longest conversation the run trained on (its audit).
A correction that does not fit is left out, and recorded with its token count (the `fewshot_selected` event).
The shots stay examples in the store: a later fine-tune cycle trains on them like on any new example, from the
few-shot version's run (its `run_dir`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from tuneship.data.conversation import Conversation, Message
from tuneship.loop.models import Example

SELECTED_EVENT = "fewshot_selected"
PROBE_QUESTION = [{"role": "user", "content": "?"}]


def with_shots(conversation: Conversation, shots: list[dict]) -> Conversation:
    """The conversation a few-shot version answers: its system prompt, the shot turns, then its own turns."""
    if not shots:
        return conversation
    turns = [Message(shot["role"], shot["content"]) for shot in shots]
    return Conversation(turns + conversation.messages, conversation.source, conversation.system)


def prompts_with_shots(prompts: list, shots: list[dict]) -> list:
    """Eval prompts (gate, smoke test) as a few-shot version sees them; expected answers unchanged."""
    return [replace(p, conversation=with_shots(p.conversation, shots)) for p in prompts]


@dataclass
class ShotChoice:
    """What the fast path chose, and what it left out and why (recorded with the candidate)."""

    shots: list[dict] = field(default_factory=list)
    example_ids: list[str] = field(default_factory=list)
    tokens: int = 0
    budget: int = 0
    context: int = 0
    considered: list[str] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (
            f"{len(self.example_ids)} of {len(self.considered)} corrections as shots, {self.tokens} of "
            f"{self.budget} tokens (context {self.context})"
        )
        return text + (f"; left out {len(self.left_out)}" if self.left_out else "")


def shot_tokens(chat_format, shots: list[dict]) -> int:
    """Tokens the shot turns add to a rendered prompt (a default system prompt the template adds counts once)."""
    if not shots:
        return 0

    def prompt_length(messages: list[dict]) -> int:
        return len(chat_format.encode(chat_format.render_text(messages, add_generation_prompt=True)))

    return prompt_length(shots + PROBE_QUESTION) - prompt_length(PROBE_QUESTION)


def shot_budget(cfg, champion_cfg, champion_run_dir: Path) -> tuple[int, int]:
    """(budget, context): tokens the shots may take, and the context they were counted against."""
    from tuneship.deploy.stage import longest_conversation
    from tuneship.run import Run

    context = cfg.serve.n_ctx
    ollama_ctx = cfg.deploy.parameters.get("num_ctx", cfg.deploy.num_ctx)
    if cfg.serve.backend == "ollama" and ollama_ctx:
        context = min(context, int(ollama_ctx))
    answer_room = max(cfg.serve.max_tokens, cfg.eval.max_new_tokens)
    prompt_room = longest_conversation(champion_cfg, Run.of(champion_cfg, champion_run_dir))
    return min(cfg.loop.fast_path_budget, context - answer_room - prompt_room), context


def corrected_at(store, example: Example) -> datetime | None:
    """When the correction an example was made from came in; None for an example made from no correction."""
    generation_id = (example.provenance or {}).get("generation")
    times = (
        [f.created_at for f in store.feedback_for(generation_id) if f.correction is not None] if generation_id else []
    )
    return max(times, default=None)


def shot_pool(store) -> tuple[list[Example], list[dict]]:
    """(corrections waiting for a cycle, newest first, one per prompt; the superseded ones, as left out)."""
    from tuneship.loop.trigger import waiting_examples
    from tuneship.loop.worker import prompt_key

    dated = [(corrected_at(store, e), e) for e in waiting_examples(store, "sft")]
    newest_first = sorted(((at, e.id, e) for at, e in dated if at is not None), reverse=True)
    pool, superseded, prompts = [], [], set()
    for _, _, example in newest_first:
        prompt = prompt_key(example.conversation)
        if prompt in prompts:
            superseded.append({"example": example.id, "reason": "a newer correction of the same prompt is used"})
            continue
        prompts.add(prompt)
        pool.append(example)
    return pool, superseded


def shot_turns(examples: list[Example]) -> list[dict]:
    """The examples' turns, oldest first (the newest correction sits nearest the question); no system prompt:
    the conversation being answered keeps its own."""
    return [
        {"role": m["role"], "content": m["content"]} for e in reversed(examples) for m in e.conversation["messages"]
    ]


def choose_shots(pool: list[Example], chat_format, budget: int) -> tuple[list[Example], list[dict]]:
    """Newest first, each while the shot block fits `budget`; the others left out with their token counts."""
    chosen: list[Example] = []
    left_out: list[dict] = []
    for example in pool:
        tokens = shot_tokens(chat_format, shot_turns([*chosen, example]))
        if tokens <= budget:
            chosen.append(example)
            continue
        own = shot_tokens(chat_format, shot_turns([example]))
        left_out.append(
            {
                "example": example.id,
                "tokens": own,
                "reason": f"{own} tokens; with the {len(chosen)} chosen the shots would take {tokens} > "
                f"budget {budget}",
            }
        )
    return chosen, left_out


def select_shots(loop, champion, chat_format) -> ShotChoice:
    pool, superseded = shot_pool(loop.store)
    budget, context = shot_budget(loop.cfg, loop.version_config(champion), Path(champion.run_dir))
    chosen, left_out = choose_shots(pool, chat_format, budget)
    shots = shot_turns(chosen)
    return ShotChoice(
        shots=shots,
        example_ids=[e.id for e in chosen],
        tokens=shot_tokens(chat_format, shots),
        budget=budget,
        context=context,
        considered=sorted([e.id for e in pool] + [s["example"] for s in superseded]),
        left_out=left_out + superseded,
    )


# when -----------------------------------------------------------------------------------------


def fast_path_due(store, loop_cfg) -> str | None:
    """Why a few-shot candidate is due (new corrections no few-shot attempt has considered yet), else None."""
    if not loop_cfg.fast_path:
        return None
    pool, superseded = shot_pool(store)
    waiting = {e.id for e in pool} | {s["example"] for s in superseded}
    last = store.events(limit=1, kind=SELECTED_EVENT)
    new = waiting - set(last[0].data.get("considered", [])) if last else waiting
    if not new:
        return None
    return f"{len(new)} new corrections for a few-shot candidate (loop.fast_path)"


# the cycle ------------------------------------------------------------------------------------


def fewshot_cycle(loop, console, heartbeat, actor: str, reason: str, live_url: str | None):
    """Harvest, choose shots, register the candidate (the champion's run + shots), gate it, then promote or
    reject it as any challenger (worker.conclude)."""
    from tuneship.chat.format import ChatFormat
    from tuneship.loop.gate import run_gate
    from tuneship.loop.signals import harvest
    from tuneship.loop.worker import NothingToTrain, gate_sets, conclude

    store = loop.store
    champion = store.champion()
    heartbeat.stage("harvest")
    chat_format = ChatFormat.load(Path(champion.run_dir) / "adapter")
    harvest(store, loop.cfg, chat_format.measure)
    choice = select_shots(loop, champion, chat_format)
    store.add_event(SELECTED_EVENT, actor, choice.summary(), choice.to_json())
    if not choice.shots:
        raise NothingToTrain(
            f"no correction to use as a few-shot example: {choice.summary()}"
            + ("; raise loop.fast_path_budget or serve.n_ctx" if choice.left_out else "; post corrections first")
        )
    version = _register_candidate(loop, champion, choice)
    store.add_event(
        "cycle_started",
        actor,
        reason,
        {
            "kind": "fewshot",
            "shots": len(choice.example_ids),
            "tokens": choice.tokens,
            "modelfile": _modelfile(loop, version),
        },
        version.id,
    )
    heartbeat.stage("gate", version.id)
    decision = run_gate(champion, version, gate_sets(loop, version), loop.cfg)
    return conclude(loop, heartbeat, version, decision, actor, live_url)


def _register_candidate(loop, champion, choice: ShotChoice):
    from tuneship.loop.worker import replay_sample

    version_id = loop.store.next_version_id()
    metrics = {
        "new_examples": choice.example_ids,
        "replay_examples": replay_sample(loop, set(choice.example_ids), version_id),
        "fewshot": {k: v for k, v in choice.to_json().items() if k not in ("shots", "considered")},
    }
    return loop.store.add_version(
        id=version_id,
        name=loop.version_name(version_id),
        parent_id=champion.id,
        run_dir=champion.run_dir,
        gguf=champion.gguf,
        status="candidate",
        kind="fewshot",
        shots=choice.shots,
        example_ids=choice.example_ids,
        metrics=metrics,
    )


# shipping -------------------------------------------------------------------------------------


def publish_config(loop, version):
    """The config a version is published to Ollama with: its run's, at this loop's Ollama; for a few-shot version
    its shots as MESSAGE lines and num_ctx the context they were budgeted against."""
    cfg = loop.version_config(version)
    cfg.deploy.host = loop.cfg.deploy.host  # where this loop's Ollama is, whatever the run used
    if version.kind == "fewshot":
        cfg.deploy.messages = [*cfg.deploy.messages, *version.shots]
        cfg.deploy.num_ctx = version.metrics["fewshot"]["context"]
    return cfg


def _modelfile(loop, version) -> str:
    """<run.dir>/<name>-loop/v<N>/Modelfile (`ollama create name:v<N> -f` it by hand), or why there is none."""
    from tuneship.deploy.modelfile import ModelfileError, render_modelfile
    from tuneship.deploy.stage import build_spec
    from tuneship.models import trained_chat_format
    from tuneship.run import Run

    cfg = publish_config(loop, version)
    run = Run.of(cfg, Path(version.run_dir))
    spec, _ = build_spec(cfg, run, trained_chat_format(run))
    folder = Path(loop.cfg.run.dir).resolve() / f"{loop.name}-loop" / f"v{version.id}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        text = render_modelfile(spec, folder)
    except ModelfileError as exc:
        return f"no Modelfile ({exc}); publishing through the REST API carries the shots"
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return str(folder / "Modelfile")
