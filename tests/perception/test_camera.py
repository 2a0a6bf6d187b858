"""Tests of ``bevjepa.perception.camera``: Lift-Splat puts a point where ``GridSpec`` says, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bevjepa.datasets import geometry
from bevjepa.perception import bench, camera

IMAGE_HW = (144, 256)
STRIDE = 8
FEATURE_HW = (18, 32)

# nuScenes CAM_FRONT (v1.0-mini calibration), at 1600 x 900.
CAM_FRONT_K_1600x900 = np.array(
    [[1266.417203046554, 0.0, 816.2670197447984], [0.0, 1266.417203046554, 491.50706579294757], [0.0, 0.0, 1.0]]
)
CAM_FRONT_TRANSLATION = np.array([1.7008, 0.0159, 1.511])
CAM_FRONT_ROTATION_WXYZ = np.array([0.4998, -0.50303, 0.49978, -0.49737])


@pytest.fixture(scope="module")
def encoder() -> camera.CameraEncoder:
    torch.manual_seed(0)
    return camera.CameraEncoder(camera.CameraEncoderConfig()).eval()


def cam_front(yaw_deg: float = 0.0) -> tuple[np.ndarray, geometry.RigidTransform]:
    """CAM_FRONT's K scaled to 256 x 144 and its pose, turned by ``yaw_deg`` about the ego z axis."""
    k = np.diag([IMAGE_HW[1] / 1600.0, IMAGE_HW[0] / 900.0, 1.0]) @ CAM_FRONT_K_1600x900
    front = geometry.RigidTransform.from_quaternion(CAM_FRONT_ROTATION_WXYZ, CAM_FRONT_TRANSLATION)
    return k, geometry.RigidTransform.from_pose_2d(0.0, 0.0, np.radians(yaw_deg)) @ front


def point_on_ray(k: np.ndarray, ego_from_camera: geometry.RigidTransform, u: int, v: int, depth_m: float):
    """The ego-frame point seen at the centre of feature pixel (u, v), at ``depth_m`` along the optical axis."""
    pixel = np.array([(u + 0.5) * STRIDE, (v + 0.5) * STRIDE, 1.0])
    return ego_from_camera.apply(depth_m * np.linalg.solve(k, pixel))


def as_batch(k: np.ndarray, ego_from_camera: geometry.RigidTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 1, 3, 3] intrinsics and [1, 1, 4, 4] pose tensors."""
    return torch.tensor(k, dtype=torch.float32)[None, None], torch.tensor(ego_from_camera.matrix).float()[None, None]


# ---------------------------------------------------------------------------------------------------------
# The acceptance test: one object lands in the splat cell GridSpec names for it.


@pytest.mark.parametrize(
    ("yaw_deg", "u", "v", "depth_m"),
    [
        (0.0, 16, 12, 20.0),  # straight ahead
        (0.0, 3, 13, 9.0),  # ahead, to the left (small u is left in the image, +y in the ego frame)
        (0.0, 29, 11, 25.0),  # ahead, to the right
        (0.0, 12, 16, 4.0),  # the nearest depth bin
        (110.0, 8, 12, 17.0),  # a rear-left camera: the object is behind and to the left
        (180.0, 20, 10, 28.0),  # a rear camera
    ],
)
def test_object_lands_in_the_cell_gridspec_names(encoder, yaw_deg, u, v, depth_m) -> None:
    config = encoder.config
    k, ego_from_camera = cam_front(yaw_deg)
    obj = point_on_ray(k, ego_from_camera, u, v, depth_m)  # the object, in the ego frame

    # From the object back to what the camera sees, by projection: the feature pixel and the depth bin.
    p_cam = ego_from_camera.inverse().apply(obj)
    pixel = k @ p_cam / p_cam[2]
    fu, fv = int(pixel[0] // STRIDE), int(pixel[1] // STRIDE)
    bin_k = round((p_cam[2] - config.depth_min_m) / config.depth_step_m)
    assert (fu, fv) == (u, v) and 0 <= bin_k < config.depth_bins

    C, D = config.channels, config.depth_bins
    features = torch.zeros(1, 1, C, *FEATURE_HW)
    features[0, 0, :, fv, fu] = torch.arange(1, C + 1, dtype=torch.float32)
    depth_probs = torch.zeros(1, 1, D, *FEATURE_HW)
    depth_probs[0, 0, bin_k] = 1.0
    bev = encoder.splat(features, depth_probs, *as_batch(k, ego_from_camera), torch.ones(1, 1, dtype=torch.bool))
    assert bev.shape == (1, C, *config.splat_grid.shape)

    rows, cols, inside = config.splat_grid.xy_to_index(obj[None, :2])
    assert inside[0]
    hit = bev[0].abs().sum(0).nonzero().tolist()
    assert hit == [[rows[0], cols[0]]]
    torch.testing.assert_close(bev[0, :, rows[0], cols[0]], features[0, 0, :, fv, fu])
    if yaw_deg == 0.0:  # a forward camera puts things ahead: rows above the grid's middle
        assert rows[0] >= config.splat_grid.shape[0] // 2
    if yaw_deg == 110.0:  # rear-left: behind and to the left
        assert rows[0] < config.splat_grid.shape[0] // 2 and cols[0] >= config.splat_grid.shape[1] // 2


def test_spread_depth_splits_features_along_the_ray(encoder) -> None:
    """A uniform depth distribution spreads one pixel's features over the cells its ray crosses, summing to it."""
    config = encoder.config
    k, ego_from_camera = cam_front()
    features = torch.zeros(1, 1, config.channels, *FEATURE_HW)
    features[0, 0, :, 12, 16] = 1.0
    depth_probs = torch.full((1, 1, config.depth_bins, *FEATURE_HW), 1.0 / config.depth_bins)
    bev = encoder.splat(features, depth_probs, *as_batch(k, ego_from_camera), torch.ones(1, 1, dtype=torch.bool))
    rays = np.stack([point_on_ray(k, ego_from_camera, 16, 12, d) for d in encoder.depths_m.tolist()])
    rows, cols, inside = config.splat_grid.xy_to_index(rays[:, :2])
    expected = torch.zeros(config.splat_grid.shape)
    np.add.at(expected.numpy(), (rows[inside], cols[inside]), 1.0 / config.depth_bins)
    torch.testing.assert_close(bev[0, 0], expected)


# ---------------------------------------------------------------------------------------------------------
# Missing cameras, shapes, gradients


def test_masked_camera_contributes_nothing_to_the_splat(encoder) -> None:
    config = encoder.config
    k, ego_from_camera = cam_front()
    features = torch.rand(1, 1, config.channels, *FEATURE_HW)
    depth_probs = torch.rand(1, 1, config.depth_bins, *FEATURE_HW).softmax(dim=2)
    bev = encoder.splat(features, depth_probs, *as_batch(k, ego_from_camera), torch.zeros(1, 1, dtype=torch.bool))
    assert not bev.any()


def random_inputs(B: int, N: int, hw: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, N, 3, *hw), dtype=torch.uint8, generator=g)
    yaws = np.linspace(0.0, 360.0, N, endpoint=False)
    rigs = [cam_front(yaw) for yaw in yaws]
    ks, poses = [k for k, _ in rigs], [p for _, p in rigs]
    scale = torch.diag(torch.tensor([hw[1] / IMAGE_HW[1], hw[0] / IMAGE_HW[0], 1.0]))
    intrinsics = (scale @ torch.tensor(np.stack(ks)).float()).expand(B, N, 3, 3).clone()
    ego_from_camera = torch.tensor(np.stack([p.matrix for p in poses])).float().expand(B, N, 4, 4).clone()
    return images, intrinsics, ego_from_camera, torch.ones(B, N, dtype=torch.bool)


def test_masked_camera_contributes_nothing_to_the_latent(encoder) -> None:
    images, intrinsics, ego_from_camera, mask = random_inputs(2, 3, (48, 80))
    mask[0, 1] = False
    out = encoder(images, intrinsics, ego_from_camera, mask)
    # Whatever the missing camera holds (other pixels, a singular K, a zero pose), the latent is the same.
    images[0, 1] = 255 - images[0, 1]
    intrinsics[0, 1] = 0.0
    ego_from_camera[0, 1] = 0.0
    again = encoder(images, intrinsics, ego_from_camera, mask)
    assert torch.isfinite(again).all()
    torch.testing.assert_close(again, out)


def test_sample_without_cameras_gives_zeros(encoder) -> None:
    images, intrinsics, ego_from_camera, mask = random_inputs(2, 2, (32, 64))
    mask[1] = False
    out = encoder(images, intrinsics, ego_from_camera, mask)
    assert out[0].abs().sum() > 0
    assert not out[1].any()


@pytest.mark.parametrize("hw", [(144, 256), (50, 70)])
def test_output_shape(encoder, hw) -> None:
    images, intrinsics, ego_from_camera, mask = random_inputs(2, 3, hw)
    out = encoder(images, intrinsics, ego_from_camera, mask)
    assert out.shape == (2, 64, 32, 32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gradients_reach_the_image_backbone_and_depth_head() -> None:
    torch.manual_seed(0)
    encoder = camera.CameraEncoder(camera.CameraEncoderConfig()).train()
    images, intrinsics, ego_from_camera, mask = random_inputs(1, 2, (48, 96))
    out = encoder(images, intrinsics, ego_from_camera, mask)
    (out * torch.randn_like(out)).sum().backward()
    first_conv = encoder.backbone[0][0].weight.grad
    assert first_conv is not None and torch.isfinite(first_conv).all() and first_conv.abs().sum() > 0
    depth_rows = encoder.lift_head.weight.grad[: encoder.config.depth_bins]
    assert depth_rows.abs().sum() > 0


def test_bad_inputs_are_named() -> None:
    encoder = camera.CameraEncoder(camera.CameraEncoderConfig())
    images, intrinsics, ego_from_camera, mask = random_inputs(1, 2, (32, 64))
    with pytest.raises(ValueError, match="intrinsics"):
        encoder(images, intrinsics[:, :1], ego_from_camera, mask)
    with pytest.raises(ValueError, match="uint8"):
        encoder(images.float(), intrinsics, ego_from_camera, mask)
    with pytest.raises(ValueError, match="depth range"):
        camera.CameraEncoderConfig(depth_min_m=4.0, depth_max_m=45.5)
    with pytest.raises(ValueError, match="whole multiple"):
        camera.CameraEncoderConfig(
            splat_grid=geometry.GridSpec(-24.0, 24.0, -24.0, 24.0, 2.0),
            out_grid=geometry.GridSpec(-24.0, 24.0, -24.0, 24.0, 3.0),
        )
    with pytest.raises(ValueError, match="same extent"):
        camera.CameraEncoderConfig(out_grid=geometry.GridSpec(-40.0, 40.0, -32.0, 32.0, 2.0))


def test_default_config_matches_the_small_preset() -> None:
    config = camera.CameraEncoderConfig()
    assert config.depth_bins == 41
    assert config.splat_grid.shape == (64, 64) and config.out_grid.shape == (32, 32)


# ---------------------------------------------------------------------------------------------------------
# Pooling


@pytest.mark.parametrize("seed", range(5))
def test_pooling_equals_the_naive_scatter_and_a_dense_reference(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    P, C, cells = int(torch.randint(0, 3000, (1,), generator=g)), 7, 50
    features = torch.randn(P, C, generator=g, dtype=torch.float64)
    flat_index = torch.randint(-5, cells + 5, (P,), generator=g)  # garbage where not inside
    inside = (flat_index >= 0) & (flat_index < cells) & (torch.rand(P, generator=g) < 0.7)
    pooled = camera.lift_splat_pool(features, flat_index, inside, cells)
    naive = camera.naive_scatter_pool(features, flat_index, inside, cells)
    one_hot = torch.nn.functional.one_hot(flat_index.clamp(0, cells - 1), cells).double() * inside[:, None]
    torch.testing.assert_close(pooled, naive)
    torch.testing.assert_close(pooled, one_hot.T @ features)


# ---------------------------------------------------------------------------------------------------------
# The cached splat index against the paper's outer product


def splat_inputs(B: int, N: int, seed: int = 0):
    """Features, depth probabilities and a surround rig at the feature size of 144 x 256 images."""
    _, intrinsics, ego_from_camera, mask = random_inputs(B, N, IMAGE_HW, seed)
    g = torch.Generator().manual_seed(seed)
    config = camera.CameraEncoderConfig()
    features = torch.randn(B, N, config.channels, *FEATURE_HW, generator=g, dtype=torch.float64)
    depth_probs = torch.randn(B, N, config.depth_bins, *FEATURE_HW, generator=g, dtype=torch.float64).softmax(2)
    return features, depth_probs, intrinsics.double(), ego_from_camera.double(), mask


def fresh_encoder() -> camera.CameraEncoder:
    torch.manual_seed(0)
    return camera.CameraEncoder(camera.CameraEncoderConfig()).double()


def test_cached_splat_equals_the_outer_product_with_its_gradients() -> None:
    """Values and gradients of the sparse splat match the reference, with a camera missing in one sample."""
    encoder = fresh_encoder()
    features, depth_probs, intrinsics, ego_from_camera, mask = splat_inputs(2, 4)
    mask[1, 2] = False
    intrinsics[1, 2] = 0.0  # a missing camera's calibration may be anything
    grads = []
    for splat in (encoder.splat, encoder.splat_reference):
        f, d = features.clone().requires_grad_(), depth_probs.clone().requires_grad_()
        bev = splat(f, d, intrinsics, ego_from_camera, mask)  # [B, C, X, Y]
        (bev * torch.linspace(-1.0, 1.0, bev.numel(), dtype=bev.dtype).view_as(bev)).sum().backward()
        grads.append((bev.detach(), f.grad, d.grad))
    assert grads[0][0].abs().sum() > 0
    for cached, reference in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(cached, reference, rtol=1e-10, atol=1e-10)


def test_the_splat_backward_never_forms_the_dense_matrix() -> None:
    """A million cells by a million pixels: dense, the matrix's gradient would take 4 TB; the pairs take bytes."""
    cells = pixels = 1_000_000
    crow = torch.zeros(cells + 1, dtype=torch.int64)
    crow[2:] = 2  # cell 1 holds pixels 5 and 999_999, cell 2 pixel 5
    crow[3:] = 3
    index = camera.SplatIndex(
        crow, torch.tensor([5, 999_999, 5]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), pixels=pixels, points=3
    )
    features = torch.zeros(pixels, 2, dtype=torch.float64)
    features[5], features[999_999] = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    features.requires_grad_()
    depth_probs = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    out = camera.sparse_splat(features, depth_probs, index)  # [cells, 2]
    torch.testing.assert_close(out[1:4], torch.tensor([[1.25, 2.0], [1.0, 2.0], [0.0, 0.0]], dtype=torch.float64))
    out[:, 0].sum().backward()  # d/d depth_probs: each pair's pixel's first feature
    torch.testing.assert_close(depth_probs.grad, torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64))
    assert features.grad[5, 0] == 1.5 and features.grad[999_999, 0] == 0.25 and features.grad[:, 1].abs().sum() == 0


def test_a_changed_calibration_builds_a_fresh_index() -> None:
    """The cache is keyed by the rig's values: turning one camera changes the splat, as the reference does."""
    encoder = fresh_encoder()
    features, depth_probs, intrinsics, ego_from_camera, mask = splat_inputs(1, 3)
    first = encoder.splat(features, depth_probs, intrinsics, ego_from_camera, mask)
    turned = ego_from_camera.clone()
    turned[0, 1, :3, :3] = (
        torch.tensor(geometry.RigidTransform.from_pose_2d(0.0, 0.0, 0.3).matrix[:3, :3]) @ (turned[0, 1, :3, :3])
    )
    second = encoder.splat(features, depth_probs, intrinsics, turned, mask)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, encoder.splat_reference(features, depth_probs, intrinsics, turned, mask))
    again = encoder.splat(features, depth_probs, intrinsics, ego_from_camera, mask)
    torch.testing.assert_close(again, first, rtol=0.0, atol=0.0)
    assert len(encoder._splat_index_cache) == 2


def test_the_index_cache_stays_bounded() -> None:
    encoder = fresh_encoder()
    features, depth_probs, intrinsics, ego_from_camera, mask = splat_inputs(1, 1)
    for step in range(camera.SPLAT_INDEX_CACHE_SIZE + 3):
        shifted = ego_from_camera.clone()
        shifted[0, 0, 0, 3] += 0.01 * step
        encoder.splat(features, depth_probs, intrinsics, shifted, mask)
    assert len(encoder._splat_index_cache) == camera.SPLAT_INDEX_CACHE_SIZE


def test_splat_index_checks_its_fields() -> None:
    crow = torch.tensor([0, 2, 3])
    with pytest.raises(ValueError, match="col_indices"):
        camera.SplatIndex(crow, torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]), pixels=2, points=4)
    with pytest.raises(ValueError, match="pair_index"):
        camera.SplatIndex(crow, torch.tensor([0, 1, 1]), torch.tensor([0, 1]), torch.tensor([0]), pixels=2, points=4)


def test_benchmarks_run_and_agree() -> None:
    pooling = bench.pooling_speed(image_hw=(48, 96), repeats=1)
    assert pooling["max_abs_diff"] < 1e-4 and pooling["kept_points"] > 0
    assert pooling["sparse_ms"] > 0 and pooling["naive_ms"] > 0 and pooling["index_add_ms"] > 0
    assert pooling["sparse_backward_ms"] > 0 and pooling["csr_autograd_backward_ms"] > 0
    latency = bench.encoder_latency(image_hw=(32, 64), sweep_points=1000, repeats=1)
    assert latency["camera_ms"] > 0 and latency["lidar_ms"] > 0
