"""What preparing a TFDS dataset from its raw files needs before TFDS's builder starts: files a
user places by hand (ImageNet), the downloads TFDS does not have yet, and TensorFlow.

Each is checked before the builder runs, so that a missing piece is one line that names it
instead of a failure after a download (cnnlab/data/tfds_reader.py raises it as
DatasetUnavailableError, exit 2). The builders themselves stay TFDS's own.
"""

from __future__ import annotations

import importlib.util
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

# The files a manual dataset's builder reads from its manual dir that cnnlab needs: its train
# split and the split the dataset's config tests on (imagenet2012: validation). TFDS prepares
# whatever subset is there, which would leave a split cnnlab reads missing.
MANUAL_FILES: dict[str, tuple[str, ...]] = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
}

# The builders of the datasets conf/dataset names: they read their raw files with tf.io.gfile
# and encode images with TensorFlow, so preparing them without it fails, after the download.
NEEDS_TENSORFLOW = frozenset(
    {"cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped", "imagenet2012"}
)

INSTALL_HINT = "pip install 'cnnlab[prepare]' (tensorflow-cpu; `make setup` installs it)"


def manual_dir(builder: tfds.core.DatasetBuilder) -> Path:
    """TFDS's default manual dir, where `download_and_prepare` looks for files placed by hand."""
    return Path(builder.data_dir_root) / "downloads" / "manual"


def manual_step(builder: tfds.core.DatasetBuilder) -> str:
    """One line saying which files to place where, or "" when the dataset needs none or they
    are there."""
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if not instructions:
        return ""
    folder = manual_dir(builder)
    wanted = MANUAL_FILES.get(builder.name)
    if wanted is not None:
        missing = [name for name in wanted if not (folder / name).is_file()]
    else:  # a manual dataset cnnlab knows no file list of: TFDS wants a non-empty folder
        missing = [] if folder.is_dir() and any(folder.iterdir()) else ["its files"]
    if not missing:
        return ""
    told = " ".join(instructions.split())
    return (f"{builder.name} is not prepared in {builder.data_dir} and needs a manual download: "
            f"place {' and '.join(missing)} in {folder}, then rerun (TFDS: {told})")


def urls_to_fetch(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The builder's registered download URLs that TFDS has neither in its download cache nor
    in the manual dir: the ones preparing fetches from the network."""
    from tensorflow_datasets.core.download import resource

    downloads = Path(builder.data_dir_root) / "downloads"
    manual = manual_dir(builder)
    urls = []
    for url, info in (builder.url_infos or {}).items():
        name = resource.get_dl_fname(url, info.checksum)
        # Where DownloadManager keeps a verified download (with the dataset's name, and the
        # legacy place without it); a file there with its .INFO is used as is.
        cached = (downloads / builder.name / name, downloads / name)
        if any(resource.is_locally_cached(path) for path in cached):
            continue
        # In the manual dir: TFDS takes it from there (checking its checksum), or the builder
        # reads it there itself (ImageNet's tars, registered under their image-net.org URLs).
        if (manual / (info.filename or posixpath.basename(urlsplit(url).path))).is_file():
            continue
        urls.append(url)
    return urls


def tensorflow_step(builder: tfds.core.DatasetBuilder) -> str:
    """One line saying to install TensorFlow when the builder needs it and it is missing, else
    ""."""
    if builder.name not in NEEDS_TENSORFLOW or tensorflow_available():
        return ""
    return (f"{builder.name} is not prepared in {builder.data_dir}, and preparing it from its raw "
            f"files needs TensorFlow (TFDS's builder reads them with tf.io.gfile): {INSTALL_HINT}")


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None
