"""Member selection and weighting on hand-made validation predictions (no network)."""
import numpy as np
import pytest

from nas_dose.config import ConfigError, load_config
from nas_dose.scores import dose_error
from nas_dose.search_spaces import get_space
from nas_dose.selection import (
    SelectionConfig,
    ValidationPredictions,
    diversity_matrices,
    diversity_order,
    fit_weights,
    greedy_order,
    leave_one_patient_out,
    mean_weights,
    select,
)

SHAPE = (4, 4, 4)


def make_vp(refs: list[np.ndarray], members: list[list[np.ndarray]], masks: list[np.ndarray] | None = None,
            ) -> ValidationPredictions:
    """members[m][p]: member m's dose for patient p; the mask is everywhere unless given."""
    masks = masks or [np.ones(SHAPE, bool)] * len(refs)
    names = [f"m{i}" for i in range(len(members))]
    return ValidationPredictions.from_patients(
        names, ((f"pt_{p}", refs[p], masks[p], [m[p] for m in members]) for p in range(len(refs))))


def refs_(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 70, SHAPE).astype(np.float64) for _ in range(n)]  # exact in float32


def genotypes(n: int) -> list:
    space = get_space("lenas")
    out, seen, seed = [], set(), 0
    while len(out) < n:
        g = space.sample(np.random.RandomState(seed))
        seed += 1
        if g.key() not in seen:
            seen.add(g.key())
            out.append(g)
    return out


def test_scores_match_the_official_dose_error_on_the_whole_grid():
    refs = refs_(2)
    mask = np.zeros(SHAPE, bool)
    mask[1:3] = True
    refs[1] = refs[1] * mask
    refs[1][0, 0, 0] = 5.0  # reference dose outside the mask: counted by the official score
    a = [r * mask * 0.9 for r in refs]
    b = [r * mask * 1.2 for r in refs]
    vp = make_vp(refs, [a, b], [mask, mask])
    w = np.array([0.25, 0.75])
    expected = np.mean([dose_error(0.25 * a[p] + 0.75 * b[p], refs[p], mask) for p in range(2)])
    assert vp.dose_score(w) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(vp.full_dose(w, 1), 0.25 * a[1] + 0.75 * b[1], rtol=1e-6)
    assert vp.preds[1].shape[1] == mask.sum() + 1  # masked voxels plus the one with a reference dose


def test_greedy_pairs_opposite_biases_over_more_accurate_members():
    refs = refs_(3)
    best = [r + 2.0 for r in refs]  # the best single member: +2 Gy everywhere
    second = [r + 2.5 for r in refs]  # second best, biased the same way
    low = [r - 2.75 for r in refs]  # worse alone, biased the other way
    vp = make_vp(refs, [second, low, best])
    np.testing.assert_allclose(vp.member_scores(), [2.5, 2.75, 2.0])
    order = greedy_order(vp, max_size=3, replacement=False)
    assert order == [2, 1, 0]  # best, then the complementary member, not the second best
    assert vp.dose_score(mean_weights(order[:2], 3)) == pytest.approx(0.375)  # |2 - 2.75| / 2
    assert vp.dose_score(mean_weights([2, 0], 3)) == pytest.approx(2.25)  # the two most accurate
    sel = select(vp, SelectionConfig(method="greedy", max_size=3, replacement=False), genotypes(3))
    assert vp.dose_score(mean_weights(order, 3)) == pytest.approx(1.75 / 3, rel=1e-5)  # float32 sums
    assert sel.size == 2  # the third pick makes it worse: the best prefix is kept
    np.testing.assert_allclose(sel.weights, [0.0, 0.5, 0.5])


def test_greedy_with_replacement_weights_by_multiplicity():
    refs = refs_(2)
    vp = make_vp(refs, [[r + 2.0 for r in refs], [r - 3.0 for r in refs]])
    # +2, then -3 (mean -0.5), then +2 again: (2 + 2 - 3) / 3 = 1/3 beats (2 - 3 - 3) / 3
    order = greedy_order(vp, max_size=3, replacement=True)
    assert order == [0, 1, 0]
    np.testing.assert_allclose(mean_weights(order, 2), [2 / 3, 1 / 3])
    assert vp.dose_score(mean_weights(order, 2)) == pytest.approx(1 / 3, rel=1e-5)
    assert greedy_order(vp, max_size=5, replacement=False) == [0, 1]


def test_fit_recovers_known_mixing_weights():
    rng = np.random.default_rng(1)
    refs, members = [], [[], [], []]
    for _ in range(3):
        a, b, c = (rng.uniform(0, 70, SHAPE) for _ in range(3))
        refs.append(0.7 * a + 0.3 * b)
        for m, x in zip(members, (a, b, c)):
            m.append(x)
    vp = make_vp(refs, members)
    w = fit_weights(vp, [0, 1, 2])
    np.testing.assert_allclose(w, [0.7, 0.3, 0.0], atol=1e-6)
    assert vp.dose_score(w) == pytest.approx(0.0, abs=1e-4)
    assert fit_weights(vp, [1, 2])[0] == 0.0  # an unselected member gets no weight


def test_fitted_weights_are_non_negative_sum_to_one_and_beat_plain_means():
    rng = np.random.default_rng(2)
    refs = refs_(4, seed=3)
    members = [[1.1 * r + rng.normal(0, 3, SHAPE) for r in refs],  # overdoses by 10%
               [80.0 - r for r in refs],  # anti-correlated with the reference
               [r + rng.normal(0, 5, SHAPE) for r in refs]]
    members.append([x.copy() for x in members[2]])  # a duplicate: a singular Gram matrix
    vp = make_vp(refs, members)
    w = fit_weights(vp, range(4))
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert w[2] == pytest.approx(w[3])
    assert w[1] < 0.1
    assert vp.dose_score(w) < vp.member_scores().min()
    assert vp.dose_score(w) < vp.dose_score(mean_weights([0, 2], 4))


def test_leave_one_out_uses_no_held_out_patient_and_is_not_optimistic():
    rng = np.random.default_rng(4)
    refs = refs_(6, seed=5)
    # the best mix differs from patient to patient: a fit on all patients flatters itself
    members = [[r + rng.normal(s, 4, SHAPE) for r, s in zip(refs, rng.normal(0, 3, 6))] for _ in range(3)]
    vp = make_vp(refs, members)
    fit_all = lambda v: fit_weights(v, range(3))  # noqa: E731
    loo = leave_one_patient_out(vp, fit_all)
    assert loo.shape == (6, 3)
    np.testing.assert_allclose(loo[2], fit_weights(vp.subset([0, 1, 3, 4, 5]), range(3)))
    in_sample = vp.dose_score(fit_all(vp))
    held_out = vp.dose_score(loo)
    assert held_out > in_sample
    # changing a patient's reference changes every fit but its own held-out one
    changed = make_vp([r + 5 if i == 2 else r for i, r in enumerate(refs)], members)
    loo2 = leave_one_patient_out(changed, fit_all)
    np.testing.assert_allclose(loo2[2], loo[2])
    assert not np.allclose(loo2[0], loo[0])
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_patient_out(vp.subset([0]), fit_all)


def test_diversity_selection_prefers_the_diverse_member_at_equal_accuracy():
    rng = np.random.default_rng(6)
    refs = refs_(3, seed=7)
    noise = [rng.integers(-4, 5, SHAPE).astype(np.float64) for _ in refs]
    first = [r + n for r, n in zip(refs, noise)]
    twin = [r + n for r, n in zip(refs, noise)]  # the same errors: adds nothing to `first`
    mirror = [r - n for r, n in zip(refs, noise)]  # the same accuracy, opposite errors
    vp = make_vp(refs, [first, twin, mirror])
    scores = vp.member_scores()
    assert scores[0] == scores[1] == scores[2] > 1.0
    gens = genotypes(3)
    m = diversity_matrices(vp, gens)
    assert m["disagreement"][0, 1] == 0.0 and m["disagreement"][0, 2] > 0.1
    assert m["error_correlation"][0, 1] == pytest.approx(1.0)
    assert m["error_correlation"][0, 2] == pytest.approx(-1.0)
    assert diversity_order(vp, gens, 3, lam=0.5) == [0, 2, 1]
    assert diversity_order(vp, gens, 3, lam=0.0)[:2] == [0, 1]  # accuracy alone: ties go in order
    sel = select(vp, SelectionConfig(method="diversity", max_size=3, lam=0.5), gens, m)
    assert (sel.order, sel.size) == ([0, 2, 1], 2)
    assert vp.dose_score(sel.weights) == pytest.approx(0.0, abs=1e-5)  # opposite errors cancel


def test_all_keeps_every_member_best_first_and_weighted_prefixes():
    refs = refs_(2)
    vp = make_vp(refs, [[r + 3.0 for r in refs], [r - 1.0 for r in refs], [r * 1.1 for r in refs]])
    sel = select(vp, SelectionConfig(method="all", combination="weighted"), genotypes(3))
    assert sel.order == [1, 0, 2] and sel.size == 3  # scores 1, 3 and about 4 Gy
    assert len(sel.prefix_weights) == 3
    np.testing.assert_allclose(sel.prefix_weights[0], [0, 1, 0])
    assert sel.weights.sum() == pytest.approx(1.0) and np.all(sel.weights >= 0)
    assert vp.dose_score(sel.weights) < vp.dose_score(mean_weights(sel.order, 3))


def test_selection_config_is_validated():
    with pytest.raises(ConfigError, match="max_size"):
        load_config(SelectionConfig, overrides=["max_size=0"])
    with pytest.raises(ConfigError, match="method"):
        load_config(SelectionConfig, overrides=["method=best"])
