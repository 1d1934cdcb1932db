"""Search figures: architecture weights over epochs, scores over time, and the pool's diversity.

They answer the questions a search leaves: did α settle or stay near uniform, did the search
still improve when it stopped, and do the chosen members differ enough to be worth averaging.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..plots import new_figure, save_figure

MATRIX_TITLES = {"disagreement": "prediction disagreement", "error_correlation": "error correlation",
                 "genotype_distance": "genotype distance (fraction of slots)"}


def plot_arch_weights(histories: Sequence[Sequence[Mapping[str, Sequence[float]]]],
                      candidates: Mapping[str, Sequence[object]], path: str | Path,
                      titles: Sequence[str] | None = None) -> None:
    """One panel per slot (one row per search): softmax(α) of each candidate over the epochs.

    `histories[k][e][slot]` is search k's probabilities after epoch e (e = 0: before training).
    """
    slots = [s for s in candidates if any(s in h[0] for h in histories if h)]
    ncols = min(4, max(1, len(slots)))
    rows_per_search = math.ceil(len(slots) / ncols)
    fig, axes = new_figure(ncols=ncols, nrows=rows_per_search * len(histories), panel_inches=(3.6, 2.6))
    for ax in axes.flat:
        ax.set_visible(False)
    for k, history in enumerate(histories):
        epochs = np.arange(len(history))
        for i, slot in enumerate(slots):
            ax = axes[k * rows_per_search + i // ncols, i % ncols]
            ax.set_visible(True)
            probs = np.array([h[slot] for h in history])
            for j, name in enumerate(candidates[slot]):
                ax.plot(epochs, probs[:, j], marker="." if len(epochs) < 15 else None, label=str(name))
            prefix = f"{titles[k]}: " if titles else ""
            ax.set_title(f"{prefix}{slot}", fontsize="medium")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel("probability")
            ax.set_ylim(0.0, 1.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small", frameon=False)
    save_figure(fig, path)


def plot_fitness(scores: Sequence[float], labels: Sequence[str], path: str | Path) -> None:
    """Each scored candidate's score in the order scored, and the best score so far; points
    are coloured by their label (e.g. which search, and what was scored)."""
    y = np.asarray(scores, dtype=np.float64)
    x = np.arange(1, len(y) + 1)
    fig, axes = new_figure(panel_inches=(7.0, 4.0))
    ax = axes[0, 0]
    for k, label in enumerate(dict.fromkeys(labels)):
        sel = np.array([lab == label for lab in labels])
        ax.scatter(x[sel], y[sel], s=14, color=f"C{k % 10}", label=label)
    if len(y):
        best = np.fmin.accumulate(np.where(np.isfinite(y), y, np.inf))
        ax.step(x, np.where(np.isfinite(best), best, np.nan), where="post", color="black", label="best so far")
        ax.legend(fontsize="small", frameon=False)  # nothing to name in an empty plot
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("candidate (in the order scored)")
    ax.set_ylabel("dose score on architecture patients (Gy)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_diversity(names: Sequence[str], matrices: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Heatmaps of the pool's pairwise matrices, each cell annotated with its value."""
    keys = [k for k in MATRIX_TITLES if k in matrices]
    fig, axes = new_figure(ncols=len(keys), panel_inches=(4.2, 3.6))
    n = len(names)
    for ax, key in zip(axes[0], keys):
        m = np.asarray(matrices[key], dtype=np.float64)
        finite = m[np.isfinite(m)]
        lo, hi = (-1.0, 1.0) if key == "error_correlation" else (0.0, float(finite.max()) if finite.size else 1.0)
        im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r" if key == "error_correlation" else "viridis",
                       vmin=lo, vmax=hi if hi > lo else lo + 1.0)
        ax.figure.colorbar(im, ax=ax, shrink=0.8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, "n/a" if not np.isfinite(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center",
                        fontsize="x-small", color="white" if key != "error_correlation" else "black")
        ax.set_xticks(range(n), names)
        ax.set_yticks(range(n), names)
        ax.set_title(MATRIX_TITLES[key], fontsize="medium")
    save_figure(fig, path)


def plot_pareto(scores: Sequence[float], costs: Sequence[float], front: Sequence[int], chosen: Sequence[int],
                cost: str, path: str | Path, diverse_front: Sequence[int] = ()) -> None:
    """Every scored candidate by cost and score, the Pareto front, the pool's members and the
    candidates of the front that counts diversity as a third objective."""
    fig, axes = new_figure(panel_inches=(6.0, 4.2))
    ax = axes[0, 0]
    x, y = np.asarray(costs, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], s=12, color="0.6", label="candidates")
    if len(front):
        ax.step(x[list(front)], y[list(front)], where="post", color="C0", label="Pareto front")
    if len(diverse_front):
        ax.scatter(x[list(diverse_front)], y[list(diverse_front)], s=22, marker="s", facecolors="none",
                   edgecolors="C2", label="front with diversity")
    if len(chosen):
        ax.scatter(x[list(chosen)], y[list(chosen)], s=40, facecolors="none", edgecolors="C3", label="pool")
    ax.set_xscale("log")
    ax.set_xlabel(cost)
    ax.set_ylabel("dose score on architecture patients (Gy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", frameon=False)
    save_figure(fig, path)
