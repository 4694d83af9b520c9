"""`train(cfg, run_dir)`: one complete run, from data loading to the final summary.

The host loop only dispatches compiled chunks of `train.steps_per_call` steps; it reads metrics
back from the device at logging intervals, where it also checks for divergence.
"""

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cnnlab import data as data_lib
from cnnlab import preprocess, steps
from cnnlab.augment import make_augment
from cnnlab.checkpoint import Checkpointer
from cnnlab.config import cycle_length
from cnnlab.errors import ConfigError
from cnnlab.evaluate import SNAPSHOT_DIR, make_views
from cnnlab.models import build_model, count_params, init_variables
from cnnlab.models.summary import summarize
from cnnlab.optim import make_optimizer, make_schedule
from cnnlab.selection import EarlyStopping, Plateau
from cnnlab.tracking import RunTracker, read_summary

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# The weights of the best evaluation of early_stopping.metric (the selected model).
BEST_DIR = "best"
CURVES_FILE = "curves.png"


def load_data(cfg: DictConfig) -> data_lib.Dataset:
    """The dataset, with `cfg.preprocess`'s training-set statistics in `dataset.preprocess`."""
    ds = cfg.dataset
    try:
        dataset = data_lib.load_dataset(
            ds.name, data_dir=ds.data_dir, train_split=ds.train_split, test_split=ds.test_split,
            image_key=ds.image_key, label_key=ds.label_key, val_size=ds.val_size,
            val_seed=ds.val_seed, download=ds.download, max_examples=ds.max_examples,
        )
    except ValueError as e:  # a request the data cannot satisfy, e.g. val_size >= train size
        raise ConfigError(f"dataset {ds.name}: {e}") from None
    # On the device once: every split's DeviceSplit then shares these buffers (device_put of a
    # device array is a no-op) instead of holding its own copy of, e.g., a ZCA matrix.
    stats = jax.device_put(preprocess.compute_stats(cfg.preprocess, dataset))
    return dataclasses.replace(dataset, preprocess=stats)


def check_declared_shapes(cfg: DictConfig, dataset: data_lib.Dataset) -> None:
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


def to_device(split: data_lib.ArraySplit, dataset: data_lib.Dataset,
              pad_to: int = 1) -> steps.DeviceSplit:
    """Move a split to the default device, padded to a multiple of `pad_to` examples."""
    n = len(split)
    padded = math.ceil(n / pad_to) * pad_to
    images = np.zeros((padded, *split.images.shape[1:]), np.uint8)
    images[:n] = split.images
    labels = np.zeros((padded,), np.int32)
    labels[:n] = split.labels
    stats = dataset.preprocess
    if stats is None:  # a Dataset that did not come through load_data
        stats = preprocess.PreprocessStats(mean=np.asarray(dataset.mean, np.float32),
                                           std=np.asarray(dataset.std, np.float32))
    return jax.device_put(steps.DeviceSplit(
        images=images, labels=labels, mask=np.arange(padded) < n, stats=stats))


def init_state(
    cfg: DictConfig, model: Any, tx: Any, image_shape: tuple[int, ...]
) -> steps.TrainState:
    root = jax.random.PRNGKey(cfg.seed)
    init_key, run_key = jax.random.split(root)
    variables = init_variables(model, init_key, image_shape)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=run_key,
        ema=steps.init_ema(cfg.eval.ema_decay, params, batch_stats),
    )


class Evaluator:
    """Evaluates the state on the held-out splits; one compiled function for all of them.

    Keys are `<split>/loss`, `<split>/error`; with `ema_decay` also `<split>_ema/...` (the
    averaged weights), with `views` (eval.tta) also `<split>_tta/...` (the raw weights).
    """

    def __init__(self, model: Any, dataset: data_lib.Dataset, batch_size: int,
                 ema_decay: float | None = None, views: steps.Views | None = None) -> None:
        self.batch_size = batch_size
        self._eval_batch = steps.make_eval_batch(model, batch_size)
        self._tta_batch = steps.make_eval_batch(model, batch_size, views) if views else None
        self._ema_decay = ema_decay
        self.splits = {"test": to_device(dataset.test, dataset, batch_size)}
        if dataset.val is not None:
            self.splits["val"] = to_device(dataset.val, dataset, batch_size)

    def _sums(self, eval_batch: Any, params: Any, batch_stats: Any,
              split: steps.DeviceSplit) -> dict[str, float]:
        sums = steps.zero_metrics()
        for index in range(split.labels.shape[0] // self.batch_size):
            sums = jax.tree.map(jnp.add, sums, eval_batch(params, batch_stats, split, index))
        return steps.summarize(jax.device_get(sums))

    def __call__(self, state: steps.TrainState) -> dict[str, float]:
        variants = [("", self._eval_batch, state.params, state.batch_stats)]
        if self._ema_decay is not None:
            variants.append(("_ema", self._eval_batch,
                             *steps.ema_variables(state.ema, self._ema_decay)))
        if self._tta_batch is not None:
            variants.append(("_tta", self._tta_batch, state.params, state.batch_stats))
        results = {}
        for name, split in self.splits.items():
            for suffix, eval_batch, params, batch_stats in variants:
                for key, value in self._sums(eval_batch, params, batch_stats, split).items():
                    results[f"{name}{suffix}/{key}"] = value
        return results


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def divergence(loss: float, train_cfg: DictConfig, step: int) -> str | None:
    """Why a run with this mean training loss counts as diverged, or None if it does not."""
    if not train_cfg.stop_on_nan:
        return None
    threshold = train_cfg.divergence_threshold
    if not math.isfinite(loss) or (threshold is not None and loss > threshold):
        return f"diverged: train/loss reached {loss:.4g} by step {step}"
    return None


def use_compile_cache(path: str | None) -> None:
    """Keep compiled programs on disk; compiles of >= 1 s are worth a lookup."""
    if path is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train(cfg: DictConfig, run_dir: Path, group: str | None = None,
          tags: list[str] | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing logs and checkpoints to `run_dir`; returns the summary.

    `group` and `tags` label the W&B run (a sweep's runs share them). The summary's `status`
    is finished, diverged (training loss non-finite or above train.divergence_threshold;
    `failure` says when), failed or interrupted.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    checkpointer = Checkpointer(run_dir / CHECKPOINT_DIR, cfg.checkpoint.keep)
    resume_step = checkpointer.latest_step()
    # A finished run is recognised from its files alone, before any data is read or compiled.
    previous = read_summary(run_dir) if resume_step is not None else None
    if previous is not None:
        if resume_step >= tc.steps or previous.get("early_stopped_at") == resume_step:
            checkpointer.close()
            log.info("%s already finished at step %d; nothing to do", run_dir, resume_step)
            return previous

    use_compile_cache(cfg.compile_cache_dir)
    dataset = load_data(cfg)
    check_declared_shapes(cfg, dataset)
    if tc.batch_size > len(dataset.train):
        raise ConfigError(
            f"train.batch_size={tc.batch_size} exceeds the {len(dataset.train)} training "
            f"examples of {dataset.name}"
        )
    model = build_model(cfg, dataset.num_classes)
    schedule = make_schedule(cfg.schedule, cfg.optimizer.lr, tc.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    state = init_state(cfg, model, tx, dataset.image_shape)
    num_params = count_params(state.params)
    macs = summarize(model, tuple(dataset.image_shape)).macs

    sched = cfg.schedule
    plateau = (Plateau(sched.factor, sched.patience, sched.threshold, sched.max_reductions)
               if sched.name == "plateau" else None)
    stopping = EarlyStopping(cfg.early_stopping.patience)
    selection_metric = cfg.early_stopping.metric
    keep_best = (cfg.early_stopping.keep_best and cfg.checkpoint.enabled
                 and dataset.val is not None)
    best_checkpointer = Checkpointer(run_dir / BEST_DIR, keep=1) if keep_best else None

    meta: dict[str, Any] = {"wall_time": 0.0, "best": {}}
    if resume_step is not None:
        state, meta = checkpointer.restore(resume_step, state)
        if plateau is not None and "plateau" in meta:
            plateau.load(meta["plateau"])
        if "stopping" in meta:
            stopping.load(meta["stopping"])
    selected: dict[str, float] = meta.get("selected", {})
    start_step = int(state.step)

    tracker = RunTracker(run_dir, OmegaConf.to_container(cfg, resolve=True), cfg.logger, group,
                         resume_step, tags)
    train_data = to_device(dataset.train, dataset)
    # AlexNet's lighting noise follows the training set's RGB principal components.
    lighting_pca = (preprocess.channel_pca(dataset.train.images) if cfg.augment.lighting
                    else None)
    train_chunk = steps.make_train_chunk(
        steps.make_train_step(model, tx, make_augment(cfg.augment, lighting_pca), tc.batch_size,
                              cfg.regularization, cfg.eval.ema_decay,
                              scale_lr=plateau is not None)
    )
    evaluate = Evaluator(model, dataset, tc.eval_batch_size, cfg.eval.ema_decay,
                         make_views(cfg.eval.tta, cfg.augment, cfg.eval.crop_size,
                                    dataset.image_shape))
    # Snapshot ensembles (Huang et al. 2017): the weights at the end of every cyclic_cosine
    # cycle, all kept (checkpoint.keep does not apply); validation made cycles end on chunks.
    snapshot_every = (cycle_length(tc.steps, cfg.schedule.cycles)
                      if cfg.schedule.name == "cyclic_cosine" and cfg.checkpoint.enabled else 0)
    snapshots = Checkpointer(run_dir / SNAPSHOT_DIR, keep=None) if snapshot_every else None
    steps_per_epoch = len(dataset.train) // tc.batch_size

    summary: dict[str, Any] = {
        "status": "running", "model": cfg.model.name, "dataset": dataset.name,
        "params": num_params, "macs": macs, "steps": tc.steps, "seed": cfg.seed,
        "resumed_from": resume_step,
    }
    tracker.write_summary(summary)
    best: dict[str, float] = meta["best"]
    wall_offset = meta["wall_time"] - (time.perf_counter() - t_start)
    window_sums, window_steps = steps.zero_metrics(), 0
    # Throughput is timed from the end of the first (compiling) chunk.
    timer_start, timed_steps = None, 0
    throughput: list[float] = []
    last: dict[str, float] = {}
    status = "finished"
    progress = tqdm(total=tc.steps, initial=start_step, disable=not cfg.progress,
                    desc=cfg.model.name, unit="step", dynamic_ncols=True)
    step = start_step
    # The previous chunk's metric sums: divergence is checked one chunk late, so reading them
    # waits only for that chunk while the next one is already queued, and the device never idles.
    previous_sums = None
    try:
        while step < tc.steps:
            num_steps = min(tc.steps_per_call, tc.steps - step)
            state, sums = train_chunk(state, train_data, num_steps)
            if tc.stop_on_nan and previous_sums is not None and (reason := divergence(
                    steps.summarize(jax.device_get(previous_sums))["loss"], tc, step)):
                status, summary["failure"] = "diverged", reason
                event = {f"train/{k}": v for k, v in
                         steps.summarize(jax.device_get(window_sums)).items()}
                event.update(epoch=step / steps_per_epoch,
                             wall_time=wall_offset + time.perf_counter() - t_start)
                tracker.log(step, event)
                last.update(event)
                break
            previous_sums = sums
            step += num_steps
            progress.update(num_steps)
            window_sums = jax.tree.map(jnp.add, window_sums, sums)
            window_steps += num_steps
            if timer_start is None:
                jax.block_until_ready(sums)
                timer_start = time.perf_counter()
            else:
                timed_steps += num_steps

            event: dict[str, float] = {}
            if _due(step, tc.log_every) or step == tc.steps:
                event.update({f"train/{k}": v for k, v in
                              steps.summarize(jax.device_get(window_sums)).items()})
                if timed_steps:
                    rate = timed_steps * tc.batch_size / (time.perf_counter() - timer_start)
                    event["images_per_sec"] = rate
                    throughput.append(rate)
                window_sums, window_steps = steps.zero_metrics(), 0
            # The lr scale the chunk ran with, before a plateau reduction below changes it (a host
            # float: the lr itself is computed only when an event is logged).
            lr_scale = plateau.scale if plateau is not None else 1.0
            stop_early = False
            if _due(step, tc.eval_every) or step == tc.steps:
                event.update(evaluate(state))
                for key in ("test/error", "val/error"):
                    if key in event:
                        best[key] = min(best.get(key, math.inf), event[key])
                if plateau is not None and plateau.observe(event[sched.metric]):
                    # Takes effect from the next step; the state's shape is unchanged, so the
                    # compiled chunk is reused.
                    state = state.replace(lr_scale=jnp.asarray(plateau.scale, jnp.float32))
                    log.info("step %d: %s stalled; lr scaled by %g", step, sched.metric,
                             plateau.scale)
                if selection_metric in event:
                    improved, stop_early = stopping.observe(step, event[selection_metric])
                    if improved:
                        selected = {"step": step, **{k: v for k, v in event.items()
                                                     if k.startswith(("val/", "test/"))}}
                        if best_checkpointer is not None:
                            best_checkpointer.save(step, state, {"selected": selected})
                    stop_early = stop_early and step < tc.steps
            if event:
                event.update(lr=float(schedule(step - 1)) * lr_scale,
                             epoch=step / steps_per_epoch,
                             wall_time=wall_offset + time.perf_counter() - t_start)
                tracker.log(step, event)
                last.update(event)
                if "train/loss" in event:
                    progress.set_postfix(loss=f"{event['train/loss']:.3f}",
                                         err=f"{event['train/error']:.1f}%")
                if "train/loss" in event and (
                        reason := divergence(event["train/loss"], tc, step)):
                    status, summary["failure"] = "diverged", reason
                    break
            if cfg.checkpoint.enabled and (_due(step, cfg.checkpoint.every) or step == tc.steps
                                           or stop_early):
                meta = {"wall_time": wall_offset + time.perf_counter() - t_start, "best": best,
                        "stopping": stopping.state(), "selected": selected}
                if plateau is not None:
                    meta["plateau"] = plateau.state()
                checkpointer.save(step, state, meta)
            if (snapshots is not None and (_due(step, snapshot_every) or step == tc.steps)
                    and step not in snapshots.all_steps()):  # a resumed run may redo a cycle
                snapshots.save(step, state, {"cycle": -(-step // snapshot_every)})
            if stop_early:
                summary["early_stopped_at"] = step
                log.info("step %d: %s has not improved for %d evaluations; stopping early",
                         step, selection_metric, stopping.patience)
                break
            if event:
                # Restart the clock after host work so evaluation and saving are not counted.
                timer_start, timed_steps = time.perf_counter(), 0
    except KeyboardInterrupt:
        status = "interrupted"
        summary["failure"] = f"interrupted at step {step}"
        raise
    except BaseException as error:
        status = "failed"
        summary["failure"] = failure_reason(error)
        raise
    finally:
        progress.close()
        checkpointer.close()
        if best_checkpointer is not None:
            best_checkpointer.close()
        if snapshots is not None:
            snapshots.close()
        summary.update(
            status=status,
            final_step=step,
            wall_time=wall_offset + time.perf_counter() - t_start,
            images_per_sec=float(np.median(throughput)) if throughput else None,
            **{f"final/{k}": v for k, v in last.items() if "/" in k},
            **{f"best/{k}": v for k, v in best.items()},
            **{f"selected/{k}": v for k, v in selected.items()},
        )
        tracker.write_summary(summary)
        _log_curves(tracker, run_dir, step)
        tracker.finish(failed=status != "finished")
    return summary


def failure_reason(error: BaseException) -> str:
    """One line saying why a run failed, for summary.json and sweep reports."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _log_curves(tracker: RunTracker, run_dir: Path, step: int) -> None:
    """The run's train/test error curves as `curves.png` and a W&B image; never fails the run."""
    try:
        from cnnlab.plots import plot_run

        path = plot_run(run_dir, run_dir / CURVES_FILE)
        if path is not None:
            tracker.log_image(step, "curves", path)
    except Exception as error:  # a plot is a convenience: a broken one must not lose the run
        log.warning("could not plot the curves of %s: %s", run_dir, error)

