"""train.train_layers below 1: the layers below the lowest trained one compute the same thing for an example at
every step (their weights and LoRA do not train, and their LoRA dropout is off: train/model.py), so their output
is kept per example the first time it is computed and given back afterwards instead of computing those layers
again: every later training step and learned check of that example runs only the layers that train. A loop cycle
in adapter format (train_layers 0.5) so skips half the forward pass of every step after its first epoch and of
every check.

Packed batches only (train/batches.py): an example's states are the rows of its tokens in the packed row, the
shared prefix's included, so a batch is put back together from them exactly as the collator packs it."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from tuneship.train.batches import EXAMPLE_INDICES, SHARED_PREFIX

MAX_CACHE_BYTES = 2 * 1024**3  # larger datasets compute the frozen layers every time


class FrozenLayersCache:
    def __init__(self, layers):
        """`layers`: the frozen decoder layers, the lowest first."""
        self.layers = layers
        self.states: dict[int, object] = {}  # example index -> (tokens, hidden) output of the last frozen layer

    @contextmanager
    def serving(self, batch: dict):
        """Around a forward pass of `batch` (its EXAMPLE_INDICES taken out of it): the frozen layers give back the
        kept states when every example has them, else they run and their output is kept."""
        indices = batch.pop(EXAMPLE_INDICES)
        shared = batch.get(SHARED_PREFIX, 0)
        if all(index in self.states for index in indices):
            with self._replaced(self._packed(indices, shared)):
                yield
            return
        handle = self.layers[-1].register_forward_hook(
            lambda module, args, output: self._keep(indices, batch["cu_seq_lens_q"], shared, output)
        )
        try:
            yield
        finally:
            handle.remove()

    def _keep(self, indices: list[int], bounds, shared: int, output) -> None:
        row = (output[0] if isinstance(output, tuple) else output)[0].detach()
        segments = bounds.tolist()[1 if shared else 0 :]  # with a shared prefix, segment 0 is that prefix
        for index, start, end in zip(indices, segments, segments[1:]):
            self.states[index] = _cat(row[:shared], row[start:end])

    def _packed(self, indices: list[int], shared: int):
        """The last frozen layer's output for the batch, as the collator packs it: the shared prefix once."""
        parts = [self.states[indices[0]][:shared]] if shared else []
        parts += [self.states[index][shared:] for index in indices]
        return _cat(*parts).unsqueeze(0)

    @contextmanager
    def _replaced(self, output):
        """The frozen layers skipped: the lowest gives `output`, the others pass it on."""
        self.layers[0].forward = lambda hidden_states, *args, **kwargs: output
        for layer in self.layers[1:]:
            layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward  # the class's own forward again


def _cat(*tensors):
    import torch

    return torch.cat(tensors)


def frozen_layers_cache(model, frozen: int, dataset_tokens: int, packed: bool):
    """A FrozenLayersCache over the `frozen` lowest layers, where it applies: some frozen, packed batches, and the
    states of every token within MAX_CACHE_BYTES."""
    if not frozen or not packed:
        return None
    config = model.get_base_model().config.get_text_config()
    if dataset_tokens * config.hidden_size * 4 > MAX_CACHE_BYTES:  # fp32 states at most
        return None
    return FrozenLayersCache(list(model.get_base_model().get_decoder().layers[:frozen]))


def serving(cache: FrozenLayersCache | None, batch: dict):
    """`cache.serving(batch)`, or nothing (EXAMPLE_INDICES taken out of the batch all the same)."""
    if cache is None:
        batch.pop(EXAMPLE_INDICES, None)
        return nullcontext()
    return cache.serving(batch)
