"""The one table from the 23 nuScenes categories to the classes the models predict."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("vehicle", "pedestrian", "cyclist")
"""The predicted classes, in channel order."""

CATEGORY_TO_CLASS: dict[str, str | None] = {
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.wheelchair": "pedestrian",
    "human.pedestrian.stroller": "pedestrian",
    "human.pedestrian.personal_mobility": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "animal": None,
    "vehicle.car": "vehicle",
    "vehicle.motorcycle": "cyclist",
    "vehicle.bicycle": "cyclist",
    "vehicle.bus.bendy": "vehicle",
    "vehicle.bus.rigid": "vehicle",
    "vehicle.truck": "vehicle",
    "vehicle.construction": "vehicle",
    "vehicle.emergency.ambulance": "vehicle",
    "vehicle.emergency.police": "vehicle",
    "vehicle.trailer": "vehicle",
    "movable_object.barrier": None,
    "movable_object.trafficcone": None,
    "movable_object.pushable_pullable": None,
    "movable_object.debris": None,
    "static_object.bicycle_rack": None,
}
"""Every nuScenes category; None where the category is not predicted (static or movable objects, animals)."""


def class_index(category: str) -> int:
    """The channel of a nuScenes category in ``CLASSES``, or -1 if it is not predicted.

    Raises:
        ValueError: for a name that is not a nuScenes category.
    """
    if category not in CATEGORY_TO_CLASS:
        raise ValueError(f"{category!r} is not a nuScenes category")
    name = CATEGORY_TO_CLASS[category]
    return -1 if name is None else CLASSES.index(name)


def class_indices(names: tuple[str, ...] | list[str]) -> list[int]:
    """The channels of predicted class names in ``CLASSES`` (for ``np.isin`` over class indices).

    Raises:
        ValueError: for a name that is not one of ``CLASSES``.
    """
    unknown = [name for name in names if name not in CLASSES]
    if unknown:
        raise ValueError(f"{unknown} are not predicted classes {CLASSES}")
    return [CLASSES.index(name) for name in names]
