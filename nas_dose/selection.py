"""Choosing and weighting ensemble members from their validation predictions alone.

Everything here works on predictions already made (numpy and scipy, no network), so a
selection, a weight fit and the leave-one-patient-out check of both cost no forward pass.
Scores are the official OpenKBP dose error (`nas_dose.scores.dose_error`); the diversity
measures and the accuracy-diversity pick are the search's own (`nas_dose.pool.diversity`).

- greedy: forward selection (Caruana et al. 2004): start from the best single member, then
  repeatedly add the member (again, when `replacement`) whose addition gives the lowest
  validation dose score of the plain mean; a member picked twice counts twice.
- diversity: the search's accuracy + lam × diversity pick (`select_pool`), with the
  diversity measured between the trained members' validation predictions.
- all: every member, best single first.

Greedy and diversity keep the prefix of their picks with the best validation dose score. A
selection and a weight fit are judged on the patients they were made on, which flatters them:
`leave_one_patient_out` gives the honest estimate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from scipy.optimize import minimize

from nas_dose.search_spaces import Genotype

from .config import at_least
from .pool import Candidate, pairwise_matrices, select_pool
from .scores import dose_error


@dataclass
class SelectionConfig:
    """How members are chosen (`method`, up to `max_size` picks) and combined.

    combination: "mean" (each pick counts once) or "weighted" (weights fitted by least squares
    on the validation voxels, non-negative and summing to 1). lam: the diversity method's weight
    of diversity against accuracy (both scaled to [0, 1]).
    """

    method: Literal["greedy", "diversity", "all"] = "greedy"
    max_size: int = 4
    replacement: bool = True
    lam: float = 0.5
    combination: Literal["mean", "weighted"] = "mean"

    def validate(self) -> None:
        at_least("selection.max_size", self.max_size, 1)
        at_least("selection.lam", self.lam, 0)


@dataclass
class ValidationPredictions:
    """Each member's validation doses (Gy) with the reference doses, voxels kept per patient.

    A patient keeps the voxels of its possible-dose mask and any other voxel where its reference
    or a prediction is non-zero: the dropped voxels add nothing to any combination's dose error,
    so scores on the kept voxels are the official ones, at a fraction of the memory.
    """

    names: list[str]
    ids: list[str]
    shape: tuple[int, ...]
    preds: list[np.ndarray]  # per patient (members, kept voxels), float32
    refs: list[np.ndarray]  # per patient (kept voxels,), float64
    masks: list[np.ndarray]  # per patient (kept voxels,), bool: inside the possible-dose mask
    index: list[np.ndarray]  # per patient: flat indices of the kept voxels in the full grid
    _normal: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_patients(cls, names: Sequence[str],
                      patients: Iterable[tuple[str, np.ndarray, np.ndarray, Sequence[np.ndarray]]],
                      ) -> ValidationPredictions:
        """From (id, reference dose, possible-dose mask, one predicted dose per member) tuples."""
        vp = cls(list(names), [], (), [], [], [], [])
        for pid, ref, mask, doses in patients:
            if len(doses) != len(vp.names):
                raise ValueError(f"patient {pid}: {len(doses)} predictions for {len(vp.names)} members")
            stack = np.stack([np.asarray(d, dtype=np.float32).ravel() for d in doses])
            ref = np.asarray(ref, dtype=np.float64).ravel()
            mask = np.asarray(mask, dtype=bool).ravel()
            if not vp.shape:
                vp.shape = tuple(np.shape(doses[0]))
            if stack.shape[1] != ref.size or mask.size != ref.size or ref.size != np.prod(vp.shape):
                raise ValueError(f"patient {pid}: predictions, reference and mask differ in size")
            keep = np.flatnonzero(mask | (ref != 0) | np.any(stack != 0, axis=0))
            vp.ids.append(pid)
            vp.preds.append(stack[:, keep])
            vp.refs.append(ref[keep])
            vp.masks.append(mask[keep])
            vp.index.append(keep)
        if not vp.ids:
            raise ValueError("no validation patients")
        return vp

    @property
    def n_members(self) -> int:
        return len(self.names)

    def subset(self, patients: Sequence[int]) -> ValidationPredictions:
        """The same members on some of the patients (by position)."""
        sub = ValidationPredictions(self.names, [self.ids[p] for p in patients], self.shape,
                                    [self.preds[p] for p in patients], [self.refs[p] for p in patients],
                                    [self.masks[p] for p in patients], [self.index[p] for p in patients])
        if self._normal is not None:
            sub._normal = (self._normal[0][list(patients)], self._normal[1][list(patients)])
        return sub

    def normal_equations(self) -> tuple[np.ndarray, np.ndarray]:
        """Per patient, AᵀA and Aᵀb of the least-squares weight fit over all members, on the
        in-mask voxels, divided by the mask size; (patients, members, members), (patients,
        members). Computed once: every fit (each prefix, each left-out patient) sums slices."""
        if self._normal is None:
            gram = np.zeros((len(self.ids), self.n_members, self.n_members))
            corr = np.zeros((len(self.ids), self.n_members))
            for p in range(len(self.ids)):
                a = self.preds[p][:, self.masks[p]].astype(np.float64)
                n = max(a.shape[1], 1)
                gram[p] = a @ a.T / n
                corr[p] = a @ self.refs[p][self.masks[p]] / n
            self._normal = (gram, corr)
        return self._normal

    def combine(self, weights: np.ndarray, patient: int) -> np.ndarray:
        """One patient's combined dose on the kept voxels; `weights` (members,)."""
        w = np.asarray(weights, dtype=np.float64)
        used = np.flatnonzero(w)
        return w[used].astype(np.float32) @ self.preds[patient][used]  # float32, as the ensemble runs

    def full_dose(self, weights: np.ndarray, patient: int) -> np.ndarray:
        """One patient's combined dose on the whole grid (float32 Gy)."""
        out = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        out[self.index[patient]] = self.combine(weights, patient)
        return out.reshape(self.shape)

    def dose_errors(self, weights: np.ndarray) -> np.ndarray:
        """Each patient's dose error (Gy) of the combination; `weights` (members,) for all
        patients or (patients, members), one row per patient."""
        w = np.asarray(weights, dtype=np.float64)
        rows = np.broadcast_to(w, (len(self.ids), self.n_members))
        return self.errors_of([self.combine(rows[p], p) for p in range(len(self.ids))])

    def errors_of(self, doses: Sequence[np.ndarray]) -> np.ndarray:
        """Each patient's dose error of doses given on the kept voxels."""
        return np.array([dose_error(d, self.refs[p], self.masks[p]) for p, d in enumerate(doses)])

    def dose_score(self, weights: np.ndarray) -> float:
        """The validation dose score (Gy): mean patient dose error, as `score_patients` has it."""
        return float(np.nanmean(self.dose_errors(weights)))

    def member_scores(self) -> np.ndarray:
        """Each member's own validation dose score."""
        return np.array([self.dose_score(np.eye(self.n_members)[m]) for m in range(self.n_members)])


def mean_weights(picks: Sequence[int], n_members: int) -> np.ndarray:
    """Weights of the plain mean of `picks`: a member picked k times weighs k / len(picks)."""
    counts = np.bincount(np.asarray(picks, dtype=int), minlength=n_members).astype(np.float64)
    return counts / counts.sum()


def greedy_order(vp: ValidationPredictions, max_size: int, replacement: bool = True) -> list[int]:
    """Caruana's forward selection: up to `max_size` picks, each the member whose addition gives
    the mean with the lowest validation dose score (ties to the earlier member)."""
    picks: list[int] = []
    sums = [np.zeros(r.size) for r in vp.refs]  # per patient: the sum of the picks' doses
    limit = max_size if replacement else min(max_size, vp.n_members)
    while len(picks) < limit:
        best, best_score = -1, np.inf
        for j in range(vp.n_members):
            if not replacement and j in picks:
                continue
            means = [(s + vp.preds[p][j]) / (len(picks) + 1) for p, s in enumerate(sums)]
            score = float(np.nanmean(vp.errors_of(means)))
            if score < best_score:
                best, best_score = j, score
        picks.append(best)
        sums = [s + vp.preds[p][best] for p, s in enumerate(sums)]
    return picks


def diversity_matrices(vp: ValidationPredictions, genotypes: Sequence[Genotype]) -> dict[str, np.ndarray]:
    """The search's pairwise matrices (disagreement, error correlation, genotype distance)
    between the members' validation predictions."""
    cands = [Candidate(g, np.nan, predictions={pid: vp.preds[p][m] for p, pid in enumerate(vp.ids)})
             for m, g in enumerate(genotypes)]
    targets = {pid: vp.refs[p] for p, pid in enumerate(vp.ids)}
    masks = {pid: vp.masks[p] for p, pid in enumerate(vp.ids)}
    return pairwise_matrices(cands, targets, masks)


def diversity_order(vp: ValidationPredictions, genotypes: Sequence[Genotype], max_size: int, lam: float,
                    matrices: dict[str, np.ndarray] | None = None) -> list[int]:
    """The search's accuracy + lam × diversity pick over the members (`select_pool`)."""
    if len(genotypes) != vp.n_members:
        raise ValueError(f"{len(genotypes)} genotypes for {vp.n_members} members")
    matrices = matrices if matrices is not None else diversity_matrices(vp, genotypes)
    cands = [Candidate(g, s) for g, s in zip(genotypes, vp.member_scores())]
    return select_pool(cands, max_size, lam, matrices)


def _simplex_least_squares(gram: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """argmin wᵀ·gram·w − 2·corrᵀ·w over w >= 0 with sum(w) = 1 (a small quadratic program:
    members × members however many voxels there are)."""
    k = len(corr)
    scale = np.trace(gram) / k
    if not scale > 0:
        return np.full(k, 1.0 / k)
    g, c = gram / scale, corr / scale
    res = minimize(lambda w: w @ g @ w - 2 * c @ w, np.full(k, 1.0 / k), jac=lambda w: 2 * (g @ w - c),
                   method="SLSQP", bounds=[(0.0, None)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}],
                   options={"ftol": 1e-15, "maxiter": 500})
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()


def fit_weights(vp: ValidationPredictions, members: Sequence[int]) -> np.ndarray:
    """Weights of `members`, non-negative and summing to 1, that minimize the squared error on
    the in-mask validation voxels (all other members get 0).

    The sum is constrained in the fit rather than normalized after an unconstrained
    non-negative fit: that fit would rescale a member that under- or overdoses, and normalizing
    it afterwards undoes the rescaling and can do worse than the plain mean. Each patient's
    voxels count 1 / its mask size: the dose score is a mean over patients, so a large patient
    must not outweigh a small one.
    """
    members = sorted(set(members))
    gram, corr = vp.normal_equations()
    out = np.zeros(vp.n_members)
    out[members] = _simplex_least_squares(gram.sum(0)[np.ix_(members, members)], corr.sum(0)[members])
    return out


@dataclass
class Selection:
    """The picks in order, the prefix kept and the combination's weights (over all members)."""

    order: list[int]
    size: int
    weights: np.ndarray
    prefix_weights: list[np.ndarray] = field(default_factory=list)  # weights of picks[:k], k = 1..


def prefix_weights(vp: ValidationPredictions, order: Sequence[int], combination: str) -> list[np.ndarray]:
    """The combination's weights for each prefix of the picks."""
    prefixes = [list(order[:k]) for k in range(1, len(order) + 1)]
    if combination == "weighted":
        return [fit_weights(vp, p) for p in prefixes]
    return [mean_weights(p, vp.n_members) for p in prefixes]


def select(vp: ValidationPredictions, cfg: SelectionConfig, genotypes: Sequence[Genotype],
           matrices: dict[str, np.ndarray] | None = None) -> Selection:
    """Pick, keep the best prefix (all picks for "all") and weight the members, on `vp` only."""
    if cfg.method == "greedy":
        order = greedy_order(vp, cfg.max_size, cfg.replacement)
    elif cfg.method == "diversity":
        order = diversity_order(vp, genotypes, cfg.max_size, cfg.lam, matrices)
    else:
        order = [int(i) for i in np.argsort(vp.member_scores(), kind="stable")]
    weights = prefix_weights(vp, order, cfg.combination)
    if cfg.method == "all":
        size = len(order)
    else:
        size = int(np.argmin([vp.dose_score(w) for w in weights])) + 1
    return Selection(order, size, weights[size - 1], weights)


def leave_one_patient_out(vp: ValidationPredictions, procedure: Callable[[ValidationPredictions], np.ndarray],
                          patients: Sequence[str] | None = None) -> np.ndarray:
    """(patients, members): row p holds the weights `procedure` gives without patient p.

    Scoring patient p with row p estimates how the procedure (selection, weight fit) does on a
    patient it has not seen, unlike scoring the patients it was fitted on. Needs 2 patients.
    `patients`: the patient of each entry, where entries are several plans of one patient (a
    conditioned ensemble's): all of a patient's entries are left out together.
    """
    groups = list(patients) if patients is not None else vp.ids
    if len(set(groups)) < 2:
        raise ValueError("leave-one-patient-out needs at least 2 patients")
    subsets = {g: vp.subset([q for q, h in enumerate(groups) if h != g]) for g in dict.fromkeys(groups)}
    rows = {g: procedure(sub) for g, sub in subsets.items()}
    return np.stack([rows[g] for g in groups])
