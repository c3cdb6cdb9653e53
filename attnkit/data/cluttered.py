"""Cluttered digits: scikit-learn's real handwritten digits placed at a random position and scale on a larger
canvas among fragments cut from other digits, after the cluttered-MNIST task of the spatial-transformer line
of work (Jaderberg et al., NeurIPS 2015; Mnih et al., "Recurrent Models of Visual Attention", 2014), where
where-to-look matters. Generated with NumPy from a seed: the same bytes on every machine."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["ClutteredSplit", "make_cluttered"]


@dataclass
class ClutteredSplit:
    images: np.ndarray  # uint8 N×canvas×canvas
    labels: np.ndarray  # int64 N: the class of the placed digit
    boxes: np.ndarray  # int64 N×3: row, column and side of the placed digit


@functools.lru_cache(maxsize=None)
def _resize_matrix(src: int, dst: int) -> np.ndarray:
    """dst×src matrix of area-weighted (box-filter) interpolation: each output pixel averages the source
    pixels its footprint covers, so up- and down-scaling both keep the strokes' mass. Cached, and read-only."""
    m = np.zeros((dst, src))
    for i in range(dst):
        lo, hi = i * src / dst, (i + 1) * src / dst
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    m /= m.sum(1, keepdims=True)
    m.flags.writeable = False
    return m


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return _resize_matrix(image.shape[0], rows) @ image @ _resize_matrix(image.shape[1], cols).T


def make_cluttered(sources: np.ndarray, labels: np.ndarray, count: int, *, canvas: int = 20, fragments: int = 3,
                   scale: tuple[float, float] = (1.0, 1.5), fragment_size: int = 4, noise: float = 0.0,
                   seed: int = 0) -> ClutteredSplit:
    """`count` images of side `canvas` from `sources` (N×h×w, values 0–255) and their `labels`.

    Each image: one source digit scaled by a factor drawn from `scale`, at a uniformly random position; then
    `fragments` square patches of side `fragment_size` cut at random from other source digits, scaled the
    same way and placed anywhere (the pixel-wise maximum, so clutter never erases the digit); then Gaussian
    noise of standard deviation `noise` (in units of the full 0–255 range), clipped.
    """
    n, h, w = sources.shape
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (low, high) with 0 < low ≤ high, got {scale}.")
    if round(max(h, w) * scale[1]) > canvas:
        raise ValueError(f"a {h}×{w} digit scaled by up to {scale[1]} does not fit a {canvas}-pixel canvas; enlarge canvas or lower scale.")
    if not 1 <= fragment_size <= min(h, w):
        raise ValueError(f"fragment_size must be between 1 and {min(h, w)} (the source digits' side), got {fragment_size}.")
    if fragments < 0 or noise < 0 or count < 1 or n < 2:
        raise ValueError(f"need fragments ≥ 0, noise ≥ 0, count ≥ 1 and two or more sources; got {fragments}, {noise}, {count}, {n}.")
    rng = np.random.default_rng(seed)
    sources = sources.astype(np.float64)
    out = np.zeros((count, canvas, canvas))
    picked = rng.integers(0, n, count)
    boxes = np.zeros((count, 3), dtype=np.int64)
    for i, s in enumerate(picked):
        for _ in range(fragments):
            j = (s + rng.integers(1, n)) % n  # any source but the digit's own
            r, c = rng.integers(0, h - fragment_size + 1), rng.integers(0, w - fragment_size + 1)
            side = max(1, round(fragment_size * rng.uniform(*scale)))
            patch = _resize(sources[j, r:r + fragment_size, c:c + fragment_size], side, side)
            top, left = rng.integers(0, canvas - side + 1, 2)
            region = out[i, top:top + side, left:left + side]
            np.maximum(region, patch, out=region)
        side = round(max(h, w) * rng.uniform(*scale))
        digit = _resize(sources[s], side, side)
        top, left = rng.integers(0, canvas - side + 1, 2)
        region = out[i, top:top + side, left:left + side]
        np.maximum(region, digit, out=region)
        boxes[i] = (top, left, side)
    if noise > 0:
        out += rng.normal(0.0, 255 * noise, out.shape)
    images = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return ClutteredSplit(images, labels[picked].astype(np.int64), boxes)
