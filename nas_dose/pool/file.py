"""The pool file: the searched ensemble members, their scores and how diverse they are.

`nasdose search` writes it and `nasdose ensemble` reads it, possibly from another version or a
hand-edited copy, so `load_pool` checks everything (format, version, each genotype against its
space, the matrices' shapes) and names the file and the bad member on any fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, TypeGuard

import numpy as np

from nas_dose.search_spaces import Genotype, genotype_from_dict, get_space

from ..errors import NasDoseError
from ..io import load_yaml, save_yaml
from ..models.conditioning import KINDS
from .diversity import MATRICES

FORMAT = "nasdose-pool"
VERSION = 1


@dataclass
class PoolMember:
    """One searched network to train fully."""

    name: str
    genotype: Genotype
    search_score: float  # Gy, dose score on the search's architecture patients
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Pool:
    """The members, in selection order, and their pairwise diversity (matrices in member order)."""

    space: str
    strategy: str
    seed: int
    members: list[PoolMember]
    matrices: dict[str, np.ndarray]
    predictions: str = ""  # how the predictions behind the matrices were made, on which patients
    config: dict[str, Any] = field(default_factory=dict)
    pareto: dict[str, Any] = field(default_factory=dict)  # the search's accuracy-cost front (pareto.py)
    # The search's `cascade` section (coarse resolved) when the members are a cascade's
    # full-resolution stages; None for whole-volume networks.
    cascade: dict[str, Any] | None = None
    # The search's `conditioning` (e.g. film) when the members were searched conditioned on the
    # planning preferences; None for plain networks.
    conditioning: str | None = None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]


def save_pool(path: str | Path, pool: Pool) -> None:
    """Write pool.yaml atomically."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "space": pool.space,
        "strategy": pool.strategy,
        "seed": pool.seed,
        "members": [{"name": m.name, "genotype": m.genotype.to_dict(), "search_score": float(m.search_score),
                     "metrics": {k: float(v) for k, v in m.metrics.items()}} for m in pool.members],
        "diversity": {"members": pool.names, "predictions": pool.predictions,
                      **{k: [[float(x) for x in row] for row in np.asarray(pool.matrices[k])]
                         for k in MATRICES}},
        "config": pool.config,
        "pareto": pool.pareto,
        **({} if pool.cascade is None else {"cascade": pool.cascade}),
        **({} if pool.conditioning is None else {"conditioning": pool.conditioning}),
    }
    save_yaml(path, data)


def _is_number(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _member(path: Path, index: int, raw: Any, space_name: str) -> PoolMember:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise NasDoseError(f"{path}: member {index} needs a mapping with a 'name'")
    name = raw["name"]

    def bad(problem: str) -> NasDoseError:
        return NasDoseError(f"{path}: member {name}: {problem}")

    if not isinstance(raw.get("genotype"), dict):
        raise bad("no genotype mapping")
    try:
        genotype = genotype_from_dict(raw["genotype"])
        if genotype.space != space_name:
            raise bad(f"genotype of space {genotype.space!r}, but the pool's space is {space_name!r}")
        get_space(space_name).validate(genotype)
    except NasDoseError as e:
        raise bad(f"invalid genotype ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"invalid genotype ({type(e).__name__}: {e})") from None
    score = raw.get("search_score")
    if not _is_number(score):
        raise bad(f"search_score must be a number, got {score!r}")
    metrics = raw.get("metrics", {}) or {}
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in metrics.items()):
        raise bad("metrics must map names to numbers")
    return PoolMember(name, genotype, float(score), {k: float(v) for k, v in metrics.items()})


def load_pool(path: str | Path) -> Pool:
    """Read and validate pool.yaml; any fault is a NasDoseError naming the file (and member)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NasDoseError(f"{path}: not a nasdose pool file (format is not '{FORMAT}')")
    if data.get("version") != VERSION:
        raise NasDoseError(f"{path}: pool version {data.get('version')!r} is not supported (expected {VERSION})")
    space = data.get("space")
    if not isinstance(space, str):
        raise NasDoseError(f"{path}: 'space' must be a search space name")
    get_space(space, source=str(path))
    raw_members = data.get("members")
    if not isinstance(raw_members, list) or not raw_members:
        raise NasDoseError(f"{path}: 'members' must be a non-empty list")
    members = [_member(path, i, raw, space) for i, raw in enumerate(raw_members)]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise NasDoseError(f"{path}: member names are not unique ({', '.join(names)})")
    seen: dict[Hashable, str] = {}
    for m in members:
        other = seen.setdefault(m.genotype.key(), m.name)
        if other != m.name:
            raise NasDoseError(f"{path}: member {m.name}: same genotype as member {other}")
    div = data.get("diversity")
    if not isinstance(div, dict):
        raise NasDoseError(f"{path}: 'diversity' must be a mapping")
    if div.get("members") != names:
        raise NasDoseError(f"{path}: diversity.members {div.get('members')!r} do not match the members {names}")
    n = len(members)
    matrices: dict[str, np.ndarray] = {}
    for key in MATRICES:
        rows = div.get(key)
        if (not isinstance(rows, list) or len(rows) != n
                or not all(isinstance(r, list) and len(r) == n and all(_is_number(x) for x in r) for r in rows)):
            raise NasDoseError(f"{path}: diversity.{key} must be a {n}×{n} matrix of numbers")
        matrices[key] = np.array(rows, dtype=np.float64)
        if not np.allclose(matrices[key], matrices[key].T, equal_nan=True):
            raise NasDoseError(f"{path}: diversity.{key} is not symmetric")
    if not isinstance(data.get("strategy"), str):
        raise NasDoseError(f"{path}: 'strategy' must be a string")
    seed = data.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise NasDoseError(f"{path}: 'seed' must be an integer")
    config = data.get("config", {}) or {}
    if not isinstance(config, dict):
        raise NasDoseError(f"{path}: 'config' must be a mapping")
    predictions = div.get("predictions", "")
    pareto = data.get("pareto", {}) or {}
    if not isinstance(pareto, dict):
        raise NasDoseError(f"{path}: 'pareto' must be a mapping")
    cascade = data.get("cascade")
    if cascade is not None and not (isinstance(cascade, dict) and isinstance(cascade.get("coarse"), str)):
        raise NasDoseError(f"{path}: 'cascade' must be a mapping with the coarse stage ('coarse')")
    conditioning = data.get("conditioning")
    if conditioning is not None and conditioning not in KINDS:
        raise NasDoseError(f"{path}: 'conditioning' must be one of {', '.join(KINDS)}, got {conditioning!r}")
    return Pool(space, data["strategy"], seed, members, matrices,
                predictions if isinstance(predictions, str) else str(predictions), config, pareto, cascade,
                conditioning)


__all__ = ["FORMAT", "VERSION", "Pool", "PoolMember", "save_pool", "load_pool"]
