"""Genotype YAML: round trip to an identical network, and loading errors that name file, slot, op."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from test_spaces import SPACES

from nas_dose.errors import NasDoseError
from nas_dose.search_spaces import Genotype, build_model, genotype_from_dict, get_space, load_genotype, save_genotype


def lenas_genotype() -> Genotype:
    space = get_space("lenas")
    return space.sample(np.random.RandomState(0), macro=space.small_macro())


@pytest.mark.parametrize("name", SPACES)
def test_yaml_round_trip_builds_an_identical_network(name, tmp_path):
    space = get_space(name)
    g = space.sample(np.random.RandomState(5), macro=space.small_macro())
    save_genotype(tmp_path / "g.yaml", g)
    loaded = load_genotype(tmp_path / "g.yaml")
    assert loaded == g and loaded.key() == g.key()
    torch.manual_seed(1)
    a = build_model(g)
    torch.manual_seed(1)
    b = build_model(loaded)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)
    x = torch.randn(1, g.macro["in_channels"], *(2 ** a.depth + 1,) * 3)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_yaml_layout(tmp_path):
    g = lenas_genotype()
    save_genotype(tmp_path / "g.yaml", g)
    raw = yaml.safe_load((tmp_path / "g.yaml").read_text())
    assert list(raw) == ["space", "version", "choices", "macro"]
    assert raw["space"] == "lenas" and raw["version"] == 1 and raw["choices"]["down.op1"] == g.choices["down.op1"]
    assert raw["macro"] == {"in_channels": 10, "out_channels": 1, "stem": 4, "widths": [8, 16]}


def test_missing_macro_takes_the_space_defaults():
    g = lenas_genotype().to_dict()
    del g["macro"]
    assert genotype_from_dict(g).macro == get_space("lenas").default_macro()


def test_key_is_hashable_and_tells_genotypes_apart():
    g = lenas_genotype()
    same = genotype_from_dict(g.to_dict())
    other = get_space("lenas").mutate(g, np.random.RandomState(0))
    smaller = genotype_from_dict({**g.to_dict(), "macro": {"stem": 2, "widths": [8, 16]}})
    assert len({g.key(), same.key(), other.key(), smaller.key()}) == 3


def _edit(d: dict, path: str, value) -> dict:
    """Set (or, with value None, delete) one dotted key of a genotype dict; slot keys keep their dots."""
    top, _, rest = path.partition("/")
    if not rest:
        d.pop(top) if value is None else d.__setitem__(top, value)
    else:
        d[top].pop(rest) if value is None else d[top].__setitem__(rest, value)
    return d


@pytest.mark.parametrize("path,value,match", [
    ("space", "lenas_v9", "unknown search space 'lenas_v9'"),
    ("version", 2, "space 'lenas' version 2 is not supported"),
    ("version", "1", "'version' must be an integer"),
    ("choices/up.up", None, "missing slot 'up.up'"),
    ("choices/up.op3", "conv", "unknown slot 'up.op3'"),
    ("choices/down.down", "up_conv", r"slot 'down.down': 'up_conv' is not allowed \(allowed: avg_pool"),
    ("choices/down.op2", "zero", "slot 'down.op2': 'zero' is not allowed"),
    ("choices/up.connect", 1, "slot 'up.connect': 1 is not allowed"),
    ("macro/stem", "16", "macro 'stem' must be a positive integer"),
    ("macro/widths", 32, "macro 'widths' must be a non-empty list"),
    ("macro/width", 32, "unknown macro key 'width'"),
    ("choices", ["conv"], "'choices' must be a mapping"),
    ("extra", 1, "unknown genotype key 'extra'"),
])
def test_loading_errors_name_the_file_and_the_problem(tmp_path, path, value, match):
    d = _edit(lenas_genotype().to_dict(), path, value)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(NasDoseError, match=r"bad\.yaml: " + match):
        load_genotype(tmp_path / "bad.yaml")


def test_loading_a_non_mapping_or_missing_file(tmp_path):
    (tmp_path / "list.yaml").write_text("- conv\n")
    with pytest.raises(NasDoseError, match="list.yaml: a genotype must be a mapping"):
        load_genotype(tmp_path / "list.yaml")
    with pytest.raises(NasDoseError, match="nope.yaml: file not found"):
        load_genotype(tmp_path / "nope.yaml")
