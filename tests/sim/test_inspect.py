"""``bevjepa inspect``: what the devkit loads, with the objects each split holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bevjepa.sim import inspect
from bevjepa.tools import cli


def _objects_by_walking_samples(nusc, scene_name: str) -> Counter:
    """Distinct instances of a scene's annotations, sample by sample: another path through the tables."""
    scene = next(s for s in nusc.scene if s["name"] == scene_name)
    tokens, instances = scene["first_sample_token"], set()
    while tokens:
        sample = nusc.get("sample", tokens)
        instances |= {nusc.get("sample_annotation", a)["instance_token"] for a in sample["anns"]}
        tokens = sample["next"]
    return Counter(nusc.get("category", nusc.get("instance", i)["category_token"])["name"] for i in instances)


def test_the_objects_of_a_real_scene_agree_with_its_annotations(real_scene_nusc):
    counted = inspect.split_instances(real_scene_nusc, {"scene-0916"})
    assert counted == dict(_objects_by_walking_samples(real_scene_nusc, "scene-0916"))
    assert counted.get("vehicle.car", 0) > 0
    assert inspect.split_instances(real_scene_nusc, set()) == {}


def test_inspect_lists_each_splits_objects(synthetic_mini: Path, capsys):
    assert cli.main(["inspect", "--dataroot", str(synthetic_mini)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    objects = [line for line in lines if line.strip().startswith("objects:")]
    assert len(objects) == 2  # mini_train, then mini_val: one synthetic scene each
    total = Counter()
    for line in objects:
        for part in line.split(":", 1)[1].split(","):
            n, name = part.split()
            total[name] += int(n)
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes(version="v1.0-mini", dataroot=str(synthetic_mini), verbose=False)
    assert total == Counter(nusc.get("category", i["category_token"])["name"] for i in nusc.instance)
