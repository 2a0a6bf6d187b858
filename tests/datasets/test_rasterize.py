"""Tests of ``bevjepa.datasets.rasterize`` against shapely's cell-centre-in-polygon test."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import shapely.affinity

from bevjepa.datasets import geometry, rasterize

GRIDS = {
    "default_128x128_0.5m": geometry.GridSpec(),
    "nonsquare_200x125_0.4m": geometry.GridSpec(-40.0, 40.0, -20.0, 30.0, 0.4),
    "far_from_origin": geometry.GridSpec(1000.0, 1032.0, -2000.0, -1968.0, 0.5),
}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240917)


def random_boxes(rng: np.random.Generator, grid: geometry.GridSpec, n: int) -> tuple[np.ndarray, ...]:
    """Centres inside and up to 6 m outside the grid, sizes 0.3-12 m, any yaw, classes 0-2."""
    lo, hi = np.array([grid.x_min_m, grid.y_min_m]), np.array([grid.x_max_m, grid.y_max_m])
    centers = rng.uniform(lo - 6.0, hi + 6.0, (n, 2))
    sizes = rng.uniform(0.3, 12.0, (n, 2))
    yaws = rng.uniform(-2 * np.pi, 2 * np.pi, n)
    classes = rng.integers(0, 3, n)
    return centers, sizes, yaws, classes


def shapely_polygon(center: np.ndarray, size_wl: np.ndarray, yaw: float) -> shapely.Polygon:
    """The footprint built independently with shapely: length along x, rotated by yaw, then moved."""
    w, length = size_wl
    footprint = shapely.box(-length / 2, -w / 2, length / 2, w / 2)
    footprint = shapely.affinity.rotate(footprint, yaw, origin=(0.0, 0.0), use_radians=True)
    return shapely.affinity.translate(footprint, center[0], center[1])


def reference(
    grid: geometry.GridSpec, polygons: list[shapely.Polygon], classes: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy and instance maps from shapely.contains_xy on the GridSpec cell centres, box by box."""
    centers = grid.cell_centers()  # [H, W, 2]
    occupancy = np.zeros((num_classes, *grid.shape), dtype=bool)
    instance = np.zeros(grid.shape, dtype=np.int32)
    for index, (polygon, cls) in enumerate(zip(polygons, classes, strict=True)):
        if cls < 0:
            continue
        hit = shapely.contains_xy(polygon, centers[..., 0], centers[..., 1])  # [H, W]
        occupancy[cls] |= hit
        instance[hit] = index + 1  # later boxes overwrite: the highest index wins
    return occupancy, instance


# ---------------------------------------------------------------------------------------------------------
# rasterize_boxes: exact agreement with shapely


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_random_boxes_match_shapely_exactly(grid_name: str, rng: np.random.Generator) -> None:
    grid = GRIDS[grid_name]
    centers, sizes, yaws, classes = random_boxes(rng, grid, 200)
    classes[::7] = -1  # some boxes skipped
    polygons = [shapely_polygon(c, s, y) for c, s, y in zip(centers, sizes, yaws, strict=True)]
    occupancy, instance = rasterize.rasterize_boxes(grid, centers, sizes, yaws, classes, 3)
    expected_occupancy, expected_instance = reference(grid, polygons, classes, 3)
    assert occupancy.shape == (3, *grid.shape) and occupancy.dtype == bool
    assert instance.shape == grid.shape and instance.dtype == np.int32
    np.testing.assert_array_equal(occupancy, expected_occupancy)
    np.testing.assert_array_equal(instance, expected_instance)
    assert instance.any() and not np.isin(instance, np.nonzero(classes < 0)[0] + 1).any()


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_edges_through_cell_centres_match_shapely_exactly(grid_name: str, rng: np.random.Generator) -> None:
    """Grid-aligned boxes put cell centres exactly on edges (strictly inside excludes them); exact predicates."""
    grid = GRIDS[grid_name]
    n, res = 200, grid.resolution_m
    h, w = grid.shape
    centers = np.array([grid.x_min_m, grid.y_min_m]) + 0.5 * res * rng.integers(0, 2 * max(h, w), (n, 2))
    sizes = res * rng.integers(0, 16, (n, 2)).astype(float)
    yaws = rng.choice([0.0, np.pi / 2, np.pi, -np.pi / 2, np.pi / 4, 3 * np.pi / 4], n)
    classes = rng.integers(0, 2, n)
    corners = rasterize.box_footprints(centers, sizes, yaws)  # [n, 4, 2]
    occupancy, instance = rasterize.rasterize_boxes(grid, centers, sizes, yaws, classes, 2)
    expected_occupancy, expected_instance = reference(grid, list(shapely.polygons(corners)), classes, 2)
    np.testing.assert_array_equal(occupancy, expected_occupancy)
    np.testing.assert_array_equal(instance, expected_instance)


def test_footprints_are_the_shapely_rectangles(rng: np.random.Generator) -> None:
    centers, sizes, yaws, _ = random_boxes(rng, GRIDS["default_128x128_0.5m"], 50)
    corners = rasterize.box_footprints(centers, sizes, yaws)  # [50, 4, 2]
    for corner, c, s, y in zip(corners, centers, sizes, yaws, strict=True):
        polygon = shapely.Polygon(corner)
        assert polygon.exterior.is_ccw
        assert shapely.equals_exact(shapely.normalize(polygon), shapely.normalize(shapely_polygon(c, s, y)), 1e-9)


def test_per_class_channels() -> None:
    grid = geometry.GridSpec()
    centers = np.array([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = np.array([[2.0, 4.0], [2.0, 4.0], [3.0, 3.0]])
    occupancy, instance = rasterize.rasterize_boxes(grid, centers, sizes, np.zeros(3), np.array([2, 0, 2]), 4)
    assert occupancy.shape == (4, *grid.shape)
    np.testing.assert_array_equal(occupancy[0], instance == 2)
    np.testing.assert_array_equal(occupancy[2], (instance == 1) | (instance == 3))
    assert not occupancy[1].any() and not occupancy[3].any()
    assert (instance == 1).sum() == 4 * 8 and (instance == 3).sum() == 6 * 6  # 2x4 m and 3x3 m at 0.5 m


def test_instance_highest_index_wins_on_overlap() -> None:
    grid = geometry.GridSpec()
    centers = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    sizes = np.array([[4.0, 4.0], [4.0, 4.0], [1.0, 1.0]])
    occupancy, instance = rasterize.rasterize_boxes(grid, centers, sizes, np.zeros(3), np.array([0, 1, -1]), 2)
    xy = grid.cell_centers()
    x, within_y = xy[..., 0], np.abs(xy[..., 1]) < 2.0
    assert np.all(instance[(x > -2.0) & (x < -1.0) & within_y] == 1)  # box 1 alone
    assert np.all(instance[(x > -1.0) & (x < 3.0) & within_y] == 2)  # box 2 wins; box 3 is skipped (class -1)
    assert np.count_nonzero(instance) == 10 * 8
    assert occupancy[0].sum() == 8 * 8 and occupancy[1].sum() == 8 * 8
    # Reversing the order flips the winner.
    _, reversed_instance = rasterize.rasterize_boxes(grid, centers[1::-1], sizes[:2], np.zeros(2), np.zeros(2, int), 1)
    overlap = (instance > 0) & occupancy[0] & occupancy[1]
    assert overlap.sum() == 6 * 8 and np.all(reversed_instance[overlap] == 2)


@pytest.mark.parametrize("grid_name", ["default_128x128_0.5m", "nonsquare_200x125_0.4m"])
def test_large_box_area_within_one_perimeter_strip(grid_name: str, rng: np.random.Generator) -> None:
    grid = GRIDS[grid_name]
    res = grid.resolution_m
    for _ in range(20):
        width, length = rng.uniform(4.0, 15.0, 2)
        center = rng.uniform(-5.0, 5.0, (1, 2))
        occupancy, _ = rasterize.rasterize_boxes(
            grid, center, np.array([[width, length]]), rng.uniform(-np.pi, np.pi, 1), np.zeros(1, int), 1
        )
        area = occupancy.sum() * res**2
        assert abs(area - width * length) <= 2 * (width + length) * res


def test_boxes_entirely_outside_give_nothing() -> None:
    grid = geometry.GridSpec()
    centers = np.array([[40.0, 0.0], [0.0, -40.0], [-100.0, 100.0], [33.0, 33.0]])
    sizes = np.array([[4.0, 10.0], [4.0, 10.0], [50.0, 50.0], [1.0, 1.0]])
    occupancy, instance = rasterize.rasterize_boxes(grid, centers, sizes, np.array([0, 0.3, 1, 2]), np.zeros(4, int), 1)
    assert not occupancy.any() and not instance.any()


def test_box_covering_the_whole_grid() -> None:
    grid = geometry.GridSpec(-8.0, 8.0, -4.0, 4.0, 0.5)
    occupancy, instance = rasterize.rasterize_boxes(
        grid, np.zeros((1, 2)), np.array([[500.0, 700.0]]), np.array([0.7]), np.array([1]), 2
    )
    assert occupancy[1].all() and not occupancy[0].any() and np.all(instance == 1)


def test_box_means_average_each_boxes_own_channel_over_the_cells_it_would_draw(rng: np.random.Generator) -> None:
    grid = GRIDS["nonsquare_200x125_0.4m"]
    centers, sizes, yaws, classes = random_boxes(rng, grid, 40)
    maps = rng.uniform(0.0, 1.0, (3, *grid.shape))
    means = rasterize.box_means(grid, maps, classes, centers, sizes, yaws)
    for a in range(len(centers)):  # against each box drawn alone, as the targets are
        drawn, _ = rasterize.rasterize_boxes(
            grid, centers[a : a + 1], sizes[a : a + 1], yaws[a : a + 1], classes[a : a + 1], 3
        )
        cells = drawn[classes[a]]
        assert means[a] == pytest.approx(maps[classes[a]][cells].mean() if cells.any() else 0.0)
    assert rasterize.box_means(grid, maps, np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)).shape == (
        0,
    )


def test_zero_boxes() -> None:
    grid = GRIDS["nonsquare_200x125_0.4m"]
    occupancy, instance = rasterize.rasterize_boxes(
        grid, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=int), 5
    )
    assert occupancy.shape == (5, 200, 125) and occupancy.dtype == bool and not occupancy.any()
    assert instance.shape == (200, 125) and instance.dtype == np.int32 and not instance.any()


@pytest.mark.parametrize("argument", ["centers_xy", "sizes_wl", "yaws"])
def test_nan_raises_naming_the_argument(argument: str) -> None:
    inputs = {"centers_xy": np.zeros((3, 2)), "sizes_wl": np.ones((3, 2)), "yaws": np.zeros(3)}
    inputs[argument].flat[1] = np.nan
    with pytest.raises(ValueError, match=argument):
        rasterize.rasterize_boxes(geometry.GridSpec(), **inputs, classes=np.zeros(3, int), num_classes=1)


def test_bad_shapes_and_classes_raise() -> None:
    grid = geometry.GridSpec()
    with pytest.raises(ValueError, match="sizes_wl"):
        rasterize.rasterize_boxes(grid, np.zeros((2, 2)), np.ones((3, 2)), np.zeros(2), np.zeros(2, int), 1)
    with pytest.raises(ValueError, match="classes"):
        rasterize.rasterize_boxes(grid, np.zeros((2, 2)), np.ones((2, 2)), np.zeros(2), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="sizes_wl"):
        rasterize.rasterize_boxes(grid, np.zeros((1, 2)), -np.ones((1, 2)), np.zeros(1), np.zeros(1, int), 1)


def test_grid_helpers_agree_with_cell_centers(rng: np.random.Generator) -> None:
    grid = GRIDS["nonsquare_200x125_0.4m"]
    h, w = grid.shape
    x, y = grid.index_to_center_coords(np.arange(h)[:, None], np.arange(w)[None, :])  # [H, 1], [1, W]
    centers = grid.cell_centers()
    np.testing.assert_array_equal(np.broadcast_to(x, (h, w)), centers[..., 0])
    np.testing.assert_array_equal(np.broadcast_to(y, (h, w)), centers[..., 1])
    lo = rng.uniform(-45.0, 35.0, (100, 2))
    hi = lo + rng.uniform(0.0, 10.0, (100, 2))
    row0, row1, col0, col1 = grid.center_window(lo, hi)
    assert np.all((0 <= row0) & (row0 <= row1) & (row1 <= h) & (0 <= col0) & (col0 <= col1) & (col1 <= w))
    rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
    in_x = (centers[:, 0, 0][None] > lo[:, :1]) & (centers[:, 0, 0][None] < hi[:, :1])  # [100, H]
    in_y = (centers[0, :, 1][None] > lo[:, 1:]) & (centers[0, :, 1][None] < hi[:, 1:])  # [100, W]
    assert np.all(~in_x | ((rows >= row0[:, None]) & (rows < row1[:, None])))  # windows miss no centre
    assert np.all(~in_y | ((cols >= col0[:, None]) & (cols < col1[:, None])))


def test_compare_with_shapely_agrees() -> None:
    result = rasterize.compare_with_shapely(geometry.GridSpec(), num_boxes=30, repeats=1)
    assert result["identical"] and result["vectorized_ms"] > 0 and result["shapely_loop_ms"] > 0


# ---------------------------------------------------------------------------------------------------------
# observed_cells


def test_single_return_straight_ahead_observes_its_ray() -> None:
    grid = geometry.GridSpec()
    sensor = np.array([0.25, 0.25])  # a cell centre, so one row of centres lies exactly on the beam
    observed = rasterize.observed_cells(grid, np.array([[20.25, 0.25]]), sensor)
    xy = grid.cell_centers()
    on_ray = np.isclose(xy[..., 1], 0.25) & (xy[..., 0] >= 0.25 - 1e-9) & (xy[..., 0] <= 20.25 + 1e-9)
    np.testing.assert_array_equal(observed, on_ray)  # 41 cells: sensor to return, nothing beyond or beside
    assert observed.sum() == 41


def test_single_return_with_coarse_bins_observes_its_wedge() -> None:
    grid = geometry.GridSpec()
    observed = rasterize.observed_cells(grid, np.array([[20.0, 0.1]]), np.zeros(2), azimuth_bins=8)
    xy = grid.cell_centers()
    distance = np.hypot(xy[..., 0], xy[..., 1])
    azimuth = np.degrees(np.arctan2(xy[..., 1], xy[..., 0]))
    assert np.all(observed[(azimuth > 0.5) & (azimuth < 44.5) & (distance < 19.9)])  # the [0, 45) deg bin
    assert not observed[(distance > 20.5) | (azimuth < -0.5) | (azimuth > 45.5)].any()


def test_returns_all_around_observe_a_disc() -> None:
    grid = geometry.GridSpec()
    angles = np.linspace(-np.pi, np.pi, 3600, endpoint=False)
    points = 10.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [3600, 2]
    observed = rasterize.observed_cells(grid, points, np.zeros(2))
    distance = np.hypot(*np.moveaxis(grid.cell_centers(), -1, 0))
    assert np.all(observed[distance <= 9.99])
    assert not observed[distance > 10.0 + grid.resolution_m / np.sqrt(2)].any()
    assert abs(observed.sum() * grid.resolution_m**2 - np.pi * 100.0) <= 2 * np.pi * 10.0 * grid.resolution_m


def test_returns_outside_the_grid_still_sweep_it() -> None:
    grid = geometry.GridSpec(-8.0, 8.0, -8.0, 8.0, 0.5)
    angles = np.linspace(-np.pi, np.pi, 3600, endpoint=False)
    points = 50.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert rasterize.observed_cells(grid, points, np.zeros(2)).all()


def test_observed_zero_points_and_nan() -> None:
    grid = geometry.GridSpec()
    observed = rasterize.observed_cells(grid, np.zeros((0, 2)), np.zeros(2))
    assert observed.shape == grid.shape and observed.dtype == bool and not observed.any()
    with pytest.raises(ValueError, match="points_xy"):
        rasterize.observed_cells(grid, np.array([[1.0, np.nan]]), np.zeros(2))
    with pytest.raises(ValueError, match="sensor_xy"):
        rasterize.observed_cells(grid, np.ones((1, 2)), np.array([np.nan, 0.0]))


@pytest.mark.parametrize("name", list(GRIDS))
def test_observed_cells_are_the_reference_ones_bit_for_bit(name, rng):
    """The faster ``observed_cells`` (cached cell polar coordinates, column-wise offsets) equals the reference."""
    grid = GRIDS[name]
    lo, hi = np.array([grid.x_min_m, grid.y_min_m]), np.array([grid.x_max_m, grid.y_max_m])
    for count, bins in ((1, 720), (5000, 720), (5000, 13)):
        points = rng.uniform(lo - 30.0, hi + 30.0, (count, 2)).astype(np.float32)
        sensor = rng.uniform(lo, hi)
        fast = rasterize.observed_cells(grid, points, sensor, azimuth_bins=bins)
        np.testing.assert_array_equal(fast, rasterize.observed_cells_reference(grid, points, sensor, azimuth_bins=bins))
        # Again from the cache of cell coordinates, for a sensor whose offsets are exact zeros at some cells.
        centre = grid.cell_centers()[3, 5]
        np.testing.assert_array_equal(
            rasterize.observed_cells(grid, points, centre, azimuth_bins=bins),
            rasterize.observed_cells_reference(grid, points, centre, azimuth_bins=bins),
        )
