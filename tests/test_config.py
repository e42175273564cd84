from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from memoe.config import Config, ConfigError, config_hash, load_config


def test_defaults_validate_and_public_keys_exist():
    cfg = load_config(None)
    assert cfg.model.name.startswith("embedded:")
    for key in (
        "data.path",
        "data.format",
        "data.n_edits",
        "data.seed",
        "method.name",
        "protocol.mode",
        "protocol.rounds",
        "protocol.batch_size",
    ):
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
    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


CONFIGS = Path(__file__).parent.parent / "configs"


def _stated_defaults(raw: dict, model: BaseModel, where: str) -> list[str]:
    """The keys a config file states at their default value. A method's defaults are those of its
    class for its name (ft-l's lr is 5e-4); ``method.name: memoe`` is the default method; the name of
    an entry of ``methods`` selects it and is never a default."""
    is_method = where.startswith("method")
    base = type(model)(name=model.name) if is_method else type(model)()
    found = []
    for key, stated in raw.items():
        if key == "dataset" and where == "data.":  # a catalogue name: it stands for its path and format
            from memoe.catalogue import dataset

            if (dataset(stated).path, dataset(stated).format) == (base.path, base.format):
                found.append("data.dataset")
            continue
        value, default = getattr(model, key), getattr(base, key)
        if key == "name" and is_method:
            if where == "method." and value == Config().method.name:
                found.append("method.name")
        elif isinstance(stated, dict):
            found += _stated_defaults(stated, value, f"{where}{key}.")
        elif key == "methods":
            for i, (r, m) in enumerate(zip(stated, value)):
                found += _stated_defaults(r, m, f"{where}methods[{i}].")
        elif value == default:
            found.append(where + key)
    return found


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_configs_state_only_what_differs_from_the_defaults(path):
    """A config restating a default (memoe/config.py) would drift when the default moves: every method's
    settings live in one place, its class's defaults, and a config states only its own differences."""
    raw = yaml.safe_load(path.read_text()) or {}
    assert _stated_defaults(raw, load_config(path), "") == []


def test_nightly_and_the_comparison_run_the_same_method_settings():
    """The nightly regression tests the methods of the comparison table, with the same settings; so do the
    per-method configs (configs/<method>.yaml, configs/memoe_*.yaml)."""
    compare = {m.name: m for m in load_config(CONFIGS / "compare.yaml").methods}
    nightly = load_config(CONFIGS / "nightly.yaml").methods
    assert {m.name for m in nightly} <= set(compare)
    for m in nightly:
        assert m == compare[m.name], m.name
    singles = [f for f in CONFIGS.glob("*.yaml") if f.stem.split("_")[0] in compare]
    assert len(singles) == 8
    for f in singles:
        m = load_config(f).method
        assert m.name == f.stem.split("_")[0] and m == compare[m.name], f.name


def test_ft_defaults_follow_the_name():
    """FT-L and FT-M share a class; the name picks EasyEdit's FT-L bound and lr, or FT-M's tuned lr."""
    from memoe.editors.ft import FTMethod

    assert (FTMethod(name="ft-l").lr, FTMethod(name="ft-l").norm_constraint) == (5e-4, 5e-4)
    assert (FTMethod(name="ft-m").lr, FTMethod(name="ft-m").norm_constraint) == (5e-3, None)
    assert FTMethod().lr == 5e-3 and FTMethod(name="ft-l", lr=1e-2).lr == 1e-2
    assert load_config(None, ["method.name=ft-l"]).method.lr == 5e-4


def test_a_config_names_a_catalogue_dataset(tmp_path):
    """``data.dataset: NAME`` stands for the catalogue's path and format: the same config, the same hash (run
    names and cache keys do not see the difference); an override of the dataset replaces them, one of the
    path or the format applies on top of the dataset's; an unknown name names the catalogue and its names."""
    from memoe.catalogue import CATALOGUE, dataset, datasets

    cf = dataset("counterfact")
    named = load_config(None, ["data.dataset=counterfact"])
    spelled = load_config(None, [f"data.path={cf.path}", f"data.format={cf.format}"])
    assert (named.data.path, named.data.format) == (cf.path, cf.format)
    assert named == spelled and config_hash(named) == config_hash(spelled)
    assert "dataset" not in named.to_dict()["data"]
    assert load_config(None).data.path == dataset("zsre").path  # the default data is the catalogue's too
    p = tmp_path / "c.yaml"
    p.write_text(f"data:\n  path: {cf.path}\n  format: {cf.format}\n")
    back = load_config(p, ["data.dataset=zsre"])  # switching datasets drops the file's path and format
    assert (back.data.path, back.data.format) == (dataset("zsre").path, "zsre")
    p.write_text("data:\n  dataset: counterfact\n")
    assert load_config(p, ["data.path=mine.json"]).data.format == "counterfact"
    assert load_config(p, ["data.format=counterfact-flat"]).data.path == cf.path
    p.write_text("data:\n  dataset: counterfact\n  format: zsre\n")
    with pytest.raises(
        ConfigError, match=r"data.dataset 'counterfact' gives the path and format; leave out data.format"
    ):
        load_config(p)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.dataset=zzz"])
    msg = str(e.value)
    assert "unknown dataset 'zzz'" in msg and CATALOGUE.name in msg
    assert all(name in msg for name in datasets())


def test_data_mix_studies_catalogue_datasets_together(tmp_path):
    """``data.mix``: the named datasets' records, ids prefixed by the dataset, shuffled together (seeded)
    and sampled; a mix with a path, an unknown or repeated name is an error naming it."""
    from memoe.catalogue import dataset
    from memoe.datasets import load_for_config

    cfg = load_config(None, ["data.mix=[zsre, counterfact]", "data.n_edits=200", "data.probes=false"])
    assert [f.name for f, _, _ in cfg.data.files] == [Path(dataset(n).path).name for n in ("zsre", "counterfact")]
    assert cfg.data.label == "zsre+counterfact"
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg  # the resolved config reads back (the flow does)
    df, report = load_for_config(cfg)
    assert df.height == 200 and df["id"].n_unique() == 200
    kinds = df["id"].str.split(":").list.first()
    assert set(kinds) == {"zsre", "counterfact"} and 60 < (kinds == "zsre").sum() < 140  # both, in every part
    assert report.n_kept == 1037 + 1031
    again, _ = load_for_config(cfg)
    assert again["id"].to_list() == df["id"].to_list()
    other, _ = load_for_config(
        load_config(None, ["data.mix=[zsre, counterfact]", "data.n_edits=200", "data.seed=1", "data.probes=false"])
    )
    assert other["id"].to_list() != df["id"].to_list()
    for bad, msg in (
        (["data.mix=[zsre, counterfact]", "data.path=x.json"], "data.mix names its datasets; leave out data.path"),
        (["data.mix=[zsre, nope]"], "unknown dataset 'nope'"),
        (["data.mix=[zsre, zsre]"], "names a dataset twice"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, bad)
