"""Streaming training sets through Grain (cnnlab/stream.py): the same batches as on the device,
resuming mid-stream, the placement choice, and an ImageNet-style set of variable-size JPEGs
prepared with TFDS and trained end to end at 224x224."""

import io
import json
import logging

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnlab import run as run_lib
from cnnlab import stream, stream_config
from cnnlab.errors import ConfigError
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
    from cnnlab import steps

    key = jax.random.split(jax.random.PRNGKey(3))[0]
    order = stream.Order(np.asarray(key), 50, 8)  # 6 steps an epoch, 2 examples skipped
    for step in (0, 5, 6, 13):
        expected = np.asarray(steps.batch_indices(key, step, 50, 8))
        np.testing.assert_array_equal([order(step * 8 + i) for i in range(8)], expected)
