"""``OccupancyForecast`` checks every field at construction, and ``load`` names the file and what is wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from bevjepa.datasets import geometry
from bevjepa.prediction import forecaster

GRID = geometry.GridSpec(-4.0, 4.0, -3.0, 3.0, 1.0)  # 8 x 6 cells
CLASSES = ("vehicle", "pedestrian", "cyclist")


def _forecast(**changes) -> forecaster.OccupancyForecast:
    """A valid forecast on an 8 x 6 grid: S = 3 maps, A = 2 agents, K = 2 modes, T = 4 steps."""
    rng = np.random.default_rng(0)
    fields = {
        "timestamp_us": 1_500_000,
        "grid": GRID,
        "classes": CLASSES,
        "times_s": np.array([0.0, 0.5, 1.0], dtype=np.float32),
        "occupancy": rng.uniform(size=(3, 3, 8, 6)).astype(np.float32),
        "agent_ids": np.array(["car-a", "walker-b"]),
        "agent_classes": np.array([0, 1], dtype=np.int64),
        "trajectory_times_s": np.array([0.5, 1.0, 1.5, 2.0], dtype=np.float32),
        "trajectories": rng.normal(size=(2, 2, 4, 2)).astype(np.float32),
        "mode_probabilities": np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32),
        "latent_occupancy": rng.uniform(size=(3, 3, 8, 6)).astype(np.float32),
    }
    return forecaster.OccupancyForecast(**{**fields, **changes})


def _nan_at(array: np.ndarray, index: tuple) -> np.ndarray:
    out = array.astype(np.float32).copy()
    out[index] = np.nan
    return out


def test_a_valid_forecast_and_an_empty_road_construct():
    assert _forecast().trajectories.shape == (2, 2, 4, 2)
    empty = _forecast(
        agent_ids=np.array([], dtype=str),
        agent_classes=np.zeros(0, dtype=np.int64),
        trajectories=np.zeros((0, 2, 4, 2), dtype=np.float32),
        mode_probabilities=np.zeros((0, 2), dtype=np.float32),
        occupancy=np.zeros((3, 3, 8, 6), dtype=np.float32),
        latent_occupancy=None,
    )
    assert empty.occupancy_at(np.array([[0.5, 0.5]]), 0.5)[0] == 0.0


OCCUPANCY = np.full((3, 3, 8, 6), 0.5, dtype=np.float32)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"occupancy": OCCUPANCY[:, :, :4]}, r"occupancy: expected shape \[S=3, C=3, H=8, W=6\], got \(3, 3, 4, 6\)"),
        ({"occupancy": OCCUPANCY[0]}, r"occupancy: expected shape \[S=3, C=3, H=8, W=6\], got \(3, 8, 6\)"),
        ({"occupancy": OCCUPANCY.tolist()}, r"occupancy: expected a numpy array of shape \[S=3, .*got list"),
        ({"occupancy": (OCCUPANCY > 0).astype(np.int64)}, r"occupancy: expected a floating array, got dtype int64"),
        ({"occupancy": OCCUPANCY * 3}, r"occupancy: expected finite probabilities in \[0, 1\]"),
        ({"occupancy": np.full_like(OCCUPANCY, np.nan)}, r"occupancy: expected finite probabilities in \[0, 1\]"),
        ({"occupancy": -OCCUPANCY}, r"occupancy: expected finite probabilities"),
        ({"latent_occupancy": OCCUPANCY[:2]}, r"latent_occupancy: expected shape \[S=3, C=3, H=8, W=6\], got \(2,"),
        ({"latent_occupancy": _nan_at(OCCUPANCY, (0, 0, 0, 0))}, r"latent_occupancy: expected finite probabilities"),
        ({"times_s": np.array([0.0, 1.0, 0.5], dtype=np.float32)}, r"times_s: expected finite, non-negative, strictly"),
        ({"times_s": np.array([0.0, 0.5, np.inf])}, r"times_s: expected finite"),
        ({"times_s": np.array([[0.0, 0.5, 1.0]])}, r"times_s: expected shape \[S\], got \(1, 3\)"),
        ({"trajectory_times_s": np.array([], dtype=np.float32)}, r"trajectory_times_s: expected at least one time"),
        ({"agent_ids": np.array(["car-a"])}, r"agent_classes: expected shape \[A=1\], got \(2,\)"),
        ({"agent_ids": np.array([1, 2])}, r"agent_ids: expected a string array, got dtype int64"),
        ({"agent_classes": np.array([0.0, 1.0])}, r"agent_classes: expected an integer array, got dtype float64"),
        ({"agent_classes": np.array([0, 3])}, r"agent_classes: expected class indices in \[0, 3\), got \[0, 3\]"),
        ({"trajectories": np.zeros((2, 2, 3, 2), np.float32)}, r"trajectories: expected shape \[A=2, K, T=4, xy=2\]"),
        ({"trajectories": np.zeros((2, 0, 4, 2), np.float32)}, r"trajectories: expected K >= 1 modes"),
        (
            {"trajectories": _nan_at(np.zeros((2, 2, 4, 2)), (1, 0, 2, 1))},
            r"trajectories: expected finite positions \(m\), agents \['walker-b'\] have NaN",
        ),
        ({"mode_probabilities": np.ones((2, 3), np.float32) / 3}, r"mode_probabilities: expected shape \[A=2, K=2\]"),
        (
            {"mode_probabilities": np.array([[0.5, 0.25], [1.0, 0.0]], np.float32)},
            r"mode_probabilities: each agent's modes must sum to 1, agents \['car-a'\] sum to \[0.75\]",
        ),
        ({"mode_probabilities": np.array([[1.5, -0.5], [1.0, 0.0]])}, r"mode_probabilities: expected finite prob"),
        ({"timestamp_us": 1.5}, r"timestamp_us: expected an integer \(µs\), got float"),
        ({"grid": {"resolution_m": 1.0}}, r"grid: expected a geometry.GridSpec, got dict"),
        ({"classes": ["vehicle"]}, r"classes: expected a non-empty tuple of names"),
    ],
)
def test_construction_names_the_field_and_the_shape_or_value_wanted(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        _forecast(**changes)
    assert str(error.value).startswith("OccupancyForecast.")


# ---------------------------------------------------------------------------------------------------- load


def _members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _header(members: dict[str, np.ndarray]) -> dict:
    return json.loads(str(members["header"]))


def test_save_then_load_returns_the_same_forecast(tmp_path):
    forecast = _forecast()
    path = forecast.save(tmp_path / "f.npz")
    loaded = forecaster.OccupancyForecast.load(path)
    for field in dataclasses.fields(forecast):
        got, want = getattr(loaded, field.name), getattr(forecast, field.name)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want, err_msg=field.name)
        else:
            assert got == want, field.name
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, none left


def _rewritten(
    tmp_path: Path, name: str, header: object = None, drop: str | None = None, arrays: dict | None = None
) -> Path:
    """A copy of a valid forecast file with its header replaced, a member dropped or arrays replaced."""
    members = _members(_forecast().save(tmp_path / "valid.npz"))
    if header is not None:
        members["header"] = np.array(json.dumps(header))
    if drop is not None:
        del members[drop]
    members.update(arrays or {})
    np.savez(tmp_path / name, **members)
    return tmp_path / name


def _valid_header(tmp_path: Path) -> dict:
    return _header(_members(_forecast().save(tmp_path / "valid.npz")))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: {k: v for k, v in h.items() if k != "grid"}, r"header: the keys \['grid'\] are missing"),
        (lambda h: {k: v for k, v in h.items() if k != "timestamp_us"}, r"header: the keys \['timestamp_us'\]"),
        (lambda h: {**h, "timestamp_us": "soon"}, r"header.timestamp_us: expected an integer"),
        (lambda h: {**h, "grid": [1, 2]}, r"header.grid: expected an object with the numbers"),
        (lambda h: {**h, "grid": {**h["grid"], "resolution_m": "fine"}}, r"header.grid: expected numbers"),
        (lambda h: {**h, "grid": {**h["grid"], "extra_m": 1.0}}, r"header.grid: expected an object with the numbers"),
        (lambda h: {**h, "grid": {**h["grid"], "resolution_m": -1.0}}, r"header.grid: GridSpec.resolution_m"),
        (lambda h: {**h, "classes": "vehicle"}, r"header.classes: expected a non-empty list of class names"),
        (lambda h: {**h, "format": "something-else"}, r"not a bevjepa-occupancy-forecast file of version 1 to 3"),
        (lambda h: [h], r"header: expected a JSON object, got list"),
    ],
)
def test_load_names_the_file_and_the_header_field(tmp_path, edit, message):
    path = _rewritten(tmp_path, "bad.npz", header=edit(_valid_header(tmp_path)))
    with pytest.raises(ValueError, match=message) as error:
        forecaster.OccupancyForecast.load(path)
    assert str(error.value).startswith(f"{path}: ")


def test_load_refuses_bad_headers_members_and_arrays_by_name(tmp_path):
    cases = [
        (_rewritten(tmp_path, "no-header.npz", drop="header"), r"the array 'header' is missing"),
        (
            _rewritten(tmp_path, "text-header.npz", arrays={"header": np.array("{not json")}),
            r"header: not valid JSON",
        ),
        (_rewritten(tmp_path, "no-trajectories.npz", drop="trajectories"), r"the arrays \['trajectories'\] are miss"),
        (
            _rewritten(tmp_path, "small-map.npz", arrays={"occupancy": np.zeros((3, 3, 4, 4), np.float32)}),
            r"OccupancyForecast.occupancy: expected shape \[S=3, C=3, H=8, W=6\], got \(3, 3, 4, 4\)",
        ),
        (
            _rewritten(tmp_path, "nan-map.npz", arrays={"occupancy": np.full((3, 3, 8, 6), np.nan, np.float32)}),
            r"OccupancyForecast.occupancy: expected finite probabilities in \[0, 1\]",
        ),
        (
            _rewritten(tmp_path, "objects.npz", arrays={"agent_ids": np.array(["a", None], dtype=object)}),
            r"the array 'agent_ids' cannot be read",
        ),
        (
            _rewritten(tmp_path, "nan-modes.npz", arrays={"trajectories": np.full((2, 2, 4, 2), np.nan, np.float32)}),
            r"OccupancyForecast.trajectories: expected finite positions",
        ),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            forecaster.OccupancyForecast.load(path)
        assert str(error.value).startswith(f"{path}: "), path.name

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match=rf"{garbage}: not a bevjepa-occupancy-forecast .npz file"):
        forecaster.OccupancyForecast.load(garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="a single .npy array"):
        forecaster.OccupancyForecast.load(single)
    with pytest.raises(FileNotFoundError, match="no such forecast file"):
        forecaster.OccupancyForecast.load(tmp_path / "absent.npz")
