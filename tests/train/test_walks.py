"""train/walks.py: inside `flat_walks`, the HF Trainer's per-step `model.train()` and `model.zero_grad()` do what
torch's do without walking the module tree; a model whose modules have a `train` of their own keeps torch's."""

import pytest


@pytest.fixture
def lora_model(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


@pytest.fixture
def module_train_calls(monkeypatch):
    """How many times torch's recursive `nn.Module.train` runs (once a module per walk)."""
    import torch

    calls = []
    own = torch.nn.Module.train

    def counting(self, mode=True):
        calls.append(self)
        return own(self, mode)

    def start():
        monkeypatch.setattr(torch.nn.Module, "train", counting)
        return calls

    return start


def training_flags(model) -> set[bool]:
    return {module.training for module in model.modules()}


def test_train_walks_the_tree_only_when_a_module_changes_mode(lora_model, module_train_calls):
    from tuneship.train.walks import flat_walks

    everything = len(list(lora_model.modules()))
    below_the_root = everything - 1  # inside, the root's own train() is the walk's start, not a call counted
    layer = lora_model.base_model.model.model.layers[0]
    lora_model.train()  # from_pretrained leaves the model in eval mode; the first step's train() walks
    with flat_walks(lora_model):
        calls = module_train_calls()
        assert lora_model.train() is lora_model and not calls  # the HF Trainer's every step: nothing to change
        assert lora_model.eval() is lora_model and len(calls) == below_the_root  # a change: torch's walk
        assert lora_model.eval() is lora_model and len(calls) == below_the_root
        assert training_flags(lora_model) == {False}
        lora_model.train()
        layer.eval()  # one submodule, as an evaluation might: the next train() must reach it
        lora_model.train()
        assert training_flags(lora_model) == {True} and len(calls) == 3 * below_the_root + len(list(layer.modules()))
        with pytest.raises(ValueError, match="boolean"):
            lora_model.train("no")
    assert not {"train", "zero_grad"} & set(vars(lora_model))  # torch's again after
    walked = len(calls)
    lora_model.train()
    assert len(calls) == walked + everything


def test_zero_grad_drops_every_gradient_and_zeroes_them_when_asked(lora_model):
    import torch

    from tuneship.train.walks import flat_walks

    def backward():
        lora_model(input_ids=torch.arange(12).view(1, 12), labels=torch.arange(12).view(1, 12)).loss.backward()
        return [p for p in lora_model.parameters() if p.grad is not None]

    with flat_walks(lora_model):
        assert backward()
        lora_model.zero_grad()
        assert all(p.grad is None for p in lora_model.parameters())
        trained = backward()
        lora_model.zero_grad(set_to_none=False)
        assert trained and all(p.grad is not None and not p.grad.any() for p in trained)


def test_a_module_with_its_own_train_keeps_torchs_walks(lora_model, module_train_calls):
    import torch

    from tuneship.train.walks import flat_walks

    class OwnTrain(torch.nn.Identity):
        def train(self, mode=True):
            self.switched = mode
            return super().train(mode)

    lora_model.base_model.model.extra = OwnTrain()
    with flat_walks(lora_model):
        assert not {"train", "zero_grad"} & set(vars(lora_model))
        calls = module_train_calls()
        lora_model.eval()
    assert len(calls) == len(list(lora_model.modules())) and lora_model.base_model.model.extra.switched is False
