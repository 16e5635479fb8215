"""Config loading: presets, inheritance, overrides, and one clear error line per mistake."""

from pathlib import Path

import pytest
import yaml

from loracl.runs.assembly import list_presets, load_config
from loracl.errors import ConfigError


def _write(tmp_path, doc, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def _minimal():
    return {"benchmark": {"name": "b", "scenario": "class-incremental", "num_tasks": 2,
                          "datasets": [{"name": "cifar100", "root": "/nowhere"}]},
            "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False}}


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_every_preset_validates(preset):
    cfg = load_config(preset=preset)
    assert cfg.name == preset
    assert cfg.method_name


def test_unknown_key_names_key_and_file(tmp_path):
    doc = _minimal()
    doc["train"] = {"epochz": 3}
    p = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.epochz" in msg and "unknown key" in msg and str(p) in msg
    assert "\n" not in msg


def test_wrong_type_and_missing_field(tmp_path):
    doc = _minimal()
    doc["train"] = {"optimizer": {"lr": "fast"}}
    with pytest.raises(ConfigError, match=r"train\.optimizer\.lr.*'fast'"):
        load_config(_write(tmp_path, doc))
    doc = _minimal()
    del doc["backbone"]
    with pytest.raises(ConfigError, match="'backbone': required key is missing"):
        load_config(_write(tmp_path, doc))


def test_method_section_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.rnak.*unknown key"):
        load_config(preset="cifar100-mini", sets=["method.rnak=4"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_config(preset="cifar100-mini", method="nope")
    cfg = load_config(preset="cifar100-mini", method="seq-lora", sets=["method.rank=4"])
    assert cfg.method.rank == 4 and cfg.method.name == "seq-lora"
    assert "targets" in cfg.model_dump()["method"]  # defaults are resolved into the saved config


def test_set_overrides_types_and_paths():
    cfg = load_config(preset="cifar100-mini", seed=3, sets=["train.epochs=[1,2,3,4,5,6,7,8,9,10]",
                                                            "data.batch_size=32", "eval.retention=null"])
    assert cfg.seed == 3 and cfg.epochs_for(4) == 5 and cfg.data.batch_size == 32
    assert cfg.eval.retention is None
    assert "{data_root}" not in cfg.benchmark.datasets[0].root


def test_extends_and_overrides(tmp_path):
    base = _minimal()
    base["overrides"] = {"linear-probe": {"train": {"optimizer": {"lr": 0.1}}}}
    _write(tmp_path, base, "base.yaml")
    child = {"extends": "base.yaml", "train": {"epochs": 7}}
    p = _write(tmp_path, child, "child.yaml")
    cfg = load_config(p)
    assert cfg.train.epochs == 7 and cfg.train.optimizer.lr == pytest.approx(5e-4)
    cfg = load_config(p, method="linear-probe")
    assert cfg.train.optimizer.lr == pytest.approx(0.1)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("benchmark: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="no-such-preset")


def test_unset_root_placeholder_is_explained(tmp_path, monkeypatch):
    import loracl.runs.assembly as C

    monkeypatch.setattr(C, "default_roots", lambda: {"data_root": None, "weights_root": None, "assets": None})
    doc = _minimal()
    doc["benchmark"]["datasets"][0]["root"] = "{data_root}/cifar100"
    with pytest.raises(ConfigError, match="LORACL_DATA_ROOT"):
        load_config(_write(tmp_path, doc))


def test_relative_roots_are_saved_absolute(tmp_path, monkeypatch):
    """A run started with --set data_root=../x saves absolute paths: export and predict work from any folder."""

    from loracl.runs.assembly import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset="cifar100-mini", sets=["data_root=rel/data", "weights_root=../w"])
    assert Path(cfg.data_root) == tmp_path / "rel" / "data"
    assert Path(cfg.benchmark.datasets[0].root) == tmp_path / "rel" / "data" / "cifar100"
    assert Path(cfg.backbone.file).is_absolute()


@pytest.mark.parametrize("name,base,key,value", [
    ("inflora-ca", "inflora", "memory", "gpm"), ("inflora-b5", "inflora", "blocks", [0, 1, 2, 3, 4]),
    ("keeplora+", "keeplora", "plus", True), ("sd-lora-rr", "sd-lora", "rank_schedule", [[0, 10], [4, 8], [8, 6]]),
    ("sd-lora-kd", "sd-lora", "absorb", True)])
def test_named_configurations_are_settings_of_one_method(name, base, key, value):
    """A variant is its method's class with other defaults: the CLI name stays, the config says which."""
    from loracl.methods import lookup

    assert lookup(name).cls is lookup(base).cls
    cfg = load_config(preset="cifar100-mini", method=name)
    assert type(cfg.method) is lookup(base).cls.Config and cfg.method.name == name
    assert getattr(cfg.method, key) == value
    assert getattr(load_config(preset="cifar100-mini", method=base).method, key) != value
    # the variant's settings are defaults: the config may override them
    override = f"method.{key}=" + ("null" if key in ("blocks", "rank_schedule") else "false" if value is True else "dualgpm")
    assert getattr(load_config(preset="cifar100-mini", method=name, sets=[override]).method, key) != value


def test_the_method_section_must_be_a_mapping(tmp_path):
    doc = _minimal() | {"method": "seq-lora"}
    with pytest.raises(ConfigError, match="'method': a mapping"):
        load_config(_write(tmp_path, doc))


def test_a_config_file_that_is_not_text_is_one_line(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="is not text"):
        load_config(p)


@pytest.mark.parametrize("sets,words", [(["data.rrc_scale=[0.9, 0.1]"], "rrc_scale"),
                                        (["train.grad_clip=-1"], "grad_clip")])
def test_values_that_would_silently_misbehave_are_refused(sets, words):
    with pytest.raises(ConfigError, match=words):
        load_config(preset="cifar100-mini", sets=sets)


def test_an_absurdly_deep_set_key_is_one_line():
    with pytest.raises(ConfigError, match="levels"):
        load_config(preset="cifar100-mini", sets=[".".join(["a"] * 5000) + "=1"])
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(preset="cifar100-mini", sets=["method.rank=" + "[" * 3000 + "]" * 3000])
