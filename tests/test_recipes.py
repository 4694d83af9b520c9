"""The notes' remaining recipes: the loss group (values and gradients against NumPy), the LR
range test (`cnnlab lr_find`), the overfit preset, cross-validation folds and
`compare.select=best` (random restarts)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.analysis import compare as cmp
from cnnlab.analysis import load
from cnnlab.config.presets import steps_from_epochs
from cnnlab.data.subsets import fold_split
from cnnlab.data.types import ArraySplit
from cnnlab.errors import ConfigError
from cnnlab.training import losses
from cnnlab.training.lr_find import exponential_schedule, smooth, suggest
from tests.helpers import TINY, augment_config, compose_config, run_cli, train_tiny
from tests.test_compare import write_run

# ------------------------------------------------------------------------------------ losses

LOGITS = np.array([[2.0, -1.0, 0.5, 0.0], [-3.0, 4.0, 1.0, -0.5], [0.1, 0.2, -6.0, 3.0]])
LABELS = np.array([0, 2, 3])
K = LOGITS.shape[1]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def targets(smoothing: float = 0.0) -> np.ndarray:
    return (1 - smoothing) * np.eye(K)[LABELS] + smoothing / K


def by_hand(name: str, output: str | None, t: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean loss, its gradient with respect to the logits), written out for a batch of B."""
    z, b = LOGITS, len(LOGITS)
    if name == "cross_entropy":  # -sum t log p; d/dz = p - t
        p = softmax(z)
        return float(np.mean(-np.sum(t * np.log(p), -1))), (p - t) / b
    if name == "sigmoid_bce":  # sum_k -[t log s + (1-t) log(1-s)]; d/dz = s - t
        s = sigmoid(z)
        loss = -np.sum(t * np.log(s) + (1 - t) * np.log(1 - s), -1)
        return float(loss.mean()), (s - t) / b
    # mse: (1/2) sum (y - t)^2, y = f(z); d/dz = J_f^T (y - t)
    if output == "logits":
        return float(np.mean(0.5 * np.sum((z - t) ** 2, -1))), (z - t) / b
    if output == "sigmoid":
        s = sigmoid(z)
        return float(np.mean(0.5 * np.sum((s - t) ** 2, -1))), (s - t) * s * (1 - s) / b
    p = softmax(z)  # softmax Jacobian: diag(p) - p p^T
    r = p - t
    grad = p * (r - np.sum(r * p, -1, keepdims=True))
    return float(np.mean(0.5 * np.sum(r ** 2, -1))), grad / b


CASES = [("cross_entropy", None), ("sigmoid_bce", None), ("mse", "softmax"), ("mse", "sigmoid"),
         ("mse", "logits")]


class Logits(nn.Module):
    """A model whose logits are its one parameter, LOGITS: the train step's gradient with
    respect to it is the gradient of the optimized loss with respect to the logits."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.param("z", lambda key: jnp.asarray(LOGITS, jnp.float32))


def step_gradient(name: str, output: str | None, smoothing: float) -> tuple[np.ndarray, float]:
    """(d loss / d logits, the logged loss) of `make_gradients`, the train step's pass, for a
    batch of len(LABELS) images labelled LABELS."""
    from cnnlab.data.augment.pipeline import make_augment
    from cnnlab.data.device import GivenBatch
    from cnnlab.data.preprocess import PreprocessStats
    from cnnlab.training import steps

    model = Logits()
    regularization = OmegaConf.create({"l1": 0.0, "l2": 0.0, "apply_to": "kernels",
                                       "label_smoothing": smoothing})
    gradients = steps.make_gradients(
        model, make_augment(augment_config()), len(LABELS), regularization,
        loss_config=OmegaConf.create({"name": name, "output": output}))
    state = steps.TrainState(step=jnp.asarray(0), params=model.init(jax.random.PRNGKey(0), None)
                             ["params"], batch_stats={}, opt_state=None,
                             rng=jax.random.PRNGKey(0))
    batch = GivenBatch(images=jnp.zeros((len(LABELS), 2, 2, 1), jnp.uint8),
                       labels=jnp.asarray(LABELS, jnp.int32), stats=PreprocessStats())
    out = jax.jit(gradients)(state, batch)
    logged = float(out.metrics["loss_sum"]) / int(out.metrics["count"])
    return np.asarray(out.grads["z"], np.float64), logged


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("name", "output"), CASES)
def test_each_loss_value_and_gradient_match_the_hand_formulas(name, output, smoothing):
    """The objective's value, and the gradient the train step takes, in float32 against the
    formulas in float64."""
    cfg = OmegaConf.create({"name": name, "output": output})
    losses.validate(cfg)
    want_value, want_grad = by_hand(name, output, targets(smoothing))
    objective = losses.make_objective(cfg, smoothing)
    grad, logged = step_gradient(name, output, smoothing)
    if objective is None:  # plain cross entropy: the train step optimizes the logged loss
        assert (name, smoothing) == ("cross_entropy", 0.0)
        value = logged
    else:
        value = float(objective(jnp.asarray(LOGITS, jnp.float32), jnp.asarray(LABELS)))
    assert value == pytest.approx(want_value, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("name", "output"), CASES)
def test_the_train_step_optimizes_each_loss_and_logs_cross_entropy(name, output):
    """Whatever loss is optimized (and with label smoothing), the logged loss is the cross
    entropy against the true labels, so runs with different losses compare on one scale; the
    losses' gradients differ from one another."""
    cross_entropy, _ = by_hand("cross_entropy", None, targets())
    grads = []
    for smoothing in (0.0, 0.1):
        grad, logged = step_gradient(name, output, smoothing)
        assert logged == pytest.approx(cross_entropy, rel=1e-6)
        grads.append(grad)
    assert not np.allclose(grads[0], grads[1], atol=1e-4)  # smoothing changed the target
    if name != "cross_entropy":
        plain, _ = step_gradient("cross_entropy", None, 0.0)
        assert not np.allclose(grads[0], plain, atol=1e-4)


def test_l2_on_saturated_sigmoid_has_almost_no_gradient_where_cross_entropy_has_one():
    """The notes' warning in numbers: a confidently wrong unit (z = -10 for the true class)."""
    z = jnp.asarray([[-10.0, 0.0, 0.0]])
    y = jnp.asarray([0])
    mse = losses.make_objective(OmegaConf.create({"name": "mse", "output": "sigmoid"}))
    bce = losses.make_objective(OmegaConf.create({"name": "sigmoid_bce", "output": None}))
    assert abs(float(jax.grad(mse)(z, y)[0, 0])) < 1e-4
    assert float(jax.grad(bce)(z, y)[0, 0]) == pytest.approx(-1.0, abs=1e-4)


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss=mse", "loss.output=tanh"], "loss.output=tanh for loss=mse; valid choices: softmax"),
    (["loss=sigmoid_bce", "loss.output=sigmoid"], "loss=sigmoid_bce is defined on the logits"),
    (["loss=cross_entropy", "loss.output=softmax"], "takes no loss.output"),
])
def test_bad_loss_values_are_one_line(overrides, message):
    from cnnlab.cli.preflight import validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_loss_options_compose():
    assert compose_config([]).loss == {"name": "cross_entropy", "output": None}
    assert compose_config(["loss=mse"]).loss == {"name": "mse", "output": "softmax"}
    assert compose_config(["loss=mse_sigmoid"]).loss == {"name": "mse", "output": "sigmoid"}


# ------------------------------------------------------------------------------------ lr_find


def test_lr_find_schedule_is_exactly_the_exponential():
    start, end, steps = 1e-5, 3.0, 37
    schedule = exponential_schedule(start, end, steps)
    i = np.arange(steps)
    want = start * (end / start) ** (i / (steps - 1))
    np.testing.assert_allclose([float(schedule(k)) for k in i], want, rtol=1e-5)
    assert float(schedule(0)) == pytest.approx(start) and float(schedule(steps - 1)) == (
        pytest.approx(end, rel=1e-5))


def test_smoothing_is_the_bias_corrected_average_and_the_suggestion_the_steepest_descent():
    x = [4.0, 2.0, 1.0]
    # a = 0.5 a + 0.5 x: 2, 2, 1.5; divided by 1 - 0.5^(i+1): 0.5, 0.75, 0.875.
    np.testing.assert_allclose(smooth(x, 0.5), [4.0, 2 / 0.75, 1.5 / 0.875])
    lrs = np.logspace(-5, 0, 51)
    # Loss flat, then falling fastest at lr 1e-3 (a tanh in log lr), lowest near 1e-1, then up.
    u = np.log10(lrs)
    loss = 2 - np.tanh(2 * (u + 3)) + np.where(u > -1, 30 * (u + 1) ** 2, 0)
    got = suggest(lrs, loss)
    assert got["suggested_lr"] == pytest.approx(1e-3)
    assert got["lr_at_min"] == pytest.approx(lrs[np.argmin(loss)])
    assert got["lr_at_min_over_10"] == pytest.approx(got["lr_at_min"] / 10)


def test_lr_find_runs_offline_and_writes_the_plot_and_json(fashion_dir, tmp_path):
    args = [*[o for o in TINY if not o.startswith(("train.steps", "checkpoint"))],
            "lr_find.steps=12", "lr_find.start=1e-4", "lr_find.end=100",
            f"lr_find.output={tmp_path / 'lrf'}"]
    result = run_cli(["lr_find", *args], cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "suggested lr:" in result.stdout
    record = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert 2 <= len(record["lr"]) == len(record["loss"]) <= 12
    np.testing.assert_allclose(record["lr"], 1e-4 * 1e6 ** (np.arange(len(record["lr"])) / 11),
                               rtol=1e-5)
    assert (tmp_path / "lrf" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("override", "message"), [
    ("lr_find.start=0", "lr_find.start=0.0 must be positive"),
    ("lr_find.end=1e-9", "lr_find.end=1e-09 must be larger than lr_find.start=1e-06"),
    ("lr_find.steps=1", "lr_find.steps=1 must be >= 2"),
    ("lr_find.diverge=1", "lr_find.diverge=1.0 must be > 1 (a factor over the lowest "
                          "smoothed loss)"),
    ("lr_find.smoothing=1", "lr_find.smoothing=1.0 must be in [0, 1)"),
])
def test_bad_lr_find_values_are_one_line(override, message, tmp_path):
    result = run_cli(["lr_find", override], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"cnnlab: error: {message}"


def test_lr_find_help_lists_its_keys(tmp_path):
    out = run_cli(["lr_find", "--help"], cwd=tmp_path).stdout
    for key in ("start", "end", "steps", "diverge", "smoothing", "output"):
        assert f"lr_find.{key}=" in out


# ------------------------------------------------------------------------------------ overfit


def test_overfit_preset_is_a_tiny_unregularized_subset():
    cfg = compose_config(["experiment=overfit"])
    assert cfg.dataset.max_examples == 100 and cfg.dataset.val_size == 0
    assert cfg.augment.name == "none" and not cfg.augment.flip and cfg.augment.crop_pad == 0
    assert cfg.optimizer.weight_decay == 0 and cfg.schedule.name == "constant"
    assert (cfg.regularization.l1, cfg.regularization.l2,
            cfg.regularization.label_smoothing) == (0, 0, 0)


def test_overfit_preset_drives_the_training_loss_to_zero(fashion_dir, tmp_path):
    # One batch of 20 images, seen every step: memorized in a few dozen steps by a tiny net.
    summary = train_tiny(tmp_path, fashion_dir, [
        "experiment=overfit", "model.width=8", "dataset.max_examples=20", "train.batch_size=20",
        "train.steps=60", "train.steps_per_call=10", "train.log_every=10"])
    assert summary["final/train/loss"] < 0.05, summary["final/train/loss"]


# ------------------------------------------------------------------------------------ folds


@pytest.mark.parametrize(("n", "k"), [(103, 5), (10, 10), (7, 2)])
def test_folds_partition_the_train_split(n, k):
    split = ArraySplit(images=np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1),
                       labels=np.arange(n, dtype=np.int32))
    vals = []
    for i in range(k):
        train, val = fold_split(split, k, i, val_seed=3)
        assert not set(train.labels) & set(val.labels)
        assert sorted([*train.labels, *val.labels]) == list(range(n))
        vals.append(val.labels)
        # Fold i is the i-th part of val_seed's permutation.
        perm = np.random.default_rng(3).permutation(n)
        assert sorted(val.labels) == sorted(np.array_split(perm, k)[i])
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert sorted(np.concatenate(vals)) == list(range(n))
    # Deterministic by val_seed, and another seed draws other folds.
    again = fold_split(split, k, 0, val_seed=3)[1].labels
    np.testing.assert_array_equal(again, vals[0])
    if n > k:
        assert list(fold_split(split, k, 0, val_seed=4)[1].labels) != list(vals[0])


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.folds=5", "dataset.val_size=100"], "dataset.folds=5 and dataset.val_size=100 both"),
    (["dataset.folds=5", "dataset.fold=5"], r"dataset.fold=5 must be in \[0, 5\)"),
    (["dataset.fold=1"], "dataset.fold=1 needs dataset.folds=K"),
    (["dataset.folds=1"], "dataset.folds=1 must be >= 2 or null"),
])
def test_bad_fold_values_are_one_line(overrides, message):
    from cnnlab.cli.preflight import validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_epochs_count_the_train_folds():
    cfg = compose_config(["dataset.folds=7", "dataset.fold=6", "train.epochs=1",
                          "train.batch_size=100"])
    steps_from_epochs(cfg)
    # 60000 = 7 x 8571 + 3: fold 6 holds 8571, train the other 51429 images.
    assert cfg.train.steps == -(-51429 // 100)


def test_a_fold_is_the_runs_validation_split(fashion_dir, tmp_path):
    summary = train_tiny(tmp_path, fashion_dir, ["dataset.folds=4", "dataset.fold=1",
                                                 "train.steps=5", "checkpoint.enabled=false"])
    assert "final/val/error" in summary


# --------------------------------------------------------------------- compare: folds, best


def cv_run(root, name, fold, seed, val_error, lr=0.1):
    cfg = {"model": {"name": "resnet20"}, "optimizer": {"lr": lr},
           "dataset": {"name": "fashion_mnist", "folds": 3, "fold": fold}, "seed": seed}
    overrides = [f"dataset.fold={fold}", f"seed={seed}", f"optimizer.lr={lr}"]
    summary = {"status": "finished", "seed": seed, "final/val/error": val_error,
               "final/test/error": val_error + 1, "final/train/error": 1.0, "params": 10}
    return write_run(root / name, cfg, overrides, [], summary)


def test_compare_groups_folds_like_seeds(tmp_path):
    for fold, error in enumerate([10.0, 12.0, 14.0]):
        cv_run(tmp_path, f"{fold}_fold={fold}", fold, 0, error)
    cv_run(tmp_path, "3_lr", 0, 0, 30.0, lr=0.01)
    comparison = cmp.build(load.load_runs([str(tmp_path)]), cmp.CompareConfig())
    rows = {row.config["optimizer.lr"]: row for row in comparison.rows}
    assert rows[0.1].finished == 3 and rows[0.01].finished == 1
    stat = rows[0.1].stats["final_val_error"]
    assert (stat.mean, stat.std) == (pytest.approx(12.0), pytest.approx(2.0))


def test_select_best_reports_the_seed_with_the_lowest_val_error(tmp_path):
    for seed, error in enumerate([15.0, 9.0, 11.0]):
        cv_run(tmp_path, f"{seed}_seed={seed}", 0, seed, error)
    runs = load.load_runs([str(tmp_path)])
    [row] = cmp.build(runs, cmp.parse_config(["compare.select=best"])).rows
    assert row.finished == 1 and row.stats["final_val_error"].mean == 9.0
    assert row.stats["final_test_error"].mean == 10.0
    [row] = cmp.build(runs, cmp.CompareConfig()).rows
    assert row.finished == 3
    with pytest.raises(ConfigError, match="compare.select: unknown 'worst'; valid choices: all"):
        cmp.parse_config(["compare.select=worst"])


def test_select_best_without_a_val_error_is_one_line(tmp_path):
    run = cv_run(tmp_path, "0_seed=0", 0, 0, 1.0)
    summary = json.loads((run / "summary.json").read_text())
    del summary["final/val/error"]
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="compare.select=best picks by final/val/error"):
        cmp.build(load.load_runs([str(tmp_path)]), cmp.parse_config(["compare.select=best"]))
