from dataclasses import dataclass

import numpy as np
import pytest
import torch

from nas_dose.config import ConfigError, from_dict
from nas_dose.pool import Candidate
from nas_dose.pool.diversity import (
    DiversityConfig,
    diversity_hinge,
    diversity_key,
    error_correlation,
    prediction_disagreement,
    select_pool,
)

A = np.array([1.0, 2.0, 3.0, 4.0])
B = np.array([1.0, 2.0, 5.0, 0.0])
MASK = np.array([1, 1, 1, 0], dtype=bool)


def test_disagreement_hand_computed():
    # inside the mask: sum|a-b| = 2, sum(a+b) = 14 -> 2 * 2 / 14
    assert prediction_disagreement(A, B, MASK) == pytest.approx(2 / 7)
    # the masked-out voxel counts once it is inside: sum|a-b| = 6, sum(a+b) = 18
    assert prediction_disagreement(A, B, np.ones(4, bool)) == pytest.approx(2 / 3)
    assert prediction_disagreement(A, B, MASK) == prediction_disagreement(B, A, MASK)


def test_identical_predictions_do_not_disagree():
    x = np.random.default_rng(0).random((4, 5, 6))
    assert prediction_disagreement(x, x.copy(), x > 0.3) == 0.0
    assert prediction_disagreement(np.zeros(3), np.zeros(3), np.ones(3, bool)) == 0.0


def test_hinge_value_and_gradient():
    pred = torch.tensor(A[None], requires_grad=True)
    ref = torch.tensor(B[None])
    mask = torch.tensor(MASK[None], dtype=torch.float64)
    assert diversity_hinge(pred, ref, mask, margin=0.2).item() == 0.0  # 2/7 > 0.2: far enough
    hinge = diversity_hinge(pred, ref, mask, margin=0.5)
    assert hinge.item() == pytest.approx(0.5 - 2 / 7)
    hinge.backward()
    # d/dp of -(2 D / S), D = sum|p-r| = 2, S = sum(|p|+|r|) = 14, sign(p-r) = (0, 0, -1, .)
    expected = np.array([4.0, 4.0, 32.0, 0.0]) / 196.0
    np.testing.assert_allclose(pred.grad[0].numpy(), expected, rtol=1e-6)


def test_hinge_is_batch_mean_of_samples():
    pred = torch.tensor(np.stack([A, A]))
    ref = torch.tensor(np.stack([B, A]))  # second sample identical: hinge = margin
    mask = torch.tensor(np.stack([MASK, MASK]))
    assert diversity_hinge(pred, ref, mask, margin=0.5).item() == pytest.approx(((0.5 - 2 / 7) + 0.5) / 2)


def test_error_correlation_signs():
    rng = np.random.default_rng(1)
    target = rng.random(50)
    err = rng.normal(size=50)
    mask = np.ones(50, bool)
    assert error_correlation(target + err, target + 2 * err, target, mask) == pytest.approx(1.0)
    assert error_correlation(target + err, target - 3 * err, target, mask) == pytest.approx(-1.0)
    other = rng.normal(size=50)
    expected = np.corrcoef(err[:30], other[:30])[0, 1]
    mask[30:] = False
    assert error_correlation(target + err, target + other, target, mask) == pytest.approx(expected)
    assert np.isnan(error_correlation(target, target + err, target, mask))


@dataclass
class _G:
    """Stand-in genotype: select_pool only needs key()."""
    name: str

    def key(self) -> str:
        return self.name


def _cands(scores, names=None):
    names = names or [f"g{i}" for i in range(len(scores))]
    return [Candidate(_G(n), s) for n, s in zip(names, scores)]


def test_select_pool_trades_accuracy_for_diversity():
    # 0 and 1 predict almost alike; 2 is less accurate but far from 0; 3 is far but inaccurate.
    dis = np.array([[0.0, 0.01, 0.5, 0.6],
                    [0.01, 0.0, 0.5, 0.6],
                    [0.5, 0.5, 0.0, 0.3],
                    [0.6, 0.6, 0.3, 0.0]])
    cands = _cands([1.0, 1.1, 1.2, 2.0])
    m = {"disagreement": dis, "genotype_distance": np.ones((4, 4))}
    # acc = 1, 0.909, 0.833, 0.5; after 0: 1 -> 0.909 + 0.5*0.01/0.6, 2 -> 0.833 + 0.5*0.5/0.6 = 1.25
    assert select_pool(cands, 2, 0.5, m) == [0, 2]
    assert select_pool(cands, 2, 0.0, m) == [0, 1]  # accuracy only
    # third: 1 -> 0.909 + 0.5*(0.01+0.5)/2/0.6 = 1.122; 3 -> 0.5 + 0.5*(0.6+0.3)/2/0.6 = 0.875
    assert select_pool(cands, 3, 0.5, m) == [0, 2, 1]
    assert select_pool(cands, 9, 0.5, m) == [0, 2, 1, 3]


def test_select_pool_skips_duplicate_genotypes_and_bad_scores():
    cands = _cands([1.0, 0.9, float("nan"), 1.5], names=["a", "a", "b", "c"])
    m = {"disagreement": np.full((4, 4), np.nan), "genotype_distance": np.array(
        [[0, 0, 1, 2], [0, 0, 1, 2], [1, 1, 0, 1], [2, 2, 1, 0]], float)}
    assert diversity_key(m) == "genotype_distance"
    assert select_pool(cands, 3, 0.5, m) == [1, 3]


def test_config_rejects_negative_weights():
    assert from_dict(DiversityConfig, {"mode": "sequential"}).weight == 10.0
    with pytest.raises(ConfigError, match="diversity.margin"):
        from_dict(DiversityConfig, {"margin": -0.1})
