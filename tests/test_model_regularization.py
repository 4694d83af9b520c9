"""Stochastic depth (Huang et al. 2016) and dropout placement (Srivastava et al. 2014).

Expected values come from the papers' formulas written out here: the linear decay rule
p_l = 1 - (l / L)(1 - p_L), the expected depth (3L - 1) / 4 at p_L = 0.5, the test-time rule
ReLU(p_l f(x) + id(x)), and inverted dropout's 1 / (1 - rate) scaling.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnlab.errors import ConfigError
from cnnlab.models import blocks, build_model, init_variables, model_options
from cnnlab.models.layers import build_layers
from cnnlab.models.regularization import GATES_COLLECTION, StochasticDepth, linear_decay
from cnnlab.models.summary import summarize
from tests.helpers import compose_config

RESIDUAL_BLOCKS = (blocks.BasicBlock, blocks.Bottleneck)


def build(*overrides: str, num_classes: int = 10) -> nn.Module:
    return build_model(compose_config(list(overrides)), num_classes)


def traced_modules(model: nn.Module, shape: tuple[int, ...], kinds: tuple) -> list:
    """(path, module) of every module of `kinds` the model calls, in call order (no compute)."""
    found: dict[str, nn.Module] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, kinds):
            found.setdefault("/".join(module.path), module)
        return next_fun(*args, **kwargs)

    def init(x):
        with nn.intercept_methods(record):
            return model.init(jax.random.PRNGKey(0), x, train=False)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    return list(found.items())


def dropout_layers(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, float]]:
    return [(path, m.rate) for path, m in traced_modules(model, shape, (blocks.Dropout,))]


def train_pass(model: nn.Module, variables, x, key, kinds: tuple = (nn.Module,)):
    """One jitted training forward pass: logits, sown gates and {path: (input, output)} of every
    module of `kinds`."""

    @jax.jit
    def run(variables, x, key):
        io = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            if (context.method_name == "__call__" and module.path
                    and isinstance(module, kinds)):
                io["/".join(module.path)] = (args[0], out)
            return out

        with nn.intercept_methods(record):
            logits, state = model.apply(variables, x, train=True,
                                        mutable=["batch_stats", GATES_COLLECTION],
                                        rngs={"dropout": key})
        return logits, state.get(GATES_COLLECTION, {}), io

    return run(variables, x, key)


def gates_in_order(gates: dict, paths: list[str]) -> list[jax.Array]:
    """The sown keep draws of the blocks at `paths`, in that order."""
    out = []
    for path in paths:
        node = gates
        for part in path.split("/"):
            node = node[part]
        out.append(node["stochastic_depth"]["keep"][0])
    return out


# ------------------------------------------------------------------ stochastic depth: the rule
@pytest.mark.parametrize("model_name,num_blocks,size", [
    ("resnet110", 54, 32), ("resnet20", 9, 32), ("resnet50", 16, 224), ("resnet18", 8, 224)])
def test_every_block_gets_the_linear_decay_survival(model_name, num_blocks, size):
    model = build(f"model={model_name}", "model.stochastic_depth=0.5")
    shape = (size, size, 3)
    residual = traced_modules(model, shape, RESIDUAL_BLOCKS)
    gates = dict(traced_modules(model, shape, (StochasticDepth,)))
    assert len(residual) == num_blocks
    for index, (path, block) in enumerate(residual, start=1):
        expected = 1 - (index / num_blocks) * (1 - 0.5)  # p_l, linear decay, p_L = 0.5
        assert block.survival == pytest.approx(expected, abs=1e-12)
        assert gates[f"{path}/stochastic_depth"].survival == block.survival
    assert residual[-1][1].survival == pytest.approx(0.5)


def test_expected_depth_of_the_110_layer_net():
    # Huang et al. section 3: with p_L = 0.5, E[L~] = (3L - 1) / 4, "about 40" of 54 blocks.
    p = linear_decay(54, 0.5)
    assert sum(p) == pytest.approx((3 * 54 - 1) / 4) == pytest.approx(40.25)
    assert p[0] == pytest.approx(1 - 1 / 108) and p[-1] == pytest.approx(0.5)
    # Any p_L: sum p_l = L - (L + 1)(1 - p_L) / 2.
    assert sum(linear_decay(16, 0.8)) == pytest.approx(16 - 17 * 0.2 / 2)
    assert linear_decay(9, 1.0) == (1.0,) * 9


def _block_draws(mode: str, num_keys: int, batch: int = 2):
    model = build("model=resnet20", "model.width=1", "model.stochastic_depth=0.5",
                  f"model.stochastic_depth_mode={mode}")
    shape = (8, 8, 1)
    paths = [p for p, _ in traced_modules(model, shape, RESIDUAL_BLOCKS)]
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, *shape))

    @jax.jit
    @jax.vmap
    def draws(key):
        _, state = model.apply(variables, x, train=True,
                               mutable=["batch_stats", GATES_COLLECTION], rngs={"dropout": key})
        return jnp.stack([g.reshape(-1) for g in gates_in_order(state[GATES_COLLECTION], paths)])

    keys = jax.random.split(jax.random.PRNGKey(7), num_keys)
    return np.asarray(draws(keys))  # (keys, blocks, draws per block)


def test_empirical_survival_matches_the_rule_per_batch():
    n = 4000
    draws = _block_draws("batch", n)
    assert draws.shape == (n, 9, 1)  # the paper's rule: one draw per block and mini-batch
    p = np.asarray(linear_decay(9, 0.5))
    freq = draws[:, :, 0].mean(0)
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-9)
    # Blocks draw independently: P(keep 9 and keep 5) = p_9 p_5, and the active depth averages
    # sum p_l.
    both = (draws[:, 8, 0] & draws[:, 4, 0]).mean()
    assert abs(both - p[8] * p[4]) < 5 * math.sqrt(p[8] * p[4] / n)
    assert draws[:, :, 0].sum(1).mean() == pytest.approx(p.sum(), abs=0.1)


def test_empirical_survival_per_example_mode():
    n, batch = 500, 8
    draws = _block_draws("example", n, batch)
    assert draws.shape == (n, 9, batch)
    p = np.asarray(linear_decay(9, 0.5))
    freq = draws.mean((0, 2))
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / (n * batch)))
    # Examples of one batch draw separately: the last block is kept for some and not others.
    assert (draws[:, 8, :].any(1) & ~draws[:, 8, :].all(1)).mean() > 0.9


# --------------------------------------------------------- stochastic depth: one block by hand
def _layers(norm: str = "none"):
    cfg = compose_config([f"norm={norm}"])
    return build_layers(cfg.init, cfg.activation, cfg.norm)


def _conv(x, p, stride=1):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"]


def _find_keys(apply, variables, x):
    """A key whose draw keeps the branch and one that drops it."""
    found = {}
    for i in range(200):
        key = jax.random.PRNGKey(i)
        _, gates = apply(variables, x, key)
        found.setdefault(bool(gates["stochastic_depth"]["keep"][0]), key)
        if len(found) == 2:
            return found[True], found[False]
    raise AssertionError("no key both keeps and drops at p = 0.7")


def test_block_by_hand_in_training_and_at_test_time():
    lay, p = _layers(), 0.7
    block = blocks.BasicBlock(4, lay, survival=p)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 4))
    variables = block.init(jax.random.PRNGKey(1), x)
    params = variables["params"]
    branch = _conv(nn.relu(_conv(x, params["conv1"])), params["conv2"])  # f(x), no norm

    # Test time (eq. 5): ReLU(p f(x) + x).
    np.testing.assert_allclose(block.apply(variables, x), nn.relu(p * branch + x),
                               rtol=1e-5, atol=1e-5)

    @jax.jit
    def train_apply(variables, x, key):
        out, state = block.apply(variables, x, train=True, mutable=[GATES_COLLECTION],
                                 rngs={"dropout": key})
        return out, state[GATES_COLLECTION]

    kept, dropped = _find_keys(train_apply, variables, x)
    # Training: the branch unscaled when kept, the identity alone when dropped.
    np.testing.assert_allclose(train_apply(variables, x, kept)[0], nn.relu(branch + x),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(train_apply(variables, x, dropped)[0], nn.relu(x))


@pytest.mark.parametrize("option", ["A", "B"])
def test_dropped_downsampling_block_is_its_shortcut_alone(option):
    lay = _layers("batch")
    block = blocks.BasicBlock(8, lay, stride=2, shortcut=option, survival=0.7)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 4))
    variables = block.init(jax.random.PRNGKey(1), x)

    @jax.jit
    def train_apply(variables, x, key):
        out, state = block.apply(variables, x, train=True,
                                 mutable=["batch_stats", GATES_COLLECTION],
                                 rngs={"dropout": key})
        return out, state[GATES_COLLECTION]

    _, dropped = _find_keys(train_apply, variables, x)
    shortcut = blocks.Shortcut(8, 2, lay, option)
    sub = {k: v["shortcut"] for k, v in variables.items() if "shortcut" in v}
    expected, _ = shortcut.apply(sub, x, train=True, mutable=["batch_stats"])
    assert expected.shape == (4, 4, 4, 8)
    # Equal up to float rounding: XLA fuses the jitted block's ops differently.
    np.testing.assert_allclose(train_apply(variables, x, dropped)[0], nn.relu(expected),
                               rtol=1e-6, atol=1e-6)


def test_per_example_gate_mixes_kept_and_dropped_examples():
    lay, p = _layers(), 0.5
    block = blocks.BasicBlock(4, lay, survival=p, per_example=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 5, 5, 4))
    variables = block.init(jax.random.PRNGKey(1), x)
    out, state = block.apply(variables, x, train=True, mutable=[GATES_COLLECTION],
                             rngs={"dropout": jax.random.PRNGKey(3)})
    keep = np.asarray(state[GATES_COLLECTION]["stochastic_depth"]["keep"][0]).reshape(-1)
    assert keep.shape == (64,) and 0 < keep.sum() < 64
    branch = _conv(nn.relu(_conv(x, variables["params"]["conv1"])), variables["params"]["conv2"])
    np.testing.assert_array_equal(np.asarray(out)[~keep], nn.relu(x)[~keep])
    np.testing.assert_allclose(np.asarray(out)[keep], nn.relu(branch + x)[keep],
                               rtol=1e-5, atol=1e-5)
    # At test time the per-example mode is the same rule: every branch scaled by p.
    np.testing.assert_allclose(block.apply(variables, x), nn.relu(p * branch + x),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------- stochastic depth: off, gradients, the model
def test_p_last_one_is_the_unchanged_model():
    shape = (16, 16, 3)
    small = ("model=resnet20", "model.depth=8", "model.width=4")
    default = build(*small)
    explicit = build(*small, "model.stochastic_depth=1.0", "model.stochastic_depth_mode=example")
    assert traced_modules(explicit, shape, (StochasticDepth,)) == []
    variables = init_variables(default, jax.random.PRNGKey(0), shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *shape))

    def train(model):
        # No `dropout` key: a model that drew anything would fail here.
        return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
            variables, x)

    (a, stats_a), (b, stats_b) = train(default), train(explicit)
    np.testing.assert_array_equal(a, b)
    assert jax.tree.all(jax.tree.map(np.array_equal, stats_a, stats_b))
    # p_L < 1 adds no parameters and changes no initial values.
    dropped = build(*small, "model.stochastic_depth=0.5")
    other = init_variables(dropped, jax.random.PRNGKey(0), shape)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, other))


def test_gradient_flows_only_through_kept_branches():
    # Depth 8: three blocks, survival 5/6, 4/6, 3/6; the last two downsample with projections.
    model = build("model=resnet20", "model.depth=8", "model.width=2", "model.shortcut=B",
                  "model.stochastic_depth=0.5")
    shape = (16, 16, 1)
    paths = [p for p, _ in traced_modules(model, shape, RESIDUAL_BLOCKS)]
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *shape))
    labels = jnp.arange(4)

    @jax.jit
    def grads(key):
        def loss(params):
            logits, state = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats", GATES_COLLECTION],
                                        rngs={"dropout": key})
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, state[GATES_COLLECTION]
        return jax.grad(loss, has_aux=True)(variables["params"])

    for i in range(100):
        g, gates = grads(jax.random.PRNGKey(i))
        keep = [bool(k) for k in gates_in_order(gates, paths)]
        # Wanted: a kept block and a dropped one with a projection shortcut.
        if keep[0] and not keep[2]:
            break
    assert any(keep) and not all(keep)
    for path, kept in zip(paths, keep, strict=True):
        branch = {k: v for k, v in g[path].items() if k != "shortcut"}
        nonzero = [bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(branch)]
        assert all(nonzero) if kept else not any(nonzero), (path, kept)
        if "shortcut" in g[path]:  # the projection is on the path either way
            assert all(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(g[path]["shortcut"]))


@pytest.mark.parametrize("overrides,message", [
    (["model=resnet20", "model.stochastic_depth=0"], "must be in (0, 1]"),
    (["model=resnet20", "model.stochastic_depth=1.5"], "must be in (0, 1]"),
    (["model=resnet50", "model.stochastic_depth=-0.5"], "must be in (0, 1]"),
    (["model=resnet20", "model.stochastic_depth_mode=layer"], "valid choices: batch, example"),
    (["model=plain20", "model.stochastic_depth=0.5"], "plain net"),
    (["model=plain50", "model.stochastic_depth=0.5"], "model.residual=false"),
    (["model=vgg_d", "model.stochastic_depth=0.5"], "has none"),
    (["model=googlenet", "model.stochastic_depth=0.5"], "has none"),
])
def test_stochastic_depth_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match="model.stochastic_depth") as error:
        model_options(compose_config(overrides).model)
    assert message in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------- dropout
def test_flax_dropout_is_inverted_dropout():
    x = jnp.ones((400_000,))
    layer = blocks.Dropout(0.3)
    y = np.asarray(layer.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)}))
    assert (y == 0).mean() == pytest.approx(0.3, abs=0.005)
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)  # kept units scaled by 1/(1-p)
    assert y.mean() == pytest.approx(1.0, abs=0.01)  # so the expected activation is unchanged
    np.testing.assert_array_equal(layer.apply({}, x, train=False), x)  # identity at test time


# The models' own dropout, as their papers place it: unchanged by default.
DEFAULT_DROPOUT = {
    "alexnet": [("drop6", 0.5), ("drop7", 0.5)],
    "vgg_d": [("dropout1", 0.5), ("dropout2", 0.5)],
    "vgg_a_cifar": [("dropout1", 0.5)],
    "googlenet": [("aux1/dropout", 0.7), ("aux2/dropout", 0.7), ("dropout", 0.4)],
    "lenet5": [], "resnet50": [], "plain18": [], "resnet20": [], "plain56": [],
}


@pytest.mark.parametrize("model_name", sorted(DEFAULT_DROPOUT))
def test_defaults_keep_each_papers_dropout(model_name):
    cfg = compose_config([f"model={model_name}"])
    size = cfg.model.input_size or 32
    assert dropout_layers(build_model(cfg, 10), (size, size, 3)) == DEFAULT_DROPOUT[model_name]


CONV5 = [(f"conv{i}_dropout", 0.1) for i in range(1, 6)]
PLACED = [
    (["model=alexnet", "model.dropout_at.conv=0.1"], 227,
     [*CONV5, ("drop6", 0.5), ("drop7", 0.5)]),
    (["model=alexnet", "model.dropout=0.3"], 227, [("drop6", 0.5), ("drop7", 0.5)]),
    (["model=vgg_a_cifar", "model.dropout_at.stage=0.2", "model.dropout=0.4"], 32,
     [(f"maxpool{i}_dropout", 0.2) for i in range(1, 6)] + [("dropout1", 0.4)]),
    (["model=lenet5", "model.dropout_at.conv=0.1"], 32,
     [("C1_dropout", 0.1), ("C3_dropout", 0.1), ("C5_dropout", 0.1)]),
    # F6 is the last hidden fc and the head position: one dropout, the head's rate.
    (["model=lenet5", "model.dropout_at.fc=0.5"], 32, [("F6_dropout", 0.5)]),
    (["model=lenet5", "model.dropout_at.fc=0.5", "model.dropout_at.head=0.2"], 32,
     [("F6_dropout", 0.2)]),
    (["model=resnet50", "model.dropout_at.stage=0.1"], 224,
     [(f"{n}_dropout", 0.1) for n in ("pool1", "conv2_3", "conv3_4", "conv4_6", "conv5_3")]),
    (["model=resnet18", "model.dropout_at.head=0.3"], 224, [("global_avgpool1_dropout", 0.3)]),
    (["model=resnet50", "model.dropout_at.block=0.2"], 224,
     [(f"conv{s}_{b}/dropout", 0.2) for s, n in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True)
      for b in range(1, n + 1)]),
    (["model=plain18", "model.dropout_at.block=0.3"], 224,
     [(f"conv{s}_{b}/dropout", 0.3) for s in (2, 3, 4, 5) for b in (1, 2)]),
    (["model=resnet20", "model.dropout_at.head=0.2"], 32, [("head_dropout", 0.2)]),
    (["model=resnet20", "model.dropout_at.stage=0.1", "model.dropout_at.block=0.3"], 32,
     [x for s in (1, 2, 3) for x in [(f"stage{s}_block{b}/dropout", 0.3) for b in (1, 2, 3)]
      + [(f"stage{s}_dropout", 0.1)]]),
    (["model=plain20", "model.dropout_at.block=0.3", "model.dropout_at.head=0.5"], 32,
     [(f"stage{s}_block{b}/dropout", 0.3) for s in (1, 2, 3) for b in (1, 2, 3)]
     + [("head_dropout", 0.5)]),
]


@pytest.mark.parametrize("overrides,size,expected", PLACED,
                         ids=[" ".join(o) for o, _, _ in PLACED])
def test_dropout_appears_exactly_where_configured(overrides, size, expected):
    assert dropout_layers(build(*overrides), (size, size, 3)) == expected


@pytest.mark.parametrize("overrides,message", [
    (["model=resnet20", "model.dropout_at.block=1.0"], "model.dropout_at.block=1.0 must be in"),
    (["model=vgg_d", "model.dropout_at.conv=-0.1"], "model.dropout_at.conv=-0.1 must be in"),
    (["model=resnet20", "model.dropout_at.fc=0.5"], "no 'fc' places; valid: stage, head, block"),
    (["model=resnet20", "model.dropout_at.conv=0.1"], "no 'conv' places"),
    (["model=resnet50", "model.dropout_at.fc=0.5"], "has no hidden fc layers"),
    (["model=vgg_d", "model.dropout_at.block=0.3"], "no residual blocks"),
    (["model=alexnet", "model.dropout_at.fc=0.5"], "its own dropout entry at every such place"),
    (["model=googlenet", "model.dropout_at.head=0.5"], "its own dropout entry"),
])
def test_dropout_placement_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match="model.dropout_at") as error:
        model_options(compose_config(overrides).model)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_dropout_place_is_refused_by_the_schema():
    with pytest.raises(Exception, match="dropout_at.haed"):
        compose_config(["model=resnet20", "model.dropout_at.haed=0.1"])


def _check_rates(io: dict, expected: dict[str, float]) -> None:
    """Each dropout zeroes a `rate` share of its nonzero inputs and scales the rest by
    1 / (1 - rate)."""
    assert set(io) == set(expected)
    for path, (inputs, outputs) in io.items():
        rate, inputs, outputs = expected[path], np.asarray(inputs), np.asarray(outputs)
        live = inputs != 0  # ReLU outputs that are already zero tell nothing
        dropped = (outputs[live] == 0).mean()
        assert abs(dropped - rate) < 5 * math.sqrt(rate * (1 - rate) / live.sum()) + 1e-3, path
        kept = outputs != 0
        np.testing.assert_allclose(outputs[kept], inputs[kept] / (1 - rate), rtol=1e-5)


@pytest.mark.parametrize("overrides,size,rates", [
    (["model=resnet20", "model.depth=8", "model.width=4", "model.dropout_at.block=0.3",
      "model.dropout_at.stage=0.1", "model.dropout_at.head=0.2"], 16,
     {**{f"stage{s}_block1/dropout": 0.3 for s in (1, 2, 3)},
      **{f"stage{s}_dropout": 0.1 for s in (1, 2, 3)}, "head_dropout": 0.2}),
    (["model=lenet5", "model.dropout_at.conv=0.1", "model.dropout_at.stage=0.25",
      "model.dropout_at.fc=0.5"], 32,
     {"C1_dropout": 0.1, "S2_dropout": 0.25, "C3_dropout": 0.1, "S4_dropout": 0.25,
      "C5_dropout": 0.1, "F6_dropout": 0.5}),
])
def test_rates_numerically_and_eval_is_identity(overrides, size, rates):
    model = build(*overrides)
    base = build(*[o for o in overrides if "dropout_at" not in o])
    shape = (size, size, 3)
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, *shape))
    _, _, io = train_pass(model, variables, x, jax.random.PRNGKey(2), (blocks.Dropout,))
    _check_rates(io, rates)
    # At test time the dropout layers are the identity: the model equals the one without them.
    np.testing.assert_array_equal(jax.jit(model.apply)(variables, x),
                                  jax.jit(base.apply)(variables, x))


def test_train_outputs_differ_only_after_the_configured_place():
    shape = (16, 16, 3)
    small = ("model=resnet20", "model.depth=8", "model.width=4")
    placed = build(*small, "model.dropout_at.head=0.5")
    base = build(*small)
    variables = init_variables(base, jax.random.PRNGKey(0), shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *shape))
    key = jax.random.PRNGKey(2)
    logits_a, _, io_a = train_pass(placed, variables, x, key)
    logits_b, _, io_b = train_pass(base, variables, x, key)
    assert set(io_a) - set(io_b) == {"head_dropout", "head_dropout/Dropout_0"}
    for path, (_, out) in io_b.items():
        same = bool(np.array_equal(out, io_a[path][1]))
        assert same == (path != "head"), path  # only the classifier sees the dropped units
    assert not np.array_equal(logits_a, logits_b)

    # Inside the blocks: conv1 of the first block is untouched, its second conv sees the drop.
    inside = build(*small, "model.dropout_at.block=0.3")
    _, _, io_c = train_pass(inside, variables, x, key)
    np.testing.assert_array_equal(io_c["stage1_block1/conv1"][1], io_b["stage1_block1/conv1"][1])
    assert not np.array_equal(io_c["stage1_block1/conv2"][1], io_b["stage1_block1/conv2"][1])


# --------------------------------------------------------------------- summary and training
@pytest.mark.parametrize("model_name,extra,dataset", [
    ("resnet20", ["model.dropout_at.block=0.3", "model.dropout_at.head=0.2",
                  "model.dropout_at.stage=0.1", "model.stochastic_depth_mode=example"],
     "cifar10"),
    ("resnet50", ["model.dropout_at.block=0.2", "model.dropout_at.stage=0.1"], "imagenet"),
])
def test_summary_counts_are_unchanged_and_shows_the_gates(model_name, extra, dataset):
    def summary(*overrides):
        cfg = compose_config([f"model={model_name}", f"dataset={dataset}", *overrides])
        return summarize(build_model(cfg, cfg.dataset.num_classes),
                         tuple(cfg.dataset.image_shape), model_name)

    base, regularized = summary(), summary("model.stochastic_depth=0.5", *extra)
    assert (regularized.params, regularized.macs) == (base.params, base.macs)
    table = regularized.to_table(depth=2)
    assert "stochastic depth 0.5" in table and "dropout" in table
    assert "stochastic depth" not in base.to_table(depth=2)
