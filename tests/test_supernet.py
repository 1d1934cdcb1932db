"""The supernet: softmax mixing, Gumbel single paths, fixed paths equal to built networks, argmax."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_spaces import SPACES

from nas_dose.errors import NasDoseError
from nas_dose.search_spaces import MixedOp, Supernet, get_space


def small_supernet(name: str, **kw):
    space = get_space(name)
    fixed = {"depth": 2} if "depth" in space.slots() else {}  # the smallest network: fast, 5-voxel inputs
    return space, Supernet(space, space.small_macro(), fixed=fixed, **kw)


def input_for(sn, size_offset: int = 1) -> torch.Tensor:
    n = 2 ** sn.net.depth + size_offset
    return torch.randn(1, sn.macro["in_channels"], n, n + 1, n + 2)


def mixed_ops(sn) -> list[MixedOp]:
    return [m for m in sn.modules() if isinstance(m, MixedOp)]


@pytest.mark.parametrize("name", SPACES)
def test_structure_and_initial_state(name):
    space, sn = small_supernet(name)
    assert set(sn.mixed_slots) <= set(space.op_slots()) and sn.mixed_slots
    assert not set(sn.mixed_slots) & set(space.slots()) - set(space.op_slots())
    assert all(not a.any() for a in sn.arch_parameters())
    for slot, w in sn.arch_weights().items():
        assert w == pytest.approx([1 / len(space.slots()[slot])] * len(space.slots()[slot]))
    arch, weights = sn.arch_parameters(), sn.weight_parameters()
    assert len(arch) + len(weights) == len(list(sn.parameters()))
    assert not {id(p) for p in arch} & {id(p) for p in weights}
    x = input_for(sn)
    assert sn(x).shape == (1, 1, *x.shape[2:])
    assert all(m.weights is None and m.index is None for m in mixed_ops(sn))  # nothing kept after a step


def test_lenas_mixes_all_eight_slots_shared_across_levels():
    space, sn = small_supernet("lenas")
    assert sn.mixed_slots == space.op_slots() and len(sn.alphas) == 8
    per_slot = {}
    for m in mixed_ops(sn):
        per_slot[m.slot] = per_slot.get(m.slot, 0) + 1
    assert per_slot == {s: 2 for s in space.op_slots()}  # 2 levels, one α per slot


def test_softmax_output_is_the_alpha_weighted_sum_of_candidates():
    torch.manual_seed(0)
    _, sn = small_supernet("lenas")
    with torch.no_grad():
        for a in sn.alphas:
            a.normal_()
    seen = {}
    targets = {m.slot: m for m in mixed_ops(sn) if m.slot in ("down.op1", "up.up")}
    for slot, m in targets.items():
        m.register_forward_hook(lambda mod, args, out, slot=slot: seen.__setitem__(slot, (args, out)))
    sn(input_for(sn))
    for slot, m in targets.items():
        args, out = seen[slot]
        w = F.softmax(sn.alphas[sn.mixed_slots.index(slot)], -1)
        expected = sum(wi * op(*args) for wi, op in zip(w, m.candidates.values()))
        torch.testing.assert_close(out, expected)


def test_gumbel_runs_one_sampled_path_per_slot_and_trains_alpha():
    torch.manual_seed(0)
    _, sn = small_supernet("lenas", mode="gumbel", tau=0.5)
    calls: list[tuple[str, int, int]] = []  # (slot, mixed op id, candidate index)
    for m in mixed_ops(sn):
        for i, op in enumerate(m.candidates.values()):
            op.register_forward_hook(lambda mod, a, o, m=m, i=i: calls.append((m.slot, id(m), i)))
    for _ in range(3):
        calls.clear()
        sn(input_for(sn)).square().mean().backward()
        assert len(calls) == len(mixed_ops(sn))  # one candidate per MixedOp
        assert len({(mid) for _, mid, _ in calls}) == len(calls)
        for slot in sn.mixed_slots:
            assert len({i for s, _, i in calls if s == slot}) == 1  # the same path at every level
    assert all(a.grad is not None for a in sn.alphas) and sum(a.grad.abs().sum() for a in sn.alphas) > 0


@pytest.mark.parametrize("name", SPACES)
def test_fixed_path_equals_the_built_network_with_inherited_weights(name):
    torch.manual_seed(0)
    space, sn = small_supernet(name)
    g = space.genotype({**space.sample(np.random.RandomState(4)).choices, **sn.fixed}, sn.macro)
    x = input_for(sn)
    mixed_out = sn(x)
    sn.fix(g)
    fixed_out = sn(x)
    net = sn.subnet(g)  # space.build(g) + the supernet's weights for g's ops (strict load)
    assert set(net.state_dict()) == set(space.build(g).state_dict())
    torch.testing.assert_close(net(x), fixed_out)
    assert not torch.allclose(fixed_out, mixed_out)
    sn.fix(None)
    torch.testing.assert_close(sn(x), mixed_out)


def test_genotype_takes_the_strongest_op_per_slot():
    space, sn = small_supernet("lenas_levels")
    slots = space.slots()
    expected = {}
    with torch.no_grad():
        for k, (slot, a) in enumerate(zip(sn.mixed_slots, sn.alphas)):
            a[(k + 1) % len(a)] = 2.0
            expected[slot] = slots[slot][(k + 1) % len(a)]
    g = sn.genotype()
    assert {s: g.choices[s] for s in sn.mixed_slots} == expected
    assert g.choices["depth"] == 2 and g.choices["width"] == 100 and g.macro == sn.macro
    assert g.choices["enc3.op1"] == slots["enc3.op1"][0]  # below the fixed depth: unused, first candidate
    space.validate(g)


def test_fixed_slots_are_not_mixed_and_must_match():
    space = get_space("lenas")
    sn = Supernet(space, space.small_macro(), fixed={"down.down": "max_pool"})
    assert "down.down" not in sn.mixed_slots and len(sn.alphas) == 7
    g = sn.genotype()
    assert g.choices["down.down"] == "max_pool"
    with pytest.raises(NasDoseError, match="slot 'down.down' is fixed to 'max_pool'"):
        sn.fix(space.genotype({**g.choices, "down.down": "avg_pool"}, g.macro))
    with pytest.raises(NasDoseError, match="macro"):
        sn.fix(space.genotype(g.choices, {"stem": 2, "widths": [8, 16]}))
    with pytest.raises(NasDoseError, match="slot 'down.down': 'conv' is not allowed"):
        Supernet(space, fixed={"down.down": "conv"})
    with pytest.raises(NasDoseError, match="mode must be one of"):
        sn.mode = "hard"


@pytest.mark.parametrize("mode", ["softmax", "gumbel"])
def test_supernet_weights_and_alphas_learn(mode):
    torch.manual_seed(0)
    _, sn = small_supernet("lenas", mode=mode)
    x = input_for(sn)
    target = x[:, :1].clone()
    opt = torch.optim.Adam(sn.parameters(), lr=1e-2)
    losses = []
    for _ in range(30 if mode == "softmax" else 60):  # a Gumbel step trains one path only
        loss = F.mse_loss(sn(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert any(a.abs().sum() > 0 for a in sn.alphas)
