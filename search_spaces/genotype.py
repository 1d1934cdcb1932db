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

from nas_dose.errors import NasDoseError
from nas_dose.io import save_yaml

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

    def key(self) -> Hashable:
        """A hashable identity (space, version, choices, macro), for caches and deduplication."""
        macro = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in self.macro.items()))
        return self.space, self.version, tuple(sorted(self.choices.items())), macro


def save_genotype(path: str | Path, g: Genotype) -> None:
    save_yaml(path, g.to_dict())


def check_fields(d: Any, where: str) -> dict[str, Any]:
    """The fields of a genotype mapping, their types checked (the space checks their values)."""
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
    return {**d, "macro": macro}
