"""Boxes and LiDAR returns onto the BEV grid: what is there (``rasterize_boxes``), what was seen (``observed_cells``).

``rasterize_boxes`` paints oriented boxes: a cell belongs to a box iff its centre lies strictly inside the box
footprint (``box_footprints``), which is exactly ``shapely.contains_xy(Polygon(footprint), cx, cy)``. For all
boxes at once it takes each box's window of candidate cells (``GridSpec.center_window``), pads the windows to a
common size, and tests every candidate centre against the four edges with the orientation determinant and a
forward bound on its rounding error; the rare centres within rounding of an edge are settled by shapely itself,
so the result is shapely's to the last cell.

``observed_cells`` is the LiDAR visibility mask: returns are binned by azimuth around the sensor, and a cell is
observed if its centre is no farther from the sensor than the farthest return of its azimuth bin (the beam passed
through it) or if it holds a return.

Notation:
    A  number of boxes
    N  number of LiDAR returns
    C  number of classes (occupancy channels)
    H, W  BEV rows (along +x) and columns (along +y), see ``geometry.GridSpec``
"""

from __future__ import annotations

import functools
import time

import numpy as np
import shapely

from bevjepa.datasets import geometry

_ORIENT_ERRBOUND = 1e-15
"""Relative error bound of the edge determinants as evaluated in ``_inside`` (at most four roundings per term,
gamma_4 ~ 4.4e-16, taken with margin): where a determinant exceeds it, its sign is exact."""

_CHUNK_ELEMENTS = 1 << 21
"""Most padded (box, candidate cell) pairs tested at once; bounds memory for huge boxes."""


def _finite(name: str, value: np.ndarray, shape: tuple[int | None, ...]) -> np.ndarray:
    """``value`` as float64 after checking its shape (``None`` matches any length) and finiteness."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != len(shape) or any(want not in (None, got) for got, want in zip(array.shape, shape, strict=True)):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def box_footprints(centers_xy: np.ndarray, sizes_wl: np.ndarray, yaws: np.ndarray) -> np.ndarray:
    """Corners of oriented boxes, counter-clockwise (for non-negative sizes).

    Args:
        centers_xy: [A, 2] float — box centres x, y (m).
        sizes_wl: [A, 2] float — width (across the heading) and length (along the heading) (m).
        yaws: [A] float — heading of the length axis (rad), counter-clockwise from +x.

    Returns:
        [A, 4, 2] float64 corners x, y (m): front-left, rear-left, rear-right, front-right.
    """
    half_w, half_l = 0.5 * sizes_wl[:, 0], 0.5 * sizes_wl[:, 1]  # [A]
    local_x = np.stack([half_l, -half_l, -half_l, half_l], axis=1)  # [A, 4] along the heading
    local_y = np.stack([half_w, half_w, -half_w, -half_w], axis=1)  # [A, 4] to the left
    cos, sin = np.cos(yaws)[:, None], np.sin(yaws)[:, None]  # [A, 1]
    x = centers_xy[:, :1] + cos * local_x - sin * local_y
    y = centers_xy[:, 1:] + sin * local_x + cos * local_y
    return np.stack([x, y], axis=-1)  # [A, 4, 2]


def _inside(corners: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Exact strict point-in-convex-quadrilateral test, broadcast over boxes and their candidate cells.

    Args:
        corners: [a, 4, 2] float64 counter-clockwise corners (m).
        px: [a, R, 1] float64 x (m) of the candidate rows' centres; NaN marks padding.
        py: [a, 1, K] float64 y (m) of the candidate columns' centres; NaN marks padding.

    Returns:
        [a, R, K] bool, ``shapely.contains_xy`` of each box's polygon at its candidate centres (False on padding).
    """
    # orient2d(c_k, c_k+1, p) > 0 iff p lies left of edge k; in the form linear in p it costs one add per cell:
    # (ax - px)(by - py) - (ay - py)(bx - px) = (ax by - ay bx) + px (ay - by) + py (bx - ax).
    ax, ay = corners[:, :, 0], corners[:, :, 1]  # [a, 4]
    bx, by = np.roll(ax, -1, axis=1), np.roll(ay, -1, axis=1)  # [a, 4] next corner
    const, along_x, along_y = ax * by - ay * bx, ay - by, bx - ax  # [a, 4]
    dets = (  # [a, R, K] per edge: a small [a, R, 1] part plus a small [a, 1, K] part
        (along_x[:, k, None, None] * px + const[:, k, None, None]) + along_y[:, k, None, None] * py for k in range(4)
    )
    det_min = functools.reduce(np.minimum, dets)  # [a, R, K]
    # Forward error: |det - exact| <= gamma_4 * (|ax by| + |ay bx| + |px| (|ay| + |by|) + |py| (|ax| + |bx|)).
    big_x = np.maximum(np.abs(ax).max(axis=1), np.nanmax(np.abs(px), axis=(1, 2), initial=0.0))  # [a]
    big_y = np.maximum(np.abs(ay).max(axis=1), np.nanmax(np.abs(py), axis=(1, 2), initial=0.0))  # [a]
    bound = (_ORIENT_ERRBOUND * 6.0 * np.maximum(big_x, big_y) ** 2)[:, None, None]  # [a, 1, 1]
    inside = det_min > bound
    unsure = np.nonzero(np.abs(det_min) <= bound)  # centres within rounding of an edge: ask shapely
    if unsure[0].size:
        polygons = shapely.polygons(corners[unsure[0]])
        x, y = np.broadcast_to(px, inside.shape)[unsure], np.broadcast_to(py, inside.shape)[unsure]
        inside[unsure] = shapely.contains_xy(polygons, x, y)
    return inside


def rasterize_boxes(
    grid: geometry.GridSpec,
    centers_xy: np.ndarray,
    sizes_wl: np.ndarray,
    yaws: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class occupancy and instance maps of oriented boxes.

    A cell is covered by a box iff its centre lies strictly inside the box footprint (``box_footprints``).

    Args:
        grid: the BEV grid.
        centers_xy: [A, 2] float — box centres x, y (m) in the grid's frame.
        sizes_wl: [A, 2] float — non-negative width and length (m); the length lies along the heading.
        yaws: [A] float — headings (rad), counter-clockwise from +x.
        classes: [A] int — occupancy channel of each box in ``[0, num_classes)``; -1 skips the box entirely.
        num_classes: C, the number of occupancy channels.

    Returns:
        occupancy: [C, H, W] bool — channel ``c`` is True where a box of class ``c`` covers the cell centre.
        instance: [H, W] int32 — 1 + index of the covering box, 0 where none; the highest index wins overlaps.
    """
    centers_xy = _finite("centers_xy", centers_xy, (None, 2))
    a_total = centers_xy.shape[0]
    sizes_wl = _finite("sizes_wl", sizes_wl, (a_total, 2))
    yaws = _finite("yaws", yaws, (a_total,))
    classes = np.asarray(classes)
    if classes.shape != (a_total,) or (a_total and not np.issubdtype(classes.dtype, np.integer)):
        raise ValueError(f"classes: expected an int array of shape [{a_total}], got {classes.dtype} {classes.shape}")
    if num_classes < 1 or np.any((classes < -1) | (classes >= num_classes)):
        raise ValueError(f"classes: values must lie in [-1, {num_classes}), num_classes >= 1")
    if np.any(sizes_wl < 0):
        raise ValueError("sizes_wl: sizes must be non-negative")
    h, w = grid.shape
    occupancy = np.zeros((num_classes, h, w), dtype=bool)
    instance = np.zeros((h, w), dtype=np.int32)
    keep = np.nonzero(classes >= 0)[0]  # [A'] boxes to paint, ascending
    if keep.size == 0:
        return occupancy, instance

    box, rows, cols = box_cells(grid, centers_xy[keep], sizes_wl[keep], yaws[keep])
    box = keep[box]
    occupancy[classes[box], rows, cols] = True
    np.maximum.at(instance, (rows, cols), (box + 1).astype(np.int32))
    return occupancy, instance


def box_cells(
    grid: geometry.GridSpec, centers_xy: np.ndarray, sizes_wl: np.ndarray, yaws: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (box, cell) pair where the cell's centre lies strictly inside the box's footprint.

    Args:
        grid: the BEV grid.
        centers_xy: [A, 2] float64 — box centres x, y (m), finite.
        sizes_wl: [A, 2] float64 — non-negative width and length (m).
        yaws: [A] float64 — headings (rad).

    Returns:
        box [P] int64 (index into the A boxes), rows [P] int64, cols [P] int64 — ordered by box.
    """
    if len(centers_xy) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    corners = box_footprints(centers_xy, sizes_wl, yaws)  # [A, 4, 2]
    # Each box's window of candidate cells, padded to the largest window: [A, R, K] candidates in all.
    row0, row1, col0, col1 = grid.center_window(corners.min(axis=1), corners.max(axis=1))  # [A] each
    pad_r, pad_c = int((row1 - row0).max()), int((col1 - col0).max())
    step = max(1, _CHUNK_ELEMENTS // max(1, pad_r * pad_c))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for s in range(0, len(corners), step):  # chunks of boxes, each fully vectorized
        sl = slice(s, s + step)
        rows = row0[sl, None, None] + np.arange(pad_r)[None, :, None]  # [a, R, 1]
        cols = col0[sl, None, None] + np.arange(pad_c)[None, None, :]  # [a, 1, K]
        px, py = grid.index_to_center_coords(rows, cols)  # [a, R, 1], [a, 1, K]
        px = np.where(rows < row1[sl, None, None], px, np.nan)  # padding: NaN never tests inside
        py = np.where(cols < col1[sl, None, None], py, np.nan)
        box, r_i, c_i = np.nonzero(_inside(corners[sl], px, py))  # [P] each
        found.append((s + box, rows[box, r_i, 0], cols[box, 0, c_i]))
    box, rows, cols = (np.concatenate(part).astype(np.int64) for part in zip(*found, strict=True))
    return box, rows, cols


def box_means(
    grid: geometry.GridSpec,
    maps: np.ndarray,
    channels: np.ndarray,
    centers_xy: np.ndarray,
    sizes_wl: np.ndarray,
    yaws: np.ndarray,
) -> np.ndarray:
    """The mean of each box's own channel over the cells it covers (``box_cells``: as the targets are drawn).

    Args:
        grid: the BEV grid of ``maps``.
        maps: [C, H, W] float — e.g. per-class occupancy probabilities.
        channels: [A] int — the channel each box reads.
        centers_xy, sizes_wl, yaws: the boxes, as ``box_cells`` takes them.

    Returns:
        [A] float64 — each box's mean; 0 for a box that covers no cell centre of the grid.
    """
    box, rows, cols = box_cells(grid, centers_xy, sizes_wl, yaws)
    A = len(centers_xy)
    covered = np.bincount(box, minlength=A)
    total = np.bincount(box, weights=maps[np.asarray(channels)[box], rows, cols], minlength=A)
    return total / np.maximum(covered, 1)


def observed_cells(
    grid: geometry.GridSpec, points_xy: np.ndarray, sensor_xy: np.ndarray, azimuth_bins: int = 720
) -> np.ndarray:
    """Cells the LiDAR observed: free space swept by the beams up to their returns, plus cells holding returns.

    The same mask as ``observed_cells_reference`` (bit for bit) in about three quarters of its time: the cells'
    polar coordinates are computed once per grid and sensor position, the offsets column by column, and only the
    returns inside the grid are binned into cells.

    Args:
        grid: the BEV grid.
        points_xy: [N, 2] float — returns x, y (m) in the grid's frame (those outside the grid still count).
        sensor_xy: [2] float — the sensor's x, y (m) in the grid's frame.
        azimuth_bins: number of equal azimuth bins over the full circle.

    Returns:
        [H, W] bool — True where the centre's range from the sensor is at most the largest return range of its
        azimuth bin, or where the cell contains a return.
    """
    points_xy, sensor_xy = _observed_inputs(points_xy, sensor_xy, azimuth_bins)
    h, w = grid.shape
    if points_xy.shape[0] == 0:
        return np.zeros((h, w), dtype=bool)
    point_range, point_bin = _polar(points_xy, sensor_xy, azimuth_bins)  # [N], [N]
    reach = np.full(azimuth_bins, -np.inf)
    np.maximum.at(reach, point_bin, point_range)  # [bins] farthest return per bin (m)
    cell_range, cell_bin = _cell_polar(grid, float(sensor_xy[0]), float(sensor_xy[1]), azimuth_bins)  # [H*W]
    observed = (cell_range <= reach[cell_bin]).reshape(h, w)
    rows, cols = grid.xy_to_index_inside(points_xy)
    observed[rows, cols] = True
    return observed


def _observed_inputs(points_xy: np.ndarray, sensor_xy: np.ndarray, azimuth_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``observed_cells``' inputs checked: finite [N, 2] returns and [2] sensor (float64), positive bin count."""
    points_xy = _finite("points_xy", points_xy, (None, 2))
    sensor_xy = _finite("sensor_xy", sensor_xy, (2,))
    if azimuth_bins < 1:
        raise ValueError(f"azimuth_bins: must be positive, got {azimuth_bins}")
    return points_xy, sensor_xy


def _polar(xy: np.ndarray, sensor_xy: np.ndarray, azimuth_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Range (m) [M] and azimuth bin [M] int64 around the sensor of [M, 2] float64 xy (m).

    The offsets are written column by column into an [M, 2] array (numpy's loops over a 2-wide broadcast run two
    elements long); arctan2 and hypot then see the very arrays ``observed_cells_reference`` gives them.
    """
    d = np.empty_like(xy)  # [M, 2] = xy - sensor_xy
    d[:, 0] = xy[:, 0] - sensor_xy[0]
    d[:, 1] = xy[:, 1] - sensor_xy[1]
    azimuth = np.arctan2(d[:, 1], d[:, 0])  # [M] in [-pi, pi]
    bins = np.floor((azimuth + np.pi) * (azimuth_bins / (2 * np.pi))).astype(np.int64) % azimuth_bins
    return np.hypot(d[:, 0], d[:, 1]), bins


@functools.lru_cache(maxsize=16)
def _cell_polar(
    grid: geometry.GridSpec, sensor_x_m: float, sensor_y_m: float, azimuth_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """``_polar`` of every cell centre (row-major, [H*W] each, read-only): one sensor mounting serves a whole scene.

    Keyed by the sensor's coordinates as floats, where 0.0 and -0.0 are one key: both give the same offsets, as no
    cell centre is -0.0.
    """
    cell_range, cell_bin = _polar(grid.cell_centers().reshape(-1, 2), np.array([sensor_x_m, sensor_y_m]), azimuth_bins)
    cell_range.setflags(write=False)
    cell_bin.setflags(write=False)
    return cell_range, cell_bin


def observed_cells_reference(
    grid: geometry.GridSpec, points_xy: np.ndarray, sensor_xy: np.ndarray, azimuth_bins: int = 720
) -> np.ndarray:
    """``observed_cells`` as it was first written: kept as its reference (``bevjepa bench preprocess``, tests).

    Args and Returns: as ``observed_cells``.
    """
    points_xy, sensor_xy = _observed_inputs(points_xy, sensor_xy, azimuth_bins)
    h, w = grid.shape
    if points_xy.shape[0] == 0:
        return np.zeros((h, w), dtype=bool)

    def polar(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[M, 2] xy (m) → range (m) [M], azimuth bin [M] int64."""
        d = xy - sensor_xy
        azimuth = np.arctan2(d[:, 1], d[:, 0])  # [M] in [-pi, pi]
        bins = np.floor((azimuth + np.pi) * (azimuth_bins / (2 * np.pi))).astype(np.int64) % azimuth_bins
        return np.hypot(d[:, 0], d[:, 1]), bins

    point_range, point_bin = polar(points_xy)  # [N], [N]
    reach = np.full(azimuth_bins, -np.inf)
    np.maximum.at(reach, point_bin, point_range)  # [bins] farthest return per bin (m)
    cell_range, cell_bin = polar(grid.cell_centers().reshape(-1, 2))  # [H*W]
    observed = (cell_range <= reach[cell_bin]).reshape(h, w)
    rows, cols, inside = grid.xy_to_index(points_xy)
    observed[rows[inside], cols[inside]] = True
    return observed


def compare_with_shapely(grid: geometry.GridSpec, num_boxes: int = 60, repeats: int = 20, seed: int = 0) -> dict:
    """Time ``rasterize_boxes`` against a loop of prepared shapely polygons over their cell windows, interleaved.

    Returns:
        ``{"vectorized_ms", "shapely_loop_ms"}`` (median ms per call), ``"speedup"`` (loop / vectorized) and
        ``"identical"`` (both gave the same occupancy and instance maps).
    """
    rng = np.random.default_rng(seed)
    centers = rng.uniform([grid.x_min_m - 2, grid.y_min_m - 2], [grid.x_max_m + 2, grid.y_max_m + 2], (num_boxes, 2))
    sizes, yaws = rng.uniform(0.3, 12.0, (num_boxes, 2)), rng.uniform(-np.pi, np.pi, num_boxes)
    classes = rng.integers(0, 3, num_boxes)

    def shapely_loop() -> tuple[np.ndarray, np.ndarray]:
        occupancy, instance = np.zeros((3, *grid.shape), dtype=bool), np.zeros(grid.shape, dtype=np.int32)
        corners = box_footprints(centers, sizes, yaws)
        row0, row1, col0, col1 = grid.center_window(corners.min(axis=1), corners.max(axis=1))
        polygons = shapely.polygons(corners)
        shapely.prepare(polygons)
        for a in range(num_boxes):
            r, c = np.meshgrid(np.arange(row0[a], row1[a]), np.arange(col0[a], col1[a]), indexing="ij")
            rows, cols = r.ravel(), c.ravel()
            xy = grid.index_to_xy(rows, cols)
            hit = shapely.contains_xy(polygons[a], xy[:, 0], xy[:, 1])
            occupancy[classes[a], rows[hit], cols[hit]] = True
            instance[rows[hit], cols[hit]] = a + 1
        return occupancy, instance

    vectorized = lambda: rasterize_boxes(grid, centers, sizes, yaws, classes, 3)  # noqa: E731
    times: dict[str, list[float]] = {"vectorized_ms": [], "shapely_loop_ms": []}
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for key, fn in (("vectorized_ms", vectorized), ("shapely_loop_ms", shapely_loop)):
            start = time.perf_counter()
            outputs[key] = fn()
            times[key].append(1e3 * (time.perf_counter() - start))
    same = all(np.array_equal(x, y) for x, y in zip(*outputs.values(), strict=True))
    medians = {key: float(np.median(value)) for key, value in times.items()}
    return {**medians, "speedup": medians["shapely_loop_ms"] / medians["vectorized_ms"], "identical": same}
