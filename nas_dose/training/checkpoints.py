"""The files of a training run (config, log, checkpoints) and what makes a checkpoint resumable."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import distributed
from ..cascade.patches import recorded_absolute
from ..config import to_dict
from ..errors import input_error
from ..io import atomic_path
from ..models.factory import CHECKPOINT_FORMAT
from .config import TrainConfig


class RunFolder:
    """The files of a run with an output folder: config, log, checkpoints, metrics."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.last = out / "checkpoints" / "last.pt"
        self.best = out / "best.pt"
        self.log = out / "log.jsonl"

    def check_new(self) -> None:
        if self.last.exists() or self.best.exists():
            raise input_error(self.out, "already holds a training run; use --resume to continue it, "
                                        "--force to replace it, or another --out")

    def rewrite_log(self, history: list[dict[str, Any]]) -> None:
        """The log as of the checkpoint (entries written after it are dropped on resume)."""
        with atomic_path(self.log) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in history))

    def append_log(self, entry: dict[str, Any]) -> None:
        """JSON lines are appended (one write per line); a resume rewrites the file whole."""
        if not distributed.writes_here():
            return
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, file: Path) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise input_error(file, "not a nasdose training checkpoint")
    # how the run executes and what it logs may change on resume; what it computes may not
    old = {k: v for k, v in ckpt["config"].items() if k not in ("runtime", "logging")}
    # a section newer than the checkpoint was, for its run, at its default
    old = {**{k: v for k, v in to_dict(TrainConfig()).items() if k not in ("runtime", "logging")}, **old}
    if "cascade" in old:
        old["cascade"] = recorded_absolute(old["cascade"])
    new = {k: v for k, v in to_dict(cfg).items() if k not in ("runtime", "logging")}
    if old != new:
        keys = sorted(_differences(old, new))
        raise input_error(file, f"the run was made with a different config ({', '.join(keys)}); "
                                "resume with the run's own config.yaml or choose another --out")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if a == b else [prefix]
