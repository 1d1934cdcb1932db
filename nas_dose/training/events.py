"""TensorBoard event files in a run folder (`logging.tensorboard=true`): the curves of what the
JSON logs hold (losses, validation scores, the learning rate; a search's architecture weights).

Off by default, and then nothing is imported or written. On, `torch.utils.tensorboard` needs the
`tensorboard` package (the `tensorboard` extra), checked when the config is loaded. Only the
process that writes a run's files writes its events (rank 0 under torchrun).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..config import ConfigError


@dataclass
class LoggingConfig:
    """`tensorboard`: also write TensorBoard event files into the run folder."""

    tensorboard: bool = False

    def validate(self) -> None:
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("config key 'logging.tensorboard': needs the tensorboard package "
                              "(pip install 'nasdose[tensorboard]', or pip install tensorboard)")


class EventLog:
    """Scalars for TensorBoard, each tag under `prefix`; a log that is off does nothing."""

    def __init__(self, writer: Any = None, prefix: str = "") -> None:
        self.writer, self.prefix = writer, prefix

    @classmethod
    def open(cls, folder: Path | None, config: LoggingConfig, purge_step: int | None = None) -> EventLog:
        """The event log of the run folder `folder` (None: a run without files; off). A resumed
        run passes the step after its checkpoint's as `purge_step`: what an earlier process logged
        from there on is dropped, as the run logs it again."""
        if folder is None or not config.tensorboard or not distributed.writes_here():
            return cls()
        # here, not at the top: tensorboard is optional and loaded only when asked for
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(str(folder), purge_step=purge_step))

    def within(self, prefix: str) -> EventLog:
        """The same log with tags under `prefix/` (one of several searches in one folder)."""
        return EventLog(self.writer, f"{self.prefix}{prefix}/")

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """One point per tag at `step`; None (not measured at this step) is left out."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(self.prefix + tag, value, step)

    def arch_weights(self, step: int, weights: Mapping[str, list[float]], ops: Mapping[str, Iterable[Any]]) -> None:
        """softmax(α) of each slot: one curve per candidate op (`alpha/SLOT/OP`) and the slot's
        distribution as a histogram (`alpha/SLOT`)."""
        if self.writer is None:
            return
        for slot, probs in weights.items():
            self.scalars(step, {f"alpha/{slot}/{op}": p for op, p in zip(ops[slot], probs)})
            self.writer.add_histogram(f"{self.prefix}alpha/{slot}", np.asarray(probs, dtype=np.float64), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

