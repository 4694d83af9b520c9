"""`build(cfg) -> Run`: a validated config turned into everything a run needs, in one place.

`cnnlab train` (cnnlab/training/loop.py), `cnnlab eval` (cnnlab/training/ensemble.py), the
benchmarks and the tests
all start here, so a run is assembled one way. Nothing is compiled: the jitted functions compile
on their first call.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from omegaconf import DictConfig, OmegaConf

from cnnlab import parallel
from cnnlab import transfer as transfer_lib
from cnnlab.data import load as data_lib
from cnnlab.data import placement as stream_config
from cnnlab.data import preprocess, stream
from cnnlab.data.augment.pipeline import Augment, make_augment
from cnnlab.data.device import DeviceSplit, StreamedChunk, device_split, host_split, local_split
from cnnlab.data.order import EpochOrders, OrderedSplit
from cnnlab.data.share import LocalRows, Share, total_of
from cnnlab.data.types import Dataset
from cnnlab.data.validate import folder_spec
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, compute_dtype, count_params, init_variables
from cnnlab.models.scan import scans_blocks
from cnnlab.models.summary import summarize
from cnnlab.runs.rundir import INPUT_STATS, RunDir
from cnnlab.training import diagnostics, numerics, steps
from cnnlab.training.evaluate import Evaluator, make_eval_views
from cnnlab.training.optim import make_optimizer, make_schedule
from cnnlab.training.transfer_optimizer import phase_optimizers
from cnnlab.transfer import sources as transfer_sources

log = logging.getLogger(__name__)


def load_data(cfg: DictConfig, share: Share | None = None) -> Dataset:
    """The dataset, with `cfg.preprocess`'s training-set statistics in `dataset.preprocess`;
    `share`: of a device-resident training set only a multi-host process's share
    (cnnlab/data/share.py)."""
    ds = cfg.dataset
    where = stream_config.data_location(cfg)
    log.info("training set %s: %s", "on the device" if where.on_device else "streamed",
             where.reason)
    try:
        if not where.on_device:
            return _with_stats(cfg, stream_config.load_streamed(cfg))
        dataset = _load_arrays(ds, data_lib.SPLITS, share)
    except ValueError as e:  # a request the data cannot satisfy, e.g. val_size >= train size
        raise ConfigError(f"dataset {ds.name}: {e}") from None
    return _with_stats(cfg, dataset)


def _load_arrays(ds: DictConfig, splits: tuple[str, ...], share: Share | None = None) -> Dataset:
    return data_lib.load_dataset(
        ds.name, data_dir=ds.data_dir, train_split=ds.train_split, test_split=ds.test_split,
        image_key=ds.image_key, label_key=ds.label_key, val_size=ds.val_size,
        val_seed=ds.val_seed, download=ds.download, max_examples=ds.max_examples,
        folds=ds.folds, fold=ds.fold or 0,
        classes=ds.classes, per_class=ds.per_class,
        folder=folder_spec(ds), cache_dir=ds.cache_dir,
        cache_max_bytes=None if ds.cache_max_gb is None else int(ds.cache_max_gb * 1e9),
        splits=splits, share=share,
    )


# PreprocessStats' fields as the run directory's input_stats.npz names them.
_PREPROCESS_FIELDS = ("mean", "std", "whiten")


def input_stats(dataset: Dataset) -> dict[str, np.ndarray]:
    """What a run normalizes its inputs with, for its run directory: the preprocessing's
    statistics and the training images' channel mean and std (viz's ascent starts from it)."""
    arrays = {"channel_mean": dataset.mean, "channel_std": dataset.std}
    stats = dataset.preprocess
    for field in _PREPROCESS_FIELDS:
        if stats is not None and getattr(stats, field) is not None:
            arrays[f"preprocess_{field}"] = getattr(stats, field)
    return {name: np.asarray(value) for name, value in arrays.items() if value is not None}


def load_for_evaluation(cfg: DictConfig, run_dir: Path, splits: tuple[str, ...] = ("test",),
                        loaded: dict[str, Dataset] | None = None) -> Dataset:
    """A saved run's `splits` (`cnnlab eval`: the test split), normalized with the statistics
    it trained with (input_stats.npz): its training set is read only if `splits` names it. A
    run saved before that file existed has its training set read for them, as before; so does a
    streamed set, whose splits stay in their files (`load_streamed`). `loaded`: splits already
    read for other runs (an ensemble's members), by dataset config, read once."""
    saved = RunDir(run_dir).input_stats()
    if saved is None:
        log.info("%s has no %s (trained before it was saved): its training set is read for "
                 "the preprocessing statistics", run_dir, INPUT_STATS)
        return load_data(cfg)
    if not stream_config.data_location(cfg).on_device:
        return load_data(cfg)
    ds = cfg.dataset
    key = f"{OmegaConf.to_yaml(ds)}{splits}"
    try:
        dataset = loaded[key] if loaded and key in loaded else _load_arrays(ds, splits)
    except ValueError as e:
        raise ConfigError(f"dataset {ds.name}: {e}") from None
    if loaded is not None:
        loaded[key] = dataset
    _check_declared_shapes(cfg, dataset)
    stats = preprocess.PreprocessStats(**{field: saved.get(f"preprocess_{field}")
                                          for field in _PREPROCESS_FIELDS})
    return dataclasses.replace(dataset, preprocess=jax.device_put(stats),
                               mean=saved.get("channel_mean"), std=saved.get("channel_std"))


def _with_stats(cfg: DictConfig, dataset: Dataset) -> Dataset:
    """`dataset` with `cfg.preprocess`'s statistics (of a streamed set: of its sample)."""
    _check_declared_shapes(cfg, dataset)
    # A transfer run normalizes as its source was trained (transfer.preprocess=source).
    stats = _source_stats(cfg, int(dataset.image_shape[-1]))
    if stats is None:
        # A streamed set's statistics come from its training sample.
        sampled = (dataclasses.replace(dataset, train=dataset.train.sample)
                   if isinstance(dataset.train, stream.StreamSplit) else dataset)
        stats = preprocess.compute_stats(cfg.preprocess, sampled)
    # On the device once: every split's DeviceSplit then shares these buffers (device_put of a
    # device array is a no-op) instead of holding its own copy of, e.g., a ZCA matrix.
    stats = jax.device_put(stats)
    return dataclasses.replace(dataset, preprocess=stats)


def _source_stats(cfg: DictConfig, channels: int) -> preprocess.PreprocessStats | None:
    """The statistics a transfer run normalizes with as its source was trained
    (transfer.preprocess=source), for this data's `channels`; None: the run's own data's.

    Transfer names them (torchvision's fixed ones) or the source run whose training data holds
    them; that data is loaded here, as the source run loaded it (its config, its data cache).
    """
    source = transfer_sources.source_preprocess(cfg)
    if isinstance(source, DictConfig):
        source = load_data(source).preprocess
    return None if source is None else transfer_sources.fit_channels(cfg, source, channels)


def _check_declared_shapes(cfg: DictConfig, dataset: Dataset) -> None:
    """The dataset config's image_shape/num_classes (used before loading) must match the data."""
    declared = cfg.dataset.image_shape
    if declared is not None and tuple(declared) != tuple(dataset.image_shape):
        raise ConfigError(
            f"dataset.image_shape={list(declared)} but {dataset.name} holds "
            f"{'x'.join(map(str, dataset.image_shape))} images; correct the dataset config")
    classes = cfg.dataset.num_classes
    if classes is not None and classes != dataset.num_classes:
        raise ConfigError(f"dataset.num_classes={classes} but {dataset.name} has "
                          f"{dataset.num_classes} classes; correct the dataset config")


def init_state(cfg: DictConfig, model: nn.Module, tx: optax.GradientTransformation,
               image_shape: tuple[int, ...]) -> steps.TrainState:
    """The state at step 0: weights from fold 0 of `seed`, the run's root key from fold 1."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    return state_of(cfg, tx, init_variables(model, init_key, image_shape), run_key)


def state_of(cfg: DictConfig, tx: optax.GradientTransformation, variables: Any,
             run_key: jax.Array) -> steps.TrainState:
    """The state at step 0 of the model's `variables` (abstract ones give its shapes)."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return steps.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params), rng=run_key,
        ema=steps.init_ema(cfg.eval.ema_decay, params, batch_stats),
    )


@dataclasses.dataclass
class Run:
    """A ready run: its data on the device, model, optimizer, initial state and compiled steps."""

    cfg: DictConfig
    dataset: Dataset
    model: nn.Module
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    state: steps.TrainState
    # Transfer learning's plan, probe phase and what was loaded (cnnlab/transfer); None for
    # transfer=scratch.
    transfer: transfer_lib.Setup | None = None
    # The devices the run uses (cnnlab/parallel.py): the state and data are replicated there.
    placement: parallel.Placement = dataclasses.field(
        default_factory=lambda: parallel.Placement.over(jax.devices()[:1]))

    def __post_init__(self) -> None:
        self.state = self.placement.put(self.state)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset.train) // self.cfg.train.batch_size

    @functools.cached_property
    def num_params(self) -> int:
        return count_params(self.state.params)

    @functools.cached_property
    def macs(self) -> int:
        return summarize(self.model, tuple(self.dataset.image_shape)).macs

    @property
    def streamed(self) -> bool:
        """Whether the training set is read from its files chunk by chunk
        (cnnlab/data/stream.py)."""
        return isinstance(self.dataset.train, stream.StreamSplit)

    @functools.cached_property
    def train_data(self) -> DeviceSplit:
        if self.streamed:
            raise ConfigError(f"{self.dataset.name}'s training set is streamed, and this needs "
                              "it on the device: set dataset.on_device=true if it fits")
        # Across processes split by rows over the devices (padded to split evenly; the steps
        # draw from the real examples only, in the same order), each process holding only its
        # rows (cnnlab/data/share.py).
        train = self.dataset.train
        if isinstance(train, LocalRows):
            split = local_split(train, self.dataset.preprocess)
            return self.placement.put_local_rows(split, train.padded)
        split = host_split(train, self.dataset.preprocess, self.placement.row_multiple)
        if len(split.labels) != len(train):
            split = split.replace(examples=len(train))
        return self.placement.put_rows(split)

    @functools.cached_property
    def feeder(self) -> stream.ChunkFeeder:
        """The streamed training set's chunks, read ahead (`batch_indices`' order)."""
        cfg = self.cfg
        data_key = jax.device_get(jax.random.split(self.state.rng)[0])
        return stream.ChunkFeeder(self.dataset.train, data_key, self.dataset.preprocess,
                                  cfg.train.batch_size, cfg.train.steps,
                                  cfg.train.steps_per_call, stream_config.options(cfg.dataset),
                                  put=self.placement.put_batches,
                                  rows=self.placement.local_rows(cfg.train.batch_size))

    def close(self) -> None:
        """Stop reading ahead (a streamed run's feeder thread), whatever ended the run."""
        if "feeder" in self.__dict__:
            self.feeder.close()

    @functools.cached_property
    def epoch_orders(self) -> EpochOrders:
        """Each epoch's order of the device-resident training set, drawn once (data/order.py).
        Made before the first chunk runs, while `state` (donated to it) still holds the key."""
        data_key = jax.random.split(self.state.rng)[0]
        return EpochOrders(data_key, len(self.dataset.train), self.cfg.train.batch_size)

    def chunk_data(self, step: int, num_steps: int) -> OrderedSplit | StreamedChunk:
        """What `chunk_at(step)` trains the steps step..step + num_steps - 1 on."""
        if self.streamed:
            return self.feeder(step, num_steps)
        return self.epoch_orders(self.train_data, step, num_steps)

    @functools.cached_property
    def augment(self) -> Augment:
        cfg = self.cfg
        # AlexNet's lighting noise follows the training set's RGB principal components.
        train = self.dataset.train
        lighting_pca = (preprocess.channel_pca(stream.stats_images(train), total_of(train))
                        if cfg.augment.lighting else None)
        return make_augment(cfg.augment, lighting_pca)

    @property
    def scale_lr(self) -> bool:
        return scales_lr(self.cfg)

    def _chunk(self, model: nn.Module, tx: optax.GradientTransformation,
               phase: str) -> Callable:
        frozen = (transfer_lib.frozen_mask(self.state.params, self.transfer.frozen(phase))
                  if self.transfer is not None else None)
        return make_chunk(self.cfg, model, tx, self.augment, self.placement, frozen)

    @functools.cached_property
    def train_chunk(self) -> Callable:
        """`train_chunk(state, train_data, num_steps) -> (state, summed metrics)`."""
        return self._chunk(self.model, self.tx, "main")

    @functools.cached_property
    def probe_chunk(self) -> Callable:
        """two_phase's first phase: `train_chunk` with the loaded layers frozen."""
        return self._chunk(self.transfer.probe_model, self.transfer.probe_tx, "probe")

    def phase_at(self, step: int) -> str:
        """"probe" during two_phase's linear probe, else "main"."""
        probe_steps = self.transfer.plan.probe_steps if self.transfer is not None else 0
        return "probe" if step < probe_steps else "main"

    def chunk_at(self, step: int) -> Callable:
        """The compiled chunk that trains the steps from `step` on (its phase's)."""
        return self.probe_chunk if self.phase_at(step) == "probe" else self.train_chunk

    @functools.cached_property
    def diagnose(self) -> Callable[[steps.TrainState], dict]:
        """`diagnose(state) -> {metric: {layer: value}}` on the batch the next step trains on
        (cnnlab/training/diagnostics.py); compiled on its first call, so only runs that use it
        pay."""
        diagnose = diagnostics.make_diagnose(self.model, self.tx, self.augment,
                                             self.cfg.train.batch_size, self.cfg.regularization,
                                             self.scale_lr, self.cfg.loss)
        return lambda state: diagnose(state, self.train_data)

    def eval_splits(self, batch_size: int) -> dict[str, DeviceSplit]:
        """The held-out splits on the device, padded to whole batches."""
        splits = {"test": self.dataset.test, "val": self.dataset.val}
        stats, options = self.dataset.preprocess, stream_config.options(self.cfg.dataset)
        return {name: stream.EvalStream(split, stats, options, self.placement.put)
                if isinstance(split, stream.StreamSplit)
                else self.placement.put(device_split(split, stats, batch_size))
                for name, split in splits.items() if split is not None}

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        cfg = self.cfg
        views = make_eval_views(cfg.eval, cfg.augment, self.dataset.image_shape)
        return Evaluator(self.model, self.eval_splits(cfg.train.eval_batch_size),
                         cfg.train.eval_batch_size, cfg.eval.ema_decay, views, cfg.eval.top_k,
                         batch_sharding=self.placement.eval_batch(cfg.train.eval_batch_size),
                         compiler_options=numerics.compiler_options(cfg.train,
                                                                    self.placement.platform))


def share_of(placement: parallel.Placement) -> Share | None:
    """What of a device-resident training set this process holds: its rows when the mesh
    spans processes (None: all of it)."""
    if not placement.spans_processes:
        return None
    return Share(rows=placement.local_rows, multiple=placement.row_multiple,
                 total=parallel.sum_over_processes)


def scales_lr(cfg: DictConfig) -> bool:
    # Only under reduce-on-plateau: other runs skip a product per parameter per step.
    return cfg.schedule.name == "plateau"


def make_chunk(cfg: DictConfig, model: nn.Module, tx: optax.GradientTransformation,
               augment: Augment, placement: parallel.Placement, frozen: Any = None) -> Callable:
    """`train_chunk(state, data, num_steps)` (cnnlab/training/steps.py) of the run `cfg`
    describes over `placement`'s devices: what `cnnlab train` runs and `cnnlab compile`
    (cnnlab/training/aot.py) compiles for a target it does not have."""
    batch = placement.batch
    return steps.make_train_chunk(steps.make_train_step(
        model, tx, augment, cfg.train.batch_size, cfg.regularization,
        cfg.eval.ema_decay, scale_lr=scales_lr(cfg), loss_config=cfg.loss,
        frozen=frozen, batch_sharding=batch, grad_accum=cfg.train.grad_accum or 1,
        compute_dtype=compute_dtype(cfg)),
        replicated=None if batch is None else placement.replicated,
        compiler_options=numerics.compiler_options(cfg.train, placement.platform),
        # Transfer runs' optimizers and frozen masks name each block's parameters.
        stack_blocks=scans_blocks(model) and cfg.transfer.mode == "scratch")


def build(cfg: DictConfig, dataset: Dataset | None = None,
          with_source: bool = False, schedule: optax.Schedule | None = None) -> Run:
    """The run `cfg` describes (validated by cnnlab.config.load); `dataset`: already loaded.

    `with_source`: a transfer run's state starts from its source's weights (a fresh start);
    otherwise from the initializer's, as a template that a checkpoint is restored into.
    `schedule`: the lr schedule instead of `cfg.schedule`'s (`cnnlab lr_find`'s ramp).
    """
    # Before anything is traced (benchmarks and `cnnlab eval` start here, not in train).
    numerics.configure(cfg.train)
    # A missing source, or devices this machine lacks, are said before the data is read.
    transfer_sources.check_exists(cfg)
    placement = parallel.Placement.over(parallel.resolve_devices(cfg.train.devices))
    placement.check_batch("train.batch_size", cfg.train.batch_size)
    dataset = load_data(cfg, share_of(placement)) if dataset is None else dataset
    # A dataset loaded for evaluation has no training images (load_for_evaluation).
    if len(dataset.train) and cfg.train.batch_size > len(dataset.train):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the "
                          f"{len(dataset.train)} training examples of {dataset.name}")
    shape = tuple(dataset.image_shape)
    model = build_model(cfg, dataset.num_classes)
    if schedule is None:
        schedule = make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.train.steps)
    plan = transfer_lib.plan_for(cfg, model, shape)
    if plan is None:
        tx = make_optimizer(cfg.optimizer, schedule)
        return Run(cfg, dataset, model, schedule, tx, init_state(cfg, model, tx, shape),
                   placement=placement)
    model, setup = transfer_lib.setup(cfg, plan, dataset.num_classes,
                                      *phase_optimizers(cfg, schedule, plan))
    state = init_state(cfg, model, setup.tx, shape)
    if with_source:
        setup.loaded = transfer_lib.load_source(
            cfg, plan, {"params": state.params, "batch_stats": state.batch_stats})
        state = state.replace(params=setup.loaded.variables["params"],
                              batch_stats=setup.loaded.variables["batch_stats"])
    return Run(cfg, dataset, model, schedule, setup.tx, state, setup, placement)


def use_compile_cache(path: str | None) -> None:
    """Keep compiled programs on disk; compiles of >= 1 s are worth a lookup."""
    if path is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
