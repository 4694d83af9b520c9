"""Top-k error, confusion matrices and per-class errors (cnnlab/training/steps.py,
cnnlab/training/evaluate.py,
cnnlab/analysis/confusion.py): the device's counts against NumPy from the same log-probabilities,
ties
and the padded tail included; the files and W&B panels of a real run."""

import csv
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from cnnlab.analysis import confusion
from cnnlab.cli.preflight import validate
from cnnlab.data.device import DeviceSplit, device_split
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.data.types import ArraySplit
from cnnlab.errors import ConfigError
from cnnlab.training import evaluate, steps
from tests.helpers import compose_config, train_tiny, wandb_run_contents

K, BATCH, REAL = 12, 32, 50  # 50 real examples padded to 64: 14 padded ones in the last batch


class PixelLogits(nn.Module):
    """A model whose logits are the first K preprocessed pixels: images of two grey levels
    give many exactly tied logits."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return x.reshape(x.shape[0], -1)[:, :K]


def _split() -> DeviceSplit:
    rng = np.random.default_rng(0)
    images = rng.choice(np.array([0, 255], np.uint8), (REAL, 4, 4, 1))
    labels = rng.integers(0, K, REAL, dtype=np.int32)
    stats = PreprocessStats(mean=np.full((1,), 0.5, np.float32),
                            std=np.full((1,), 0.25, np.float32))
    return device_split(ArraySplit(images, labels), stats, pad_to=BATCH)


def _numpy_reference(split: DeviceSplit) -> tuple[np.ndarray, np.ndarray]:
    """The real examples' log-probabilities from the prediction path, and their labels."""
    predict = steps.make_predict_batch(PixelLogits(), BATCH)
    logp = np.concatenate([np.asarray(predict({}, {}, split, i))
                           for i in range(split.labels.shape[0] // BATCH)])
    return logp[:REAL], np.asarray(split.labels)[:REAL]


def test_top5_error_and_confusion_on_the_device_match_numpy_with_ties_and_padding():
    split = _split()
    assert split.labels.shape[0] == 64 and int(np.sum(split.mask)) == REAL
    evaluator = evaluate.Evaluator(PixelLogits(), {"test": split}, BATCH, top_k=5)
    results = evaluator(steps.TrainState(step=0, params={}, batch_stats={}, opt_state=None,
                                         rng=None))
    logp, labels = _numpy_reference(split)

    # NumPy: the first 5 of a stable descending sort (ties: the lower class index first), and
    # the argmax, which breaks ties the same way.
    order = np.argsort(-logp, axis=1, kind="stable")
    top5_hit = np.any(order[:, :5] == labels[:, None], axis=1)
    predictions = np.argmax(logp, axis=1)
    expected = np.zeros((K, K), np.int64)
    np.add.at(expected, (labels, predictions), 1)

    assert results["test/top5_error"] == pytest.approx(100 * np.mean(~top5_hit))
    assert results["test/error"] == pytest.approx(100 * np.mean(predictions != labels))
    counts = np.asarray(evaluator.confusions["test"])
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == REAL  # the 14 padded examples (all-zero images, label 0) count nowhere
    assert evaluate.prob_metrics(logp, labels, 5)["top5_error"] == results["test/top5_error"]
    np.testing.assert_array_equal(evaluate.confusion_matrix(logp, labels), expected)

    # The ties matter here: counting only strictly higher classes would rank differently.
    picked = logp[np.arange(REAL), labels][:, None]
    assert np.any((np.sum(logp > picked, axis=1) < 5) != top5_hit)
    # And the padded tail would count: its examples all tie, so argmax picks their label 0.
    padded = np.asarray(steps.make_predict_batch(PixelLogits(), BATCH)({}, {}, split, 1))[-1]
    assert np.argmax(padded) == 0 and np.asarray(split.labels)[-1] == 0


def test_label_rank_on_the_device_is_numpy_s():
    rng = np.random.default_rng(1)
    logp = rng.integers(0, 3, (200, 7)).astype(np.float32)  # values 0..2: ties everywhere
    labels = rng.integers(0, 7, 200)
    got = np.asarray(jax.jit(steps.label_rank)(logp, labels.astype(np.int32)))
    order = np.argsort(-logp, axis=1, kind="stable")
    np.testing.assert_array_equal(got, np.argmax(order == labels[:, None], axis=1))
    np.testing.assert_array_equal(got, evaluate.label_rank(logp, labels))


def test_top_k_is_reported_only_below_the_class_count_and_is_checked():
    split = _split()
    state = steps.TrainState(step=0, params={}, batch_stats={}, opt_state=None, rng=None)
    for top_k in (K, None):
        results = evaluate.Evaluator(PixelLogits(), {"test": split}, BATCH, top_k=top_k)(state)
        assert sorted(results) == ["test/error", "test/loss"]
    assert compose_config().eval.top_k == 5  # conf/config.yaml's default
    with pytest.raises(ConfigError, match="eval.top_k=1"):
        validate(compose_config(["eval.top_k=1"]))


def test_per_class_error_is_one_minus_diagonal_over_row_sum(tmp_path):
    counts = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])
    errors = confusion.per_class_error(counts)
    np.testing.assert_allclose(errors[:2], [100 * (1 - 8 / 10), 100 * (1 - 1 / 4)])
    assert np.isnan(errors[2])  # no examples of class 2
    paths = confusion.write_confusion(tmp_path, "test", counts, ("cat", "dog", "emu"), "t")
    with paths["csv"].open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["true \\ predicted", "cat", "dog", "emu"]
    assert table[2] == ["dog", "1", "1", "2"]
    with paths["per_class"].open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["examples"], r["errors"], r["error"]) for r in rows] == [
        ("cat", "10", "2", "20.0"), ("dog", "4", "3", "75.0"), ("emu", "0", "0", "")]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_imagenets_1000_classes_draw_a_bounded_figure(tmp_path):
    """At 0.55 inches per class 1000 classes made a 60,000-pixel square (27 GB to draw): only
    annotated matrices (up to 30 classes) grow with the class count."""
    from PIL import Image

    counts = np.eye(1000, dtype=np.int64)
    paths = confusion.write_confusion(tmp_path, "test", counts, [str(i) for i in range(1000)], "t")
    with Image.open(paths["png"]) as image:
        thousand = max(image.size)
    thirty = confusion.write_confusion(tmp_path / "k30", "test", np.eye(30, dtype=np.int64),
                                       [str(i) for i in range(30)], "t")
    with Image.open(thirty["png"]) as image:
        assert thousand <= max(image.size) * 1.1 and thousand < 3000


def test_a_real_run_writes_its_confusion_matrix_and_logs_it_to_wandb(fashion_dir, tmp_path):
    summary = train_tiny(tmp_path, fashion_dir, ["logger.mode=offline", "train.eval_every=10"])
    assert summary["status"] == "finished"
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = events[-1]
    assert {"test/error", "test/top5_error"} <= final.keys()
    assert final["test/top5_error"] <= final["test/error"]
    assert summary["final/test/top5_error"] == final["test/top5_error"]

    with (tmp_path / "confusion_test.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0][1:] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                            "Shirt", "Sneaker", "Bag", "Ankle boot"]
    counts = np.array([[int(c) for c in row[1:]] for row in table[1:]])
    assert counts.sum() == 1024  # dataset.max_examples=1024 cuts the test split too
    assert 100 * (1 - np.trace(counts) / counts.sum()) == pytest.approx(final["test/error"])
    with (tmp_path / "per_class_test.csv").open() as f:
        per_class = [float(r["error"]) for r in csv.DictReader(f)]
    np.testing.assert_allclose(per_class, confusion.per_class_error(counts), atol=1e-3)
    assert (tmp_path / "confusion_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    wb = wandb_run_contents(tmp_path)
    last = wb["history"][-1]
    assert last["_step"] == 20
    assert last["confusion/test/_type"] == "image-file"
    assert last["per_class/test/_type"] == "table-file"
    assert wb["summary"]["final/test/top5_error"] == final["test/top5_error"]
