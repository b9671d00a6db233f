"""The eight classes of synthetic-shapes as polygons, so an object's mask is exactly its polygon.

Each shape is centred on its bounding box and scaled so its farthest vertex is at radius 1: a
shape of size s placed at centre c lies inside the disc of diameter s around c whatever its
rotation, which makes "fully inside the image" a bound on c alone.
"""

from __future__ import annotations

import numpy as np


def _regular(n: int, radius: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
    angles = start + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return radii[:, None] * _regular(2 * points)


def _cross(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    return np.array(
        [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
    )


def _arrow() -> np.ndarray:
    return np.array(
        [(-1, -0.3), (0.1, -0.3), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.3), (-1, 0.3)]
    )


def _crescent(offset: float = 0.45, inner: float = 0.8) -> np.ndarray:
    """The unit disc minus a disc of radius `inner` shifted right by `offset`."""
    x = (1 + offset**2 - inner**2) / (2 * offset)  # where the two circles cross
    y = np.sqrt(1 - x**2)
    outer_start = np.arctan2(y, x)
    inner_start = np.arctan2(y, x - offset)
    outer = np.linspace(outer_start, 2 * np.pi - outer_start, 32)
    hollow = np.linspace(2 * np.pi - inner_start, inner_start, 24)[1:-1]
    return np.concatenate(
        [
            np.stack([np.cos(outer), np.sin(outer)], axis=1),
            np.stack([offset + inner * np.cos(hollow), inner * np.sin(hollow)], axis=1),
        ]
    )


def _heart(n: int = 48) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y points down
    return np.stack([x, y], axis=1)


def _normalise(polygon: np.ndarray) -> np.ndarray:
    polygon = polygon - (polygon.min(axis=0) + polygon.max(axis=0)) / 2
    return polygon / np.linalg.norm(polygon, axis=1).max()


SHAPES = {
    name: _normalise(make())
    for name, make in {
        "arrow": _arrow,
        "circle": lambda: _regular(48),
        "crescent": _crescent,
        "cross": _cross,
        "heart": _heart,
        "square": lambda: _regular(4),
        "star": _star,
        "triangle": lambda: _regular(3),
    }.items()
}
CLASSES = tuple(sorted(SHAPES))  # ImageFolder's class order, so label k is CLASSES[k]


def place(shape: str, size: float, centre: np.ndarray, angle: float) -> np.ndarray:
    """Vertices (K, 2) of `shape` scaled to diameter `size`, rotated by `angle`, at `centre`."""
    c, s = np.cos(angle), np.sin(angle)
    return SHAPES[shape] @ np.array([[c, s], [-s, c]]) * (size / 2) + centre
