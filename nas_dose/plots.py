"""Figures: DVH curves, dose slices, and the helpers the search and ensemble figures share.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no window can
open, no global backend is switched under other code, and no figure outlives its function.
Every PNG is written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .data.patient import ROIS
from .io import atomic_path

# One fixed colour per structure, so a structure looks the same in every figure.
ROI_COLORS: dict[str, str] = {roi: f"C{i}" for i, roi in enumerate(ROIS)}
DOSE_CMAP = "turbo"
DIFF_CMAP = "RdBu_r"
# CT is stored as HU + CT_OFFSET; shown in HU through this window; the body is above BODY_HU.
CT_OFFSET = 1024.0
CT_WINDOW_HU = (-500.0, 1000.0)
BODY_HU = -500.0


def new_figure(ncols: int = 1, nrows: int = 1, panel_inches: tuple[float, float] = (5.0, 4.0),
               ) -> tuple[Figure, np.ndarray]:
    """A figure with a grid of axes (always a 2D array), sized per panel."""
    fig = Figure(figsize=(panel_inches[0] * ncols, panel_inches[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write the figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def cumulative_dvh(dose: np.ndarray, mask: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Percentage of the structure's volume receiving at least each dose in `bins`."""
    roi_dose = np.sort(np.asarray(dose, dtype=np.float64)[np.asarray(mask, dtype=bool)])
    below = np.searchsorted(roi_dose, bins, side="left")
    return 100.0 * (roi_dose.size - below) / roi_dose.size


def image_panel(ax: Axes, image: np.ndarray, title: str, cmap: str, vmin: float, vmax: float,
                label: str = "", background: np.ndarray | None = None) -> None:
    """Show one 2D image without ticks, with a colorbar (labelled `label`).

    With a grey `background` (values in 0..1), the image is drawn over it and left transparent
    where it is masked (a numpy masked array), so anatomy shows around a dose.
    """
    if background is not None:
        ax.imshow(background, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                   alpha=0.75 if background is not None else None)
    ax.set_title(title)
    ax.set_axis_off()
    ax.figure.colorbar(im, ax=ax, shrink=0.85, label=label)


def crop_box(*images: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """The rows and columns where any image is non-zero, plus a margin (all when none is)."""
    occupied = np.logical_or.reduce([np.asarray(im) != 0 for im in images])
    if not occupied.any():
        return slice(None), slice(None)
    rows, cols = np.nonzero(occupied.any(axis=1))[0], np.nonzero(occupied.any(axis=0))[0]
    return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def plot_dvh(ref_dose: np.ndarray, pred_dose: np.ndarray, structures: Mapping[str, np.ndarray],
             path: str | Path, title: str = "") -> None:
    """Cumulative DVHs of every contoured structure: reference solid, prediction dashed."""
    top = max(float(np.max(ref_dose)), float(np.max(pred_dose)), 1.0) * 1.02
    bins = np.linspace(0.0, top, 400)
    fig, axes = new_figure(panel_inches=(8.0, 5.5))
    ax = axes[0, 0]
    for roi in ROIS:
        mask = structures.get(roi)
        if mask is None or not np.any(mask):
            continue
        color = ROI_COLORS[roi]
        ax.plot(bins, cumulative_dvh(ref_dose, mask, bins), color=color, label=roi)
        ax.plot(bins, cumulative_dvh(pred_dose, mask, bins), color=color, linestyle="--")
    ax.plot([], [], color="0.3", label="reference")
    ax.plot([], [], color="0.3", linestyle="--", label="prediction")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, 101.0)
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def plot_dvh_sweep(bins: np.ndarray, curves: Mapping[str, Mapping[str, np.ndarray]], path: str | Path,
                   title: str = "") -> None:
    """A panel per structure, the DVH of each setting (`curves`: label -> structure -> curve on
    `bins`, as `cumulative_dvh`) coloured in order: how the dose moves with a preference."""
    rois = [roi for roi in ROIS if any(roi in c for c in curves.values())]
    ncols = min(len(rois), 4) or 1
    fig, axes = new_figure(ncols, -(-len(rois) // ncols) or 1, panel_inches=(3.6, 2.8))
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(curves), 1)))
    for ax, roi in zip(axes.flat, rois):
        for color, (label, by_roi) in zip(colors, curves.items()):
            if roi in by_roi:
                ax.plot(bins, by_roi[roi], color=color, label=label)
        ax.set_title(roi, fontsize="medium")
        ax.set_xlim(0.0, float(bins[-1]))
        ax.set_ylim(0.0, 101.0)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(rois):]:
        ax.set_axis_off()
    axes[0, 0].legend(fontsize="x-small", frameon=False)
    fig.supxlabel("dose (Gy)")
    fig.supylabel("volume (%)")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def axial_centre(mask: np.ndarray) -> int | None:
    """Axial slice (index along axis 2) through the centroid of a mask; None when it is empty."""
    slices = np.nonzero(mask)[2]
    return int(round(float(slices.mean()))) if slices.size else None


def plot_dose_slices(ct: np.ndarray, ref_dose: np.ndarray, pred_dose: np.ndarray,
                     path: str | Path, slice_index: int | None = None,
                     ptv70: np.ndarray | None = None, title: str = "") -> None:
    """One axial slice, cropped to the body: CT, reference dose, predicted dose (both over the
    CT) and prediction - reference.

    The default slice passes through the PTV70 centroid; without a PTV70 mask, through the
    centroid of the high-dose region (>= 95% of the reference maximum), which PTV70 receives.
    """
    if slice_index is None:
        slice_index = axial_centre(ptv70) if ptv70 is not None else None
    if slice_index is None:
        slice_index = axial_centre(ref_dose >= 0.95 * float(np.max(ref_dose)))
    if slice_index is None or not 0 <= slice_index < ct.shape[2]:
        raise ValueError(f"slice {slice_index} outside 0..{ct.shape[2] - 1}")
    hu = ct[:, :, slice_index].astype(np.float64) - CT_OFFSET
    ref, pred = ref_dose[:, :, slice_index], pred_dose[:, :, slice_index]
    box = crop_box(hu > BODY_HU, ref, pred)
    hu, ref, pred = hu[box], ref[box], pred[box]
    diff = pred - ref
    grey = np.clip((hu - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0]), 0.0, 1.0)
    dose_max = max(float(np.max(ref)), float(np.max(pred)), 1e-6)
    diff_max = max(float(np.max(np.abs(diff))), 1e-6)
    fig, axes = new_figure(ncols=4, panel_inches=(4.0, 3.6))
    image_panel(axes[0, 0], hu, "CT", "gray", *CT_WINDOW_HU, label="HU")
    image_panel(axes[0, 1], np.ma.masked_equal(ref, 0), "reference dose", DOSE_CMAP, 0.0,
                dose_max, label="Gy", background=grey)
    image_panel(axes[0, 2], np.ma.masked_equal(pred, 0), "predicted dose", DOSE_CMAP, 0.0,
                dose_max, label="Gy", background=grey)
    image_panel(axes[0, 3], diff, "prediction - reference", DIFF_CMAP, -diff_max, diff_max,
                label="Gy")
    fig.suptitle(f"{title}{': ' if title else ''}axial slice {slice_index}")
    save_figure(fig, path)


def plot_training_curve(history: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """The training loss and the validation dose score by epoch (log.jsonl's records)."""
    fig, axes = new_figure(ncols=2, panel_inches=(4.8, 3.6))
    steps = [h for h in history if h.get("loss") is not None]
    val = [h for h in history if h.get("val_dose_score") is not None]
    loss_ax, val_ax = axes[0, 0], axes[0, 1]
    loss_ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], lw=1)
    loss_ax.set(xlabel="step", ylabel="training loss", yscale="log")
    val_ax.plot([h["epoch"] for h in val], [h["val_dose_score"] for h in val], marker="o", ms=3)
    val_ax.set(xlabel="epoch", ylabel="validation dose score (Gy)")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    save_figure(fig, path)
