"""tuneship's one-pass GGUF header reader agrees with gguf's GGUFReader on every field and tensor."""

import pytest

from tuneship.gguf_header import GGUFHeaderError, read_header


def test_header_matches_gguf_readers_fields_and_tensors(tiny_run):
    from gguf import GGUFReader

    _, run = tiny_run
    for path in run.model_ggufs():
        ours, theirs = read_header(path), GGUFReader(str(path))
        expected = {key: field.contents() for key, field in theirs.fields.items() if not key.startswith("GGUF.")}
        assert ours.metadata == expected
        assert len(expected["tokenizer.ggml.tokens"]) == 49152  # the real SmolLM2 vocabulary
        assert [(t.name, t.n_elements, t.n_bytes, t.type_name) for t in ours.tensors] == [
            (t.name, int(t.n_elements), int(t.n_bytes), t.tensor_type.name.lower()) for t in theirs.tensors
        ]


@pytest.mark.parametrize(
    "cut, says", [(0, "empty file"), (3, "not a GGUF file"), (24, "cut short"), (5000, "cut short")]
)
def test_a_cut_file_is_a_clear_error(tiny_run, tmp_path, cut, says):
    _, run = tiny_run
    data = run.model_ggufs()[0].read_bytes()[:cut]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data)
    with pytest.raises(GGUFHeaderError, match=says):
        read_header(broken)
