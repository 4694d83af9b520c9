"""dataset=folder (cnnlab.data.folder) and the dataset.classes / dataset.per_class subsets.

Folders of small PNG/JPEG images of assorted sizes and modes are built in tmp_path with Pillow;
per_class and classes on real fashion_mnist use the shared offline copy (`fashion_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cnnlab.cli import preflight
from cnnlab.data import folder as folder_data
from cnnlab.data import load as data
from cnnlab.data.types import Dataset
from cnnlab.data.validate import resolve
from cnnlab.errors import ConfigError
from tests.helpers import TINY, compose_config, make_image_folder, run_cli

SIZE = (12, 10)  # (H, W): not square, so height and width cannot be swapped unnoticed


def spec(path: Path, **changes: object) -> folder_data.FolderSpec:
    return folder_data.FolderSpec(path=str(path), image_size=SIZE, **changes)


def load(path: Path, **kwargs: object) -> Dataset:
    folder = kwargs.pop("folder", None) or spec(path)
    return data.load_dataset("folder", folder=folder, **kwargs)


@pytest.fixture
def split_layout(tmp_path: Path) -> Path:
    """train: 3 classes; test: 2 of them (a class missing from a split is fine); val: 1."""
    root = tmp_path / "split"
    make_image_folder(root / "train", {"zebra": 5, "ant": 4, "moth": 3})
    make_image_folder(root / "test", {"ant": 2, "zebra": 3}, seed=1)
    make_image_folder(root / "val", {"moth": 2}, seed=2)
    return root


@pytest.fixture
def plain_layout(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "plain", {"b": 10, "a": 5, "c": 3})


def _class_of(images: np.ndarray, folder: Path, spec_: folder_data.FolderSpec) -> list[str]:
    """The class folder of each image, found by decoding every file and matching pixels."""
    by_pixels = {folder_data.decode_image(f, spec_).tobytes(): f.parent.name
                 for f in folder.rglob("*") if f.is_file()}
    return [by_pixels[image.tobytes()] for image in images]


def test_split_layout_shapes_labels_and_class_names(split_layout: Path) -> None:
    for channels in (3, 1):
        folder = spec(split_layout, channels=channels)
        ds = load(split_layout, folder=folder)
        assert ds.class_names == ("ant", "moth", "zebra")  # sorted train folders
        assert ds.num_classes == 3 and ds.image_shape == (*SIZE, channels)
        assert (len(ds.train), len(ds.test), len(ds.val)) == (12, 5, 2)
        for split, sub in ((ds.train, "train"), (ds.test, "test"), (ds.val, "val")):
            assert split.images.shape[1:] == (*SIZE, channels)
            assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
            # The same index in every split, from the folder each image came from.
            names = _class_of(split.images, split_layout / sub, folder)
            assert [ds.class_names[label] for label in split.labels] == names
        assert np.bincount(ds.train.labels).tolist() == [4, 3, 5]
        assert np.bincount(ds.val.labels, minlength=3).tolist() == [0, 2, 0]


def test_plain_layout_holds_out_a_stratified_test_fraction_by_val_seed(
        plain_layout: Path) -> None:
    ds = load(plain_layout, folder=spec(plain_layout, test_fraction=0.2))
    assert ds.class_names == ("a", "b", "c") and ds.val is None
    # round(0.2 x n) of each class, at least one image kept for training: 5 -> 1, 10 -> 2, 3 -> 1.
    assert np.bincount(ds.test.labels).tolist() == [1, 2, 1]
    assert np.bincount(ds.train.labels).tolist() == [4, 8, 2]
    again = load(plain_layout, folder=spec(plain_layout, test_fraction=0.2))
    assert np.array_equal(again.test.images, ds.test.images)
    other = load(plain_layout, folder=spec(plain_layout, test_fraction=0.2), val_seed=5)
    assert not np.array_equal(other.test.images, ds.test.images)
    assert np.bincount(other.test.labels).tolist() == [1, 2, 1]
    # Every image is in train or test, once.
    everything = np.concatenate([ds.train.images, ds.test.images]).reshape(18, -1)
    assert len({row.tobytes() for row in everything}) == 18
    assert folder_data.held_out_count(1, 0.5) == 0 and folder_data.held_out_count(4, 0.9) == 3


def test_resize_modes_match_pillows_own_resize(tmp_path: Path) -> None:
    # A known pattern: a horizontal ramp in red, a vertical one in green, checkers in blue.
    y, x = np.mgrid[0:30, 0:50]
    pattern = np.stack([x * 5, y * 8, ((x // 5 + y // 5) % 2) * 255], -1).astype(np.uint8)
    (tmp_path / "pic" / "k").mkdir(parents=True)
    Image.fromarray(pattern).save(tmp_path / "pic" / "k" / "p.png")
    file = tmp_path / "pic" / "k" / "p.png"
    original = Image.fromarray(pattern)
    stretched = original.resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
    cropped = ImageOps.fit(original, (SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
    for resize, expected in (("stretch", stretched), ("center_crop", cropped)):
        got = folder_data.decode_image(file, spec(tmp_path, resize=resize))
        assert np.array_equal(got, np.asarray(expected)), resize
    grey = folder_data.decode_image(file, spec(tmp_path, channels=1))
    # Converted first, then resized (as torchvision's loader, then Resize, would).
    grey_expected = original.convert("L").resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
    assert np.array_equal(grey[..., 0], np.asarray(grey_expected))
    # 16-bit greyscale keeps its high byte (Pillow's own convert would clip it to white).
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(SIZE[0] * SIZE[1]) * 500).astype(np.uint16).reshape(SIZE)).save(deep)
    got = folder_data.decode_image(deep, spec(tmp_path, channels=1))[..., 0]
    assert np.array_equal(got, (np.arange(SIZE[0] * SIZE[1]) * 500 >> 8).reshape(SIZE))
    # center_crop keeps the aspect ratio: the checkers' squares stay square.
    assert not np.array_equal(np.asarray(stretched), np.asarray(cropped))


def test_second_load_comes_from_the_cache_keyed_by_the_files(
        split_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = str(tmp_path / "cache")
    first = load(split_layout, cache_dir=cache)
    entries = sorted(p.name for p in (tmp_path / "cache" / "folder").iterdir())
    assert len(entries) == 3  # train, test, val

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as patch:
        patch.setattr(folder_data, "decode_files", no_decoding)
        second = load(split_layout, cache_dir=cache)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    # The subsets are cut after the cache: they reuse its entries.
    with monkeypatch.context() as patch:
        patch.setattr(folder_data, "decode_files", no_decoding)
        load(split_layout, cache_dir=cache, per_class=1, classes=[2, 0])
    # A changed file (size and mtime), or other resize settings, make new entries.
    victim = next((split_layout / "test" / "ant").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")
    os.utime(victim, ns=(1, 1))
    load(split_layout, cache_dir=cache)
    load(split_layout, cache_dir=cache, folder=spec(split_layout, resize="center_crop"))
    after = sorted(p.name for p in (tmp_path / "cache" / "folder").iterdir())
    assert len(after) == 3 + 1 + 3
    key = json.loads((tmp_path / "cache" / "folder" / entries[0] / "key.json").read_text())
    assert {"files", "image_shape", "resize", "class_names"} <= key.keys()


def _one_line_error(call: object, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_folder_errors_are_one_line_naming_the_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    _one_line_error(lambda: load(missing), str(missing), "no such folder", "<class>/<image>")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: load(tmp_path / "empty"), "no class subfolders", "<class>/<image>")
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    (tmp_path / "no_images" / "cls" / "notes.txt").write_text("no image")
    _one_line_error(lambda: load(tmp_path / "no_images"), "no images")
    odd = tmp_path / "odd"
    make_image_folder(odd / "train", {"a": 2})
    _one_line_error(lambda: load(odd), "no", str(odd / "test"))
    make_image_folder(odd / "test", {"a": 1, "b": 1})
    _one_line_error(lambda: load(odd), "['b']", "train split does not have")
    single = make_image_folder(tmp_path / "single", {"a": 1, "b": 1})
    _one_line_error(lambda: load(single), "test_fraction", "no test image")
    # The same errors come while composing, before anything compiles.
    _one_line_error(lambda: compose_config(["dataset=folder", f"dataset.path={missing}",
                                            "dataset.image_size=[8,8]"]), str(missing))


def test_unreadable_files_are_skipped_with_one_warning(
        plain_layout: Path, caplog: pytest.LogCaptureFixture) -> None:
    (plain_layout / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    (plain_layout / "a" / "cut.jpg").write_bytes((plain_layout / "a" / "1.jpg").read_bytes()[:60])
    with caplog.at_level(logging.WARNING, logger="cnnlab.data.folder"):
        ds = load(plain_layout)
    assert len(ds.train) + len(ds.test) == 18
    [record] = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert "skipped 2 unreadable" in record.getMessage() and "broken.png" in record.getMessage()


def test_per_class_and_classes_on_a_folder(plain_layout: Path) -> None:
    ds = load(plain_layout, per_class=3, classes=[2, 0])
    assert ds.class_names == ("c", "a") and ds.num_classes == 2
    # c has 2 training images (3 less its test image): it keeps both.
    assert np.bincount(ds.train.labels).tolist() == [2, 3]
    assert set(ds.test.labels.tolist()) == {0, 1}


def test_folder_config_knows_shapes_and_sizes_before_reading(plain_layout: Path) -> None:
    cfg = compose_config(["dataset=folder", f"dataset.path={plain_layout}",
                          "dataset.image_size=[16,20]", "dataset.channels=1"])
    preflight.validate(cfg)  # the geometry check runs on the derived shape
    assert list(cfg.dataset.image_shape) == [16, 20, 1] and cfg.dataset.num_classes == 3
    assert cfg.dataset.train_size == 4 + 8 + 2
    steps = compose_config(["dataset=folder", f"dataset.path={plain_layout}",
                            "dataset.image_size=[16,16]", "train.epochs=2",
                            "train.batch_size=4"]).train.steps
    assert steps == 7  # ceil(2 x 14 / 4)
    for bad, needle in (("dataset.image_size=[16]", "[height, width]"),
                        ("dataset.resize=squash", "stretch, center_crop"),
                        ("dataset.channels=4", "1 (greyscale) or 3")):
        _one_line_error(lambda bad=bad: preflight.validate(compose_config(
            ["dataset=folder", f"dataset.path={plain_layout}", "dataset.image_size=[16,16]",
             bad])), needle)
    _one_line_error(lambda: preflight.validate(compose_config(["dataset=folder"])),
                    "dataset.path=DIR")
    _one_line_error(lambda: preflight.validate(compose_config(["dataset.path=/x"])),
                    "dataset=folder only")


def test_bad_per_class_and_classes_values_are_one_line() -> None:
    for value, needle in (("0", "integer >= 1"), ("1.0", "fraction in (0, 1)"),
                          ("-0.5", "per_class=-0.5")):
        _one_line_error(lambda value=value: preflight.validate(
            compose_config([f"dataset.per_class={value}"])), needle)
    for value, needle in (("[]", "keeps no class"), ("[1,1,2]", "repeats [1]"),
                          ("[3,10]", "[10] outside the valid range: indices in [0, 10)"),
                          ("[-1]", "[-1] outside")):
        _one_line_error(lambda value=value: preflight.validate(
            compose_config([f"dataset.classes={value}"])), needle)
    _one_line_error(lambda: compose_config(["dataset.per_class=5", "train.epochs=1"]),
                    "train.epochs", "dataset.per_class=5", "train.steps")


def test_per_class_on_fashion_mnist(fashion_dir: Path) -> None:
    kwargs = {"data_dir": str(fashion_dir), "max_examples": 1000, "val_size": 100}
    full = data.load_dataset("fashion_mnist", **kwargs)
    few = data.load_dataset("fashion_mnist", per_class=7, **kwargs)
    assert np.bincount(few.train.labels, minlength=10).tolist() == [7] * 10
    # After the hold-out: the same validation and test splits as without per_class.
    assert np.array_equal(few.val.images, full.val.images)
    assert np.array_equal(few.test.labels, full.test.labels)
    again = data.load_dataset("fashion_mnist", per_class=7, **kwargs)
    assert np.array_equal(again.train.images, few.train.images)
    fewer = data.load_dataset("fashion_mnist", per_class=3, **kwargs)
    rows = {row.tobytes() for row in few.train.images}
    assert all(row.tobytes() in rows for row in fewer.train.images)  # nested subsets
    other_seed = data.load_dataset("fashion_mnist", per_class=7, val_seed=1, **kwargs)
    assert not np.array_equal(other_seed.train.images, few.train.images)
    fraction = data.load_dataset("fashion_mnist", per_class=0.1, **kwargs)
    expected = np.floor(np.bincount(full.train.labels, minlength=10) * 0.1 + 0.5).astype(int)
    assert np.bincount(fraction.train.labels, minlength=10).tolist() == expected.tolist()
    # More than a class has: all of it, and a warning says which.
    big = data.load_dataset("fashion_mnist", per_class=10_000, **kwargs)
    assert len(big.train) == len(full.train)


def test_classes_are_kept_and_relabelled_in_the_listed_order(fashion_dir: Path) -> None:
    kwargs = {"data_dir": str(fashion_dir), "max_examples": 600}
    full = data.load_dataset("fashion_mnist", **kwargs)
    task_b = data.load_dataset("fashion_mnist", classes=[9, 5, 6, 7, 8], **kwargs)
    assert task_b.num_classes == 5
    assert task_b.class_names == tuple(full.class_names[c] for c in (9, 5, 6, 7, 8))
    for part, whole in ((task_b.train, full.train), (task_b.test, full.test)):
        keep = np.isin(whole.labels, [5, 6, 7, 8, 9])
        assert np.array_equal(part.images, whole.images[keep])
        assert np.array_equal(part.labels, np.array([1, 2, 3, 4, 0])[whole.labels[keep] - 5])
    with pytest.raises(ValueError, match=r"\[10\] outside the valid range"):
        data.load_dataset("fashion_mnist", classes=[10], **kwargs)
    # The config's num_classes is the model's head: len(classes), also once resolved again.
    cfg = compose_config(["dataset.classes=[5,6,7,8,9]"])
    assert cfg.dataset.num_classes == 5
    resolve(cfg.dataset)
    assert cfg.dataset.num_classes == 5 and list(cfg.dataset.classes) == [5, 6, 7, 8, 9]


def test_a_short_run_on_a_folder_finishes(plain_layout: Path, tmp_path: Path) -> None:
    shutil.copytree(plain_layout, tmp_path / "run_images")
    overrides = [o for o in TINY if not o.startswith(("dataset.", "train.batch_size"))]
    args = ["train", *overrides, "dataset=folder", f"dataset.path={tmp_path / 'run_images'}",
            "dataset.image_size=[16,16]", "train.batch_size=4", "train.steps=4",
            "train.steps_per_call=2", "train.log_every=2", "checkpoint.every=2",
            "logger.mode=offline", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_step"] == 4
