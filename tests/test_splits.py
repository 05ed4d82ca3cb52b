"""Tests for reproducible splits and the JSON split manifest."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from medcore_monai.data import DataError, SplitManifest, apply_split, make_splits


def flat_items(count: int, dataset: str = "polyps") -> list[dict]:
    return [{"name": f"img{i:03d}", "dataset": dataset, "image": f"/x/img{i:03d}.png"} for i in range(count)]


def slice_items(volumes: int, slices_per_volume: int = 4, dataset: str = "hippo") -> list[dict]:
    return [
        {"name": f"vol{v:02d}_s{s:03d}", "volume": f"vol{v:02d}", "dataset": dataset}
        for v in range(volumes)
        for s in range(slices_per_volume)
    ]


def all_names(manifest: SplitManifest, dataset: str) -> list[str]:
    lists = manifest.splits[dataset]
    return lists["train"] + lists["val"] + lists["test"]


def test_split_sizes_and_disjointness() -> None:
    items = flat_items(53)
    manifest = make_splits(items, seed=1, val_fraction=0.2, test_fraction=0.1, cal_size=10)
    lists = manifest.splits["polyps"]
    assert len(lists["val"]) == math.floor(0.2 * 53) and len(lists["test"]) == max(1, math.floor(0.1 * 53))
    assert len(lists["train"]) == 53 - len(lists["val"]) - len(lists["test"])
    names = all_names(manifest, "polyps")
    assert sorted(names) == sorted(item["name"] for item in items)
    assert len(set(names)) == len(names)


def test_splits_are_reproducible_and_order_independent() -> None:
    items = flat_items(40) + flat_items(25, dataset="other")
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert make_splits(items, seed=7) == make_splits(shuffled, seed=7)
    assert make_splits(items, seed=7) != make_splits(items, seed=8)


def test_datasets_split_independently() -> None:
    alone = make_splits(flat_items(40), seed=3)
    together = make_splits(flat_items(40) + flat_items(30, dataset="other"), seed=3)
    assert together.splits["polyps"] == alone.splits["polyps"]
    assert sorted(together.splits) == ["other", "polyps"]


def test_calibration_is_prefix_of_train() -> None:
    manifest = make_splits(flat_items(60), cal_size=16)
    lists = manifest.splits["polyps"]
    assert lists["calibration"] == lists["train"][:16]
    small = make_splits(flat_items(10), cal_size=128).splits["polyps"]
    assert small["calibration"] == small["train"]


def test_small_and_too_small_datasets() -> None:
    lists = make_splits(flat_items(3)).splits["polyps"]
    assert [len(lists[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(DataError, match="tiny"):
        make_splits(flat_items(2, dataset="tiny"))
    no_test = make_splits(flat_items(10), test_fraction=0.0).splits["polyps"]
    assert no_test["test"] == [] and len(no_test["val"]) == 2


def test_bad_items_and_arguments() -> None:
    with pytest.raises(DataError, match="img001"):
        make_splits(flat_items(5) + flat_items(5)[1:2])
    with pytest.raises(DataError, match="name"):
        make_splits([{"image": "/x/a.png"}, *flat_items(4)])
    with pytest.raises(DataError, match="empty"):
        make_splits([])
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits(flat_items(5), val_fraction=1.5)


def test_grouping_keeps_volumes_together() -> None:
    items = slice_items(volumes=20, slices_per_volume=5)
    manifest = make_splits(items, seed=11, cal_size=12, group_key="volume")
    lists = manifest.splits["hippo"]
    volume_of = {item["name"]: item["volume"] for item in items}
    volumes = {split: {volume_of[n] for n in lists[split]} for split in ("train", "val", "test")}
    assert volumes["train"].isdisjoint(volumes["val"]) and volumes["train"].isdisjoint(volumes["test"])
    assert volumes["val"].isdisjoint(volumes["test"])
    assert len(volumes["val"]) == 4 and len(volumes["test"]) == 4 and len(volumes["train"]) == 12
    assert all(len(lists[split]) == 5 * len(volumes[split]) for split in volumes)
    assert lists["calibration"] == lists["train"][:12]
    assert len({volume_of[n] for n in lists["calibration"]}) > 2  # not the slices of one or two volumes
    assert manifest.group_key == "volume"


def test_grouping_needs_the_group_key() -> None:
    items = slice_items(volumes=5)
    del items[3]["volume"]
    with pytest.raises(DataError, match="vol00_s003"):
        make_splits(items, group_key="volume")


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = make_splits(flat_items(30) + slice_items(6), seed=5, cal_size=4)
    path = manifest.save(tmp_path / "deep" / "splits.json")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temporary file left behind
    loaded = SplitManifest.load(path)
    assert loaded == manifest
    assert json.loads(path.read_text())["seed"] == 5
    manifest.save(path)  # overwriting works too
    assert SplitManifest.load(path) == manifest


def test_manifest_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.json"):
        SplitManifest.load(tmp_path / "absent.json")
    (tmp_path / "garbled.json").write_text("{")
    with pytest.raises(DataError, match="garbled.json"):
        SplitManifest.load(tmp_path / "garbled.json")
    (tmp_path / "partial.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(DataError, match="partial.json"):
        SplitManifest.load(tmp_path / "partial.json")
    incomplete = {"seed": 1, "fractions": {}, "cal_size": 1, "splits": {"a": {"train": []}}}
    (tmp_path / "incomplete.json").write_text(json.dumps(incomplete))
    with pytest.raises(DataError, match="incomplete.json"):
        SplitManifest.load(tmp_path / "incomplete.json")


def test_apply_split_selects_items_in_manifest_order() -> None:
    items = flat_items(30) + flat_items(20, dataset="other")
    manifest = make_splits(items, seed=2, cal_size=5)
    val = apply_split(items, manifest, "val", dataset="polyps")
    assert [item["name"] for item in val] == manifest.splits["polyps"]["val"]
    assert all(item["dataset"] == "polyps" for item in val)
    everything = [item for split in ("train", "val", "test") for item in apply_split(items, manifest, split)]
    assert len(everything) == len(items)
    assert len(apply_split(items, manifest, "calibration")) == 10
    assert manifest.names("test") == [item["name"] for item in apply_split(items, manifest, "test")]


def test_apply_split_errors() -> None:
    items = flat_items(30)
    manifest = make_splits(items, seed=2)
    missing = manifest.splits["polyps"]["test"][0]
    with pytest.raises(DataError, match=missing):
        apply_split([item for item in items if item["name"] != missing], manifest, "test")
    with pytest.raises(DataError, match="elsewhere"):
        apply_split(items, manifest, "test", dataset="elsewhere")
    with pytest.raises(ValueError, match="holdout"):
        apply_split(items, manifest, "holdout")


def test_apply_split_with_groups_returns_whole_volumes() -> None:
    items = slice_items(volumes=10, slices_per_volume=3)
    manifest = make_splits(items, seed=0, group_key="volume")
    test = apply_split(items, manifest, "test")
    assert len(test) == 2 * 3
    assert len({item["volume"] for item in test}) == 2
