"""A scored architecture: what a search hands to the pool selection, the pool file and diversity."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nas_dose.search_spaces import Genotype, genotype_from_dict


@dataclass
class Candidate:
    """One scored architecture."""

    genotype: Genotype
    score: float  # search-time validation dose score in Gy on the arch patients; lower is better
    metrics: dict[str, float] = field(default_factory=dict)
    # dose / 70 by patient id: at least ctx.diversity_ids (for diversity); a strategy that honours
    # ctx.references also gives ctx.arch_ids, the patients its diversity hinge acts on
    predictions: dict[str, np.ndarray] | None = None

    def to_state(self) -> dict[str, Any]:
        """Plain values and tensors, for a weights_only checkpoint."""
        return {"genotype": self.genotype.to_dict(), "score": float(self.score), "metrics": dict(self.metrics),
                "predictions": None if self.predictions is None
                else {k: torch.from_numpy(np.asarray(v)) for k, v in self.predictions.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str) -> Candidate:
        """Inverse of `to_state`; the genotype is validated (errors name `source`)."""
        preds = state["predictions"]
        return cls(genotype_from_dict(state["genotype"], source=source), state["score"], state["metrics"],
                   None if preds is None else {k: v.numpy() for k, v in preds.items()})
