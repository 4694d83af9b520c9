"""Streaming training sets through Grain (cnnlab/data/stream.py): the same batches as on the device,
resuming mid-stream, the placement choice, and an ImageNet-style set of variable-size JPEGs
prepared with TFDS and trained end to end at 224x224."""

import io
import json
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnlab.data import placement as stream_config
from cnnlab.data import stream
from cnnlab.errors import ConfigError
from cnnlab.training import build as run_lib
from tests.helpers import TINY, compose_config, train_tiny

# In-process reading (no worker processes to start): what the tests can afford on 2 cores.
STREAM = ["dataset.on_device=false", "dataset.stream_workers=0", "dataset.stream_threads=2",
          "dataset.stats_sample=256"]
SMALL = ["dataset.max_examples=256", "train.batch_size=16", "train.steps=12",
         "train.steps_per_call=4", "train.eval_batch_size=64"]


def _losses(overrides: list[str], data_dir, steps_per_call: int = 4, chunks: int = 3):
    cfg = compose_config([*TINY, *SMALL, f"dataset.data_dir={data_dir}", *overrides])
    run = run_lib.build(cfg)
    state, losses = run.state, []
    for _ in range(chunks):
        step = int(state.step)
        state, sums = run.chunk_at(step)(state, run.chunk_data(step, steps_per_call),
                                         steps_per_call)
        losses.append(float(sums["loss_sum"]))
    return run, state, losses


def test_streamed_batches_train_as_the_device_resident_ones(fashion_dir):
    # 256 examples, batch 16: 16 steps an epoch; 12 steps stay in epoch 0, so also cross one.
    on_device, device_state, device_losses = _losses(
        ["dataset.on_device=true", "train.steps=24"], fashion_dir, chunks=6)
    streamed, stream_state, stream_losses = _losses(
        [*STREAM, "train.steps=24"], fashion_dir, chunks=6)
    assert not on_device.streamed and streamed.streamed
    np.testing.assert_array_equal(stream_losses, device_losses)
    for a, b in zip(jax.tree.leaves(device_state.params), jax.tree.leaves(stream_state.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    streamed.feeder.close()


def test_the_stream_order_is_batch_indices_order():
    from cnnlab.data.device import batch_indices

    key = jax.random.split(jax.random.PRNGKey(3))[0]
    order = stream.Order(np.asarray(key), 50, 8)  # 6 steps an epoch, 2 examples skipped
    for step in (0, 5, 6, 13):
        expected = np.asarray(batch_indices(key, step, 50, 8))
        np.testing.assert_array_equal([order(step * 8 + i) for i in range(8)], expected)


class StreamTinyNet(tfds.core.GeneratorBasedBuilder):
    """ImageNet in miniature: JPEG photos of varying sizes, 3 classes, train and validation.

    TFDS encodes numpy images with TensorFlow, which is not installed; like the real ImageNet
    builder, this one yields the JPEG files' bytes, which TFDS stores as they are."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24, 0),
                "validation": self._generate_examples(8, 1)}

    def _generate_examples(self, n: int, seed: int):
        from PIL import Image

        rng = np.random.default_rng(seed)
        for i in range(n):
            height, width = rng.integers(150, 330, 2)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, format="JPEG")
            yield i, {"image": encoded.getvalue(), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_net_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    StreamTinyNet(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


IMAGENET_STYLE = [
    "dataset=imagenet", "dataset.name=stream_tiny_net", "dataset.num_classes=3",
    "dataset.train_size=24", "model=resnet18", "model.width=0.125", "augment=flip",
    "train.batch_size=2",
    "train.steps=2", "train.steps_per_call=2", "train.eval_every=2", "train.eval_batch_size=4",
    "train.log_every=1", "checkpoint.enabled=false", "progress=false", "logger.mode=disabled",
    "dataset.stream_workers=0", "dataset.stats_sample=8",
]


def test_an_imagenet_style_set_streams_resized_and_trains_at_224(tiny_net_dir, tmp_path,
                                                                 caplog):
    from omegaconf import OmegaConf

    from cnnlab.cli import preflight
    from cnnlab.training.loop import train

    cfg = preflight.compose([*IMAGENET_STYLE, "model.input_size=null",
                             f"dataset.data_dir={tiny_net_dir}"])
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    # What the network is traced with (training step, evaluation, init): the batches the
    # stream feeds it, and what its first conv sees. The photos are 150-330 pixels a side, so
    # only the stream's resize and centre crop make them 224x224; the model's own input_size
    # (a resize to 224) is turned off, so it cannot make up for a stream that does not.
    seen = {"net": set(), "conv1": set()}

    def record(call, args, kwargs, context):
        path = context.module.scope.path if context.module.scope else None
        if context.method_name == "__call__" and path == ():
            seen["net"].add((args[0].shape, bool(kwargs.get("train", False))))
        elif context.method_name == "__call__" and path == ("conv1",):
            seen["conv1"].add(args[0].shape[1:])
        return call(*args, **kwargs)

    with caplog.at_level(logging.INFO), nn.intercept_methods(record):
        summary = train(cfg, tmp_path)
    assert summary["status"] == "finished", summary
    assert np.isfinite(summary["final/test/loss"]) and "final/test/error" in summary
    # Batches of 2 in training, the 8 validation images in batches of 4 at the evaluation.
    assert {((2, 224, 224, 3), True), ((4, 224, 224, 3), False)} <= seen["net"]
    assert {shape[1:] for shape, _ in seen["net"]} == {(224, 224, 3)}
    assert seen["conv1"] == {(224, 224, 3)}
    assert "streamed: stream_tiny_net's images have variable sizes" in caplog.text
    assert "test (8 images)" in caplog.text


def test_on_device_true_refuses_variable_size_images(tiny_net_dir):
    cfg = compose_config([*IMAGENET_STYLE, f"dataset.data_dir={tiny_net_dir}",
                          "dataset.on_device=true"])
    with pytest.raises(ConfigError, match="on_device=true but stream_tiny_net's images have "
                                          "variable sizes"):
        stream_config.data_location(cfg)


def test_auto_keeps_a_set_that_fits_on_the_device_and_streams_one_that_does_not(fashion_dir):
    base = [f"dataset.data_dir={fashion_dir}", "dataset.max_examples=1000"]
    fits = stream_config.data_location(compose_config(base))
    assert fits.on_device and "fits the budget of 8 GB" in fits.reason
    # 1,000 28x28 images: 0.78 MB.
    over = stream_config.data_location(compose_config([*base, "dataset.device_budget_gb=0.0005"]))
    assert not over.on_device and "0.00 GB, over the budget" in over.reason
    assert stream_config.data_location(compose_config(
        [*base, "dataset.on_device=false"])).reason == "dataset.on_device=false"


@pytest.mark.parametrize("override, key", [("dataset.val_size=10", "val_size"),
                                           ("dataset.classes=[0,1]", "classes")])
def test_streaming_refuses_what_needs_the_whole_set_in_memory(override, key):
    from cnnlab.cli import preflight

    with pytest.raises(ConfigError, match=f"dataset.{key}=.*streamed training set"):
        preflight.compose(["dataset.on_device=false", override])


def test_resuming_mid_stream_gives_the_uninterrupted_result(fashion_dir, tmp_path):
    import os
    import signal

    from cnnlab.training import actions

    overrides = [*STREAM, "dataset.max_examples=256", "train.batch_size=16", "train.steps=24",
                 "train.steps_per_call=4", "train.log_every=4", "checkpoint.every=4"]
    straight = train_tiny(tmp_path / "straight", fashion_dir, overrides)
    original = actions.Record.__call__

    def record_then_stop(self, tick):
        original(self, tick)
        if tick.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(actions.Record, "__call__", record_then_stop)
        assert train_tiny(cut, fashion_dir, overrides)["status"] == "interrupted"
    resumed = train_tiny(cut, fashion_dir, overrides)
    assert resumed["status"] == "finished" and resumed["resumed_from"] == 12

    def losses(run_dir):
        events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(e["step"], e["train/loss"]) for e in events if "train/loss" in e]

    assert losses(cut) == losses(tmp_path / "straight") and len(losses(cut)) == 6
    assert resumed["final/test/loss"] == straight["final/test/loss"]


def test_grain_worker_processes_read_the_batches_the_main_process_reads(fashion_dir):
    """The default reads with `dataset.stream_workers=4` worker processes (each a fresh Python
    process that decodes its share): the batches must be the in-process reader's, in order."""
    split = stream_config.load_streamed(compose_config(
        [f"dataset.data_dir={fashion_dir}", "dataset.max_examples=256",
         "dataset.stats_sample=64"])).train
    key = np.asarray(jax.random.split(jax.random.PRNGKey(7))[0])

    def batches(workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        options = stream.StreamOptions(workers=workers, threads=1)
        # Steps 14-20 of batch 16 cross from epoch 0 (16 steps of 256 examples) into epoch 1.
        return [(np.asarray(images), np.asarray(labels)) for images, labels
                in stream.train_batches(split, key, 16, 14, 20, options)]

    in_process, two_workers = batches(0), batches(2)
    assert len(in_process) == 6 and len(two_workers) == 6
    for (images, labels), (w_images, w_labels) in zip(in_process, two_workers, strict=True):
        assert images.shape == (16, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(w_images, images)
        np.testing.assert_array_equal(w_labels, labels)
    assert len({labels.tobytes() for _, labels in in_process}) == 6  # the batches differ
