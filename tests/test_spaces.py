"""Every registered search space: NNI mutable, sampling, validation, building, mutation, plugins."""
from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from nni.mutable import Categorical, MutableDict  # after nas_dose: NNI_FRAMEWORK=none

from nas_dose.errors import NasDoseError
from nas_dose.search_spaces import (
    CellUNet,
    SearchSpace,
    build_model,
    cell_slots,
    count_flops,
    count_params,
    genotype_from_dict,
    get_op,
    get_space,
    import_plugins,
    list_ops,
    list_spaces,
)
from nas_dose.search_spaces import ops as ops_module
from nas_dose.search_spaces import space as space_module

# every space nasdose ships (other test modules register toy spaces of their own)
SPACES = [n for n in list_spaces() if type(get_space(n)).__module__.startswith("nas_dose.")]




def small_sample(name: str, seed: int = 0):
    space = get_space(name)
    return space, space.sample(np.random.RandomState(seed), macro=space.small_macro())


def test_builtin_spaces_are_registered():
    assert {"lenas", "lenas_levels"} <= set(SPACES)


@pytest.mark.parametrize("name", SPACES)
def test_mutable_is_a_freezable_nni_space(name):
    space = get_space(name)
    mutable = space.mutable()
    assert isinstance(mutable, MutableDict)
    for slot, candidates in space.slots().items():
        assert isinstance(mutable[slot], Categorical) and mutable[slot].label == slot
        assert list(mutable[slot].values) == candidates
    sample = mutable.random(random_state=np.random.RandomState(3))
    g = space.genotype(sample)
    assert g.choices == mutable.freeze(sample) and g.space == name and g.version == space.version


@pytest.mark.parametrize("name", SPACES)
def test_op_slot_candidates_are_registered_ops_of_the_slot_kind(name):
    space = get_space(name)
    slots = space.slots()
    op_slots = space.op_slots()
    kind = {"op1": "cell", "op2": "cell", "connect": "connect", "down": "down", "up": "up"}
    for slot in op_slots:
        for op in slots[slot]:
            assert kind[slot.rsplit(".", 1)[1]] in get_op(op).kinds, (slot, op)
    assert set(slots) - set(op_slots) == set(space.default_choices())


def test_lenas_has_75000_architectures():
    space = get_space("lenas")
    slots = space.slots()
    assert list(slots) == cell_slots("down", "down") + cell_slots("up", "up")
    assert math.prod(len(slots[s]) for s in cell_slots("down", "down")) == 300
    assert math.prod(len(slots[s]) for s in cell_slots("up", "up")) == 250
    grid = {tuple(sample.values()) for sample in space.mutable().grid()}
    assert space.size() == len(grid) == 75_000


def test_lenas_levels_has_per_level_cells_width_and_depth():
    space = get_space("lenas_levels")
    slots = space.slots()
    assert {"enc0.op1", "enc3.down", "dec0.up", "dec3.connect", "width", "depth"} <= set(slots)
    assert "width" not in space.op_slots() and "depth" not in space.op_slots()
    assert {"conv_k5", "dep_conv_k5", "res_conv"} <= set(slots["enc0.op1"]) and "zero" in slots["dec2.op2"]
    assert space.default_choices() == {"width": 100, "depth": 4}


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("seed", [0, 1])
def test_built_network_shapes_at_even_and_odd_sizes(name, seed):
    space, g = small_sample(name, seed)
    torch.manual_seed(0)
    net = build_model(g)
    assert isinstance(net, torch.nn.Module)
    d = net.depth
    for size in [(2 ** d + 1,) * 3, (2 ** d + 2,) * 3, (2 ** d + 1, 2 ** d + 2, 2 ** d + 4)]:
        x = torch.randn(1, g.macro["in_channels"], *size)
        assert net(x).shape == (1, g.macro["out_channels"], *size)
    with pytest.raises(NasDoseError, match="too small"):
        net(torch.randn(1, g.macro["in_channels"], 2 ** d, 2 ** d, 2 ** d))


@pytest.mark.parametrize("name", SPACES)
def test_built_network_is_plain_torch_and_trains(name):
    space, g = small_sample(name, 2)
    torch.manual_seed(0)
    net = build_model(g)
    assert not [type(m) for m in net.modules() if type(m).__module__.startswith("nni")]
    x = torch.randn(1, g.macro["in_channels"], *(2 ** net.depth + 1,) * 3)
    net(x).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_lenas_network_exports_with_torch_export():
    space = get_space("lenas")
    g = space.genotype({"down.op1": "se_conv", "down.op2": "dep_conv", "down.connect": "identity",
                        "down.down": "down_dil_conv", "up.op1": "dil_conv", "up.op2": "conv",
                        "up.connect": "none", "up.up": "up_dil_conv"}, space.small_macro())
    net = build_model(g).eval()
    x = torch.randn(1, 10, 7, 8, 9)
    exported = torch.export.export(net, (x,))
    torch.testing.assert_close(exported.module()(x), net(x))


def test_lenas_macro_is_the_trained_lenas_network():
    space = get_space("lenas")
    assert space.default_macro() == {"in_channels": 10, "out_channels": 1, "stem": 16, "widths": [32, 64, 128, 256]}
    g = space.genotype({s: c[-1] for s, c in space.slots().items()})
    net = space.construct(g.choices, g.macro, lambda slot, kind, c_in, c_out: torch.nn.Identity())
    assert isinstance(net, CellUNet) and net.depth == 4 and len(net.encoder) == len(net.decoder) == 4
    assert [c.pre[0].out_channels for c in net.encoder] == [16, 32, 64, 128]
    assert [c.pre[0].out_channels for c in net.decoder] == [32, 64, 128, 256]


def test_params_and_flops_at_any_input_size():
    space = get_space("lenas")
    no_se = {s: next(c for c in cands if "se_" not in c) for s, cands in space.slots().items()}
    net = build_model(space.genotype(no_se, space.small_macro()))  # SE gates cost the same at any size
    flops = [count_flops(net, (1, 10, n, n, n)) for n in (8, 16, 128)]
    assert flops[1] == 8 * flops[0] and flops[2] == 512 * flops[1]
    assert count_params(net) == sum(p.numel() for p in net.parameters()) > 0


def test_width_and_depth_slots_change_the_network():
    space = get_space("lenas_levels")
    base = {s: c[0] for s, c in space.slots().items() if s not in ("width", "depth")}
    params = {}
    for width, depth in [(100, 4), (50, 4), (100, 2)]:
        net = space.build(space.genotype({**base, "width": width, "depth": depth}, space.small_macro()))
        params[width, depth] = count_params(net)
        assert net.depth == depth
    assert params[50, 4] < params[100, 4] and params[100, 2] < params[100, 4]


@pytest.mark.parametrize("name", SPACES)
def test_sampling_is_reproducible_and_covers_the_candidates(name):
    space = get_space(name)
    a = [space.sample(np.random.RandomState(7)).choices for _ in range(2)]
    assert a[0] == a[1]
    seen = {space.sample(np.random.RandomState(s)).choices[space.op_slots()[0]] for s in range(60)}
    assert seen == set(space.slots()[space.op_slots()[0]])


@pytest.mark.parametrize("name", SPACES)
def test_mutate_changes_exactly_one_active_slot_and_distance_counts_it(name):
    space, g = small_sample(name)
    n_slots = len(space.slots())
    rng = np.random.RandomState(0)
    for _ in range(30):
        m = space.mutate(g, rng)
        changed = [s for s in g.choices if g.choices[s] != m.choices[s]]
        # a depth changed also changes the levels it brings into use or out of it (lenas_levels)
        kept = set(space.active_slots(g)) & set(space.active_slots(m))
        moved = [s for s in changed if s in kept]
        assert len(moved) == 1 and moved[0] in space.active_slots(g)
        assert space.distance(g, m) == space.distance(m, g) == pytest.approx(len(changed) / n_slots)
        assert m == space.canonical(m) and m.macro == g.macro
        g = m
    assert space.distance(g, g) == 0.0
    other = space.genotype({s: next(c for c in cands if c != g.choices[s]) for s, cands in space.slots().items()})
    differ = [s for s in space.slots() if g.choices[s] != other.choices[s]]  # lenas: all of them
    assert space.distance(g, other) == len(differ) / n_slots and set(space.active_slots(other)) <= set(differ)


def test_lenas_levels_mutation_skips_levels_below_the_depth():
    space = get_space("lenas_levels")
    g = space.genotype({**{s: c[0] for s, c in space.slots().items()}, "depth": 2})
    active = space.active_slots(g)
    assert "enc1.op1" in active and "enc2.op1" not in active and "dec3.up" not in active and "width" in active


def test_lenas_levels_genotypes_of_one_network_are_one_genotype():
    """The cells of levels beyond the depth are unused: made, loaded or mutated, a genotype holds
    their first candidates, so genotypes that build one network are equal (one key)."""
    space = get_space("lenas_levels")
    base = {s: c[0] for s, c in space.slots().items()}
    g = space.genotype({**base, "depth": 2})
    hidden = space.genotype({**base, "depth": 2, "enc3.op1": "conv", "dec2.up": "up_conv"})
    assert hidden == g and hidden.key() == g.key()
    assert genotype_from_dict({**g.to_dict(), "choices": {**g.choices, "enc2.op2": "conv"}}) == g
    assert space.genotype({**base, "depth": 2, "enc1.op1": "conv"}) != g  # a level in use
    deep = {**base, "depth": 4}
    assert space.genotype({**deep, "enc3.op1": "conv"}) != space.genotype(deep)  # depth 4 uses level 3
    rng = np.random.RandomState(0)
    made = [space.sample(rng) for _ in range(20)] + [space.mutate(g, rng) for _ in range(300)]
    assert {x.choices["depth"] for x in made} == {2, 3, 4}
    for x in made:
        unused = set(space.slots()) - set(space.active_slots(x))
        assert all(x.choices[s] == base[s] for s in unused)
    # a mutation to a deeper network draws the cells of its new levels, as a sample does
    deeper = [x for x in made[20:] if x.choices["depth"] == 4]
    assert deeper and len({(x.choices["enc3.op1"], x.choices["dec2.up"]) for x in deeper}) > 1


@pytest.mark.parametrize("choices,match", [
    ({"down.op1": "avg_pool"}, r"slot 'down.op1': 'avg_pool' is not allowed \(allowed: identity, se_conv"),
    ({"up.up": "conv_k5"}, r"slot 'up.up': 'conv_k5' is not allowed"),
    ({"down.connect": True}, r"slot 'down.connect': True is not an op name"),
    ({"typo.op1": "conv"}, r"unknown slot 'typo.op1'"),
])
def test_validation_errors_name_the_slot_and_op(choices, match):
    space = get_space("lenas")
    good = {s: c[0] for s, c in space.slots().items()}
    with pytest.raises(NasDoseError, match=match):
        space.genotype({**good, **choices}, source="g.yaml")


def test_validation_reports_a_missing_slot():
    space = get_space("lenas")
    choices = {s: c[0] for s, c in space.slots().items()}
    del choices["up.connect"]
    with pytest.raises(NasDoseError, match="missing slot 'up.connect'"):
        space.genotype(choices)


@pytest.mark.parametrize("macro,match", [
    ({"depth": 3}, "unknown macro key 'depth'"),
    ({"stem": 0}, "macro 'stem' must be a positive integer"),
    ({"stem": True}, "macro 'stem' must be a positive integer"),
    ({"widths": []}, "macro 'widths' must be a non-empty list"),
    ({"widths": [8, "16"]}, "macro 'widths' must be a non-empty list"),
])
def test_macro_errors(macro, match):
    with pytest.raises(NasDoseError, match=match):
        get_space("lenas").check_macro(macro)


def test_lenas_levels_needs_four_widths():
    with pytest.raises(NasDoseError, match="'widths' must have 4 entries"):
        get_space("lenas_levels").check_macro({"widths": [8, 16]})


def test_unknown_space_and_bad_import_paths():
    with pytest.raises(NasDoseError, match="unknown search space 'nope'"):
        get_space("nope")
    with pytest.raises(NasDoseError, match="cannot import module 'no_such_module_xyz'"):
        get_space("no_such_module_xyz:Space")
    with pytest.raises(NasDoseError, match="is not a SearchSpace subclass"):
        get_space("nas_dose.search_spaces.ops:Zero")
    with pytest.raises(NasDoseError, match="cannot import"):
        import_plugins(["no_such_module_xyz"])


PLUGIN = '''
import torch.nn as nn
from nas_dose.search_spaces import CellUNet, SearchSpace, register_op, register_space
from nas_dose.search_spaces.ops import conv_op


@register_op("plugin_conv_k1", "cell")
def plugin_conv_k1(c_in, c_out):
    """1x1x1 conv."""
    return conv_op(c_in, c_out, kernel=1)


class TinySpace(SearchSpace):
    def slots(self):
        return {"down.op1": ["plugin_conv_k1", "conv"], "down.op2": ["identity"], "down.connect": ["none"],
                "down.down": ["max_pool"], "up.op1": ["identity"], "up.op2": ["plugin_conv_k1"],
                "up.connect": ["identity"], "up.up": ["up_conv"]}

    def default_macro(self):
        return {"in_channels": 2, "out_channels": 1, "stem": 2, "widths": [4]}

    def construct(self, choices, macro, make):
        return CellUNet(macro, ["down"], ["up"], make)


register_space("tiny_plugin")(type("RegisteredTinySpace", (TinySpace,), {}))
'''


def test_plugins_add_ops_and_spaces_from_outside_the_package(tmp_path, monkeypatch):
    (tmp_path / "my_nas_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    for reg in (ops_module.OPS, space_module.SPACES):  # the registries are restored afterwards
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    import_plugins(["my_nas_plugin"])
    assert "plugin_conv_k1" in list_ops("cell") and "tiny_plugin" in list_spaces()

    by_path = get_space("my_nas_plugin:TinySpace")  # not registered: named by its import path
    assert isinstance(by_path, SearchSpace) and by_path.name == "my_nas_plugin:TinySpace"
    g = by_path.sample(np.random.RandomState(0))
    assert g.space == "my_nas_plugin:TinySpace" and by_path.size() == 2
    assert build_model(g)(torch.randn(1, 2, 5, 6, 7)).shape == (1, 1, 5, 6, 7)
    registered = get_space("tiny_plugin")
    assert registered.name == "tiny_plugin" and registered.op_slots() == list(registered.slots())
    g = registered.genotype({**g.choices, "down.op1": "plugin_conv_k1"})
    assert build_model(g).encoder[0].op1[0].kernel_size == (1, 1, 1)
    sys.modules.pop("my_nas_plugin", None)
