"""`model.scan_blocks`: repeated residual blocks as one scan (cnnlab.models.scan).

The scanned model must be the unrolled one computed differently: same variables, same outputs,
gradients and batch statistics (float64, so only the order of sums may differ), a checkpoint of
either loads into the other, and its compiled program does not grow with depth.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.models import build_model, init_variables
from cnnlab.models.scan import unrolled
from cnnlab.models.stack import repeats
from tests.helpers import compose_config, saved_state, train_tiny

TINY_CIFAR = ["model=resnet20", "model.width=4"]
TINY_STACK = ["model.width=0.0625"]


def _models(overrides: list[str]) -> tuple:
    cfg = compose_config(overrides)
    scanned = compose_config([*overrides, "model.scan_blocks=true"])
    return build_model(cfg, 10), build_model(scanned, 10)


def _forward(model, variables, x, train: bool, rngs=None):
    """(sum of squared logits, (logits, mutable collections)) as one differentiable function."""
    def loss(params):
        out = model.apply({**variables, "params": params}, x, train=train,
                          mutable=["batch_stats", "intermediates"] if train else False,
                          rngs=rngs or {})
        logits, state = out if train else (out, {})
        return jnp.sum(logits ** 2), (logits, state)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def _assert_trees_close(a, b, what: str, rtol: float = 1e-10) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * 1e-2,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


# Training mode runs every path test mode does (batch statistics instead of running ones).
@pytest.mark.parametrize("overrides, shape, modes", [
    (TINY_CIFAR, (8, 8, 3), (False, True)),
    pytest.param(["model=resnet50", *TINY_STACK, "model.shortcut=A"], (16, 16, 3), (True,),
                 marks=pytest.mark.slow),  # the same scan over bottleneck blocks: a long compile
], ids=["cifar_resnet20", "resnet50_bottleneck"])
def test_scanned_blocks_compute_what_unrolled_blocks_do(overrides, shape, modes):
    with jax.enable_x64(True):
        plain, scanned = _models(overrides)
        variables = init_variables(plain, jax.random.PRNGKey(0), shape)
        # Initialization unrolls either way: one seed, one set of weights (the scanned model's
        # is run op by op, not compiled, which may round a float32 draw one ulp differently).
        _assert_trees_close(variables, init_variables(scanned, jax.random.PRNGKey(0), shape),
                            "init", rtol=1e-6)
        variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
        x = jax.random.normal(jax.random.PRNGKey(1), (4, *shape), jnp.float64)
        for train in modes:
            (loss, (logits, state)), grads = _forward(plain, variables, x, train)
            (loss_s, (logits_s, state_s)), grads_s = _forward(scanned, variables, x, train)
            np.testing.assert_allclose(logits_s, logits, rtol=1e-10)
            _assert_trees_close(grads_s, grads, f"gradients (train={train})")
            # Batch statistics come back under each block's own name.
            _assert_trees_close(state_s, state, "updated batch statistics")


def test_stochastic_depth_under_a_scan_gates_each_block_and_scales_at_test_time():
    overrides = [*TINY_CIFAR, "model.stochastic_depth=0.5"]
    with jax.enable_x64(True):
        plain, scanned = _models(overrides)
        variables = jax.tree.map(lambda v: v.astype(jnp.float64),
                                 init_variables(plain, jax.random.PRNGKey(0), (8, 8, 3)))
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3), jnp.float64)
        # Test time: every branch scaled by its own survival probability, as unrolled.
        np.testing.assert_allclose(scanned.apply(variables, x), plain.apply(variables, x),
                                   rtol=1e-10)

        def gates(model, key):
            _, state = model.apply(variables, x, train=True, rngs={"dropout": key},
                                   mutable=["batch_stats", "intermediates"])
            return state["intermediates"]

        keys = jax.random.split(jax.random.PRNGKey(2), 8)
        drawn = jax.jit(jax.vmap(lambda key: gates(scanned, key)))(keys)
        # Sown under each block's own name, as unrolled.
        assert jax.tree.structure(drawn) == jax.tree.structure(
            jax.eval_shape(lambda: gates(plain, keys[0])))
    draws = np.stack([np.asarray(g).reshape(8) for g in jax.tree.leaves(drawn)], axis=1)
    assert set(np.unique(draws)) <= {0.0, 1.0}
    # Each block draws its own gate: over 8 draws, the 9 blocks' do not all agree.
    assert len({tuple(column) for column in draws.T}) > 1


def test_repeated_blocks_are_found_per_stage():
    """He et al. 2016, Table 1: ResNet-34 has 3, 4, 6 and 3 basic blocks per stage; each
    stage's first block changes width or stride, so 2, 3, 5 and 2 repeat it."""
    cfg = compose_config(["model=resnet34"])
    from cnnlab.models import model_options

    body, head = model_options(cfg.model).specs()
    specs = body + head
    runs = [repeats(specs, i, set()) for i in range(len(specs))]
    starts = [(specs[i - 1].name, n) for i, n in enumerate(runs) if n and runs[i - 1] == 0]
    assert [n for _, n in starts] == [2, 3, 5, 2]
    # A dropout after a block ends its run there.
    cut = specs[[s.name for s in specs].index(starts[2][0]) + 2].name
    assert repeats(specs, [s.name for s in specs].index(starts[2][0]) + 1, {cut}) == 2


def _convolutions(model, shape: tuple[int, ...]) -> int:
    """Convolutions in the traced training step: what XLA compiles."""
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    x = jnp.zeros((2, *shape))

    def step(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(logits)

    text = str(jax.make_jaxpr(jax.grad(step))(variables["params"]))
    return text.count("conv_general_dilated")


def test_the_scanned_program_does_not_grow_with_depth():
    counts = {}
    for depth in (20, 56):
        plain, scanned = _models([*TINY_CIFAR, f"model.depth={depth}"])
        counts[depth] = _convolutions(plain, (8, 8, 3)), _convolutions(scanned, (8, 8, 3))
    assert counts[56][0] > 2 * counts[20][0]  # unrolled: every block is compiled
    assert counts[56][1] == counts[20][1] < counts[20][0]


def test_per_module_tools_see_every_block():
    _, scanned = _models(TINY_CIFAR)
    assert unrolled(scanned).options.scan_blocks is False and scanned.options.scan_blocks is True
    from cnnlab.models.summary import summarize

    rows = [row.name for row in summarize(scanned, (8, 8, 3)).rows]
    assert {f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)} <= set(rows)


def _params(run_dir, step: int) -> dict:
    restored = saved_state(run_dir / "checkpoints" / str(step))
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(restored["params"])}


def test_a_scanned_run_resumes_unrolled_from_its_checkpoint(fashion_dir, tmp_path):
    common = ["model.depth=14", "train.log_every=5"]
    scanned, resumed = tmp_path / "scanned", tmp_path / "resumed"
    train_tiny(scanned, fashion_dir, [*common, "model.scan_blocks=true"])
    shutil.copytree(scanned, resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    (resumed / "summary.json").unlink()
    summary = train_tiny(resumed, fashion_dir, [*common, "model.scan_blocks=false"])
    assert summary["resumed_from"] == 10 and summary["status"] == "finished"

    def losses(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {e["step"]: e["train/loss"] for e in map(json.loads, lines) if "train/loss" in e}

    a, b = losses(scanned), losses(resumed)
    assert a.keys() == b.keys() == {5, 10, 15, 20}
    np.testing.assert_allclose([b[s] for s in (15, 20)], [a[s] for s in (15, 20)], rtol=1e-4)
    final, final_resumed = _params(scanned, 20), _params(resumed, 20)
    assert final.keys() == final_resumed.keys()
    for key in final:
        np.testing.assert_allclose(final_resumed[key], final[key], rtol=1e-3, atol=1e-5,
                                   err_msg=key)


@pytest.mark.parametrize("name", ["resnet56", "plain56"])
def test_the_56_layer_nets_scan_their_blocks_on_accelerators_only(name):
    """Their `model.scan_blocks: null` unrolls the blocks on CPU (faster steps, less memory)
    and scans them in a model built for GPU or TPU (fewer collectives, a shorter compile), as
    `cnnlab compile` builds it for a target (parallel.compiling_for); true or false forces."""
    import types

    from cnnlab import parallel
    from cnnlab.models import build_model
    from cnnlab.models.scan import scans_blocks

    def scans(overrides: list[str], platform: str | None) -> bool:
        cfg = compose_config([f"model={name}", *overrides])
        if platform is None:
            return scans_blocks(build_model(cfg, 10))
        with parallel.compiling_for([types.SimpleNamespace(platform=platform)]):
            return scans_blocks(build_model(cfg, 10))

    assert compose_config([f"model={name}"]).model.scan_blocks is None
    assert [scans([], p) for p in (None, "gpu", "tpu")] == [False, True, True]
    assert scans(["model.scan_blocks=true"], None) and not scans(["model.scan_blocks=false"],
                                                                  "tpu")


def test_a_pattern_net_does_not_claim_scanned_blocks():
    """The pattern family builds a stack with no residual blocks: its options must say
    scan_blocks=false, not leave it MISSING ('???', which is truthy and sent its init down the
    scanned models' path)."""
    from cnnlab.models import build_model
    from cnnlab.models.scan import scans_blocks

    assert scans_blocks(build_model(compose_config(["model=pattern"]), 10)) is False


def test_stacking_a_state_for_a_chunk_round_trips_it_exactly():
    """A chunk stacks the runs' variables wherever the state holds them (params, optimizer
    state, moving averages) and gives them back under their own names, unchanged."""
    import optax

    from cnnlab.models.scan import stack_runs, stacked_name, unstack_runs

    run = ("b2", "b3", "b4")
    params = {name: {"kernel": np.full((2, 3), float(i)), "bias": np.arange(3.0) + i}
              for i, name in enumerate(("b1", *run))}
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(0.9))
    state = {"params": params, "opt": tx.init(params),
             "ema": optax.ema(0.9).init({"params": params}),
             # Not the whole run: left as it is.
             "partial": {"b2": np.ones(1), "b3": np.ones(1)}}
    stacked = stack_runs(state, [run])
    key = stacked_name(run)
    assert set(stacked["params"]) == {"b1", key} and set(stacked["partial"]) == {"b2", "b3"}
    np.testing.assert_array_equal(stacked["params"][key]["kernel"][:, 0, 0], [1.0, 2.0, 3.0])
    assert set(stacked["opt"][1].trace) == {"b1", key}
    assert set(stacked["ema"].ema["params"]) == {"b1", key}
    back = unstack_runs(stacked, [run])
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def _chunks(depth: int) -> tuple:
    """A tiny scanned CIFAR ResNet's training chunk with the runs stacked through its steps and
    without, its first state and data."""
    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.training import build, steps

    cfg = compose_config([*TINY_CIFAR, f"model.depth={depth}", "model.scan_blocks=true",
                          "dataset=cifar10", "train.batch_size=4", "eval.ema_decay=0.9",
                          "regularization.l2=1e-3", "optimizer.weight_decay=1e-4"])
    run = build.build(cfg, synthetic_dataset(16, (8, 8, 3), 10))
    step = steps.make_train_step(run.model, run.tx, run.augment, 4, cfg.regularization,
                                 cfg.eval.ema_decay)
    return (steps.make_train_chunk(step, stack_blocks=True), steps.make_train_chunk(step),
            run.state, run.chunk_data(0, 2))


def _step_size(chunk, state, data) -> int:
    """Operations in one training step of the chunk (the body of its loop over steps)."""
    closed = jax.make_jaxpr(chunk, static_argnums=2)(state, data, 2)
    inner = closed.jaxpr.eqns[0].params["jaxpr"].jaxpr
    (loop,) = [eqn for eqn in inner.eqns if eqn.primitive.name == "scan"]
    return len(loop.params["jaxpr"].jaxpr.eqns)


def test_a_chunk_keeps_scanned_blocks_stacked_through_its_steps():
    """With the runs stacked for the whole chunk the steps do what they did with the stacking
    inside each step (up to float32 rounding: the weight penalty sums in another order), and a
    step's program no longer grows with depth (no stacking, write-back or per-block update in
    it)."""
    sizes = {}
    for depth in (56, 20):
        chunk, plain, state, data = _chunks(depth)
        sizes[depth] = _step_size(chunk, state, data), _step_size(plain, state, data)
    assert sizes[56][0] == sizes[20][0] < sizes[20][1] < sizes[56][1]
    copy = jax.tree.map(jnp.copy, state)
    stacked, sums = chunk(state, data, 2)
    unstacked, plain_sums = plain(copy, data, 2)
    _assert_trees_close(stacked, unstacked, "state after 2 steps", rtol=1e-5)
    _assert_trees_close(sums, plain_sums, "metrics", rtol=1e-5)
