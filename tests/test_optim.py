"""Optimizers, weight decay, penalties, label smoothing and clipping against their update rules
written out by hand in NumPy (float64), one formula per paper; then configs and real steps."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import DictConfig, OmegaConf

from cnnlab.cli.preflight import validate
from cnnlab.config.groups import group_options, option_values
from cnnlab.config.schema import OptimizerConfig
from cnnlab.errors import ConfigError
from cnnlab.training.optim import (
    OPTIMIZERS,
    make_optimizer,
    make_penalty,
    make_schedule,
    smoothed_cross_entropy,
)
from tests.helpers import compose_config, random_device_split

W0 = np.array([1.0, -2.0, 0.5])
CURVATURE = np.array([1.0, 3.0, 0.2])  # loss = 0.5 * sum(CURVATURE * w^2), gradient CURVATURE * w


def preset(name: str, **keys: object) -> DictConfig:
    """conf/optimizer/<name>.yaml (its bases merged in) on the schema, with `keys` overridden."""
    cfg = OmegaConf.merge(OmegaConf.structured(OptimizerConfig),
                          option_values("optimizer", name))
    return OmegaConf.merge(cfg, keys)


def decaying_lr(base: float) -> Callable:
    # Varies per step, so a missing or doubled lr factor anywhere shows.
    return lambda step: base * 0.5 ** step


def run_optax(opt: DictConfig, schedule: Callable, grads: Callable, steps: int = 2) -> list:
    """Parameters after each of `steps` steps; `grads(step, w)` is the gradient at w.

    In float64, so that the comparison with the NumPy rules is exact up to round-off.
    """
    with jax.enable_x64(True):
        tx = make_optimizer(opt, schedule)
        w = jnp.asarray(W0, jnp.float64)
        state = tx.init(w)
        out = []
        for t in range(steps):
            updates, state = tx.update(jnp.asarray(grads(t, np.asarray(w))), state, w)
            w = w + updates
            assert w.dtype == jnp.float64
            out.append(np.asarray(w))
    return out


def quadratic(t: int, w: np.ndarray) -> np.ndarray:
    return CURVATURE * w


FIXED = [np.array([0.3, -1.2, 2.0]), np.array([-0.7, 0.4, 1.5]), np.array([0.1, 0.9, -0.2])]


def fixed(t: int, w: np.ndarray) -> np.ndarray:
    return FIXED[t]


def reference(name: str, opt: DictConfig, schedule: Callable, grads: Callable,
              steps: int = 2) -> list:
    """The papers' rules (module docstring of cnnlab/training/optim.py), in float64."""
    w = W0.copy()
    buf = m = v = eg = ex = np.zeros_like(w)
    wd, out = opt.weight_decay, []
    for t in range(steps):
        lr = schedule(t)
        g = grads(t, w)
        d = g + wd * w if opt.decay == "coupled" else g  # coupled: the L2 term's gradient
        if name in ("sgd", "momentum", "nesterov"):
            # torch.optim.SGD: b <- mu b + d; step along b, or d + mu b with Nesterov.
            buf = opt.momentum * buf + d
            step = (d + opt.momentum * buf if opt.nesterov else buf) if opt.momentum else d
        elif name == "adadelta":
            # Zeiler 2012, Algorithm 1.
            eg = opt.rho * eg + (1 - opt.rho) * d**2
            step = np.sqrt(ex + opt.eps) / np.sqrt(eg + opt.eps) * d
            ex = opt.rho * ex + (1 - opt.rho) * step**2
        else:
            # Kingma & Ba 2015, Algorithm 1, with bias correction at t = 1, 2, ...
            m = opt.b1 * m + (1 - opt.b1) * d
            v = opt.b2 * v + (1 - opt.b2) * d**2
            m_hat, v_hat = m / (1 - opt.b1 ** (t + 1)), v / (1 - opt.b2 ** (t + 1))
            step = m_hat / (np.sqrt(v_hat) + opt.eps)
        if opt.decay == "decoupled":
            step = step + wd * w  # Loshchilov & Hutter, scaled by lr_t below as in PyTorch
        w = w - lr * step
        out.append(w.copy())
    return out


@pytest.mark.parametrize("name", OPTIMIZERS.names())
@pytest.mark.parametrize("grads", [quadratic, fixed], ids=["quadratic", "fixed"])
def test_two_steps_match_the_papers_update_rule(name, grads):
    opt = preset(name, weight_decay=0.05)
    schedule = decaying_lr(opt.lr)
    got, want = run_optax(opt, schedule, grads), reference(name, opt, schedule, grads)
    for w_got, w_want in zip(got, want, strict=True):
        np.testing.assert_allclose(w_got, w_want, rtol=1e-12)
    # The steps themselves, not just the parameters they were added to.
    np.testing.assert_allclose(got[0] - W0, want[0] - W0, rtol=1e-9)
    np.testing.assert_allclose(got[1] - got[0], want[1] - want[0], rtol=1e-9)


def test_presets_are_the_literature_defaults():
    assert (preset("sgd").momentum, preset("sgd").nesterov) == (0.0, False)
    assert (preset("momentum").momentum, preset("momentum").nesterov) == (0.9, False)
    assert (preset("nesterov").momentum, preset("nesterov").nesterov) == (0.9, True)
    assert (preset("adadelta").lr, preset("adadelta").rho, preset("adadelta").eps) == (
        1.0, 0.9, 1e-6)
    for name in ("adam", "adamw"):
        p = preset(name)
        assert (p.lr, p.b1, p.b2, p.eps) == (1e-3, 0.9, 0.999, 1e-8)
    assert (preset("adamw").decay, preset("adamw").weight_decay) == ("decoupled", 1e-2)
    assert all(preset(n).decay == "coupled" for n in OPTIMIZERS if n != "adamw")
    assert group_options("optimizer") == sorted(OPTIMIZERS)


def test_sgd_coupled_and_decoupled_decay_agree_without_momentum_only():
    """Plain SGD: w - lr_t (g + wd w) either way. With momentum the coupled term is accumulated
    in the buffer and the decoupled one is not, so they part after the first step."""
    schedule = decaying_lr(0.1)
    coupled = run_optax(preset("sgd", weight_decay=0.1), schedule, quadratic, 3)
    decoupled = run_optax(preset("sgd", weight_decay=0.1, decay="decoupled"), schedule,
                          quadratic, 3)
    np.testing.assert_allclose(coupled, decoupled, rtol=1e-12)
    heavy_c = run_optax(preset("momentum", weight_decay=0.1), schedule, quadratic)
    heavy_d = run_optax(preset("momentum", weight_decay=0.1, decay="decoupled"), schedule,
                        quadratic)
    np.testing.assert_allclose(heavy_c[0], heavy_d[0], rtol=1e-12)
    assert not np.allclose(heavy_c[1], heavy_d[1], rtol=1e-6)


def test_adamw_is_adam_plus_lr_times_wd_times_w_and_coupled_adam_is_not():
    schedule, wd = decaying_lr(1e-3), 0.1
    adam = run_optax(preset("adam"), schedule, fixed, 3)
    adamw = run_optax(preset("adamw", weight_decay=wd), schedule, fixed, 3)
    adam_decoupled = run_optax(preset("adam", weight_decay=wd, decay="decoupled"), schedule,
                               fixed, 3)
    np.testing.assert_allclose(adamw, adam_decoupled, rtol=1e-12)
    # With gradients that do not depend on w the moments match, so every AdamW step is the Adam
    # step minus lr_t * wd * w_t (Loshchilov & Hutter 2019, Algorithm 2, line 12).
    prev_w, prev_adam = W0, W0
    for t in range(3):
        adam_step = adam[t] - prev_adam
        np.testing.assert_allclose(adamw[t] - prev_w, adam_step - schedule(t) * wd * prev_w,
                                   rtol=1e-9)
        prev_w, prev_adam = adamw[t], adam[t]
    # Coupled decay goes through the moments and is normalized away: not AdamW.
    adam_l2 = run_optax(preset("adam", weight_decay=wd), schedule, fixed, 3)
    assert not np.allclose(adam_l2[2], adamw[2], rtol=1e-6)


PARAMS = {
    "conv": {"kernel": jnp.array([[0.5, -1.5], [0.0, 2.0]]), "bias": jnp.array([0.3, -0.2])},
    "norm": {"scale": jnp.array([1.2, -0.7]), "bias": jnp.array([0.4, 0.0])},
    "dense": {"kernel": jnp.array([[-0.25], [3.0]])},
}


@pytest.mark.parametrize("apply_to", ["kernels", "all"])
def test_l1_and_l2_add_lambda_sign_w_and_lambda_w_to_the_selected_gradients(apply_to):
    l1, l2 = 0.01, 0.2
    reg = OmegaConf.create({"l1": l1, "l2": l2, "apply_to": apply_to, "label_smoothing": 0.0})
    penalty = make_penalty(reg)
    grads = jax.grad(penalty)(PARAMS)
    selected = 0.0
    for path, w in jax.tree_util.tree_leaves_with_path(PARAMS):
        grad = np.asarray(_at(grads, path))
        w = np.asarray(w)
        if apply_to == "all" or path[-1].key == "kernel":
            np.testing.assert_allclose(grad, l1 * np.sign(w) + l2 * w, rtol=1e-6)
            selected += l1 * np.abs(w).sum() + 0.5 * l2 * (w**2).sum()
        else:
            np.testing.assert_array_equal(grad, 0.0)
    assert float(penalty(PARAMS)) == pytest.approx(selected, rel=1e-6)
    assert make_penalty(OmegaConf.merge(reg, {"l1": 0.0, "l2": 0.0})) is None


def _at(tree: dict, path: tuple) -> jax.Array:
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_label_smoothing_is_cross_entropy_against_the_smoothed_targets():
    rng = np.random.default_rng(0)
    logits, labels, eps, k = rng.normal(size=(5, 4)), np.array([0, 3, 1, 1, 2]), 0.1, 4
    targets = (1 - eps) * np.eye(k)[labels] + eps / k  # Szegedy et al. 2016, section 7
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(targets * log_p).sum(-1).mean()
    got = smoothed_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), eps)
    assert float(got) == pytest.approx(want, rel=1e-6)
    hard = smoothed_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 0.0)
    assert float(hard) == pytest.approx(-log_p[np.arange(5), labels].mean(), rel=1e-6)


def test_clipping_rescales_a_large_gradient_to_clip_norm_and_leaves_a_small_one():
    opt = preset("sgd", lr=1.0, weight_decay=0.0, clip_norm=2.5)
    tx = make_optimizer(opt, lambda step: 1.0)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    big = {"a": jnp.array([6.0, 0.0]), "b": jnp.array([8.0])}  # global norm 10
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}  # global norm 0.5
    updates, _ = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-1.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-2.0], rtol=1e-6)
    updates, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-0.4], rtol=1e-6)
    # Coupled weight decay is added after clipping, as torch's clip_grad_norm_ then step().
    tx = make_optimizer(preset("sgd", lr=1.0, weight_decay=0.5, clip_norm=2.5),
                        lambda step: 1.0)
    params = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([2.0])}
    updates, _ = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-2.0, -0.5], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-3.0], rtol=1e-6)


def test_label_smoothing_raises_the_minimum_loss_to_the_targets_entropy():
    """Minimized over the logits, smoothed cross entropy ends at the entropy of the smoothed
    target (Szegedy et al. 2016), with softmax equal to that target; unsmoothed, it goes to 0."""
    k, eps, labels = 5, 0.2, jnp.array([0, 3])
    target = (1 - eps) * np.eye(k)[np.asarray(labels)] + eps / k
    entropy = -np.sum(target * np.log(target), -1).mean()

    def minimize(smoothing: float) -> tuple[float, jax.Array]:
        loss = jax.jit(jax.value_and_grad(
            lambda z: smoothed_cross_entropy(z, labels, smoothing)))
        z = jnp.zeros((2, k))
        for _ in range(500):
            value, grad = loss(z)
            z = z - 10.0 * grad
        return float(value), z

    value, z = minimize(eps)
    assert value == pytest.approx(entropy, rel=1e-4)
    np.testing.assert_allclose(jax.nn.softmax(z), target, atol=1e-4)
    assert minimize(0.0)[0] < 0.02 < entropy


def test_schedules_give_pytorchs_lr_curves():
    """Every schedule's lr at each step against torch.optim.lr_scheduler on the same base lr
    (warm-up: the linear ramp, then the schedule's own value, its milestones counted from 0)."""
    torch = pytest.importorskip("torch")
    sched_lib = torch.optim.lr_scheduler
    base, total = 0.2, 40

    def torch_curve(make: Callable) -> np.ndarray:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        scheduler, out = make(opt), []
        for _ in range(total + 1):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return np.array(out)

    def ours(**keys: object) -> np.ndarray:
        sched = OmegaConf.merge(option_values("schedule", str(keys.pop("name"))), keys)
        schedule = make_schedule(sched, base, total)
        return np.array([float(schedule(t)) for t in range(total + 1)])

    cases = {
        "constant": (ours(name="constant"), torch_curve(lambda o: sched_lib.LambdaLR(
            o, lambda t: 1.0))),
        "step": (ours(name="step", milestones=[0.25, 0.6], factor=0.3),
                 torch_curve(lambda o: sched_lib.MultiStepLR(o, [10, 24], gamma=0.3))),
        "cosine": (ours(name="cosine", final_factor=0.1),
                   torch_curve(lambda o: sched_lib.CosineAnnealingLR(o, total, base * 0.1))),
        "cyclic_cosine": (ours(name="cyclic_cosine", cycles=4), torch_curve(
            lambda o: sched_lib.CosineAnnealingWarmRestarts(o, total // 4, eta_min=0.0))),
    }
    for name, (got, want) in cases.items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8, err_msg=name)
    warm = ours(name="step", milestones=[0.25, 0.6], factor=0.3, warmup_steps=5)
    ramp = base * np.arange(1, 6) / 5
    np.testing.assert_allclose(warm, np.concatenate([ramp, cases["step"][1][5:]]), rtol=1e-6)


# ------------------------------------------------------------------------------ configs


# Accepted settings, the ResNet recipe's among them (one test: composing is all they need).
ACCEPTED = [
    *[[f"optimizer={name}"] for name in OPTIMIZERS],
    ["optimizer=sgd", "optimizer.momentum=0.9"],  # the ResNet recipe's torch.optim.SGD
    ["optimizer=momentum", "optimizer.decay=decoupled"],
    ["optimizer=adam", "optimizer.decay=decoupled", "optimizer.weight_decay=0.01"],
    ["optimizer=adadelta", "optimizer.clip_norm=1.0"],
    ["regularization.l1=1e-5", "regularization.l2=5e-4", "regularization.apply_to=all"],
    ["regularization.label_smoothing=0.1"],
    ["experiment=resnet_cifar10", "optimizer=nesterov"],
]


def test_every_optimizer_and_regularization_setting_validates():
    for overrides in ACCEPTED:
        validate(compose_config(overrides))


def test_defaults_are_unchanged_and_do_not_regularize():
    cfg = compose_config()
    assert cfg.optimizer.name == "momentum" and cfg.optimizer.decay == "coupled"
    assert cfg.optimizer.clip_norm is None
    reg = cfg.regularization
    assert (reg.l1, reg.l2, reg.label_smoothing, reg.apply_to) == (0.0, 0.0, 0.0, "kernels")


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.name=adamx"], "unknown optimizer 'adamx'; valid choices: adadelta, "
                               "adam, adamw, momentum, nesterov, sgd (did you mean 'adam'?)"),
    (["optimizer.lr=0"], "optimizer.lr=0.0 must be positive"),
    (["optimizer.momentum=1.0"], "optimizer.momentum=1.0 must be in [0, 1)"),
    (["optimizer=sgd", "optimizer.momentum=-0.1"], "optimizer.momentum=-0.1 must be in [0, 1)"),
    (["optimizer=adam", "optimizer.b1=1.0"], "optimizer.b1=1.0 must be in [0, 1)"),
    (["optimizer=adamw", "optimizer.b2=-0.5"], "optimizer.b2=-0.5 must be in [0, 1)"),
    (["optimizer=adam", "optimizer.eps=0"], "optimizer.eps=0.0 must be positive"),
    (["optimizer=adadelta", "optimizer.rho=1.0"], "optimizer.rho=1.0 must be in [0, 1)"),
    (["optimizer.weight_decay=-1e-4"], "optimizer.weight_decay=-0.0001 must be >= 0"),
    (["optimizer.decay=sideways"], "optimizer.decay='sideways'; valid choices: coupled, "
                                   "decoupled"),
    (["optimizer.clip_norm=0"], "optimizer.clip_norm=0.0 must be positive or null"),
    (["optimizer=adam", "optimizer.momentum=0.9"],
     "optimizer.momentum=0.9 is not used by optimizer 'adam' (it reads b1, b2, eps)"),
    (["optimizer=adam", "optimizer.b1=null"], "optimizer 'adam' needs optimizer.b1"),
    (["optimizer=momentum", "optimizer.momentum=0"], "optimizer 'momentum' needs "
                                                     "optimizer.momentum in (0, 1)"),
    (["optimizer=momentum", "optimizer.nesterov=true"], "is optimizer=nesterov"),
    (["optimizer=nesterov", "optimizer.nesterov=false"], "is optimizer=momentum"),
    (["optimizer=sgd", "optimizer.nesterov=true"], "optimizer.nesterov=true needs "
                                                   "optimizer.momentum > 0"),
    (["optimizer=adamw", "optimizer.decay=coupled"], "for Adam with an L2 term use "
                                                     "optimizer=adam"),
    (["regularization.l1=-1"], "regularization.l1=-1.0 must be >= 0"),
    (["regularization.l2=-0.5"], "regularization.l2=-0.5 must be >= 0"),
    (["regularization.label_smoothing=1.0"], "regularization.label_smoothing=1.0 must be in "
                                             "[0, 1)"),
    (["regularization.apply_to=biases"], "regularization.apply_to='biases'; valid choices: "
                                         "all, kernels"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- real train steps


MODEL = ("model=resnet20", "model.depth=8")


@functools.cache
def _initial() -> tuple[object, object, object]:
    """ResNet-8, its initial train state and random 16x16x3 data, shared by all runs below."""
    from cnnlab.models import build_model
    from cnnlab.training.build import init_state

    cfg = compose_config(list(MODEL))
    model = build_model(cfg, 10)
    state = init_state(cfg, model, optax.identity(), (16, 16, 3))
    return model, state, random_device_split((16, 16, 3))


@functools.cache
def _train(overrides: tuple[str, ...], steps: int = 2) -> tuple[list[float], list]:
    """Jitted train steps through make_train_step: the logged losses and the states (initial one
    first). Cached, so the regularization tests reuse the `sgd` run as their baseline."""
    from cnnlab.data.augment.pipeline import make_augment
    from cnnlab.training import steps as steps_lib

    cfg = compose_config([*MODEL, *overrides])
    validate(cfg)
    model, state, data = _initial()
    tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, cfg.optimizer.lr, 100))
    # LLVM's backend optimizations would double the compile time of these two-step runs.
    train_step = jax.jit(
        steps_lib.make_train_step(model, tx, make_augment(cfg.augment), 16, cfg.regularization),
        compiler_options={"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True})
    states = [state.replace(opt_state=tx.init(state.params))]
    losses = []
    for _ in range(steps):
        state, metrics = train_step(states[-1], data)
        states.append(state)
        losses.append(float(metrics["loss_sum"]) / int(metrics["count"]))
    return losses, states


def _max_change(a: object, b: object) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("decay", ["coupled", "decoupled"])
def test_weight_decay_shrinks_every_weight_in_a_real_step(decay):
    """Plain SGD: the first step with weight decay is the step without it minus lr * wd * w, on
    every parameter (biases and norm scales too: PyTorch's weight_decay), and the logged loss is
    the same."""
    wd, lr = 0.5, 0.1
    plain_losses, plain = _train(("optimizer=sgd",))
    decayed_losses, decayed = _train(("optimizer=sgd", f"optimizer.weight_decay={wd}",
                                      f"optimizer.decay={decay}"))
    assert decayed_losses[0] == pytest.approx(plain_losses[0], rel=1e-6)
    for w, a, b in zip(jax.tree.leaves(plain[0].params), jax.tree.leaves(plain[1].params),
                       jax.tree.leaves(decayed[1].params), strict=True):
        np.testing.assert_allclose(np.asarray(b) - np.asarray(a), -lr * wd * np.asarray(w),
                                   rtol=1e-3, atol=1e-6)
    norm = [float(jnp.sum(jnp.square(w))) for w in jax.tree.leaves(decayed[1].params)]
    assert sum(norm) < sum(float(jnp.sum(jnp.square(w))) for w in
                           jax.tree.leaves(plain[1].params))


def test_l2_joins_the_objective_for_kernels_only_and_the_logged_loss_stays_cross_entropy():
    l2, lr = 0.5, 0.1  # optimizer=sgd: plain SGD, lr 0.1 at step 0
    plain_losses, plain = _train(("optimizer=sgd",))
    reg_losses, reg = _train(("optimizer=sgd", f"regularization.l2={l2}"))
    # Same parameters and batch at step 0: the same logged cross entropy.
    assert reg_losses[0] == pytest.approx(plain_losses[0], rel=1e-6)
    # Same data gradient, so the first steps differ by exactly -lr * l2 * w on kernels only.
    start = jax.tree_util.tree_leaves_with_path(plain[0].params)
    for (path, w), a, b in zip(start, jax.tree.leaves(plain[1].params),
                               jax.tree.leaves(reg[1].params), strict=True):
        extra = -lr * l2 * np.asarray(w) if path[-1].key == "kernel" else np.zeros(w.shape)
        np.testing.assert_allclose(np.asarray(b) - np.asarray(a), extra, rtol=1e-3, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_label_smoothing_changes_the_step_but_not_the_logged_loss():
    plain_losses, plain = _train(("optimizer=sgd",))
    smooth_losses, smooth = _train(("optimizer=sgd", "regularization.label_smoothing=0.2"))
    assert smooth_losses[0] == pytest.approx(plain_losses[0], rel=1e-6)
    assert _max_change(plain[1].params, smooth[1].params) > 1e-4
