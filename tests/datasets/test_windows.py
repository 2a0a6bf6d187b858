"""Windows and their targets against the devkit: futures, occupancy, actions, inputs in the t0 frame."""

from __future__ import annotations

import numpy as np
import pytest
from nuscenes.prediction import PredictHelper

from bevjepa.datasets import categories, geometry, nuscenes_source, windows


@pytest.fixture(scope="module")
def built(synthetic_mini):
    source = nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(synthetic_mini))
    config = windows.WindowConfig()
    builder = windows.WindowBuilder(source, config)
    result = []
    for scene in source.scenes:
        tokens = source.scene_sample_tokens(scene)
        for index in windows.window_sample_tokens(tokens, config):
            result.append((tokens, index, builder.window(tokens, index)))
    return source, builder, result


def test_windows_need_past_and_future_keyframes():
    config = windows.WindowConfig(past_keyframes=3, occupancy_steps=4)
    assert windows.window_sample_tokens([f"t{i}" for i in range(8)], config) == [2, 3]
    assert windows.window_sample_tokens([f"t{i}" for i in range(6)], config) == []


def test_future_trajectories_equal_the_predict_helper(built):
    source, _, result = built
    helper = PredictHelper(source.nusc)
    checked = 0
    for _, _, window in result:
        _, global_from_t0 = source.ego_pose(window.sample_token)
        for a, instance in enumerate(window.agent_ids):
            future = helper.get_future_for_agent(str(instance), window.sample_token, seconds=6, in_agent_frame=False)
            expected = global_from_t0.inverse().apply(np.concatenate([future, np.zeros((len(future), 1))], axis=1))
            got = window.agent_future[a][window.agent_future_mask[a]]
            np.testing.assert_allclose(got, expected[:, :2], atol=1e-4)
            checked += len(future)
    assert checked > 50


def test_occupancy_holds_every_agent_at_t0_and_its_instance(built):
    _, _, result = built
    grid = geometry.GridSpec()
    for _, _, window in result:
        assert window.occupancy.shape == (5, len(categories.CLASSES), 128, 128)
        rows, cols, inside = grid.xy_to_index(window.agent_box[:, :2])
        for a in np.flatnonzero(inside):
            assert window.occupancy[0, window.agent_class[a], rows[a], cols[a]]
            assert window.instance_ids[window.instances[0, rows[a], cols[a]] - 1] == window.agent_ids[a]
        # Occupancy and instances agree everywhere, at every step.
        np.testing.assert_array_equal(window.occupancy.any(axis=1), window.instances > 0)
    assert 0.05 < np.mean([w.observed.mean() for _, _, w in result]) < 1.0


def test_actions_rebuild_the_ego_path(built):
    _, _, result = built
    for _, _, window in result:
        pose = np.array(
            [
                window.t0_from_ego[0, 0, 3],
                window.t0_from_ego[0, 1, 3],
                np.arctan2(window.t0_from_ego[0, 1, 0], window.t0_from_ego[0, 0, 0]),
            ]
        )
        path = []
        for action, valid in zip(window.actions, window.action_mask, strict=True):
            if not valid:
                break
            c, s = np.cos(pose[2]), np.sin(pose[2])
            pose = np.array(
                [pose[0] + c * action[0] - s * action[1], pose[1] + s * action[0] + c * action[1], pose[2] + action[2]]
            )
            path.append(pose)
        path = np.array(path)
        p = len(window.keyframe_tokens)
        np.testing.assert_allclose(path[p - 2, :2], [0.0, 0.0], atol=1e-4)  # the past actions end at t0
        future = window.ego_future[window.ego_future_mask]
        np.testing.assert_allclose(path[p - 1 :, :2], future[:, :2], atol=1e-3)


def test_inputs_assemble_in_the_t0_frame(built):
    _, builder, result = built
    tokens, index, window = result[0]
    frames = [builder.frame(str(t)) for t in window.keyframe_tokens]
    inputs = windows.assemble_inputs(window, frames, (144, 256))
    assert inputs.images.shape == (3, 6, 144, 256, 3) and inputs.camera_mask.all()
    t0 = inputs.points[inputs.points_frame == 2]
    np.testing.assert_allclose(t0[:, :3], frames[2].points[:, :3], atol=1e-5)  # t0's own frame: identity
    assert inputs.points[inputs.points_frame == 0, 4].min() >= 1.0 - 1e-6  # two keyframes back: 1 s and more
    # A static point seen from two keyframes lands in the same place in t0: compare the map-fixed ground ring
    # via the ego poses, which assemble_inputs applies.
    np.testing.assert_allclose(inputs.t0_from_camera[2, 0], frames[2].ego_from_camera[0], atol=1e-6)


def test_frames_and_windows_round_trip_through_npz(built, tmp_path):
    _, builder, result = built
    _, _, window = result[1]
    frame = builder.frame(window.sample_token)
    windows.save_window(window, tmp_path / "w.npz")
    windows.save_frame(frame, tmp_path / "f.npz")
    loaded = windows.load_window(tmp_path / "w.npz")
    loaded_frame = windows.load_frame(tmp_path / "f.npz")
    for name in ("occupancy", "instances", "agent_future", "agent_ids", "actions", "observed"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(window, name))
    assert loaded.sample_token == window.sample_token and isinstance(loaded.timestamp_us, int)
    np.testing.assert_array_equal(loaded_frame.image(0), frame.image(0))
    assert not list(tmp_path.glob("*.tmp*"))


def test_voxel_downsampling_averages_within_voxels():
    rng = np.random.default_rng(0)
    points = np.concatenate(
        [rng.uniform(0, 2, (5000, 3)), rng.uniform(0, 255, (5000, 1)), rng.uniform(0, 0.5, (5000, 1))], axis=1
    ).astype(np.float32)
    down = windows.voxel_downsample(points, 0.5)
    assert len(down) == 64  # 4 x 4 x 4 voxels
    np.testing.assert_allclose(down[:, 3].mean(), points[:, 3].mean(), rtol=0.05)
    reference = windows.voxel_downsample_open3d(points, 0.5)
    assert len(reference) == len(down)
    order = np.lexsort(down[:, :3].T), np.lexsort(reference[:, :3].T)
    np.testing.assert_allclose(down[order[0]], reference[order[1]], atol=1e-3)


def test_inference_window_matches_the_built_window(built):
    _, builder, result = built
    config = windows.WindowConfig()
    p_count, f_count = config.past_keyframes, config.occupancy_steps
    for _, _, window in result[:2]:
        frames = [builder.frame(str(t)) for t in window.keyframe_tokens]
        ours = windows.inference_window(
            frames,
            window.agent_box,
            window.agent_class,
            window.agent_velocity,
            window.agent_past,
            window.agent_past_mask,
            [str(a) for a in window.agent_ids],
            config,
            window.actions[p_count - 1 : p_count - 1 + f_count],
        )
        # The inputs, the poses and the actions (past ones from the frames' poses, future ones as given) agree.
        np.testing.assert_allclose(ours.t0_from_ego, window.t0_from_ego, atol=1e-6)
        known = p_count - 1 + f_count
        np.testing.assert_allclose(ours.actions[:known], window.actions[:known], atol=1e-5)
        assert ours.action_mask[:known].all() and not ours.action_mask[known:].any()
        for name in ("sample_token", "timestamp_us"):
            assert getattr(ours, name) == getattr(window, name)
        for name in ("keyframe_tokens", "agent_ids", "agent_class", "agent_box", "agent_past", "agent_past_mask"):
            np.testing.assert_array_equal(getattr(ours, name), getattr(window, name), err_msg=name)
        mine, theirs = (windows.assemble_inputs(w, frames, (144, 256)) for w in (ours, window))
        np.testing.assert_allclose(mine.points, theirs.points, atol=1e-4)
        np.testing.assert_allclose(mine.t0_from_camera, theirs.t0_from_camera, atol=1e-5)
        # Zero targets: nothing of the future is known at inference.
        assert ours.occupancy.shape == window.occupancy.shape and not ours.occupancy.any()
        assert not ours.agent_future_mask.any() and not ours.ego_future_mask.any() and not ours.observed.any()
        assert len(ours.future_keyframe_tokens) == 0
    # No agents and no future actions: a valid window all the same; the frame count is checked.
    without = windows.inference_window(frames, *_no_agents(p_count), [], config)
    assert not without.action_mask[p_count - 1 :].any() and without.agent_box.shape == (0, 7)
    with pytest.raises(ValueError, match="2 frames, the config wants 3"):
        windows.inference_window(frames[1:], *_no_agents(p_count - 1), [], config)


def _no_agents(p_count: int) -> tuple[np.ndarray, ...]:
    """The agent arrays of no agent: boxes, classes, velocities, past positions, past mask."""
    return np.zeros((0, 7)), np.zeros(0), np.zeros((0, 2)), np.zeros((0, p_count, 2)), np.zeros((0, p_count), bool)


@pytest.mark.parametrize("voxel_size_m", [0.05, 0.2, 0.7])
def test_voxel_downsampling_gives_the_reference_bytes(voxel_size_m):
    """The hash-factorized downsampling writes what the np.unique one (``voxel_downsample_reference``) wrote."""
    rng = np.random.default_rng(7)
    for count in (0, 1, 2, 3000):
        points = np.concatenate(
            [rng.normal(0.0, 25.0, (count, 2)), rng.uniform(-3.0, 40.0, (count, 1)), rng.uniform(0, 255, (count, 2))],
            axis=1,
        ).astype(np.float32)
        points = np.concatenate([points, points[: count // 3]])  # points that share a voxel exactly
        down, reference = (
            windows.voxel_downsample(points, voxel_size_m),
            windows.voxel_downsample_reference(points, voxel_size_m),
        )
        assert down.dtype == np.float32 and down.tobytes() == reference.tobytes()


def test_the_reference_builder_gives_the_same_frames_and_windows(built):
    """``WindowBuilder(reference=True)`` (as first written) and the caching one build the same bytes."""
    source, _, result = built
    config = windows.WindowConfig()
    fast, slow = windows.WindowBuilder(source, config), windows.WindowBuilder(source, config, reference=True)
    for tokens, index, _ in result:
        for token in tokens[index - 2 : index + 5]:
            a, b = fast.frame(token), slow.frame(token)
            for name in a.__dataclass_fields__:
                assert np.asarray(getattr(a, name)).tobytes() == np.asarray(getattr(b, name)).tobytes(), name
        a, b = fast.window(tokens, index), slow.window(tokens, index)
        for name in a.__dataclass_fields__:
            assert np.asarray(getattr(a, name)).tobytes() == np.asarray(getattr(b, name)).tobytes(), name
