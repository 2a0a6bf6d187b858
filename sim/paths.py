"""Paths that actors follow: polylines parametrised by arc length.

Notation:
    M  samples along the path
    K  query positions
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Path:
    """A polyline resampled at even arc length.

    Attributes:
        xy: [M, 2] float64 points (m, global), ``spacing_m`` apart.
        s_m: [M] float64 arc length of each point (m), from 0.
        heading_rad: [M] float64 unwrapped direction of travel at each point (rad).
        curvature_per_m: [M] float64 absolute curvature at each point (1/m).
    """

    xy: np.ndarray
    s_m: np.ndarray
    heading_rad: np.ndarray
    curvature_per_m: np.ndarray

    @staticmethod
    def from_polyline(polyline: np.ndarray, spacing_m: float = 0.5) -> Path:
        """Resample a polyline ([M, 2] m, at least two distinct points) every ``spacing_m``."""
        polyline = np.asarray(polyline, dtype=np.float64)
        steps = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
        keep = np.concatenate([[True], steps > 1e-9])
        polyline, steps = polyline[keep], steps[steps > 1e-9]
        if len(polyline) < 2:
            raise ValueError("Path.from_polyline: needs at least two distinct points")
        cumulative = np.concatenate([[0.0], np.cumsum(steps)])
        s = np.linspace(0.0, cumulative[-1], max(2, int(np.ceil(cumulative[-1] / spacing_m)) + 1))
        xy = np.stack([np.interp(s, cumulative, polyline[:, 0]), np.interp(s, cumulative, polyline[:, 1])], axis=1)
        direction = np.gradient(xy, axis=0)
        heading = np.unwrap(np.arctan2(direction[:, 1], direction[:, 0]))
        return Path(xy, s, heading, np.abs(np.gradient(heading, s)))

    @staticmethod
    def stationary(x_m: float, y_m: float, yaw_rad: float, length_m: float = 1.0) -> Path:
        """A short straight path for an actor that stays put (a parked car)."""
        direction = np.array([np.cos(yaw_rad), np.sin(yaw_rad)])
        start = np.array([x_m, y_m])
        return Path.from_polyline(np.stack([start, start + direction * length_m]))

    @property
    def length_m(self) -> float:
        """Total arc length (m)."""
        return float(self.s_m[-1])

    def pose_at(self, s_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions and headings at arc lengths (clamped to the path).

        Args:
            s_m: [K] float arc lengths (m).

        Returns:
            xy [K, 2] float64 (m), heading [K] float64 (rad, unwrapped).
        """
        s = np.clip(np.asarray(s_m, dtype=np.float64), 0.0, self.s_m[-1])
        xy = np.stack([np.interp(s, self.s_m, self.xy[:, 0]), np.interp(s, self.s_m, self.xy[:, 1])], axis=-1)
        return xy, np.interp(s, self.s_m, self.heading_rad)

    def curvature_at(self, s_m: np.ndarray) -> np.ndarray:
        """[K] float64 absolute curvature (1/m) at arc lengths, from the heading's rate of change."""
        return np.interp(np.clip(s_m, 0.0, self.s_m[-1]), self.s_m, self.curvature_per_m)

    def project(self, xy: np.ndarray) -> float:
        """Arc length (m) of the path sample nearest to a point ([2] m)."""
        return float(self.s_m[np.argmin(np.sum((self.xy - np.asarray(xy)) ** 2, axis=1))])


def lane_change_polyline(source: np.ndarray, target: np.ndarray, start_s_m: float, length_m: float) -> np.ndarray:
    """A polyline that follows ``source`` and blends smoothly onto the parallel ``target`` over ``length_m``.

    Both polylines ([M, 2] m) run the same way; the blend is a smoothstep in arc length from ``start_s_m``.
    """
    src = Path.from_polyline(source, 1.0)
    dst = Path.from_polyline(target, 1.0)
    s = src.s_m
    src_xy = src.xy
    # The target point beside each source point: project by arc length offset of the two starts.
    offset_m = dst.project(src.xy[0])
    dst_xy, _ = dst.pose_at(s + offset_m)
    t = np.clip((s - start_s_m) / length_m, 0.0, 1.0)
    blend = (t * t * (3 - 2 * t))[:, None]
    mixed = (1 - blend) * src_xy + blend * dst_xy
    # Past the source's end, carry on along the target.
    rest, _ = dst.pose_at(np.arange(s[-1] + offset_m + 1.0, dst.length_m, 1.0))
    return np.concatenate([mixed, rest], axis=0) if len(rest) else mixed


@dataclass(frozen=True)
class PathBank:
    """Many paths in one set of arrays, so that poses of every actor are looked up at once.

    Attributes:
        xy: [sum M, 2] float64 every path's points, concatenated (m).
        heading_rad: [sum M] float64.
        curvature_per_m: [sum M] float64.
        start: [P] int64 index of each path's first point.
        count: [P] int64 points of each path.
        spacing_m: [P] float64 arc length between points of each path (m).
    """

    xy: np.ndarray
    heading_rad: np.ndarray
    curvature_per_m: np.ndarray
    start: np.ndarray
    count: np.ndarray
    spacing_m: np.ndarray

    @staticmethod
    def of(paths: list[Path] | tuple[Path, ...]) -> PathBank:
        """Stack paths."""
        count = np.array([len(p.s_m) for p in paths], dtype=np.int64)
        return PathBank(
            np.concatenate([p.xy for p in paths]),
            np.concatenate([p.heading_rad for p in paths]),
            np.concatenate([p.curvature_per_m for p in paths]),
            np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64),
            count,
            np.array([p.s_m[1] for p in paths]),
        )

    @property
    def length_m(self) -> np.ndarray:
        """[P] float64 length of each path (m)."""
        return (self.count - 1) * self.spacing_m

    def lookup(self, s_m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Poses at arc lengths, clamped to each path.

        Args:
            s_m: [P, ...] float arc lengths (m) along path p.

        Returns:
            xy [P, ..., 2] (m), heading [P, ...] (rad, unwrapped), curvature [P, ...] (1/m).
        """
        s_m = np.asarray(s_m, dtype=np.float64)
        shape = (-1,) + (1,) * (s_m.ndim - 1)
        position = np.clip(s_m / self.spacing_m.reshape(shape), 0.0, (self.count - 1).reshape(shape))
        lower = np.minimum(np.floor(position).astype(np.int64), (self.count - 2).reshape(shape))
        frac = position - lower
        i0 = self.start.reshape(shape) + lower
        xy = self.xy[i0] * (1 - frac)[..., None] + self.xy[i0 + 1] * frac[..., None]
        heading = self.heading_rad[i0] * (1 - frac) + self.heading_rad[i0 + 1] * frac
        curvature = self.curvature_per_m[i0] * (1 - frac) + self.curvature_per_m[i0 + 1] * frac
        return xy, heading, curvature
