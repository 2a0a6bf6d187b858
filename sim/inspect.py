"""Describe a nuScenes dataset as the devkit sees it: tables, scenes, splits, a sample's sensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.splits import create_splits_scenes

from bevjepa.datasets import nuscenes_source


def split_instances(nusc, scenes: set[str]) -> dict[str, int]:
    """{category name: how many distinct objects (instances) the named scenes hold}, over the devkit's tables.

    Per-class figures on a split rest on these: ``mini_val`` of the real v1.0-mini, two scenes, holds a handful of
    bicycles, so a bicycle figure there is a figure about a few objects.
    """
    counts: dict[str, int] = {}
    for instance in nusc.instance:
        sample = nusc.get("sample", nusc.get("sample_annotation", instance["first_annotation_token"])["sample_token"])
        if nusc.get("scene", sample["scene_token"])["name"] in scenes:
            name = nusc.get("category", instance["category_token"])["name"]
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def describe(dataroot: Path, version: str) -> str:
    """A short text report of what the devkit loads (through ``nuscenes_source.open_nuscenes``)."""
    nusc = nuscenes_source.open_nuscenes(Path(dataroot), version)
    lines = [f"nuscenes-devkit loads {dataroot} ({version}):"]
    lines.append("  " + ", ".join(f"{len(getattr(nusc, t))} {t}" for t in nusc.table_names))
    splits = create_splits_scenes()
    names = {s["name"] for s in nusc.scene}
    for split in ["mini_train", "mini_val"] if version == "v1.0-mini" else ["train", "val"]:
        present = sorted(names & set(splits[split]))
        lines.append(
            f"  split {split}: {len(present)} scenes ({', '.join(present[:6])}{'...' if len(present) > 6 else ''})"
        )
        objects = split_instances(nusc, set(present))
        lines.append(f"    objects: {', '.join(f'{n} {c}' for c, n in objects.items()) or 'none'}")
    categories: dict[str, int] = {}
    for ann in nusc.sample_annotation:
        name = nusc.get("instance", ann["instance_token"])["category_token"]
        categories[nusc.get("category", name)["name"]] = categories.get(nusc.get("category", name)["name"], 0) + 1
    lines.append("  annotations: " + ", ".join(f"{n} {c}" for c, n in sorted(categories.items())))
    sample = nusc.sample[0]
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    cloud = LidarPointCloud.from_file(str(nuscenes_source.sensor_path(Path(dataroot), lidar)))
    lines.append(
        f"  first sample: {len(sample['anns'])} annotations, LIDAR_TOP {cloud.points.shape[1]:,} points "
        f"(range {np.linalg.norm(cloud.points[:2], axis=0).max():.1f} m), "
        + ", ".join(
            f"{c} {nusc.get('sample_data', t)['width']}x{nusc.get('sample_data', t)['height']}"
            for c, t in sorted(sample["data"].items())
            if c.startswith("CAM")
        )
    )
    return "\n".join(lines)
