"""`cnnlab eval`: saved runs evaluated on their test split, alone and as an ensemble.

Each run contributes the weights `eval.weights` selects (cnnlab/runs/weights.py's `WEIGHTS`):
its final, best or averaged (EMA) weights, or every snapshot of a snapshot ensemble. Members are
evaluated on the device in jitted batches; only their (N, K) log-probabilities come back to the
host, once per member, where the ensemble is combined (cnnlab/training/evaluate.py's
`ensemble_log_probs`).
"""

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from cnnlab.analysis.confusion import per_class_error, write_confusion
from cnnlab.config.load import load_run_config
from cnnlab.data.device import DeviceSplit, device_split
from cnnlab.errors import ConfigError
from cnnlab.progress import CompileTimer, duration
from cnnlab.runs.rundir import RunDir
from cnnlab.runs.weights import WEIGHTS, ema_variables
from cnnlab.training import numerics, steps
from cnnlab.training.build import Run, build, load_for_evaluation
from cnnlab.training.evaluate import (
    confusion_matrix,
    ensemble_log_probs,
    make_eval_views,
    prob_metrics,
    validate,
    validate_scales,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Member:
    """One ensemble member: a run's weights at one step, and its test log-probabilities."""

    run_dir: Path
    weights: str
    step: int
    log_probs: np.ndarray  # (N, K)


def _steps_to_restore(run_dir: Path, cfg: DictConfig, weights: str) -> list[int]:
    """The checkpoint steps `eval.weights` selects for one run (newest, or all snapshots)."""
    source = WEIGHTS.get(weights)
    if source.averaged and cfg.eval.ema_decay is None:
        raise ConfigError(f"{run_dir} was trained without eval.ema_decay: it has no averaged "
                          "weights")
    folder = Path(run_dir) / source.folder
    if not folder.is_dir():
        raise ConfigError(f"{run_dir} has no {source.what} ({source.folder}/ is missing)")
    found = RunDir(run_dir).checkpoint_steps(source.folder)
    if not found:
        raise ConfigError(f"{run_dir} has no {source.what} (nothing saved in {source.folder}/)")
    return found if source.every_step else found[-1:]


def _predict(predict_batch: Any, params: Any, batch_stats: Any, split: DeviceSplit,
             batch_size: int, count: int, compiles: CompileTimer) -> np.ndarray:
    # The first batch of a run compiles (timed apart: the call returns once it is queued).
    batches = [compiles.call("predict", predict_batch, params, batch_stats, split, index)[0]
               for index in range(split.labels.shape[0] // batch_size)]
    # One transfer per member: the batches are joined on the device first.
    return np.asarray(jax.device_get(jnp.concatenate(batches)[:count]))


def jitted_predict(run: Run, batch_size: int, views: steps.Views | None) -> Callable:
    """The run's `steps.make_predict_batch`, compiled with the XLA options its training step
    and evaluation use (training/numerics: on CPU, `train.cpu_kernels`)."""
    return jax.jit(steps.make_predict_batch(run.model, batch_size, views),
                   compiler_options=numerics.compiler_options(run.cfg.train,
                                                              run.placement.platform))


def _members(run_dir: Path, run: Run, ev: DictConfig, label: str) -> list[Member]:
    """Restore each selected checkpoint of one run into `run.state` and predict its test set;
    `label` (`run 1/3`) begins the lines that say what is evaluated and how long it took."""
    cfg, dataset = run.cfg, run.dataset
    batch_size = ev.batch_size or cfg.train.eval_batch_size
    views = make_eval_views(ev, cfg.augment, dataset.image_shape)
    predict_batch = jitted_predict(run, batch_size, views)
    split = device_split(dataset.test, dataset.preprocess, batch_size)
    source = WEIGHTS.get(ev.weights)
    checkpoints = RunDir(run_dir).checkpointer(source.folder)
    compiles = CompileTimer()
    members = []
    try:
        for step in _steps_to_restore(run_dir, cfg, ev.weights):
            log.info("%s: evaluating %s, %s weights of step %d, on %s (%s images, tta=%s)",
                     label, run_dir, ev.weights, step, cfg.dataset.test_split,
                     f"{len(dataset.test):,}", ev.tta)
            start, compiled = time.perf_counter(), compiles.seconds
            state, _ = checkpoints.restore(step, run.state)
            params, batch_stats = state.params, state.batch_stats
            if source.averaged:
                params, batch_stats = ema_variables(state.ema, cfg.eval.ema_decay)
            log_probs = _predict(predict_batch, params, batch_stats, split, batch_size,
                                 len(dataset.test), compiles)
            members.append(Member(run_dir, ev.weights, step, log_probs))
            _log_member_end(label, time.perf_counter() - start, compiles.seconds - compiled,
                            prob_metrics(log_probs, dataset.test.labels)["error"])
    finally:
        checkpoints.close()
    return members


def _log_member_end(label: str, took: float, compiling: float, error: float) -> None:
    if compiling:
        log.info("%s: compiled the evaluation in %s", label, duration(compiling))
    log.info("%s: evaluated in %s: error %.2f%%", label, duration(took - compiling), error)


def _check_same_test_set(first: tuple[Path, Any], other: tuple[Path, Any]) -> None:
    (first_dir, a), (run_dir, b) = first, other
    if (a.name == b.name and a.num_classes == b.num_classes
            and np.array_equal(a.test.labels, b.test.labels)):
        return
    raise ConfigError(
        f"{run_dir} ({b.name}, {b.num_classes} classes, {len(b.test)} test examples) and "
        f"{first_dir} ({a.name}, {a.num_classes} classes, {len(a.test)} test examples) do not "
        "share a test set; an ensemble needs the same examples and classes")


def _load_datasets(run_dirs: list[Path], configs: list[DictConfig]) -> list[Any]:
    """Each run's test split, normalized with the statistics it trained with (its training set
    is not read: cnnlab/training/build.py's `load_for_evaluation`); all must share the first
    one's test set."""
    datasets, loaded = [], {}
    for run_dir, cfg in zip(run_dirs, configs, strict=True):
        datasets.append(load_for_evaluation(cfg, run_dir, loaded=loaded))
        _check_same_test_set((run_dirs[0], datasets[0]), (run_dir, datasets[-1]))
    return datasets


def evaluate_runs(run_dirs: Sequence[Path], ev: DictConfig) -> dict[str, Any]:
    """Evaluate each run's `ev.weights` with `ev.tta` on its dataset's test split; with more
    than one member, also their ensemble. Returns the report `format_report` prints."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ConfigError("cnnlab eval needs at least one run directory")
    # Every run's config is checked before any data is read or anything compiles.
    configs = [load_run_config(d) for d in run_dirs]
    for run_dir, cfg in zip(run_dirs, configs, strict=True):
        try:
            validate(ev, cfg.augment, cfg.dataset.image_shape)
            validate_scales(ev, cfg)
        except ConfigError as e:
            raise ConfigError(f"{run_dir}: {e}") from None
        _steps_to_restore(run_dir, cfg, ev.weights)

    # Every dataset is read (and the test sets compared) before anything is evaluated.
    datasets = _load_datasets(run_dirs, configs)
    members: list[Member] = []
    for number, (run_dir, cfg, dataset) in enumerate(
            zip(run_dirs, configs, datasets, strict=True), 1):
        members += _members(run_dir, build(cfg, dataset), ev, f"run {number}/{len(run_dirs)}")

    reference = datasets[0]
    labels = reference.test.labels
    report: dict[str, Any] = {
        "dataset": reference.name, "split": configs[0].dataset.test_split,
        "examples": int(len(labels)), "tta": ev.tta, "weights": ev.weights,
        "top_k": ev.top_k,
        "scales": None if ev.scales is None else list(ev.scales), "scale_mode": ev.scale_mode,
        "members": [{"run_dir": str(m.run_dir), "weights": m.weights, "step": m.step,
                     **_metrics(m.log_probs, labels, ev.top_k)} for m in members],
        "ensemble": None,
    }
    combined = members[0].log_probs
    if len(members) > 1:
        combined = ensemble_log_probs([m.log_probs for m in members])
        report["ensemble"] = {"members": len(members), **_metrics(combined, labels, ev.top_k)}
    if ev.confusion_dir is not None:
        # The result the report ends on: the ensemble's, or the single member's.
        what = f"ensemble of {len(members)}" if len(members) > 1 else str(members[0].run_dir)
        paths = write_confusion(Path(ev.confusion_dir), "test",
                                confusion_matrix(combined, labels), reference.class_names,
                                f"{what} on {reference.name} {report['split']}")
        report["confusion_files"] = {kind: str(path) for kind, path in paths.items()}
    return report


def _metrics(log_probs: np.ndarray, labels: np.ndarray, top_k: int | None) -> dict[str, Any]:
    """`prob_metrics` and each class's error (percent; None for a class with no examples)."""
    errors = per_class_error(confusion_matrix(log_probs, labels))
    return {**prob_metrics(log_probs, labels, top_k),
            "per_class_error": [None if np.isnan(e) else float(e) for e in errors]}


def format_report(report: dict[str, Any], fmt: str = "table") -> str:
    """`fmt` json: the report as JSON; table: a row per member, then the ensemble (with a
    top-k column where the top-k error was reported)."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    top_key = next((k for k in report["members"][0] if k.startswith("top")), None)
    extra = [top_key] if top_key else []

    def numbers(result: dict[str, Any]) -> list[str]:
        return [f"{result[k]:.2f}" for k in ["error", *extra]] + [f"{result['loss']:.4f}"]

    rows = [(m["run_dir"], m["weights"], str(m["step"]), *numbers(m))
            for m in report["members"]]
    if report["ensemble"] is not None:
        ens = report["ensemble"]
        rows.append((f"ensemble of {ens['members']}", "", "", *numbers(ens)))
    header = ("member", "weights", "step", "error %",
              *(f"top-{k.removeprefix('top').removesuffix('_error')} error %" for k in extra),
              "loss")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                 *(cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True))]
        return "  ".join(cells).rstrip()

    title = (f"{report['dataset']} {report['split']} split, {report['examples']} examples, "
             f"tta={report['tta']}")
    if report.get("scales"):
        title += f", scales={report['scales']} ({report['scale_mode']})"
    return "\n".join([title, line(header), *(line(r) for r in rows)])
