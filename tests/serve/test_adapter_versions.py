"""Versions in adapter format (the default loop.version_format): every version is a LoRA GGUF on one loaded base
GGUF; a promotion switches adapters and never reloads the base, and no request in flight fails meanwhile."""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.serve.conftest import serve_loop
from tests.serve.test_routing import ask

QUESTION = "Question number 3?"


def add_adapter_version(loop, version_id: int, zero: bool = False):
    """A copy of the base run as version `version_id` in adapter format; `zero`: its LoRA does nothing (lora_B = 0),
    so it answers as the base model alone."""
    from safetensors.torch import load_file, save_file

    from tuneship.loop.adapter_form import adapter_files

    run_dir = loop.base_run.parent / f"tiny-v{version_id}"
    shutil.copytree(loop.base_run, run_dir, ignore=shutil.ignore_patterns("merged", "gguf", "checkpoints"))
    if zero:
        weights = run_dir / "adapter" / "adapter_model.safetensors"
        tensors = load_file(weights)
        save_file({k: v * 0 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    base, lora = adapter_files(loop.version_config(loop.store.version(1)), run_dir)
    return loop.store.add_version(
        id=version_id,
        name=f"tiny-v{version_id}",
        parent_id=1,
        run_dir=str(run_dir),
        gguf=str(base),
        adapter=str(lora),
        status="candidate",
        example_ids=[],
        metrics={},
    )


def pool_of(server):
    return server.server.config.app.state.router.pool


def next_token_logits(model, tokens: list[int]):
    """The logits after `tokens` as `model` (a version on its SharedGGUF) computes them, with its adapter."""
    import llama_cpp
    import numpy as np

    with model.base.lock:
        model.base.apply(model.adapter)
        llm = model.base.llm
        llm.reset()
        llm.eval(tokens)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()


def test_a_promotion_switches_the_adapter_on_the_loaded_base_and_no_request_in_flight_fails(fresh_loop_dir):
    from tuneship.loop.promotion import promote, rollback

    loop, server = serve_loop(fresh_loop_dir)
    with server:
        champion = loop.store.champion()
        assert champion.adapter and Path(champion.adapter).is_file()  # v1 brought into adapter form at start
        assert ask(server.url, question=QUESTION).tuneship["version"] == 1
        v2 = add_adapter_version(loop, 2, zero=True)
        assert v2.gguf == champion.gguf  # one base file for every version
        pool = pool_of(server)
        assert pool.loads == 1

        replies, failures = [], []

        def chat(_):
            try:
                replies.append(ask(server.url, question=QUESTION))
            except Exception as exc:  # noqa: BLE001 - every failure is reported by the assertion below
                failures.append(exc)

        with ThreadPoolExecutor(4) as workers:
            running = [workers.submit(chat, i) for i in range(12)]
            for move in range(4):  # promote and roll back while requests are in flight
                time.sleep(0.05)
                if move % 2 == 0:
                    promote(loop, 2, "test", "the adapter switch")
                else:
                    rollback(loop, "test", "and back")
                    loop.store.update_version(2, status="candidate")
            for future in running:
                future.result()
        assert failures == [] and len(replies) == 12
        assert {r.tuneship["version"] for r in replies} <= {1, 2}
        promote(loop, 2, "test", "for good")
        reply = ask(server.url, question=QUESTION)
        assert reply.tuneship["version"] == 2
        assert pool.loads == 1, "a promotion in adapter format reloaded a GGUF"


def test_switching_to_another_versions_adapter_on_the_loaded_base_takes_under_100_ms(fresh_loop_dir):
    from tuneship.loop.adapter_form import in_adapter_form
    from tuneship.loop.registry import open_loop
    from tuneship.serve.pool import ModelPool, Reply

    loop = open_loop(fresh_loop_dir)
    v1 = in_adapter_form(loop, loop.store.version(1))
    v2 = add_adapter_version(loop, 2, zero=True)
    pool = ModelPool(512)
    messages = [{"role": "user", "content": QUESTION}]
    with pool.use(v1) as first:
        list(first.stream(messages, 1, 0.0, Reply("", "stop", None, None)))
        tokens = first.base.llm.tokenize(b"Question number 3?", add_bos=False)
        with_v1 = next_token_logits(first, tokens)
        with pool.use(v2) as second:  # loads v2's LoRA GGUF and ChatFormat: a few MB, no GGUF model
            started = time.monotonic()
            with second.base.lock:
                second.base.apply(second.adapter)
            switched = time.monotonic() - started
            with_v2 = next_token_logits(second, tokens)
            second.base.apply(None)
            alone = next_token_logits(second, tokens)
    assert pool.loads == 1 and switched < 0.1, switched
    assert (with_v2 == alone).all()  # v2's LoRA (lora_B = 0) applied, not v1's left over
    assert not (with_v1 == alone).all()
    pool.close()
    assert not pool.bases and not pool.models  # the base closed once no version used it
