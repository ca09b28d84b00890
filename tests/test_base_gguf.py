"""The base as it serves (base_gguf.py `served_base_dir`): what a challenger in adapter format trains on, so that
its learned check measures the weights llama.cpp answers with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

QUANT = "Q4_K_M"


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> Path:
    from tuneship.base_gguf import served_base_dir

    return served_base_dir(tiny_model_dir, QUANT)


def gguf_weights(path: Path, name: str):
    """A tensor of a GGUF, dequantized by gguf-py, in the shape PyTorch holds it (rows, columns)."""
    import gguf

    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return tensor.tensor_type, gguf.dequantize(tensor.data, tensor.tensor_type)


def test_it_has_the_quant_s_weights_and_the_base_s_own_files(tiny_model_dir, served):
    import numpy as np
    from gguf import GGMLQuantizationType
    from safetensors.numpy import load_file

    from tuneship.base_gguf import base_gguf

    base = Path(tiny_model_dir)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (served / name).read_bytes() == (base / name).read_bytes(), name
    weights, original = load_file(served / "model.safetensors"), load_file(base / "model.safetensors")
    assert weights.keys() == original.keys()
    kind, quantized = gguf_weights(base_gguf(base, QUANT), "blk.1.ffn_down.weight")
    assert kind not in (GGMLQuantizationType.F16, GGMLQuantizationType.F32)
    down = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(weights[down], quantized.astype(np.float32))
    assert not np.allclose(weights[down], original[down], atol=1e-4)


def test_its_logits_are_llama_cpp_s_on_the_quant_as_the_base_s_are_not(tiny_model_dir, served):
    """The point of it: PyTorch on the served base computes what llama.cpp computes on the quantized GGUF (but for
    llama.cpp's 8-bit activations), several times closer than PyTorch on the base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneship.evaluate.backends import LOADER_CONTEXT, load_gguf
    from tuneship.evaluate.llama_parallel import position_logits
    from tuneship.base_gguf import base_gguf

    tokens = AutoTokenizer.from_pretrained(tiny_model_dir)("What is the capital of France? Paris, of course.")
    tokens = tokens["input_ids"]
    llm = load_gguf(base_gguf(tiny_model_dir, QUANT), LOADER_CONTEXT)
    try:
        [served_in_llama] = position_logits(llm, [(tokens, 0)])
    finally:
        llm.close()

    def torch_logits(folder) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0, :-1]

    served_in_llama = torch.from_numpy(served_in_llama)
    off_served = (torch_logits(served) - served_in_llama).abs().mean().item()
    off_base = (torch_logits(tiny_model_dir) - served_in_llama).abs().mean().item()
    assert off_served < off_base / 3, (off_served, off_base)


def test_it_leads_back_to_its_base_s_ggufs(tiny_model_dir, served):
    """An adapter trained on it names it as its base: its GGUFs must be the base's, the files every version shares."""
    from tuneship.base_gguf import base_gguf, served_base_dir

    base = Path(tiny_model_dir)
    assert served.parent == base_gguf(base, QUANT).parent and served.name == f"hf-{QUANT}"
    for kind in (QUANT, "f16"):
        assert base_gguf(served, kind) == base_gguf(base, kind)
    assert served_base_dir(served, QUANT) == served
    assert served_base_dir(served, "f16") == served_base_dir(base, "f16") == base  # unquantized: the base itself


def test_a_quant_transformers_cannot_read_is_said_and_leaves_no_folder(tiny_model_dir, tmp_path):
    import gguf
    import numpy as np

    from tuneship.base_gguf import ServedBaseUnavailable, base_gguf, served_base_dir

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    quantized = base_gguf(base, "f16").with_name(f"base-{QUANT}.gguf")  # taken as the base's quant: built no more
    writer = gguf.GGUFWriter(quantized, "no-such-architecture")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ServedBaseUnavailable, match=r"cannot dequantize .*base-Q4_K_M\.gguf.*no-such-architecture"):
        served_base_dir(base, QUANT)
    assert not quantized.with_name(f"hf-{QUANT}").exists()
    assert not list(quantized.parent.glob(f"hf-{QUANT}.partial-*"))


def test_no_room_for_it_is_said_before_any_of_it_is_written(tiny_model_dir, tmp_path, monkeypatch):
    """The disk's free space as the OS reports it is made small (a disk cannot be filled here); the loop's cycle
    then trains on the base as it is and records why (tests/loop/test_cycle.py)."""
    import tuneship.base_gguf
    from tuneship.base_gguf import ServedBaseUnavailable, base_gguf, served_base_dir

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    quantized = base_gguf(base, QUANT)
    assert json.loads((quantized.parent / "base.json").read_text()) == {"base": str(base.resolve())}  # which base
    monkeypatch.setattr(tuneship.base_gguf, "free_disk_bytes", lambda path: 1000)
    with pytest.raises(ServedBaseUnavailable, match=r"needs 0\.\d\d GB \(the base's weights\) and 0\.00 GB are free"):
        served_base_dir(base, QUANT)
    assert not quantized.with_name(f"hf-{QUANT}").exists()
    assert not list(quantized.parent.glob(f"hf-{QUANT}.partial-*"))
    monkeypatch.undo()
    assert (served_base_dir(base, QUANT) / "model.safetensors").is_file()  # with room, made


def test_a_base_stored_in_bf16_is_served_in_bf16(tiny_model_dir, tmp_path):
    """A 7B base in bf16 takes 14 GB as it serves, not 28."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneship.base_gguf import served_base_dir

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tiny_model_dir) / name, base / name)
    served = served_base_dir(base, QUANT)
    assert {tensor.dtype for tensor in load_file(served / "model.safetensors").values()} == {torch.bfloat16}
    assert (served / "config.json").read_bytes() == (base / "config.json").read_bytes()
