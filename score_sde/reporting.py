"""Human-facing output of long jobs: PNG image grids, progress lines, log files.

Nothing here runs inside jitted code; these functions take host numpy arrays.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import BinaryIO

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> np.ndarray:
    """Tile ``images`` (n, H, W, C) with values in [0, 1] into one (H', W', C) image.

    ``nrow`` images per row, ``padding`` pixels of ``pad_value`` around every image
    (torchvision's ``make_grid`` layout, which the original used).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"make_grid needs images of shape (n, H, W, C); got {images.shape}.")
    n, height, width, channels = images.shape
    cols = min(nrow, n)
    rows = int(math.ceil(n / cols))
    cell_h, cell_w = height + padding, width + padding
    grid = np.full((rows * cell_h + padding, cols * cell_w + padding, channels), pad_value, dtype=np.float32)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = r * cell_h + padding, c * cell_w + padding
        grid[top:top + height, left:left + width] = images[k]
    return grid


def save_image(images: np.ndarray, fp: str | BinaryIO, nrow: int = 8, padding: int = 2, pad_value: float = 0.0,
               format: str | None = None, upscale: int = 1) -> None:  # noqa: A002 (the original's argument name)
    """Save ``images`` (n, H, W, C) in [0, 1] as one PNG grid (see :func:`make_grid`).

    Values are rounded to the nearest of 256 levels; one channel is written as greyscale.
    ``upscale`` repeats every pixel (nearest neighbour) so that tiny images (8×8 digits)
    are visible in an image viewer.
    """
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    pixels = np.clip(grid * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if upscale > 1:
        pixels = pixels.repeat(upscale, axis=0).repeat(upscale, axis=1)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    Image.fromarray(pixels).save(fp, format=format)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``65`` -> ``'1m05s'``; ``7.2`` -> ``'7s'``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Steps per second and time left of a loop running from ``start_step`` to ``total_steps``.

    The rate is measured from the first :meth:`update` on (so compilation of the first
    step does not count) and smoothed over the recent window.
    """

    def __init__(self, start_step: int, total_steps: int, clock=None):
        self._clock = clock or time.perf_counter
        self.total_steps = total_steps
        self._marks: list[tuple[int, float]] = [(start_step, self._clock())]

    def update(self, step: int) -> None:
        """Record that ``step`` steps have been completed now."""
        self._marks.append((step, self._clock()))
        if len(self._marks) > 20:
            del self._marks[1:-19]

    def steps_per_second(self) -> float:
        """Recent rate, ignoring the interval up to the first update (compilation); 0 if unknown."""
        marks = self._marks[1:] if len(self._marks) > 2 else self._marks
        (s0, t0), (s1, t1) = marks[0], marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else 0.0

    def line(self, step: int, **values: float) -> str:
        """``'step 500/3000 (17%) | loss 1.23e-01 | 12.3 steps/s | ETA 3m23s'``."""
        rate = self.steps_per_second()
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.0f}%)"]
        parts += [f"{name} {value:.4e}" for name, value in values.items()]
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s")
            parts.append(f"ETA {format_duration((self.total_steps - step) / rate)}")
        return " | ".join(parts)


def add_log_file(path: str) -> logging.Handler:
    """Also write Python/absl log records to ``path`` (appending); returns the handler to remove later."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(levelname)s - %(filename)s - %(asctime)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler
