"""Genotypes: one architecture of a search space as plain data, saved as YAML and validated on load.

YAML form::

    space: lenas
    version: 1
    choices: {down.op1: conv, down.op2: se_conv, ..., up.up: up_conv}
    macro: {in_channels: 10, out_channels: 1, stem: 16, widths: [32, 64, 128, 256]}

Loading checks the space, its version, every slot and op (through the space's NNI mutable)
and the macro, and names the file and the bad slot or op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

from ..errors import NasDoseError
from ..io import load_yaml, save_yaml

FIELDS = ("space", "version", "choices", "macro")


@dataclass
class Genotype:
    """An architecture: the space it comes from, one value per slot, and the macro settings."""

    space: str
    version: int
    choices: dict[str, str | int]
    macro: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe data (tuples become lists)."""
        return {"space": self.space, "version": self.version, "choices": dict(self.choices),
                "macro": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.macro.items()}}

    @classmethod
    def from_dict(cls, d: Any, source: str = "") -> Genotype:
        """Parse and validate; errors start with ``source`` (a file name) and name the bad field."""
        where = source or "genotype"
        if not isinstance(d, dict):
            raise NasDoseError(f"{where}: a genotype must be a mapping with keys {', '.join(FIELDS)}")
        unknown = [k for k in d if k not in FIELDS]
        if unknown:
            raise NasDoseError(f"{where}: unknown genotype key '{unknown[0]}' (known: {', '.join(FIELDS)})")
        for key in ("space", "version", "choices"):
            if key not in d:
                raise NasDoseError(f"{where}: missing genotype key '{key}'")
        if not isinstance(d["space"], str):
            raise NasDoseError(f"{where}: 'space' must be a name, got {d['space']!r}")
        if not isinstance(d["version"], int) or isinstance(d["version"], bool):
            raise NasDoseError(f"{where}: 'version' must be an integer, got {d['version']!r}")
        if not isinstance(d["choices"], dict):
            raise NasDoseError(f"{where}: 'choices' must be a mapping of slot -> op")
        macro = d.get("macro") or {}
        if not isinstance(macro, dict):
            raise NasDoseError(f"{where}: 'macro' must be a mapping")
        # the space registry imports this module, so it is looked up at call time
        from .space import get_space

        space = get_space(d["space"], source=where)
        g = cls(d["space"], d["version"], dict(d["choices"]), space.check_macro(macro, where))
        space.validate(g, source=where)
        return g

    def key(self) -> Hashable:
        """A hashable identity (space, version, choices, macro), for caches and deduplication."""
        macro = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in self.macro.items()))
        return self.space, self.version, tuple(sorted(self.choices.items())), macro


def save_genotype(path: str | Path, g: Genotype) -> None:
    save_yaml(path, g.to_dict())


def load_genotype(path: str | Path) -> Genotype:
    return Genotype.from_dict(load_yaml(path), source=str(path))
