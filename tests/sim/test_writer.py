"""The synthetic dataset against the real nuscenes-devkit: it loads, and it agrees with the simulator's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.prediction.splits import get_prediction_challenge_split  # noqa: F401  (devkit import check)
from nuscenes.nuscenes import NuScenes
from nuscenes.prediction import PredictHelper
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import BoxVisibility, points_in_box, view_points
from nuscenes.utils.splits import create_splits_scenes
from PIL import Image
from pyquaternion import Quaternion

from bevjepa.datasets import types
from bevjepa.sim import synth, writer

SCENES, DURATION_S = 4, 3.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[synth.SynthConfig, NuScenes]:
    out = tmp_path_factory.mktemp("synth") / "mini"
    config = synth.SynthConfig(out=out, scenes=SCENES, seed=7, duration_s=DURATION_S)
    synth.synthesize(config, progress=False)
    return config, NuScenes("v1.0-mini", str(out), verbose=False)


@pytest.fixture(scope="module")
def truth(dataset: tuple[synth.SynthConfig, NuScenes]) -> dict[tuple[str, int], dict[str, tuple]]:
    """(scene name, timestamp) -> instance id -> (centre [3], velocity [2]) from the simulator itself."""
    config, _ = dataset
    table: dict[tuple[str, int], dict[str, tuple]] = {}
    for spec in synth.scene_specs(config):
        for frame in writer.simulate(spec):
            if frame.is_key_frame:
                from bevjepa.sim import world

                boxes, _ = world.agent_boxes(frame.world, frame.state)
                table[(spec.name, frame.timestamp_us)] = {b.instance_id: (b.center_m, b.velocity_mps) for b in boxes}
    return table


def _instance_id(nusc: NuScenes, config: synth.SynthConfig, annotation: dict) -> tuple[str, str]:
    """The simulator's instance id of an annotation, found through the deterministic tokens."""
    scene = nusc.get("scene", nusc.get("sample", annotation["sample_token"])["scene_token"])
    spec = next(s for s in synth.scene_specs(config) if s.name == scene["name"])
    for actor_id in _actor_ids(spec):
        if spec.token("instance", actor_id) == annotation["instance_token"]:
            return scene["name"], actor_id
    raise AssertionError("annotation instance not found in the simulator")


_ACTOR_CACHE: dict[str, list[str]] = {}


def _actor_ids(spec: writer.SceneSpec) -> list[str]:
    if spec.name not in _ACTOR_CACHE:
        from bevjepa.sim import scenario

        built, _ = scenario.build_world(spec.scenario)
        _ACTOR_CACHE[spec.name] = [a.instance_id for a in built.actors]
    return _ACTOR_CACHE[spec.name]


def test_devkit_loads_all_tables_and_the_mini_val_scenes(dataset):
    _, nusc = dataset
    names = {s["name"] for s in nusc.scene}
    assert set(create_splits_scenes()["mini_val"]) <= names
    assert len(nusc.scene) == SCENES
    assert len(nusc.sample) == SCENES * writer.keyframe_count(DURATION_S)
    for table in nusc.table_names:
        assert getattr(nusc, table), f"table {table} is empty"
    sample = nusc.sample[0]
    assert set(sample["data"]) == {"LIDAR_TOP", *types.CAMERA_CHANNELS}
    path, boxes, intrinsic = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
    assert Path(path).exists() and intrinsic.shape == (3, 3)
    cloud = LidarPointCloud.from_file(nusc.get_sample_data_path(sample["data"]["LIDAR_TOP"]))
    assert cloud.points.shape[0] == 4 and 25_000 < cloud.points.shape[1] < 40_000


def test_sweeps_are_chained_at_20_hz_with_one_ego_pose_each(dataset):
    _, nusc = dataset
    sample = nusc.sample[1]
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    previous = nusc.get("sample_data", lidar["prev"])
    assert not previous["is_key_frame"] and previous["filename"].startswith("sweeps/LIDAR_TOP/")
    assert lidar["timestamp"] - previous["timestamp"] == 50_000
    assert nusc.get("ego_pose", lidar["ego_pose_token"])["timestamp"] == lidar["timestamp"]
    assert len(nusc.ego_pose) == len(nusc.sample_data)
    clouds = LidarPointCloud.from_file_multisweep(nusc, sample, "LIDAR_TOP", "LIDAR_TOP", nsweeps=10)[0]
    assert clouds.points.shape[1] > 5 * 25_000


def test_instances_count_and_chain_their_annotations(dataset):
    _, nusc = dataset
    for instance in nusc.instance:
        token, count = instance["first_annotation_token"], 0
        while token:
            annotation = nusc.get("sample_annotation", token)
            assert annotation["instance_token"] == instance["token"]
            token, count = annotation["next"], count + 1
        assert count == instance["nbr_annotations"]
        assert nusc.get("sample_annotation", instance["last_annotation_token"])["next"] == ""


def test_annotations_match_the_simulator_positions_and_velocities(dataset, truth):
    config, nusc = dataset
    checked_velocity = 0
    for annotation in nusc.sample_annotation:
        sample = nusc.get("sample", annotation["sample_token"])
        scene_name, actor_id = _instance_id(nusc, config, annotation)
        center, velocity = truth[(scene_name, sample["timestamp"])][actor_id]
        np.testing.assert_allclose(annotation["translation"], center, atol=0.01)
        if annotation["prev"] and annotation["next"]:
            devkit_velocity = nusc.box_velocity(annotation["token"])[:2]
            np.testing.assert_allclose(devkit_velocity, velocity, atol=0.3, err_msg=actor_id)
            checked_velocity += 1
    assert checked_velocity > 20


def test_predict_helper_future_matches_the_simulator(dataset, truth):
    config, nusc = dataset
    helper = PredictHelper(nusc)
    checked = 0
    for annotation in nusc.sample_annotation[::5]:
        future = helper.get_future_for_agent(
            annotation["instance_token"], annotation["sample_token"], seconds=2, in_agent_frame=False
        )
        scene_name, actor_id = _instance_id(nusc, config, annotation)
        sample = nusc.get("sample", annotation["sample_token"])
        for xy in future:
            sample = nusc.get("sample", sample["next"])
            np.testing.assert_allclose(xy, truth[(scene_name, sample["timestamp"])][actor_id][0][:2], atol=0.01)
            checked += 1
    assert checked > 20


def test_num_lidar_pts_equals_the_devkit_points_in_box(dataset):
    _, nusc = dataset
    nonzero = 0
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"], box_vis_level=BoxVisibility.NONE)
        points = LidarPointCloud.from_file(path).points[:3]
        for box in boxes:
            expected = nusc.get("sample_annotation", box.token)["num_lidar_pts"]
            assert points_in_box(box, points).sum() == expected, box.token
            nonzero += expected > 0
    assert nonzero > 20


CLASS_HUE = {"vehicle": "blue", "human": "red", "vehicle.bicycle": "yellow"}


def _colour(rgb: np.ndarray) -> np.ndarray:
    """[N] names of the dominant colour of JPEG pixels ([N, 3] uint8)."""
    r, g, b = (rgb[:, i].astype(int) for i in range(3))
    return np.select(
        [(b > r + 40) & (b > g + 20), (r > g + 60) & (r > b + 60), (r > b + 80) & (g > b + 60)],
        ["blue", "red", "yellow"],
        "other",
    )


def test_lidar_points_on_agents_land_on_their_pixels_in_the_cameras(dataset):
    """The two sensors agree: LiDAR points inside an agent's box, projected through the written calibration with
    the devkit's ``view_points``, fall on pixels of that agent's colour in the rendered JPEG."""
    _, nusc = dataset
    agree = total = 0
    for sample in nusc.sample[:: max(1, len(nusc.sample) // 8)]:
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        cloud = LidarPointCloud.from_file(nusc.get_sample_data_path(lidar["token"]))
        lidar_cs = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
        lidar_pose = nusc.get("ego_pose", lidar["ego_pose_token"])
        cloud.rotate(Quaternion(lidar_cs["rotation"]).rotation_matrix)
        cloud.translate(np.array(lidar_cs["translation"]))
        cloud.rotate(Quaternion(lidar_pose["rotation"]).rotation_matrix)
        cloud.translate(np.array(lidar_pose["translation"]))  # global frame
        for annotation_token in sample["anns"]:
            box = nusc.get_box(annotation_token)
            category = nusc.get("sample_annotation", annotation_token)["category_name"]
            wanted = "yellow" if category == "vehicle.bicycle" else CLASS_HUE[category.split(".")[0]]
            inside = points_in_box(box, cloud.points[:3])
            if inside.sum() < 5:
                continue
            for channel in (
                "CAM_FRONT",
                "CAM_FRONT_LEFT",
                "CAM_FRONT_RIGHT",
                "CAM_BACK",
                "CAM_BACK_LEFT",
                "CAM_BACK_RIGHT",
            ):
                cam = nusc.get("sample_data", sample["data"][channel])
                cam_cs = nusc.get("calibrated_sensor", cam["calibrated_sensor_token"])
                cam_pose = nusc.get("ego_pose", cam["ego_pose_token"])
                points = cloud.points[:3, inside] - np.array(cam_pose["translation"])[:, None]
                points = Quaternion(cam_pose["rotation"]).rotation_matrix.T @ points
                points = points - np.array(cam_cs["translation"])[:, None]
                points = Quaternion(cam_cs["rotation"]).rotation_matrix.T @ points
                front = points[2] > 1.0
                pixels = view_points(points[:, front], np.array(cam_cs["camera_intrinsic"]), normalize=True)
                u, v = np.floor(pixels[0]).astype(int), np.floor(pixels[1]).astype(int)
                on_image = (u >= 1) & (u < cam["width"] - 1) & (v >= 1) & (v < cam["height"] - 1)
                if on_image.sum() == 0:
                    continue
                image = np.asarray(Image.open(nusc.get_sample_data_path(cam["token"])))
                colours = _colour(image[v[on_image], u[on_image]])
                agree += int((colours == wanted).sum())
                total += int(on_image.sum())
    assert total > 200
    assert agree / total > 0.9, f"only {agree}/{total} LiDAR points on agents land on their pixels"


def test_ego_drives_on_the_drivable_area_of_the_map_mask(dataset):
    _, nusc = dataset
    for scene in nusc.scene:
        log = nusc.get("log", scene["log_token"])
        mask = next(m for m in nusc.map if log["token"] in m["log_tokens"])["mask"]
        sample = nusc.get("sample", scene["first_sample_token"])
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        assert mask.is_on_mask(pose["translation"][0], pose["translation"][1])
        assert not mask.is_on_mask(1.0, 1.0)  # the map's corner is off-road
