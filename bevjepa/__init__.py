"""bevjepa: camera and LiDAR BEV perception with a JEPA world model, on nuScenes."""

__version__ = "0.1.0"
