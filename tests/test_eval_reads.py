"""`cnnlab eval` and `viz` read only the splits they use: the statistics a run normalizes with
are saved in its directory (input_stats.npz), so its training set is not read again."""

import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.config.groups import root_values
from cnnlab.config.load import load_run_config
from cnnlab.config.schema import EvalConfig
from cnnlab.data import tfds_reader
from cnnlab.data.load import channel_mean_std, load_dataset
from cnnlab.runs.rundir import INPUT_STATS
from cnnlab.training.ensemble import evaluate_runs
from cnnlab.viz import visualize
from tests.helpers import fashion_dir, train_tiny  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_dir):  # noqa: F811
    # No data cache: every split a command reads goes through the TFDS reader the test spies on.
    path = tmp_path_factory.mktemp("eval_reads") / "run"
    train_tiny(path, fashion_dir, ["dataset.cache_dir=null", "dataset.val_size=128",
                                   "train.steps=10"])
    return path


@pytest.fixture
def reads(monkeypatch):
    """The TFDS splits read, in order."""
    seen: list[str] = []
    choose = tfds_reader.choose_reader

    def spying_choose(builder, download):
        read = choose(builder, download)

        def spy(builder, split, *args, **kwargs):
            seen.append(split)
            return read(builder, split, *args, **kwargs)

        return spy

    monkeypatch.setattr(tfds_reader, "choose_reader", spying_choose)
    return seen


def _eval(run_dir):
    """`cnnlab eval RUN_DIR`'s report (conf/config.yaml's eval section)."""
    return evaluate_runs([run_dir], OmegaConf.merge(OmegaConf.structured(EvalConfig),
                                                    root_values("eval")))


def test_the_run_saves_the_statistics_of_its_training_images(run_dir, fashion_dir):  # noqa: F811
    saved = np.load(run_dir / INPUT_STATS)
    ds = load_run_config(run_dir).dataset
    train = load_dataset("fashion_mnist", data_dir=str(fashion_dir), max_examples=1024,
                         val_size=ds.val_size, cache_dir=None).train
    mean, std = channel_mean_std(train.images)  # preprocess=channel: the same two numbers
    assert len(train) == 1024 - 128
    np.testing.assert_array_equal(saved["preprocess_mean"], mean)
    np.testing.assert_array_equal(saved["preprocess_std"], std)
    np.testing.assert_array_equal(saved["channel_mean"], mean)


def test_eval_reads_only_the_test_split_and_gives_the_same_numbers(run_dir, reads, tmp_path):
    report = _eval(run_dir)
    assert reads == ["test"]
    # The same run without the saved statistics (as one trained before they were): its
    # training set is read for them, and the numbers are the same.
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / INPUT_STATS).unlink()
    reads.clear()
    before = _eval(old)
    assert reads == ["train", "test"]
    ours, theirs = report["members"][0], before["members"][0]
    assert ours["error"] == theirs["error"] and ours["loss"] == theirs["loss"]
    assert report["examples"] == before["examples"] == 1024


@pytest.mark.parametrize("kind, options, splits", [
    ("filters", [], []),
    ("neighbors", ["images=1", "search=64", "k=2"], ["train", "test"]),
    ("occlusion", ["images=1"], ["test"]),
])
def test_viz_reads_the_splits_its_kind_uses(run_dir, reads, kind, options, splits):
    result = visualize(kind, run_dir, ["wandb=disabled", *options])
    assert result.written and reads == splits
