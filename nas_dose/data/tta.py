"""Flip test-time augmentation: a prediction averaged over the patient mirrored along the two
in-plane axes, each flipped back. One place for it, because every stage that predicts (a single
network, an ensemble, a cascade's full-resolution stage) averages the same flips."""
from __future__ import annotations

import operator
from functools import reduce
from typing import Callable

import torch

from .augment import Transform
from .dataset import INPUT_LAYOUT

TTA_FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def _flip(x: torch.Tensor, flips: tuple[bool, bool]) -> torch.Tensor:
    dims = [axis + 2 for axis, flipped in enumerate(flips) if flipped]
    return x.flip(dims) if dims else x


def _mirror_channels(x: torch.Tensor) -> torch.Tensor:
    """Swap the channels of paired left/right structures (a mirrored right parotid is a left one).
    Channels after the model input's (a coarse dose, a mask) have no side and stay."""
    order = list(range(x.shape[1]))
    for right, left in INPUT_LAYOUT.mirror_pairs:
        order[right], order[left] = left, right
    return x[:, order]


def _flipped_prediction(predictor: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        flips: tuple[bool, bool]) -> torch.Tensor:
    """The prediction for `x` flipped by `flips`, flipped back to the original orientation."""
    xi = _flip(x, flips)
    if Transform(flips=flips).mirrors:
        xi = _mirror_channels(xi)
    return _flip(predictor(xi).float(), flips)


def flip_tta(predictor: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of the predictions over TTA_FLIPS, each flipped back to the original orientation."""
    return reduce(operator.add, (_flipped_prediction(predictor, x, flips) for flips in TTA_FLIPS)) / len(TTA_FLIPS)
