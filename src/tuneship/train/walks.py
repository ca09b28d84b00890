"""The two walks over the whole model that the HF Trainer makes every step, cut short while training.

Every step the HF Trainer calls `model.train()`, which recurses through every module in Python (SmolLM2-135M with
LoRA on every linear: about 2,500 modules), and `model.zero_grad()`, which walks every module again to reach the
parameters: on a 2-core CPU about 8 and 5 ms of a step. Inside `flat_walks`, `model.train(mode)` returns at once
when every module is in that mode already (it always is, step after step: the check reads a list of the modules
taken once), and does torch's and transformers' own walk otherwise (the first step, after an evaluation that put
the model in eval mode); `model.zero_grad()` drops the gradients from a list of the parameters taken once. A model
with a module whose class has a `train` of its own (DoRA's layers clear a cache on every call) keeps its walks.
"""

from __future__ import annotations

from contextlib import contextmanager


def _plain_train_only(modules) -> bool:
    """Whether every module's `train` does nothing more when its mode does not change: torch's own, or
    transformers' (which also sets the model's hub-kernels mode from the same flag)."""
    import torch
    from transformers import PreTrainedModel

    plain = (torch.nn.Module.train, PreTrainedModel.train)
    return all(type(module).train in plain and "train" not in vars(module) for module in modules)


@contextmanager
def flat_walks(model):
    """Inside, `model.train(mode)` / `model.eval()` and `model.zero_grad()` do what torch's do, without walking the
    module tree when there is nothing to change (the model's structure does not change while it trains)."""
    modules = list(model.modules())
    if not _plain_train_only(modules) or "zero_grad" in vars(model):
        yield
        return
    parameters = list(model.parameters())
    own_train, own_zero_grad = type(model).train, model.zero_grad

    def train(mode: bool = True):
        if any(module.__dict__["training"] is not mode for module in modules):
            return own_train(model, mode)
        return model

    def zero_grad(set_to_none: bool = True):
        if not set_to_none:
            return own_zero_grad(set_to_none)
        for parameter in parameters:
            parameter.grad = None
        return None

    model.train, model.zero_grad = train, zero_grad
    try:
        yield
    finally:
        del model.train, model.zero_grad
