"""TFDS's own builders prepare the datasets conf/dataset names from raw files in their original
formats, offline, and `cnnlab train dataset=NAME` trains on what they wrote.

Only the download is replaced: the raw files (CIFAR binary batches in their .tar.gz, MNIST idx.gz,
SVHN .mat, ImageNet's tar of per-class tars) are written at tiny scale and placed where TFDS's
DownloadManager keeps a verified download (`<data_dir>/downloads/<dataset>/<name from URL and
registered checksum>` with its .INFO file: TFDS uses such a file without fetching or hashing it
again), or, for imagenet2012, in the manual dir its TFDS page asks for. The builders, their
parsing and TFDS's writing of array_record files are the real ones; so is cnnlab's path (the
offline probe skips cached downloads). What TFDS wrote is then compared with the pixels and labels
written here.

The builders read raw files with TensorFlow (the `prepare` extra): without it these tests skip,
except under CI=true, where `make setup` has installed it and its absence is a failure.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.download import resource

from cnnlab.data import prepare
from tests.helpers import run_cli

TRAIN = [
    "model=convnetjs", "train.batch_size=4", "train.steps=2",
    "train.steps_per_call=1", "train.log_every=1", "train.eval_every=0",
    "train.eval_batch_size=8", "checkpoint.enabled=false", "progress=false",
    "logger.mode=disabled", "dataset.cache_dir=null", "dataset.val_size=0",
]


@pytest.fixture
def tensorflow() -> None:
    """Skips without TensorFlow, unless under CI, where `make setup` installs it."""
    if importlib.util.find_spec("tensorflow") is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("TensorFlow is missing under CI=true: `make setup` installs the prepare extra")
    pytest.skip("TensorFlow not installed (pip install 'cnnlab[prepare]')")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy on a closed local port: nothing can be fetched, whatever the machine's network."""
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)


def place_download(data_dir: Path, name: str, url: str, raw: Path) -> None:
    """Puts `raw` where TFDS's DownloadManager keeps the verified download of `url`."""
    info = tfds.builder(name, data_dir=str(data_dir)).url_infos[url]
    path = data_dir / "downloads" / name / resource.get_dl_fname(url, info.checksum)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(raw, path)
    resource.write_info_file(url=url, path=epath.Path(path), dataset_name=name,
                             original_fname=info.filename, url_info=info)


def images_and_labels(rng: np.random.Generator, n: int, shape: tuple, classes: int):
    return rng.integers(0, 256, (n, *shape), np.uint8), rng.integers(0, classes, n)


# ---------------------------------------------------------------- raw files, original formats


def cifar_tar(tmp: Path, name: str, splits: dict) -> dict[str, Path]:
    """CIFAR's binary version: per example the label byte(s), then 3072 bytes of R, G, B planes."""
    if name == "cifar10":
        folder, files = "cifar-10-batches-bin", {"train": [f"data_batch_{i}.bin" for i in
                                                           range(1, 6)], "test": ["test_batch.bin"]}
        meta = {"batches.meta.txt": [f"class{i}" for i in range(10)]}
    else:
        folder, files = "cifar-100-binary", {"train": ["train.bin"], "test": ["test.bin"]}
        meta = {"coarse_label_names.txt": [f"super{i}" for i in range(20)],
                "fine_label_names.txt": [f"class{i}" for i in range(100)]}
    root = tmp / "raw" / folder
    root.mkdir(parents=True)
    for split, (images, labels) in splits.items():
        parts = np.array_split(np.arange(len(labels)), len(files[split]))
        for file, part in zip(files[split], parts, strict=True):
            records = []
            for i in part:
                head = [labels[i]] if name == "cifar10" else [labels[i] // 5, labels[i]]
                records.append(bytes(head) + images[i].transpose(2, 0, 1).tobytes())
            (root / file).write_bytes(b"".join(records))
    for file, names in meta.items():
        (root / file).write_text("\n".join(names) + "\n")
    archive = tmp / f"{folder}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=folder)
    stem = "cifar-10-binary" if name == "cifar10" else "cifar-100-binary"
    return {f"https://www.cs.toronto.edu/~kriz/{stem}.tar.gz": archive}


def idx_gz(tmp: Path, name: str, splits: dict) -> dict[str, Path]:
    """MNIST's idx files, gzipped: magic 2051/2049, counts and sizes big-endian, then bytes."""
    base = {"mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}[name]
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = splits[split]
        n = len(labels)
        for kind, payload in (
                ("images-idx3-ubyte", np.array([2051, n, 28, 28], ">u4").tobytes()
                 + images.tobytes()),
                ("labels-idx1-ubyte", np.array([2049, n], ">u4").tobytes()
                 + labels.astype(np.uint8).tobytes())):
            path = tmp / f"{prefix}-{kind}.gz"
            path.write_bytes(gzip.compress(payload))
            out[base + path.name] = path
    return out


def svhn_mat(tmp: Path, name: str, splits: dict) -> dict[str, Path]:
    """SVHN's format 2 .mat files: X is (32, 32, 3, N), y is (N, 1) with the digit 0 as 10."""
    import scipy.io

    out = {}
    for split in ("train", "test", "extra"):
        images, labels = splits["train" if split == "extra" else split]
        path = tmp / f"{split}_32x32.mat"
        scipy.io.savemat(path, {"X": np.moveaxis(images, 0, -1),
                                "y": np.where(labels == 0, 10, labels).reshape(-1, 1)})
        out[f"http://ufldl.stanford.edu/housenumbers/{path.name}"] = path
    return out


# name: (writer, image shape, classes, conf/dataset option)
DATASETS = {
    "cifar10": (cifar_tar, (32, 32, 3), 10),
    "cifar100": (cifar_tar, (32, 32, 3), 100),
    "mnist": (idx_gz, (28, 28, 1), 10),
    "fashion_mnist": (idx_gz, (28, 28, 1), 10),
    "svhn_cropped": (svhn_mat, (32, 32, 3), 10),
}


def examples(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
    """(label, pixels) pairs, sorted: TFDS shuffles the examples by key as it writes them."""
    return sorted((int(label), image.tobytes()) for image, label in zip(images, labels,
                                                                         strict=True))


def written(data_dir: Path, name: str, split: str) -> list[tuple[int, bytes]]:
    """The examples TFDS wrote for `split`, read back from its array_record files."""
    source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    read = [source[i] for i in range(len(source))]
    return examples(np.stack([np.asarray(e["image"], np.uint8) for e in read]),
                    np.array([e["label"] for e in read]))


@pytest.mark.parametrize("name", list(DATASETS))
def test_tfds_builder_prepares_the_raw_files_and_cnnlab_trains_on_them(
        name, tmp_path, monkeypatch, tensorflow, offline):
    from tensorflow_datasets.image_classification import mnist

    write, shape, classes = DATASETS[name]
    rng = np.random.default_rng(len(name))
    splits = {"train": images_and_labels(rng, 10, shape, classes),
              "test": images_and_labels(rng, 6, shape, classes)}
    # MNIST's builder reads a fixed count from its files: TFDS's own tests set it so.
    monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", 10)
    monkeypatch.setattr(mnist, "_TEST_EXAMPLES", 6)
    data_dir = tmp_path / "tfds"
    for url, raw in write(tmp_path, name, splits).items():
        place_download(data_dir, name, url, raw)

    result = run_cli(["train", f"dataset={name}", f"dataset.data_dir={data_dir}", *TRAIN,
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and np.isfinite(summary["final/test/loss"])
    log = "".join(p.read_text() for p in (tmp_path / "run").glob("*.log"))
    assert f"preparing it from the files in {data_dir / 'downloads'}" in log  # nothing fetched

    for split, (images, labels) in splits.items():
        assert written(data_dir, name, split) == examples(images, labels), split
    formats = tfds.builder(name, data_dir=str(data_dir)).info.available_file_formats()
    assert formats == {tfds.core.FileFormat.ARRAY_RECORD}


# ------------------------------------------------------------------------ imagenet2012, manual


def jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    height, width = rng.integers(40, 90, 2)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(out, "JPEG")
    return out.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    tar.addfile(member, io.BytesIO(payload))


def imagenet_tars(manual: Path, synsets: list[str], per_class: int, val: int) -> None:
    """ILSVRC2012_img_train.tar (one tar per synset, of its JPEGs) and ILSVRC2012_img_val.tar
    (ILSVRC2012_val_%08d.JPEG, labelled by TFDS's validation_labels.txt in sorted order)."""
    rng = np.random.default_rng(0)
    manual.mkdir(parents=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        for synset in synsets:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_class_tar:
                for i in range(per_class):
                    add_bytes(per_class_tar, f"{synset}_{i}.JPEG", jpeg(rng))
            add_bytes(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(1, val + 1):
            add_bytes(tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(rng))


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


IMAGENET = ["dataset=imagenet", "dataset.image_shape=[32,32,3]", "dataset.stream_workers=0",
            "dataset.stats_sample=4", "augment=flip", *TRAIN]


def test_imagenet2012_prepares_from_manually_placed_tars_and_trains(tmp_path, tensorflow,
                                                                    offline):
    data_dir = tmp_path / "tfds"
    labels_txt = Path(tfds.core.tfds_path("datasets/imagenet2012/labels.txt")).read_text()
    names = labels_txt.split()
    synsets = [names[3], names[500]]
    imagenet_tars(data_dir / "downloads" / "manual", synsets, per_class=3, val=4)

    result = run_cli(["train", *IMAGENET, f"dataset.data_dir={data_dir}",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and np.isfinite(summary["final/test/loss"])

    train = tfds.data_source("imagenet2012", split="train", data_dir=str(data_dir))
    got = sorted((text(e["file_name"]), int(e["label"])) for e in train)
    assert got == sorted((f"{s}_{i}.JPEG", names.index(s)) for s in synsets for i in range(3))
    val = tfds.data_source("imagenet2012", split="validation", data_dir=str(data_dir))
    val_txt = Path(tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt"))
    expected = [names.index(s) for s in val_txt.read_text().split()[:4]]
    assert sorted((text(e["file_name"]), int(e["label"])) for e in val) == [
        (f"ILSVRC2012_val_{i:08d}.JPEG", expected[i - 1]) for i in range(1, 5)]


@pytest.mark.parametrize("placed", [[], ["ILSVRC2012_img_train.tar"]])
def test_imagenet2012_without_its_tars_says_where_to_place_which_in_one_line(tmp_path, placed):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in placed:
        (manual / name).write_bytes(b"")
    result = run_cli(["train", *IMAGENET, f"dataset.data_dir={tmp_path / 'tfds'}",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    missing = [n for n in prepare.MANUAL_FILES["imagenet2012"] if n not in placed]
    assert f"place {' and '.join(missing)} in {manual}," in lines[0]
    assert "imagenet2012 is not prepared" in lines[0] and "image-net.org" in lines[0]
    assert not (tmp_path / "tfds" / "imagenet2012").exists()


def test_preparing_without_tensorflow_says_to_install_it_before_downloading(
        tmp_path, monkeypatch, offline):
    monkeypatch.setattr(prepare, "tensorflow_available", lambda: False)
    result = run_cli(["train", "dataset=cifar10", f"dataset.data_dir={tmp_path / 'tfds'}",
                      *TRAIN, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cifar10 is not prepared" in lines[0] and "pip install 'cnnlab[prepare]'" in lines[0]
    # Checked before the offline probe: the message is about TensorFlow, not the network.
    assert "unreachable" not in lines[0]
