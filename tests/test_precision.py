"""train.precision (bfloat16 compute, float32 state) and train.grad_accum (microbatches)."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.cli import preflight
from cnnlab.config.schema import TrainConfig
from cnnlab.data.augment.pipeline import make_augment
from cnnlab.data.preprocess import preprocess
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, compute_dtype
from cnnlab.runs import resume
from cnnlab.training import steps
from tests.helpers import TINY, compose_config, tiny_step, train_tiny
from tests.test_faults import _params


def _float_dtypes(tree: object) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)}


def _step(t, grad_accum: int = 1, batch_size: int = 32) -> object:
    return steps.make_train_step(t.model, t.tx, make_augment(t.cfg.augment), batch_size,
                                 t.cfg.regularization, grad_accum=grad_accum,
                                 compute_dtype=compute_dtype(t.cfg))


def _read_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if line.strip()]


def test_bf16_keeps_state_float32_and_computes_in_bfloat16():
    t = tiny_step(["train.precision=bf16"])
    step = jax.jit(_step(t))
    state, metrics = step(*step(t.state, t.data)[:1], t.data)
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss_sum"]))
    # Mixed precision: weights, BN running statistics and the optimizer's moments stay float32.
    for part in (state.params, state.batch_stats, state.opt_state):
        assert _float_dtypes(part) == {jnp.dtype(jnp.float32)}

    x = preprocess(t.data.images[:8], t.data.stats)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, captured = t.model.apply(variables, x, train=True, mutable=["batch_stats",
                                                                         "intermediates"],
                                     capture_intermediates=True)
    outputs = {"/".join(path): leaf.dtype for path, leaf in
               jax.tree_util.tree_flatten_with_path(captured["intermediates"])[0]
               for path in [[str(getattr(k, "key", k)) for k in path]]}
    convs = {k: v for k, v in outputs.items() if "conv" in k or "norm" in k}
    assert convs and set(convs.values()) == {jnp.dtype(jnp.bfloat16)}, outputs
    assert logits.dtype == jnp.float32  # the loss sees float32 logits
    assert _float_dtypes(captured["batch_stats"]) == {jnp.dtype(jnp.float32)}

    # The same weights in fp32: the logits agree to bfloat16's precision.
    fp32 = build_model(compose_config([*TINY, "train.precision=fp32"]), 10)
    exact = fp32.apply(variables, x, train=False)
    approx = t.model.apply(variables, x, train=False)
    scale = float(jnp.max(jnp.abs(exact)))
    np.testing.assert_allclose(approx, exact, atol=0.05 * scale + 1e-3)
    assert not np.array_equal(approx, exact)  # it did compute in bfloat16


def test_grad_accum_equals_the_whole_batch_without_batch_norm():
    # group norm normalizes per example: 4 microbatches are exactly the whole batch, split.
    t = tiny_step(["norm=group", "augment.mixup=0.2"])
    whole = jax.jit(steps.make_gradients(t.model, make_augment(t.cfg.augment), 32,
                                         t.cfg.regularization))(t.state, t.data)
    parts = jax.jit(steps.make_gradients(t.model, make_augment(t.cfg.augment), 32,
                                         t.cfg.regularization, grad_accum=4))(t.state, t.data)
    for a, b in zip(jax.tree.leaves(whole.grads), jax.tree.leaves(parts.grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(parts.metrics["count"]) == 32
    assert int(parts.metrics["correct"]) == int(whole.metrics["correct"])
    np.testing.assert_allclose(parts.metrics["loss_sum"], whole.metrics["loss_sum"], rtol=1e-5)

    one, m1 = jax.jit(_step(t, 1))(t.state, t.data)
    four, m4 = jax.jit(_step(t, 4))(t.state, t.data)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(one.step) == int(four.step) == 1  # one update, not four
    assert jax.tree.map(int, (m1["correct"], m1["count"])) == jax.tree.map(
        int, (m4["correct"], m4["count"]))


def test_grad_accum_as_a_rolled_scan_equals_the_whole_batch(monkeypatch):
    # What GPU/TPU run (steps.ACCUMULATE_LOOPS has CPU's unrolled loop only).
    monkeypatch.setattr(steps, "ACCUMULATE_LOOPS", {})
    t = tiny_step(["norm=none"])
    whole, parts = (jax.jit(steps.make_gradients(t.model, make_augment(t.cfg.augment), 32,
                                                 grad_accum=k))(t.state, t.data) for k in (1, 2))
    for a, b in zip(jax.tree.leaves(whole.grads), jax.tree.leaves(parts.grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(parts.metrics["correct"]) == int(whole.metrics["correct"])


def _lowered(platform: str, grad_accum: int) -> object:
    """The run's training chunk as traced for `platform` (one step per call: the chunk's own
    loop is then a single step)."""
    from cnnlab import parallel
    from cnnlab.training import aot

    cfg = preflight.compose([*TINY, f"train.grad_accum={grad_accum}", "train.steps_per_call=1"])
    with parallel.compiling_for([SimpleNamespace(platform=platform)]):
        lowered, _ = aot.lower(cfg, parallel.Placement.over(jax.devices()[:1]), 1 << 30)
    return lowered


def test_grad_accum_traced_for_a_gpu_is_one_rolled_loop_costed_k_times():
    """The GPU branch without a monkeypatch: the program `cnnlab compile gpu:...` and a GPU run
    trace (parallel.platform() "gpu") holds one more rolled loop with microbatches than without,
    the CPU one none (its loop unrolled); and `cnnlab compile` costs a step of it as K times
    the loop's body (XLA costs a body once), as the unrolled CPU program's every copy."""
    from cnnlab.training import aot

    loops = {(p, k): _lowered(p, k) for p in ("gpu", "cpu") for k in (1, 4)}
    whiles = {key: lowered.as_text().count("stablehlo.while") for key, lowered in loops.items()}
    assert whiles["gpu", 4] == whiles["gpu", 1] + 1 and whiles["cpu", 4] == whiles["cpu", 1]
    for platform in ("gpu", "cpu"):
        flops = {k: aot._hlo_cost(loops[platform, k].compiler_ir("hlo").get_hlo_module())["flops"]
                 * aot._costed_microbatches(platform, k) for k in (1, 4)}
        assert flops[4] == pytest.approx(flops[1], rel=0.02), platform


def test_grad_accum_traced_for_a_gpu_trains_as_the_cpu_loop(fashion_dir, tmp_path):
    """A run whose steps are traced for a GPU (its rolled microbatch loop and its convolutions,
    run here on the CPU) trains to the CPU run's parameters, batch norm's per-microbatch
    statistics included."""
    from cnnlab import parallel

    # One step per call: the CPU's unrolled program holds 4 passes, not 5 steps x 4.
    overrides = ["train.grad_accum=4", "train.steps=4", "train.steps_per_call=1",
                 "checkpoint.every=4", "train.log_every=2"]
    cpu = train_tiny(tmp_path / "cpu", fashion_dir, overrides)
    with parallel.compiling_for([SimpleNamespace(platform="gpu")]):
        gpu = train_tiny(tmp_path / "gpu", fashion_dir, overrides)
    assert cpu["status"] == gpu["status"] == "finished"
    np.testing.assert_allclose(gpu["final/train/loss"], cpu["final/train/loss"], rtol=1e-4)
    for a, b in zip(_params(tmp_path / "cpu", 4), _params(tmp_path / "gpu", 4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_grad_accum_with_batch_norm_normalizes_per_microbatch():
    t = tiny_step()
    one, _ = jax.jit(_step(t, 1))(t.state, t.data)
    four, metrics = jax.jit(_step(t, 4))(t.state, t.data)
    assert int(metrics["count"]) == 32 and np.isfinite(float(metrics["loss_sum"]))
    # Ghost batch norm: microbatch statistics, so the update differs from the whole batch's,
    # and the running statistics moved 4 times (further from their initial values).
    first = jax.tree.leaves(t.state.batch_stats)
    moved = [float(jnp.max(jnp.abs(b - a))) for a, b in zip(
        first, jax.tree.leaves(one.batch_stats), strict=True)]
    moved4 = [float(jnp.max(jnp.abs(b - a))) for a, b in zip(
        first, jax.tree.leaves(four.batch_stats), strict=True)]
    assert sum(moved4) > sum(moved)
    assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(
        jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True))


def test_bf16_run_learns_and_records_its_precision(fashion_dir, tmp_path):
    summary = train_tiny(tmp_path, fashion_dir, ["train.precision=bf16", "train.steps=40"])
    assert summary["status"] == "finished" and summary["precision"] == "bf16"
    losses = _read_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.2, losses


def test_bf16_with_grad_accum_and_batch_norm_learns(fashion_dir, tmp_path):
    summary = train_tiny(tmp_path, fashion_dir, ["train.precision=bf16", "train.grad_accum=4",
                                                 "train.steps=40"])
    assert summary["status"] == "finished"
    losses = _read_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize(("override", "message"), [
    ("train.precision=fp16", "train.precision='fp16'; valid choices: bf16, fp32"),
    ("train.grad_accum=3", "train.batch_size=32 must be a multiple of train.grad_accum=3"),
    ("train.grad_accum=0", "train.grad_accum=0 must be a positive integer"),
    ("train.grad_accum=-2", "train.grad_accum=-2 must be a positive integer"),
])
def test_bad_values_are_one_line_errors(override, message):
    cfg = compose_config(["train.batch_size=32", override])
    with pytest.raises(ConfigError) as info:
        preflight.validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_configs_saved_before_the_keys_mean_fp32_and_one_microbatch():
    assert TrainConfig().precision is None and TrainConfig().grad_accum is None
    cfg = compose_config(["train.precision=null", "train.grad_accum=null"])
    preflight.validate(cfg)
    # Like train.precision=fp32: no dtype forced on the layers (they compute in float32).
    assert compute_dtype(cfg) is None
    assert compute_dtype(compose_config(["train.precision=fp32"])) is None
    # Resuming such a run with today's defaults is no change; with others it is one.
    old = {"train": {"steps": 5}}
    assert resume.config_changes(old, {"train": {"steps": 5, "precision": "fp32",
                                                 "grad_accum": 1}}) == {}
    assert resume.config_changes(old, {"train": {"steps": 5, "precision": "bf16",
                                                 "grad_accum": 1}}) == {
        "train.precision": ["fp32", "bf16"]}


@pytest.mark.parametrize("shape, out, stride, kernel", [
    ((4, 9, 9, 3), 8, 2, 3),  # the convolution form; the input gradient's phases
    ((4, 16, 16, 8), 8, 1, 3),  # matmuls over batch tiles (conv.takes_matmul_kernel_gradient)
    ((4, 9, 9, 16), 8, 2, 1),  # one matmul (conv._pointwise_kernel_gradient)
])
def test_cpu_conv_kernel_gradient_in_bfloat16(shape, out, stride, kernel):
    from jax import lax

    from cnnlab.models.conv import conv_general_dilated

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, shape[-1], out))
    pad = (kernel // 2, kernel // 2)
    args, dn = ((stride, stride), (pad, pad)), ("NHWC", "HWIO", "NHWC")

    def loss(conv, dtype):
        return lambda x, w: jnp.sum(jnp.sin(conv(x.astype(dtype), w.astype(dtype), *args,
                                                 dimension_numbers=dn).astype(jnp.float32)))

    expected = jax.grad(loss(lax.conv_general_dilated, jnp.float32), (0, 1))(x, w)
    inner = jax.grad(lambda x, w: loss(conv_general_dilated, jnp.bfloat16)(x, w), (0, 1))
    got = inner(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == jnp.bfloat16  # custom_vjp: cotangents in the primals' dtypes
        np.testing.assert_allclose(g.astype(jnp.float32), e, atol=0.05 * float(jnp.abs(e).max()))


@pytest.mark.parametrize("model", ["lenet5", "alexnet_cifar"])
def test_stack_models_compute_in_bfloat16(model):
    # LeNet-5's subsampling layers (float32 coefficients) and sparse table conv, AlexNet's LRN.
    cfg = compose_config([f"model={model}", "train.precision=bf16", "model.dropout=0"])
    shape = (32, 32, 3) if model == "alexnet_cifar" else (28, 28, 1)
    net = build_model(cfg, 10)
    x = jnp.ones((2, *shape), jnp.bfloat16)
    variables = jax.jit(net.init, static_argnames="train")(jax.random.PRNGKey(0), x,
                                                             train=False)
    logits, captured = jax.jit(lambda v, x: net.apply(v, x, capture_intermediates=True,
                                                      mutable=["intermediates"]))(variables, x)
    assert logits.dtype == jnp.float32
    dtypes = _float_dtypes(captured["intermediates"])
    # Every layer's output is bfloat16; only the model's own output (the logits) is float32.
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    top = captured["intermediates"]["__call__"][0]
    assert top.dtype == jnp.float32
    inner = {k: v for k, v in captured["intermediates"].items() if k != "__call__"}
    assert _float_dtypes(inner) == {jnp.dtype(jnp.bfloat16)}
    assert _float_dtypes(variables["params"]) == {jnp.dtype(jnp.float32)}
