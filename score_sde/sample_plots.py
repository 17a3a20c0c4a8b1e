"""Pictures of point samples: the score field ``--mode sample`` draws for 2-D data, and training's point snapshots.

:func:`is_2d` tells whether samples of a shape are points of the plane; :func:`plot_score_field`
writes one PNG with a panel per time: the direction of the score ``∇_x log p_t`` on a grid (unit
arrows, coloured by ``log10 |score|``, since its size grows like ``1/σ(t)²`` towards the data) and
the paths that the samples took from noise (frame 0) to data (the last frame). :func:`plot_points`
is the scatter plot of training's snapshot samples of mixture points (``run_lib.write_samples``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

# Panel times as fractions of the way from eps (0) to T (1).
PANEL_FRACTIONS = (1.0, 0.5, 0.2, 0.05, 0.0)


def is_2d(shape: Sequence[int]) -> bool:
    """Whether a sample batch of ``shape`` ``(batch, ...)`` holds 2-D points (two numbers per example)."""
    return math.prod(shape[1:]) == 2


def panel_times(t_end: float, t_start: float) -> list[float]:
    """The times of the panels, from ``t_start`` (``T``) down to ``t_end`` (``eps``)."""
    return [t_end + f * (t_start - t_end) for f in PANEL_FRACTIONS]


def plot_bounds(samples: np.ndarray, margin: float = 0.3) -> tuple[float, float, float, float]:
    """A square ``(x0, x1, y0, y1)`` around the 1st–99th percentiles of ``samples`` (n, 2), widened by ``margin``."""
    lo, hi = np.percentile(samples, 1, axis=0), np.percentile(samples, 99, axis=0)
    center, half = (lo + hi) / 2, max(float(np.max(hi - lo)) / 2, 0.5) * (1 + margin)
    return center[0] - half, center[0] + half, center[1] - half, center[1] + half


def plot_score_field(path: str, score_fn: Callable[[np.ndarray, float], np.ndarray], times: Sequence[float],
                     paths: np.ndarray, *, grid: int = 21, bounds: tuple[float, float, float, float] | None = None,
                     title: str = "") -> None:
    """Write a PNG to ``path``: for each of ``times``, the score field on a ``grid × grid`` lattice and the paths.

    Args:
        path: the PNG file to write.
        score_fn: ``score_fn(points, t)``: ``points`` ``(n, 2)`` and a float time -> scores ``(n, 2)``
            (in the coordinates of ``paths``).
        times: one panel per time.
        paths: ``(frames, n, 2)``: the states of ``n`` samples from noise (frame 0) to the samples (last).
        grid: arrows per side.
        bounds: ``(x0, x1, y0, y1)`` of the panels; default :func:`plot_bounds` of the samples.
        title: the figure's title (the sampler, its settings).
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 (only this plot needs matplotlib; no pyplot state)

    paths = np.asarray(paths, np.float64)
    if paths.ndim != 3 or paths.shape[-1] != 2:
        raise ValueError(f"paths must be (frames, n, 2) points of the plane, got shape {paths.shape}.")
    x0, x1, y0, y1 = plot_bounds(paths[-1]) if bounds is None else bounds
    gx, gy = np.meshgrid(np.linspace(x0, x1, grid), np.linspace(y0, y1, grid))
    points = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)

    fig = Figure(figsize=(3.2 * len(times), 3.6), layout="constrained")
    for k, t in enumerate(times):
        ax = fig.add_subplot(1, len(times), k + 1)
        score = np.asarray(score_fn(points, float(t)), np.float64).reshape(-1, 2)
        norm = np.linalg.norm(score, axis=1)
        unit = score / np.where(norm > 0, norm, 1.0)[:, None]
        ax.quiver(points[:, 0], points[:, 1], unit[:, 0], unit[:, 1], np.log10(np.maximum(norm, 1e-12)),
                  cmap="viridis", angles="xy", pivot="mid", width=0.006)
        for trace in np.moveaxis(paths, 1, 0):  # one line per sample, noise to data
            ax.plot(trace[:, 0], trace[:, 1], color="0.35", linewidth=0.5, alpha=0.5)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=4, color="tab:blue", label="noise")
        ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=6, color="tab:red", label="sample")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
        ax.set_title(f"t = {t:.3g}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(loc="lower left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)


def plot_points(path: str, points: np.ndarray, title: str = "") -> None:
    """Write a scatter plot of ``points`` ``(n, dim)``, dim >= 2, to the PNG ``path``: coordinates 1 and 2."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (only the plots need matplotlib; no pyplot state)

    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] < 2:
        raise ValueError(f"points must be (n, dim) with dim >= 2, got shape {points.shape}.")
    x0, x1, y0, y1 = plot_bounds(points[:, :2])
    fig = Figure(figsize=(4.0, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(points[:, 0], points[:, 1], s=4, color="tab:red")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    if points.shape[1] > 2:
        title = f"{title} (coordinates 1 and 2 of {points.shape[1]})".strip()
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=90)
