"""Deploying a tiny run to a local server that implements Ollama's documented REST API."""

import json

import pytest

from tests.conftest import copy_run, quiet_console
from tests.deploy.fake_ollama import FakeOllama
from tuneship.chat.format import ChatFormat
from tuneship.errors import ConfigError
from tuneship.deploy.modelfile import parse_modelfile
from tuneship.deploy.ollama import OllamaClient, OllamaError, OllamaUnreachable, file_digest, resolve_host
from tuneship.deploy.ollama_template import to_ollama
from tuneship.deploy.stage import run_deploy


@pytest.fixture(scope="module")
def exported_tiny(tiny_run, tmp_path_factory):
    """A copy of the tiny run (deploy writes the Modelfile and its manifest entry)."""
    cfg, run = copy_run(tiny_run, tmp_path_factory.mktemp("deploy"))
    return cfg, run.path


@pytest.fixture
def ollama(tmp_path, exported_tiny):
    _, run_dir = exported_tiny
    report = json.loads((run_dir / "reports" / "eval.json").read_text())
    gguf_answers = {
        p["question"]: a["answer"] for p, a in zip(report["prompts"], report["models"]["gguf-Q8_0"]["answers"])
    }
    with FakeOllama(tmp_path) as server:
        server.reply = lambda messages: (gguf_answers[messages[-1]["content"]], "stop")
        yield server


def deploy(cfg, run_dir, host=None, **settings):
    """run_deploy with deploy.host=host (target ollama) and other deploy settings."""
    from tuneship.run import Run

    cfg = cfg.model_copy(deep=True)
    cfg.deploy.host = host
    cfg.deploy.target = settings.pop("target", "ollama")
    for key, value in settings.items():
        setattr(cfg.deploy, key, value)
    return run_deploy(cfg, Run.of(cfg, run_dir), quiet_console())


def test_deploy_uploads_creates_verifies_smoke_tests_and_unloads(exported_tiny, ollama):
    cfg, run_dir = exported_tiny
    result = deploy(cfg, run_dir, ollama.url)
    gguf = run_dir / "gguf" / "tiny-Q8_0.gguf"
    digest = file_digest(gguf)
    methods = [(method, path) for method, path, _ in ollama.requests]
    assert ("HEAD", f"/api/blobs/{digest}") in methods and ("POST", f"/api/blobs/{digest}") in methods
    create = next(body for method, path, body in ollama.requests if path == "/api/create")
    chat_format = ChatFormat.load(run_dir / "adapter")
    assert create["files"] == {"tiny-Q8_0.gguf": digest}
    assert create["template"] == to_ollama(chat_format).template
    assert create["parameters"] == {"num_ctx": 256, "stop": ["<|im_end|>"]}
    assert create["system"].startswith("You are a helpful AI assistant named SmolLM")
    chats = [body for _, path, body in ollama.requests if path == "/api/chat"]
    assert len(chats) == 6 and all(body["options"]["temperature"] == 0 for body in chats)
    assert ollama.unloaded == ["tiny"] and result.smoke == {"prompts": 6, "passed": 6}
    assert any("uploaded; created tiny" in line for line in result.lines)


def test_blob_already_on_the_server_is_not_uploaded_again(exported_tiny, ollama):
    cfg, run_dir = exported_tiny
    deploy(cfg, run_dir, ollama.url)
    ollama.requests.clear()
    result = deploy(cfg, run_dir, ollama.url)
    assert not [path for method, path, _ in ollama.requests if method == "POST" and path.startswith("/api/blobs/")]
    assert any("already on the server" in line for line in result.lines)


def test_error_inside_the_create_stream_fails_with_the_servers_text_and_a_hint(exported_tiny, ollama):
    cfg, run_dir = exported_tiny
    ollama.create_error = "unsupported architecture 'tinyllama'"
    with pytest.raises(OllamaError, match=r"unsupported architecture 'tinyllama' \(hint: .*update Ollama\)"):
        deploy(cfg, run_dir, ollama.url)


def test_smoke_test_catches_an_answer_that_did_not_stop(exported_tiny, ollama):
    cfg, run_dir = exported_tiny
    ollama.reply = lambda messages: ("and so on and so on", "length")
    with pytest.raises(OllamaError, match=r"done_reason 'length' \(the answer did not stop\)"):
        deploy(cfg, run_dir, ollama.url)
    assert ollama.unloaded == ["tiny"]


def test_smoke_test_catches_answers_that_differ_from_the_gguf(exported_tiny, ollama):
    cfg, run_dir = exported_tiny
    ollama.reply = lambda messages: ("something else", "stop")
    with pytest.raises(OllamaError, match="the GGUF in llama.cpp answered"):
        deploy(cfg, run_dir, ollama.url)


def test_unreachable_ollama_says_how_to_start_it(exported_tiny):
    cfg, run_dir = exported_tiny
    with pytest.raises(OllamaUnreachable, match=r"cannot reach Ollama at http://127.0.0.1:9 .*ollama serve"):
        deploy(cfg, run_dir, "127.0.0.1:9")


def test_host_forms_and_blob_head_status(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:8080")
    assert resolve_host(None) == "http://0.0.0.0:8080"
    assert (
        resolve_host("myhost") == "http://myhost:11434"
        and resolve_host("https://o.example/") == "https://o.example:443"
    )
    with FakeOllama(tmp_path) as server:
        assert not OllamaClient(server.url).has_blob("sha256:" + "0" * 64)


def test_modelfile_is_written_and_reads_back(exported_tiny, ollama):
    cfg, run_dir = exported_tiny
    result = deploy(cfg, run_dir, ollama.url)
    pairs = parse_modelfile(result.modelfile.read_text())
    chat_format = ChatFormat.load(run_dir / "adapter")
    assert pairs[0] == ("FROM", "./gguf/tiny-Q8_0.gguf")
    assert ("TEMPLATE", to_ollama(chat_format).template) in pairs
    assert ("PARAMETER", "stop <|im_end|>") in pairs and ("PARAMETER", "num_ctx 256") in pairs
    assert next(v for k, v in pairs if k == "SYSTEM").startswith("You are a helpful AI assistant named SmolLM")


def test_lmstudio_layout_and_llamacpp_command(exported_tiny, tmp_path):
    cfg, run_dir = exported_tiny
    result = deploy(cfg, run_dir, target="lmstudio", lmstudio_dir=tmp_path / "models")
    folder = tmp_path / "models" / "tuneship" / "tiny"
    assert {"tiny-Q8_0.gguf", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert str(folder) in result.lines[-1]
    served = deploy(cfg, run_dir, target="llamacpp")
    assert any("llama-server -m" in line and "--jinja" in line for line in served.lines)


def test_deploy_refuses_a_template_that_differs_from_training(tiny_run, tmp_path):
    from tuneship.errors import ContractBroken

    cfg, run = copy_run(tiny_run, tmp_path)
    spec_path = run.adapter_dir / "chat_format.json"
    spec = json.loads(spec_path.read_text())
    spec["template"] = spec["template"].replace(
        "'<|im_start|>' + message['role']", "'<|im_start|>' + 'x' + message['role']"
    )
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ContractBroken, match="template contract broken: the renderers disagree"):
        deploy(cfg, run.path, target="none")


def test_num_ctx_fits_the_longest_conversation_and_the_answer_budget(exported_tiny):
    """The default was train.max_seq_len (64 here): below Ollama's useful minimum and below what an answer
    after a long prompt needs."""
    from tuneship.deploy.stage import context_length
    from tuneship.run import Run

    cfg, run_dir = exported_tiny
    run = Run.of(cfg, run_dir)
    longest = json.loads((run_dir / "data" / "audit.json").read_text())["stats"]["tokens"]["max"]
    assert context_length(cfg, run) == 256 and longest + cfg.eval.max_new_tokens <= 256
    bigger = cfg.model_copy(deep=True)
    bigger.eval.max_new_tokens = 700
    assert context_length(bigger, run) == 768  # rounded up to a multiple of 256
    bigger.deploy.parameters = {"num_predict": 1000}
    assert context_length(bigger, run) == 1280
    with pytest.raises(ConfigError, match=r"deploy.num_ctx=300 is too short: .* at least 1\d\d\d"):
        deploy(bigger, run_dir, target="none", num_ctx=300)
    explicit = cfg.model_copy(deep=True)
    explicit.deploy.num_ctx = 512
    assert context_length(explicit, run) == 512
    explicit.deploy.parameters = {"num_ctx": 100}
    with pytest.raises(ConfigError, match="deploy.num_ctx=100 is too short"):
        context_length(explicit, run)
