"""Tests of the LiDAR and camera rendering: geometry, noise, calibration and agent bookkeeping."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nuscenes.utils.geometry_utils import view_points

from bevjepa.datasets import geometry, types
from bevjepa.sim import bench, layouts, materials, sensors

EXACT = sensors.LidarConfig(range_noise_std_m=0.0, drop_probability=0.0)


def _pose_on_lane(layout: layouts.RoadLayout, lane_id: str, before_end_m: float) -> geometry.RigidTransform:
    """A pose on a straight lane's centreline, ``before_end_m`` before its end, heading along it."""
    centerline = layout.lane(lane_id).centerline
    heading = (centerline[-1] - centerline[0]) / np.linalg.norm(centerline[-1] - centerline[0])
    xy = centerline[-1] - heading * before_end_m
    return geometry.RigidTransform.from_pose_2d(*xy, float(np.arctan2(heading[1], heading[0])))


def _ahead(pose: geometry.RigidTransform, distance_m: float, z_m: float = 0.0) -> np.ndarray:
    """[3] the global point ``distance_m`` straight ahead of a planar pose, at height ``z_m``."""
    return np.array([*pose.apply(np.array([distance_m, 0.0, 0.0]))[:2], z_m])


def _car(center_xy: np.ndarray, yaw_rad: float, instance_id: str = "car") -> types.Box3D:
    w, length, h = bench.CAR_SIZE_WLH_M
    return types.Box3D(
        np.array([*center_xy[:2], bench.BOX_BOTTOM_Z_M + h / 2]),
        np.array([w, length, h]),
        yaw_rad,
        category="vehicle.car",
        instance_id=instance_id,
    )


def _global_points(sweep: types.LidarSweep) -> np.ndarray:
    """[N, 3] float64 sweep points moved from the sensor into the global frame."""
    return (sweep.global_from_ego @ sweep.ego_from_sensor).apply(sweep.points[:, :3])


@pytest.fixture(scope="module")
def street():
    """The benchmark street: intersection layout, 20 cars near the ego, its renderer and one sweep."""
    layout, agents, global_from_ego = bench.street_scene("intersection", seed=0)
    renderer = sensors.SensorRenderer(layout)
    sweep, agent_index = renderer.lidar_sweep(agents, global_from_ego, 1_000_000, np.random.default_rng(0))
    return layout, agents, global_from_ego, renderer, sweep, agent_index


@pytest.fixture(scope="module")
def car_ahead():
    """The ego on lane a0_in0 with one car 12 m straight ahead, on the intersection layout."""
    layout = layouts.build_layout("intersection", np.random.default_rng(0))
    ego = _pose_on_lane(layout, "a0_in0", before_end_m=40.0)
    car = _car(_ahead(ego, 12.0), ego.yaw_rad)
    return layout, ego, car, sensors.SensorRenderer(layout)


# ------------------------------------------------------------------------------------------------- LiDAR


def test_sweep_size_rings_intensity_and_range(street):
    _, _, _, renderer, sweep, agent_index = street
    points = sweep.points
    assert points.dtype == np.float32 and points.shape[1] == 5
    assert 25_000 <= len(points) <= 40_000
    assert agent_index.shape == (len(points),) and agent_index.dtype == np.int32
    ring = points[:, 4]
    assert np.array_equal(ring, np.round(ring)) and set(np.unique(ring).astype(int)) == set(range(32))
    assert points[:, 3].min() >= 0 and points[:, 3].max() <= 255 and np.ptp(points[:, 3]) > 50
    assert np.linalg.norm(points[:, :3], axis=1).max() <= renderer.lidar.max_range_m
    assert sweep.ego_from_sensor is renderer.lidar.ego_from_sensor and sweep.timestamp_us == 1_000_000


def test_agent_points_lie_strictly_inside_their_boxes(street):
    _, agents, _, _, sweep, agent_index = street
    points = _global_points(sweep)
    assert (agent_index >= 0).sum() > 1000
    assert agent_index.max() < len(agents)
    for a in np.unique(agent_index[agent_index >= 0]):
        box = agents[a]
        mine = points[agent_index == a]
        assert box.contains(mine).all()
        local = box.frame_from_box.inverse().apply(mine)  # [n, 3] box frame: length, width, up
        half = box.size_wlh_m[[1, 0, 2]] / 2
        assert np.all(np.abs(local) < half - 1e-3), f"agent {a}: a point within 1 mm of a face"


def test_static_points_are_not_in_agent_boxes(street):
    _, agents, _, _, sweep, agent_index = street
    static = _global_points(sweep)[agent_index < 0]
    inside = np.stack([box.contains(static) for box in agents])  # [A, n]
    assert not inside.any()


def test_same_seed_same_sweep_and_other_seed_differs(car_ahead):
    _, ego, car, renderer = car_ahead
    first, first_index = renderer.lidar_sweep([car], ego, 0, np.random.default_rng(7))
    again, again_index = renderer.lidar_sweep([car], ego, 0, np.random.default_rng(7))
    other, _ = renderer.lidar_sweep([car], ego, 0, np.random.default_rng(8))
    assert np.array_equal(first.points, again.points) and np.array_equal(first_index, again_index)
    assert len(other.points) != len(first.points) or not np.array_equal(other.points, first.points)


def test_exact_ranges_to_ground_and_wall_without_noise_or_drops():
    layout = layouts.build_layout("intersection", np.random.default_rng(0))
    ego = _pose_on_lane(layout, "a0_in0", before_end_m=40.0)
    wall = layouts.Structure(
        _ahead(ego, 20.0, z_m=2.0), np.array([0.3, 30.0, 4.0]), ego.yaw_rad + np.pi / 2, materials.Material.WALL
    )
    renderer = sensors.SensorRenderer(dataclasses.replace(layout, structures=(wall,)), lidar=EXACT)
    sweep, agent_index = renderer.lidar_sweep([], ego, 0, np.random.default_rng(0))
    assert (agent_index == -1).all()

    # Analytic first hit of every returned point's ray: the ground plane z = 0 or the wall's near face.
    range_m = np.linalg.norm(sweep.points[:, :3].astype(np.float64), axis=1)
    global_from_sensor = ego @ EXACT.ego_from_sensor
    origin = global_from_sensor.translation
    direction = global_from_sensor.apply_vectors(sweep.points[:, :3] / range_m[:, None])  # [N, 3] unit
    with np.errstate(divide="ignore"):
        t_ground = np.where(direction[:, 2] < 0, -origin[2] / direction[:, 2], np.inf)
    ego_from_global = ego.inverse()
    face_x = 20.0 - 0.15  # the wall's near face, in the ego frame
    local_origin, local_direction = ego_from_global.apply(origin), ego_from_global.apply_vectors(direction)
    with np.errstate(divide="ignore"):
        t_wall = (face_x - local_origin[0]) / local_direction[:, 0]
    on_face = local_origin + t_wall[:, None] * local_direction
    t_wall = np.where((t_wall > 0) & (np.abs(on_face[:, 1]) <= 15.0) & (on_face[:, 2] <= 4.0), t_wall, np.inf)
    expected = np.minimum(t_ground, t_wall)
    np.testing.assert_allclose(range_m, expected, atol=1e-3)
    hit_wall = t_wall < t_ground
    assert hit_wall.sum() > 1000 and (~hit_wall).sum() > 10_000

    ground = _global_points(sweep)[~hit_wall]
    assert np.abs(ground[:, 2]).max() < 1e-3
    # Each ring fires at its own elevation; all rays that hit within range come back.
    elevation = np.arcsin(sweep.points[:, 2] / range_m)
    np.testing.assert_allclose(elevation, EXACT.elevations_rad()[sweep.points[:, 4].astype(int)], atol=1e-4)


def test_noise_stays_within_its_truncation(car_ahead):
    layout, ego, car, _ = car_ahead
    # A range beyond the whole map: no return can cross it, so both sweeps hold the same rays in order.
    noisy = sensors.LidarConfig(drop_probability=0.0, max_range_m=1000.0)
    exact_config = dataclasses.replace(EXACT, max_range_m=1000.0)
    exact, _ = sensors.SensorRenderer(layout, lidar=exact_config).lidar_sweep([car], ego, 0, np.random.default_rng(0))
    sweep, _ = sensors.SensorRenderer(layout, lidar=noisy).lidar_sweep([car], ego, 0, np.random.default_rng(0))
    assert len(sweep.points) == len(exact.points)
    np.testing.assert_array_equal(sweep.points[:, 4], exact.points[:, 4])
    error = np.linalg.norm(sweep.points[:, :3], axis=1) - np.linalg.norm(exact.points[:, :3], axis=1)
    limit = sensors.NOISE_TRUNCATION_SIGMA * noisy.range_noise_std_m
    assert np.abs(error).max() <= limit + 1e-4
    assert 0.5 * noisy.range_noise_std_m < error.std() < 1.5 * noisy.range_noise_std_m


def test_drop_probability_drops_about_that_share(car_ahead):
    layout, ego, car, _ = car_ahead
    exact, _ = sensors.SensorRenderer(layout, lidar=EXACT).lidar_sweep([car], ego, 0, np.random.default_rng(0))
    dropping = sensors.LidarConfig(range_noise_std_m=0.0, drop_probability=0.2)
    sweep, _ = sensors.SensorRenderer(layout, lidar=dropping).lidar_sweep([car], ego, 0, np.random.default_rng(0))
    assert abs(1 - len(sweep.points) / len(exact.points) - 0.2) < 0.02


@pytest.mark.parametrize(
    "config",
    [
        sensors.LidarConfig(),
        sensors.LidarConfig(range_noise_std_m=0.03),  # noise clipped tighter on agents
        sensors.LidarConfig(max_range_m=25.0, drop_probability=0.5),
        sensors.LidarConfig(beam_count=5, azimuth_steps=90),
        EXACT,
    ],
    ids=["default", "noisy", "short-range-dropping", "sparse", "exact"],
)
def test_lidar_sweep_equals_its_reference_to_float_rounding(street, config):
    layout, agents, global_from_ego, _, _, _ = street
    renderer = sensors.SensorRenderer(layout, lidar=config)
    turned = geometry.RigidTransform.from_pose_2d(*global_from_ego.translation[:2], global_from_ego.yaw_rad + 2.0)
    for pose, seen in ((global_from_ego, agents), (turned, agents[:3]), (turned, [])):
        rng, reference_rng = np.random.default_rng(11), np.random.default_rng(11)
        sweep, agent_index = renderer.lidar_sweep(seen, pose, 5, rng)
        reference, reference_index = renderer._lidar_sweep_reference(seen, pose, 5, reference_rng)
        assert sweep.points.shape == reference.points.shape and len(sweep.points) > 0
        np.testing.assert_allclose(sweep.points, reference.points, **sensors.REFERENCE_TOLERANCE)
        np.testing.assert_array_equal(agent_index, reference_index)
        assert agent_index.dtype == reference_index.dtype == np.int32
        assert rng.bit_generator.state == reference_rng.bit_generator.state  # the same draws, no more, no fewer
        assert sweep.timestamp_us == 5 and sweep.global_from_ego is pose


def test_lidar_rays_equal_open3ds_product_to_float_rounding(car_ahead):
    _, ego, _, renderer = car_ahead
    rng = np.random.default_rng(0)
    poses = [ego, geometry.RigidTransform.from_pose_2d(0.0, 0.0, 0.0)]
    poses += [geometry.RigidTransform.from_pose_2d(0.0, 0.0, np.pi / 2), ego @ EXACT.ego_from_sensor]
    poses += [
        geometry.RigidTransform.from_pose_2d(*rng.uniform(-50, 350, 2), rng.uniform(-np.pi, np.pi)) for _ in range(20)
    ]
    for pose in poses:
        fast = renderer.lidar_rays(pose).numpy()
        product = sensors._global_rays(renderer._lidar_rays_ego, pose).numpy()  # what the reference casts
        np.testing.assert_allclose(fast, product, **sensors.REFERENCE_TOLERANCE)


# ----------------------------------------------------------------------------------------------- cameras


def test_camera_images_shapes_calibration_and_determinism(car_ahead):
    _, ego, car, renderer = car_ahead
    images, agent_images = renderer.camera_images([car], ego, 5)
    again, again_agents = renderer.camera_images([car], ego, 5)
    assert [i.channel for i in images] == list(types.CAMERA_CHANNELS)
    for image, agent_image, other, other_agent in zip(images, agent_images, again, again_agents, strict=True):
        assert image.image.shape == (225, 400, 3) and image.image.dtype == np.uint8
        assert agent_image.shape == (225, 400) and agent_image.dtype == np.int32
        assert set(np.unique(agent_image)) <= {-1, 0}
        assert np.array_equal(image.image, other.image) and np.array_equal(agent_image, other_agent)
        assert image.global_from_ego is ego and image.timestamp_us == 5
    front = images[0]
    np.testing.assert_allclose(front.intrinsics, [[1266.4 / 4, 0, 816.3 / 4], [0, 1266.4 / 4, 491.5 / 4], [0, 0, 1]])
    np.testing.assert_allclose(front.ego_from_camera.translation, [1.7008, 0.0159, 1.511])
    assert (agent_images[0] == 0).sum() > 500  # the car fills part of CAM_FRONT
    assert (agent_images[3] == 0).sum() == 0  # and none of CAM_BACK


def test_road_and_sky_shading():
    layout = layouts.build_layout("straight", np.random.default_rng(0))
    renderer = sensors.SensorRenderer(dataclasses.replace(layout, structures=()))
    ego = _pose_on_lane(layout, layout.ego_routes[0][0], before_end_m=60.0)
    images, _ = renderer.camera_images([], ego, 0)
    front = images[0].image.astype(int)
    # The bottom centre of CAM_FRONT sees the road a few metres ahead, lit from above.
    sun = max(0.0, sensors.SUN_DIRECTION[2])
    road = np.round(materials.SURFACE_RGB[materials.Surface.ROAD] * (sensors.AMBIENT + (1 - sensors.AMBIENT) * sun))
    assert np.array_equal(front[-1, 200], road)
    assert front[0, 200, 2] > front[0, 200, 0]  # sky: blue above red at the top
    assert not np.array_equal(front[0], front[-1])


def test_lidar_point_straight_ahead_projects_onto_its_agent_pixel(car_ahead):
    _, ego, car, renderer = car_ahead
    sweep, agent_index = renderer.lidar_sweep([car], ego, 0, np.random.default_rng(0))
    images, agent_images = renderer.camera_images([car], ego, 0)
    on_car = _global_points(sweep)[agent_index == 0]  # [n, 3] global
    assert len(on_car) > 200

    front = images[0]
    ego_from_global = front.global_from_ego.inverse()
    camera_from_ego = front.ego_from_camera.inverse()
    in_camera = camera_from_ego.apply(ego_from_global.apply(on_car))  # [n, 3]
    pixels = np.floor(view_points(in_camera.T, front.intrinsics, normalize=True)[:2]).astype(int)  # [2, n]
    in_ego = ego_from_global.apply(on_car)
    straight = np.argmin(np.abs(np.arctan2(in_ego[:, 1], in_ego[:, 0])) + np.abs(in_ego[:, 2] - 0.6))
    u, v = pixels[:, straight]
    assert agent_images[0][v, u] == 0
    # Nearly every return on the car lands on a pixel that shows the car (a few graze its silhouette).
    inside = (pixels[0] >= 0) & (pixels[0] < 400) & (pixels[1] >= 0) & (pixels[1] < 225)
    assert inside.all()
    assert np.mean(agent_images[0][pixels[1], pixels[0]] == 0) > 0.95


# -------------------------------------------------------------------------------------------- visibility


def test_visible_fraction_unoccluded_and_hidden(car_ahead):
    layout, ego, car, renderer = car_ahead
    assert renderer.visible_fraction([car], ego).tolist() == [1.0]
    assert renderer.visible_fraction([], ego).shape == (0,)

    hidden = _car(_ahead(ego, 16.0), ego.yaw_rad, "hidden")
    block = layouts.Structure(
        _ahead(ego, 8.0, z_m=2.5), np.array([1.0, 12.0, 5.0]), ego.yaw_rad + np.pi / 2, materials.Material.BUILDING
    )
    blocked = sensors.SensorRenderer(dataclasses.replace(layout, structures=(*layout.structures, block)))
    fraction = blocked.visible_fraction([hidden, car], ego)
    assert fraction[0] < 0.05
    assert fraction[1] == 0.0  # the near car (12 m) stands behind the block too
    behind = _car(_ahead(ego, -10.0), ego.yaw_rad, "behind")
    assert blocked.visible_fraction([behind], ego)[0] == 1.0  # CAM_BACK sees it


# ----------------------------------------------------------------------------------------- small pieces


def test_surface_classes_match_the_raster_lookup(car_ahead):
    layout, _, _, renderer = car_ahead
    xy = np.random.default_rng(0).uniform(-20, layout.extent_m + 20, size=(20_000, 2))
    np.testing.assert_array_equal(renderer.surface_classes(xy[:, 0], xy[:, 1]), layout.surface.lookup(xy))


def test_agent_meshes_stay_inside_their_boxes():
    agents = [
        _car(np.array([10.0, 5.0]), 0.7),
        types.Box3D(np.array([3.0, -2.0, 0.9]), np.array([0.67, 0.73, 1.77]), -2.0, category="human.pedestrian.adult"),
        types.Box3D(np.array([-4.0, 1.0, 0.9]), np.array([0.61, 1.7, 1.7]), 3.0, category="vehicle.bicycle"),
    ]
    mesh = sensors.AgentMesh.from_boxes(agents)
    assert len(mesh.triangles) == 12 * 4  # a car's body and cabin, one box for the others
    assert mesh.agent_material.tolist() == [
        materials.Material.VEHICLE,
        materials.Material.PEDESTRIAN,
        materials.Material.CYCLIST,
    ]
    for a, box in enumerate(agents):
        vertices = mesh.vertices[np.unique(mesh.triangles[mesh.triangle_agent == a])]
        local = box.frame_from_box.inverse().apply(vertices)
        half = box.size_wlh_m[[1, 0, 2]] / 2
        assert np.all(np.abs(local) <= half - sensors.AGENT_INSET_M + 1e-5)
        assert np.isclose(local[:, 2].max(), half[2] - sensors.AGENT_INSET_M, atol=1e-5)
        assert np.isclose(local[:, 2].min(), -half[2] + sensors.AGENT_INSET_M, atol=1e-5)


def test_box_triangles_wind_outwards():
    vertices, triangles = sensors.box_meshes(np.array([[1.0, 2.0, 3.0]]), np.array([[2.0, 1.0, 0.5]]), np.array([0.3]))
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    normal = np.cross(b - a, c - a)
    assert np.all(np.einsum("ij,ij->i", normal, (a + b + c) / 3 - [1.0, 2.0, 3.0]) > 0)


def test_config_checks():
    with pytest.raises(ValueError, match="drop_probability"):
        sensors.LidarConfig(drop_probability=1.0)
    with pytest.raises(ValueError, match="max_range_m"):
        sensors.LidarConfig(max_range_m=0.0)
    with pytest.raises(ValueError, match="CameraConfig"):
        sensors.CameraConfig(width_px=0)
    assert sensors.LidarConfig().ray_count == 32 * sensors.LidarConfig().azimuth_steps
    np.testing.assert_allclose(np.degrees(sensors.LidarConfig().elevations_rad()[[0, -1]]), [-30.67, 10.67])


def test_pixel_rays_project_back_onto_their_pixel_centres():
    config = sensors.CameraConfig(width_px=40, height_px=30)
    for channel in types.CAMERA_CHANNELS:
        directions = config.ray_directions(channel).reshape(-1, 3)  # [H*W, 3] camera frame
        uv = view_points((7.0 * directions).T, config.intrinsics(channel), normalize=True)[:2]  # [2, H*W]
        v, u = np.meshgrid(np.arange(30), np.arange(40), indexing="ij")
        np.testing.assert_allclose(uv, np.stack([u.ravel(), v.ravel()]) + 0.5, atol=1e-9)
