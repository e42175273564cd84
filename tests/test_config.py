import pytest

from memoe.config import Config, ConfigError, config_hash, load_config


def test_defaults_validate_and_public_keys_exist():
    cfg = load_config(None)
    assert cfg.model.name.startswith("embedded:")
    for key in ("data.path", "data.format", "data.n_edits", "data.seed", "method.name",
                "protocol.mode", "protocol.rounds", "protocol.batch_size"):
        section, field = key.split(".")
        assert field in type(getattr(cfg, section)).model_fields, key


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  n_edit: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.n_edit'"):
        load_config(p)


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("protocol:\n  rounds: many\n")
    with pytest.raises(ConfigError, match=r"protocol.rounds"):
        load_config(p)


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match=r"data.format"):
        load_config(None, ["data.format=xml"])


def test_overrides_apply_and_unknown_override_is_rejected():
    cfg = load_config(None, ["data.n_edits=6", "protocol.mode=sequential", "protocol.rounds=3", "method.lr=0.5"])
    assert cfg.data.n_edits == 6 and cfg.protocol.rounds == 3 and cfg.method.lr == 0.5
    with pytest.raises(ConfigError, match=r"unknown key 'method.colour'"):
        load_config(None, ["method.colour=red"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.n_edits"])


def test_switching_method_by_override():
    cfg = load_config(None, ["method.name=ft-m"])
    assert cfg.method.name == "ft-m"


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(None, ["data.seed=1"])
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  seed: 1\n")
    b = load_config(p)
    assert config_hash(a) == config_hash(b) == config_hash(Config.model_validate(a.to_dict()))
    assert config_hash(a) != config_hash(load_config(None, ["data.seed=2"]))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


def test_shipped_configs_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)
