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

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from tuneship.chat.format import ChatFormat
from tuneship.config import Config, LoopSection
from tuneship.deploy.stage import longest_conversation
from tuneship.loop.examples import prompt_key, waiting_examples
from tuneship.loop.registry import Loop
from tuneship.loop.shots import shot_tokens, shot_turns
from tuneship.loop.store import Store
from tuneship.loop.tables import Example, Version
from tuneship.run import Run

SELECTED_EVENT = "fewshot_selected"


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


def shot_budget(cfg: Config, champion_cfg: Config, champion_run_dir: Path) -> tuple[int, int]:
    """(budget, context): tokens the shots may take, and the context they were counted against."""
    context = cfg.serve.n_ctx
    ollama_ctx = cfg.deploy.parameters.get("num_ctx", cfg.deploy.num_ctx)
    if cfg.serve.backend == "ollama" and ollama_ctx:
        context = min(context, int(ollama_ctx))
    answer_room = max(cfg.serve.max_tokens, cfg.eval.max_new_tokens)
    prompt_room = longest_conversation(champion_cfg, Run.of(champion_cfg, champion_run_dir))
    return min(cfg.loop.fast_path_budget, context - answer_room - prompt_room), context


def corrected_at(store: Store, example: Example) -> datetime | None:
    """When the correction an example was made from came in; None for an example made from no correction."""
    generation_id = (example.provenance or {}).get("generation")
    times = (
        [f.created_at for f in store.feedback_for(generation_id) if f.correction is not None] if generation_id else []
    )
    return max(times, default=None)


def shot_pool(store: Store) -> tuple[list[Example], list[dict]]:
    """(corrections waiting for a cycle, newest first, one per prompt; the superseded ones, as left out)."""
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


def choose_shots(pool: list[Example], chat_format: ChatFormat, budget: int) -> tuple[list[Example], list[dict]]:
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


def select_shots(loop: Loop, champion: Version, chat_format: ChatFormat) -> ShotChoice:
    """The newest corrections that fit the budget, as shot turns, with what was left out and why."""
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


def fast_path_due(store: Store, loop_cfg: LoopSection) -> str | None:
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
