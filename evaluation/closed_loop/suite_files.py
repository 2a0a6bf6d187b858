"""Closed-loop scenario suites: a TOML file of scenarios, each expanded into one episode per seed.

A suite file (read with the standard library's ``tomllib``) looks like this::

    name = "ci"                       # required: the suite's name
    description = "busy junctions"    # optional

    [defaults]                        # optional: fields every scenario takes unless it sets its own
    duration_s = 10.0

    [[scenario]]                      # one table per scenario; at least one
    name = "crossing-traffic"         # required, unique within the suite
    layout = "intersection"           # required: one of sim.layouts.LAYOUTS (intersection, straight, t_junction)
    seeds = [0, 1, 2]                 # required: one episode per seed (non-negative integers, no repeats)
    duration_s = 10.0                 # required here or in [defaults]: seconds the episode runs: a whole number
                                      # of 0.5 s planning steps, from 0.5 to 3600
    vehicles = 14                     # moving vehicles        (default 14)
    parked = 4                        # parked vehicles        (default 8)
    pedestrians = 10                  # pedestrians            (default 12)
    cyclists = 2                      # cyclists               (default 3)
    ego_speed_mps = 9.0               # the ego's cruise speed (default: drawn from the seed, 7-11 m/s)

Counts lie in [0, ``MAX_AGENTS``] (all zero is an empty road: the ego alone); ``ego_speed_mps`` in (0, 20] m/s.
Every key is checked: an unknown key, a missing required field, a wrong type or a value out of range (NaN and
infinities included) raises ``SuiteError`` naming the file, the scenario and the field. An ``Episode`` made in
code is checked the same way when it is constructed (except its layout, checked when its world is built). The
scenario's world is ``sim.scenario.build_world`` of the ``ScenarioConfig`` made from these fields with the
episode's seed, so an episode is byte-identical on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import tomllib

from bevjepa.sim import layouts, scenario

SCENARIO_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "layout": str,
    "seeds": list,
    "duration_s": (int, float),
    "vehicles": int,
    "parked": int,
    "pedestrians": int,
    "cyclists": int,
    "ego_speed_mps": (int, float),
}
"""Every key a ``[[scenario]]`` table (or ``[defaults]``) may hold, with its TOML type."""
_COUNT_DEFAULTS = {"vehicles": 14, "parked": 8, "pedestrians": 12, "cyclists": 3}
PLANNING_STEP_S = 0.5
"""The closed loop plans every keyframe interval; an episode lasts a whole number of these (s)."""
SUB_STEP_S = 0.1
"""The world is simulated in steps of this length (s)."""
SUB_STEPS = round(PLANNING_STEP_S / SUB_STEP_S)
"""World steps per planning step."""
MAX_DURATION_S = 3600.0
"""The longest episode a suite may ask for (s): an hour of simulated driving."""
MAX_AGENTS = 500
"""The most agents of one kind (vehicles, parked, pedestrians or cyclists) a scenario may ask for."""
MAX_EGO_SPEED_MPS = 20.0
"""The fastest cruise speed a scenario may set (m/s)."""


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Episode:
    """One closed-loop episode: a scenario with one seed.

    Attributes:
        suite: the suite's name.
        scenario: the scenario's name.
        seed: the episode's seed (seeds the world).
        layout: the layout's name; checked when the world is built (``scenario_config``), so that a suite made in
            code can hold an episode that fails at run time.
        duration_s: how long the episode runs (s).
        vehicles: moving vehicles.
        parked: parked vehicles.
        pedestrians: pedestrians.
        cyclists: cyclists.
        ego_speed_mps: the ego's cruise speed (m/s); None lets the seed draw one.
    """

    suite: str
    scenario: str
    seed: int
    layout: str
    duration_s: float
    vehicles: int = 14
    parked: int = 8
    pedestrians: int = 12
    cyclists: int = 3
    ego_speed_mps: float | None = None

    def __post_init__(self) -> None:
        label = f"suite {self.suite!r}: episode {self.scenario}/{self.seed}"
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SuiteError(f"{label}: `seed` must be a non-negative integer, got {self.seed!r}")
        check_fields(
            {
                "duration_s": self.duration_s,
                "ego_speed_mps": self.ego_speed_mps,
                **{name: getattr(self, name) for name in _COUNT_DEFAULTS},
            },
            label,
        )

    @property
    def episode_id(self) -> str:
        """``scenario/seed``: unique within a suite."""
        return f"{self.scenario}/{self.seed}"

    def scenario_config(self) -> scenario.ScenarioConfig:
        """The simulator's scenario (raises ``ValueError`` for an unknown layout or a bad count)."""
        return scenario.ScenarioConfig(
            layout=self.layout,
            seed=self.seed,
            duration_s=self.duration_s,
            vehicles=self.vehicles,
            parked=self.parked,
            pedestrians=self.pedestrians,
            cyclists=self.cyclists,
            ego_speed_mps=self.ego_speed_mps,
        )


@dataclass(frozen=True)
class Suite:
    """A named list of episodes.

    Attributes:
        name: the suite's name.
        episodes: every episode, scenario by scenario, seeds in file order.
        description: free text.
        path: the file it was read from (None when made in code).
    """

    name: str
    episodes: tuple[Episode, ...]
    description: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        ids = [e.episode_id for e in self.episodes]
        if len(set(ids)) != len(ids):
            raise SuiteError(f"suite {self.name!r}: episode ids must be unique, got {ids}")


SHIPPED_SUITES = Path(__file__).resolve().parent / "suites"
"""The suites that ship with the package as data (``ci``, ``smoke``, ``empty``), in a checkout and a wheel alike."""


def resolve_suite_path(suite: Path | str) -> Path:
    """A suite file's path: ``suite`` itself if it exists, else the shipped ``suites/<suite>.toml`` of that name."""
    path = Path(suite)
    if path.is_file():
        return path
    shipped = SHIPPED_SUITES / f"{suite}.toml"
    if path.suffix == "" and path.parent == Path(".") and shipped.is_file():
        return shipped
    return path


def load_suite(path: Path | str) -> Suite:
    """Read and check a suite file (see the module docstring for the format).

    Raises:
        FileNotFoundError: the file does not exist.
        SuiteError: the file is not valid TOML or breaks the format; the message names the file and field.
    """
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED_SUITES.glob("*.toml")))
        raise FileNotFoundError(f"suite file {path} not found; pass a .toml file or a shipped suite's name ({shipped})")
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SuiteError(f"{path}: not valid TOML: {error}") from None
    return parse_suite(document, str(path), path)


def parse_suite(document: dict, where: str = "<suite>", path: Path | None = None) -> Suite:
    """Check a parsed suite document and expand it into episodes; ``where`` names it in errors."""
    unknown = sorted(set(document) - {"name", "description", "defaults", "scenario"})
    if unknown:
        raise SuiteError(f"{where}: unknown top-level keys {unknown}; allowed: name, description, defaults, scenario")
    name = document.get("name")
    if not isinstance(name, str) or not name:
        raise SuiteError(f"{where}: `name` is required and must be a non-empty string")
    description = document.get("description", "")
    if not isinstance(description, str):
        raise SuiteError(f"{where}: `description` must be a string")
    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SuiteError(f"{where}: [defaults] must be a table")
    _check_keys(defaults, f"{where}: [defaults]", allow_identity=False)
    scenarios = document.get("scenario")
    if not isinstance(scenarios, list) or not scenarios:
        raise SuiteError(f"{where}: needs at least one [[scenario]] table")
    episodes: list[Episode] = []
    names: set[str] = set()
    for number, table in enumerate(scenarios):
        if not isinstance(table, dict):
            raise SuiteError(f"{where}: scenario {number} must be a table")
        label = f"{where}: scenario {table.get('name', number)!r}"
        _check_keys(table, label, allow_identity=True)
        fields = {**_COUNT_DEFAULTS, **defaults, **table}
        for required in ("name", "layout", "seeds", "duration_s"):
            if required not in fields:
                raise SuiteError(f"{label}: `{required}` is required")
        if fields["name"] in names:
            raise SuiteError(f"{label}: another scenario has the same name")
        names.add(fields["name"])
        if fields["layout"] not in layouts.LAYOUTS:
            raise SuiteError(
                f"{label}: `layout` {fields['layout']!r} is unknown; choose one of {sorted(layouts.LAYOUTS)}"
            )
        seeds = fields["seeds"]
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise SuiteError(f"{label}: `seeds` must be a non-empty list of non-negative integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise SuiteError(f"{label}: `seeds` repeats a seed: {seeds!r}")
        check_fields(fields, label)
        speed = fields.get("ego_speed_mps")
        for seed in seeds:
            episodes.append(
                Episode(
                    suite=name,
                    scenario=fields["name"],
                    seed=seed,
                    layout=fields["layout"],
                    duration_s=float(fields["duration_s"]),
                    vehicles=fields["vehicles"],
                    parked=fields["parked"],
                    pedestrians=fields["pedestrians"],
                    cyclists=fields["cyclists"],
                    ego_speed_mps=None if speed is None else float(speed),
                )
            )
    return Suite(name, tuple(episodes), description, path)


def check_fields(fields: dict, label: str) -> None:
    """Check a scenario's values: duration, the four agent counts and the optional cruise speed.

    Args:
        fields: ``duration_s``, ``vehicles``, ``parked``, ``pedestrians``, ``cyclists`` and optionally
            ``ego_speed_mps`` (None: drawn from the seed).
        label: where the scenario comes from (the file and scenario), for the error.

    Raises:
        SuiteError: ``{label}: `field` must ..., got ...``.
    """
    duration = fields["duration_s"]
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise SuiteError(f"{label}: `duration_s` must be a number of seconds, got {duration!r}")
    if not math.isfinite(duration):
        raise SuiteError(f"{label}: `duration_s` must be finite (at most {MAX_DURATION_S:g} s), got {duration}")
    if not duration > 0:
        raise SuiteError(f"{label}: `duration_s` must be positive, got {duration}")
    if not PLANNING_STEP_S <= duration <= MAX_DURATION_S:
        raise SuiteError(
            f"{label}: `duration_s` must lie between one planning step ({PLANNING_STEP_S} s) and "
            f"{MAX_DURATION_S:g} s, got {duration}"
        )
    steps = duration / PLANNING_STEP_S
    if abs(steps - round(steps)) > 1e-6:
        raise SuiteError(
            f"{label}: `duration_s` must be a whole number of {PLANNING_STEP_S} s planning steps, got {duration} "
            f"(use {round(steps) * PLANNING_STEP_S:g})"
        )
    for count in _COUNT_DEFAULTS:
        value = fields[count]
        if isinstance(value, bool) or not isinstance(value, int):
            raise SuiteError(f"{label}: `{count}` must be an integer, got {value!r}")
        if value < 0:
            raise SuiteError(f"{label}: `{count}` must not be negative, got {value}")
        if value > MAX_AGENTS:
            raise SuiteError(f"{label}: `{count}` must be at most {MAX_AGENTS}, got {value}")
    speed = fields.get("ego_speed_mps")
    if speed is not None and (
        isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 < speed <= MAX_EGO_SPEED_MPS
    ):
        raise SuiteError(f"{label}: `ego_speed_mps` must lie in (0, {MAX_EGO_SPEED_MPS:g}] m/s, got {speed}")


def _check_keys(table: dict, label: str, allow_identity: bool) -> None:
    """Unknown keys and wrong types raise ``SuiteError`` naming ``label`` and the key."""
    for key, value in table.items():
        if key not in SCENARIO_KEYS or (not allow_identity and key in ("name", "seeds")):
            allowed = sorted(k for k in SCENARIO_KEYS if allow_identity or k not in ("name", "seeds"))
            raise SuiteError(f"{label}: unknown key `{key}`; allowed: {', '.join(allowed)}")
        want = SCENARIO_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, want):
            names = want.__name__ if isinstance(want, type) else " or ".join(t.__name__ for t in want)
            raise SuiteError(f"{label}: `{key}` must be {names}, got {type(value).__name__} {value!r}")
