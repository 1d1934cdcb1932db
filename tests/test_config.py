from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from nas_dose.config import ConfigError, load_config, save_config, to_dict
from nas_dose.io import load_yaml
from nas_dose.runtime import RuntimeConfig


@dataclass
class Optim:
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3


@dataclass
class Run:
    optim: Optim = field(default_factory=Optim)
    epochs: int = 3
    widths: tuple[int, ...] = (8, 16)
    note: str | None = None


def test_defaults_file_and_overrides_merge(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim: {lr: 0.01}\nepochs: 7\n")
    cfg = load_config(Run, cfg_file, ["optim.name=sgd", "widths=[4, 8, 16]"])
    assert cfg.optim == Optim("sgd", 0.01)
    assert cfg.epochs == 7 and cfg.widths == (4, 8, 16) and cfg.note is None


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("epochs=1.5", "config key 'epochs': expected int"),
    ("optim.name=rmsprop", "config key 'optim.name': expected one of"),
    ("widths=[1, x]", "config key 'widths[1]': expected int"),
    ("epochs", "not of the form key.sub=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(Run, overrides=[override])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [\n")
    with pytest.raises(Exception, match="bad.yaml: invalid YAML"):
        load_config(Run, bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="wrong.yaml: config key 'epochs'"):
        load_config(Run, wrong)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Run, overrides=["optim.lr=0.5", "note=hello"])
    save_config(tmp_path / "config.yaml", cfg)
    assert load_config(Run, tmp_path / "config.yaml") == cfg
    assert load_yaml(tmp_path / "config.yaml") == to_dict(cfg)


@dataclass
class Pairs:
    betas: tuple[float, float] = (0.9, 0.999)
    lr: float = 0.1


def test_exponent_floats_and_fixed_tuples(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-3\n")  # YAML 1.1 reads this as a string
    cfg = load_config(Pairs, cfg_file, ["betas=[0.5, 2e-1]"])
    assert cfg.lr == 1e-3 and cfg.betas == (0.5, 0.2)
    with pytest.raises(ConfigError, match=r"config key 'betas': expected 2 items"):
        load_config(Pairs, overrides=["betas=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"config key 'lr': expected float"):
        load_config(Pairs, overrides=["lr=fast"])


def test_a_shipped_config_is_named_without_its_path(tmp_path, monkeypatch):
    from nas_dose.config import SHIPPED, shipped_config

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert shipped_config("search_evolution") == SHIPPED / "search_evolution.yaml"
    assert shipped_config("nowhere") == Path("nowhere")  # not shipped: the path as given (its error names it)
    (tmp_path / "search_evolution").write_text("{}")
    assert shipped_config("search_evolution") == Path("search_evolution")  # a file here wins


def test_off_and_on_are_choices_where_booleans_are_not():
    """YAML 1.1 reads `off` as false: a choice named `off` still gets it."""
    assert load_config(RuntimeConfig, overrides=["amp=off"]).amp == "off"
    with pytest.raises(ConfigError, match="config key 'name': expected one of"):
        load_config(Optim, overrides=["name=off"])
