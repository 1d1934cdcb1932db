"""Diversity between learners: how differently they predict, and picking an accurate, diverse pool.

An ensemble gains only where its members err differently, so nasdose measures it explicitly
(LENAS picked members by hand): the LENAS disagreement between two dose predictions, the
correlation of their errors, and the distance between genotypes. The same disagreement, as a
hinge, is the sequential-search penalty that pushes a new network away from earlier ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Literal, Mapping, Sequence

import numpy as np
import torch

from nas_dose.search_spaces import get_space

from ..config import ConfigError
from .candidate import Candidate

MATRICES = ("disagreement", "error_correlation", "genotype_distance")


@dataclass
class DiversityConfig:
    """How diversity enters a search.

    mode: "none" (the best K), "sequential" (K searches in a row, each with the hinge against
    the members found before it, as LENAS), or "pool" (one search; K members greedily chosen
    for accuracy + lam × diversity). weight and margin: the hinge's factor and its target
    disagreement (LENAS: 10 and 0.2).
    """

    mode: Literal["none", "sequential", "pool"] = "pool"
    weight: float = 10.0
    margin: float = 0.2
    lam: float = 0.5

    def validate(self) -> None:
        for key in ("weight", "margin", "lam"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'diversity.{key}': must not be negative, got {getattr(self, key)}")


def prediction_disagreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """2·mean|a − b| / mean(|a| + |b|) inside the mask: 0 for identical predictions.

    The LENAS measure (for non-negative doses |a| + |b| = a + b); the absolute values keep it
    a distance for the negative outputs of a barely trained network.
    """
    m = np.asarray(mask, dtype=bool)
    a = np.asarray(a, dtype=np.float64)[m]
    b = np.asarray(b, dtype=np.float64)[m]
    scale = np.sum(np.abs(a) + np.abs(b))
    diff = np.sum(np.abs(a - b))
    if scale == 0:
        return 0.0
    return float(2.0 * diff / scale)


def mean_disagreement(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                      masks: Mapping[str, np.ndarray]) -> float:
    """Mean `prediction_disagreement` over the patients of `masks` both predicted (0 when there is none)."""
    ids = [pid for pid in masks if pid in a and pid in b]
    if not ids:
        return 0.0
    return float(np.mean([prediction_disagreement(a[p], b[p], masks[p]) for p in ids]))


def error_correlation(a: np.ndarray, b: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of the residuals a − target and b − target inside the mask.

    1: the two make the same errors (averaging them gains nothing); NaN where a residual is
    constant (a perfect prediction has no error to correlate).
    """
    m = np.asarray(mask, dtype=bool)
    t = np.asarray(target, dtype=np.float64)[m]
    ra = np.asarray(a, dtype=np.float64)[m] - t
    rb = np.asarray(b, dtype=np.float64)[m] - t
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    if denom == 0:
        return float("nan")
    return float(np.clip(np.sum(ra * rb) / denom, -1.0, 1.0))


def diversity_hinge(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                    margin: float = 0.2) -> torch.Tensor:
    """Batch mean of max(0, margin − disagreement(pred, ref)); differentiable in `pred`.

    Tensors are (N, ...) with the batch first; each sample's disagreement is its own, as in
    `prediction_disagreement`. Zero once the prediction is `margin` (relative) away from `ref`.
    """
    n = pred.shape[0]
    p = pred.reshape(n, -1).float()
    r = ref.reshape(n, -1).to(p)
    m = mask.reshape(n, -1).to(p)
    diff = torch.sum(torch.abs(p - r) * m, dim=1)
    scale = torch.sum((torch.abs(p) + torch.abs(r)) * m, dim=1).clamp_min(1e-12)
    return torch.relu(margin - 2.0 * diff / scale).mean()


def pairwise_matrices(cands: Sequence[Candidate], targets: Mapping[str, np.ndarray],
                      masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Square matrices over the candidates: disagreement, error_correlation, genotype_distance.

    The prediction measures are means over the patients both candidates predicted (those in
    `targets`); they are NaN for a pair where either candidate carries no predictions.
    """
    n = len(cands)
    out = {name: np.full((n, n), np.nan) for name in MATRICES}
    for i, ci in enumerate(cands):
        space = get_space(ci.genotype.space)
        for j in range(i, n):
            cj = cands[j]
            out["genotype_distance"][i, j] = out["genotype_distance"][j, i] = float(
                space.distance(ci.genotype, cj.genotype))
            if ci.predictions is None or cj.predictions is None:
                continue
            ids = [pid for pid in targets if pid in ci.predictions and pid in cj.predictions]
            if not ids:
                continue
            dis = [prediction_disagreement(ci.predictions[p], cj.predictions[p], masks[p]) for p in ids]
            cor = [error_correlation(ci.predictions[p], cj.predictions[p], targets[p], masks[p]) for p in ids]
            out["disagreement"][i, j] = out["disagreement"][j, i] = float(np.mean(dis))
            finite = [c for c in cor if np.isfinite(c)]
            out["error_correlation"][i, j] = out["error_correlation"][j, i] = (
                float(np.mean(finite)) if finite else np.nan)
    return out


def diversity_key(matrices: Mapping[str, np.ndarray]) -> str:
    """The measure selection uses: prediction disagreement where known for every pair, else genotypes."""
    dis = matrices.get("disagreement")
    if dis is not None and dis.size and np.all(np.isfinite(dis)):
        return "disagreement"
    return "genotype_distance"


def select_pool(cands: Sequence[Candidate], k: int, lam: float,
                matrices: Mapping[str, np.ndarray], key: str | None = None) -> list[int]:
    """Greedy pick of up to k candidates with distinct genotypes: the most accurate first, then
    each maximizing accuracy + lam × mean diversity to those already chosen.

    Accuracy is best score / score (1 for the best candidate; scores are errors in Gy) and the
    diversity measure (`key`, default `diversity_key(matrices)`) is divided by its largest
    off-diagonal value, so both terms lie in [0, 1] and lam weighs them directly. Candidates
    with a non-finite or non-positive score are never picked. Ties go to the earlier candidate.
    """
    key = key or diversity_key(matrices)
    div = np.asarray(matrices[key], dtype=np.float64)
    n = len(cands)
    if div.shape != (n, n):
        raise ValueError(f"{key} matrix has shape {div.shape}, expected {(n, n)}")
    scores = np.array([c.score for c in cands], dtype=np.float64)
    usable = np.isfinite(scores) & (scores > 0)
    if not usable.any() or k <= 0:
        return []
    acc = np.where(usable, scores[usable].min() / np.where(usable, scores, 1.0), -np.inf)
    off = div[~np.eye(n, dtype=bool)]
    off = off[np.isfinite(off)]
    top = off.max() if off.size else 0.0
    div_n = np.nan_to_num(div / top if top > 0 else np.zeros_like(div), nan=0.0)
    chosen: list[int] = []
    keys: set[Hashable] = set()
    while len(chosen) < k:
        best, best_value = -1, -np.inf
        for i in range(n):
            if not usable[i] or i in chosen or cands[i].genotype.key() in keys:
                continue
            value = acc[i] + (lam * float(np.mean(div_n[i, chosen])) if chosen else 0.0)
            if value > best_value:
                best, best_value = i, value
        if best < 0:
            break
        chosen.append(best)
        keys.add(cands[best].genotype.key())
    return chosen
