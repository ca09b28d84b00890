import pytest

from tuneship.config import config_warnings, load_config, save_config
from tuneship.errors import ConfigError


def test_defaults_use_the_embedded_model():
    cfg = load_config()
    assert cfg.model.base == "smollm2-135m-instruct" and cfg.deploy.target == "ollama"


def test_set_values_are_parsed_as_yaml():
    cfg = load_config(
        overrides=[
            'data.sources=["a.jsonl", "s3://b/k.json"]',
            "train.learning_rate=1e-4",
            "export.quants=[Q4_K_M, Q8_0]",
            "train.epochs=2",
            "run.name=exp-1",
        ]
    )
    assert cfg.data.sources == ["a.jsonl", "s3://b/k.json"]
    assert cfg.train.learning_rate == 1e-4 and cfg.train.epochs == 2.0
    assert cfg.export.quants == ["Q4_K_M", "Q8_0"] and cfg.run.name == "exp-1"


def test_learning_rate_outside_hard_range_names_field_and_range():
    with pytest.raises(ConfigError, match=r"train.learning_rate: must be within \[1e-06, 0.01\]"):
        load_config(overrides=["train.learning_rate=0.5"])


def test_learning_rate_outside_usual_range_is_a_warning():
    assert any(
        "train.learning_rate=0.005" in w for w in config_warnings(load_config(overrides=["train.learning_rate=5e-3"]))
    )
    assert config_warnings(load_config(overrides=["train.learning_rate=2e-4"])) == []


def test_training_on_the_served_quant_warns_when_the_adapter_is_merged_all_the_same():
    on_quant = "model.train_on_quant=Q4_K_M"
    [warning] = config_warnings(load_config(overrides=[on_quant]))
    assert "model.train_on_quant=Q4_K_M" in warning and "export.merge: false" in warning
    assert config_warnings(load_config(overrides=[on_quant, "export.merge=false"])) == []


def test_unknown_key_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match="train.learnig_rate: unknown key"):
        load_config(overrides=["train.learnig_rate=1e-4"])


def test_file_paths_are_relative_to_the_config_and_resolved_config_round_trips(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text("run: {name: r1, dir: ../runs}\ndata: {sources: [data/x.jsonl]}\ndeploy: {target: none}\n")
    cfg = load_config(path)
    assert cfg.data.sources == [str(tmp_path / "cfg" / "data" / "x.jsonl")]
    assert cfg.run_dir == tmp_path / "runs" / "r1"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_bad_yaml_says_where(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml:3"):
        load_config(path)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["train.epochs"])
