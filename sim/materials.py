"""What the synthetic world is made of: ground surfaces and object materials, with their look and reflectivity."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Surface(IntEnum):
    """Ground surface classes held in a layout's surface raster (one uint8 per 0.1 m cell)."""

    OFFROAD = 0
    ROAD = 1
    SIDEWALK = 2
    CROSSWALK = 3
    LANE_MARKING = 4
    PARKING = 5


class Material(IntEnum):
    """Materials of the meshes that rays hit."""

    GROUND = 0
    BUILDING = 1
    WALL = 2
    POLE = 3
    VEHICLE = 4
    PEDESTRIAN = 5
    CYCLIST = 6


SURFACE_RGB = np.array(
    [
        [96, 128, 72],  # OFFROAD: grass
        [70, 70, 74],  # ROAD: asphalt
        [150, 146, 140],  # SIDEWALK: concrete
        [225, 225, 225],  # CROSSWALK: white paint
        [235, 235, 230],  # LANE_MARKING
        [86, 86, 92],  # PARKING
    ],
    dtype=np.float32,
)
"""[len(Surface), 3] base RGB (0-255) of each surface."""

SURFACE_REFLECTIVITY = np.array([0.25, 0.12, 0.3, 0.85, 0.9, 0.15], dtype=np.float32)
"""[len(Surface)] diffuse LiDAR reflectivity (0-1) of each surface; paint is retro-reflective."""

MATERIAL_RGB = np.array(
    [
        [0, 0, 0],  # GROUND: coloured by the surface raster instead
        [176, 160, 140],  # BUILDING
        [140, 130, 120],  # WALL
        [110, 110, 115],  # POLE
        [40, 80, 200],  # VEHICLE: blue
        [210, 40, 40],  # PEDESTRIAN: red
        [230, 200, 30],  # CYCLIST: yellow
    ],
    dtype=np.float32,
)
"""[len(Material), 3] base RGB (0-255); agents get their class colour so that cameras show what LiDAR sees."""

MATERIAL_REFLECTIVITY = np.array([0.0, 0.35, 0.3, 0.5, 0.6, 0.25, 0.4], dtype=np.float32)
"""[len(Material)] diffuse LiDAR reflectivity (0-1)."""


def material_of_category(category: str) -> Material:
    """The rendering material of a nuScenes category name."""
    if category.startswith("human.pedestrian"):
        return Material.PEDESTRIAN
    if category in ("vehicle.bicycle", "vehicle.motorcycle"):
        return Material.CYCLIST
    if category.startswith("vehicle."):
        return Material.VEHICLE
    raise ValueError(f"no material for category {category!r}")
