"""`cnnlab viz`: each computation against an independent answer, and the command end to end."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.data.preprocess import PreprocessStats
from cnnlab.models import blocks
from cnnlab.viz import draw_ascent
from cnnlab.viz.ascent import ascend
from cnnlab.viz.gradients import class_score, input_gradients, saliency_map
from cnnlab.viz.neighbors import nearest
from cnnlab.viz.network import Network, model_factory
from cnnlab.viz.occlusion import occlusion_maps
from cnnlab.viz.options import VizOptions
from cnnlab.viz.receptive import Geometry, layer_geometry
from tests.helpers import compose_config, read_wandb_records, run_cli, train_tiny


class Linear(nn.Module):
    """A dense layer on the flattened input."""

    classes: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dense(self.classes, name="dense")(x.reshape(len(x), -1))


class ReluThenDense(nn.Module):
    """score = W relu(x): a ReLU right on the input, so its masks are visible at the input."""

    act: object = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dense(3, name="dense")((self.act or nn.relu)(x).reshape(len(x), -1))


def network_of(module_for_act, shape: tuple[int, int, int], classes: int) -> Network:
    variables = jax.jit(module_for_act(None).init)(jax.random.PRNGKey(1), jnp.zeros((1, *shape)))
    # No preprocessing: the gradients are the model's own.
    return Network(module_for_act, variables, PreprocessStats(), shape, classes)


def test_saliency_of_a_linear_model_is_its_weight_row():
    network = network_of(lambda act: Linear(), (5, 6, 3), 4)
    pixels = jax.random.uniform(jax.random.PRNGKey(2), (4, 5, 6, 3))
    targets = jnp.array([0, 1, 2, 3])
    maps = saliency_map(network.jit(lambda net, p: input_gradients(
        net, p, class_score(targets), "saliency"))(pixels))
    weights = np.asarray(network.variables["params"]["dense"]["kernel"]).reshape(5, 6, 3, 4)
    for i, t in enumerate(targets):
        np.testing.assert_allclose(maps[i], np.abs(weights[..., t]).max(axis=-1), rtol=1e-6)


def _gradients(network: Network, pixels: jax.Array, method: str) -> np.ndarray:
    score = class_score(jnp.zeros(len(pixels), jnp.int32))
    return np.asarray(network.jit(
        lambda net, p: input_gradients(net, p, score, method))(pixels))


def test_guided_backprop_and_deconvnet_change_relu_gradients_exactly_at_the_masks():
    network = network_of(lambda act: ReluThenDense(act), (4, 4, 2), 3)
    pixels = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 2))
    plain, guided, deconv = (_gradients(network, pixels, m)
                             for m in ("saliency", "guided_backprop", "deconvnet"))
    w = np.asarray(network.variables["params"]["dense"]["kernel"])[:, 0].reshape(4, 4, 2)
    x = np.asarray(pixels)
    np.testing.assert_allclose(plain, w * (x > 0), rtol=1e-6)
    # Guided: also zero where the incoming gradient (w) is negative, and only there.
    masked = (x > 0) & (w < 0)
    assert masked.any() and (plain[masked] != 0).all()
    np.testing.assert_array_equal(guided[masked], 0)
    np.testing.assert_allclose(guided[~masked], plain[~masked], rtol=1e-6)
    # Deconvnet: relu(gradient), whatever the forward input.
    np.testing.assert_allclose(deconv, np.broadcast_to(np.maximum(w, 0), x.shape), rtol=1e-6)


def test_guided_backprop_is_the_gradient_of_a_run_without_relus_and_not_with_them():
    """Through the run's own model (LeNet-5 built from its config): only ReLUs are swapped."""
    pixels = jax.random.uniform(jax.random.PRNGKey(4), (2, 28, 28, 1))
    gradients = {}
    for activation in ("tanh", "relu"):
        cfg = compose_config(["model=lenet5", "dataset=fashion_mnist", "norm=none",
                              f"activation={activation}"])
        network = network_of(model_factory(cfg, 10), (28, 28, 1), 10)
        gradients[activation] = [_gradients(network, pixels, m)
                                 for m in ("saliency", "guided_backprop")]
    plain, guided = gradients["tanh"]
    np.testing.assert_array_equal(guided, plain)
    plain, guided = gradients["relu"]
    assert np.abs(plain).max() > 0 and not np.allclose(guided, plain)


def test_gradient_ascent_raises_the_score_and_l2_shrinks_the_image():
    direction = jax.random.normal(jax.random.PRNGKey(5), (8, 8, 3))

    def objective(pixels: jax.Array) -> jax.Array:  # a linear score plus a bump
        return jnp.sum(pixels * direction, axis=(1, 2, 3)) - jnp.sum(pixels**2, axis=(1, 2, 3))

    mean = jnp.full((3,), 0.5)
    norms = []
    for l2 in (1e-3, 0.2):
        settings = draw_ascent.settings(VizOptions(steps=40, lr=0.02, l2=l2, seed=7))
        pixels, history = jax.jit(lambda s=settings: ascend(objective, mean, (2, 8, 8, 3), s))()
        assert (history[-1] > history[0]).all()
        assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1
        norms.append(float(jnp.linalg.norm(pixels - mean)))
        again, _ = jax.jit(lambda s=settings: ascend(objective, mean, (2, 8, 8, 3), s))()
        np.testing.assert_array_equal(again, pixels)  # seeded: the same image
    assert norms[1] < norms[0]


def test_occluding_what_the_model_ignores_leaves_the_probability_unchanged():
    weights = jax.random.normal(jax.random.PRNGKey(6), (4 * 4, 5))

    def probabilities(pixels: jax.Array) -> jax.Array:  # reads the top-left 4x4 corner only
        return jax.nn.softmax(pixels[:, :4, :4, 0].reshape(len(pixels), -1) @ weights)

    pixels = jax.random.uniform(jax.random.PRNGKey(7), (3, 12, 12, 1))
    targets = jnp.array([0, 2, 4])
    maps = np.asarray(jax.jit(lambda p, t: occlusion_maps(probabilities, p, t, 3, 1, 0.5))(
        pixels, targets))
    base = np.asarray(probabilities(pixels))[np.arange(3), targets]
    assert maps.shape == (3, 10, 10)
    ys, xs = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    touches_corner = (ys < 4) & (xs < 4)  # a 3x3 square at (y, x) covers rows y..y+2
    # Unchanged up to float rounding: the batched, jitted matmul may round differently on
    # another CPU; a real change (below) is thousands of times larger.
    np.testing.assert_allclose(maps[:, ~touches_corner], np.repeat(
        base[:, None], (~touches_corner).sum(), axis=1), rtol=1e-5, atol=0)
    assert (np.abs(maps[:, touches_corner] / base[:, None] - 1) > 1e-3).all()


def test_nearest_neighbours_agree_with_brute_force():
    rng = np.random.default_rng(8)
    base = rng.integers(0, 256, (1000, 7, 7, 1), dtype=np.uint8)
    queries = rng.integers(0, 256, (5, 7, 7, 1), dtype=np.uint8)
    d2, ids = jax.jit(nearest, static_argnames=("k", "chunk"))(queries, base, k=4, chunk=300)
    flat = base.reshape(1000, -1).astype(np.float64)
    brute = ((queries.reshape(5, 1, -1) - flat[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(brute, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(np.asarray(d2), np.sort(brute, axis=1)[:, :4], rtol=1e-5)


class ConvPoolConv(nn.Module):
    """conv 3x3/1 (pad 1) -> maxpool 2/2 -> conv 3x3/1 (pad 1), all-ones kernels: a unit is
    positive exactly when a bright pixel lies in its receptive field."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ones = nn.initializers.ones
        x = nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), kernel_init=ones, name="a")(x)
        x = blocks.Pool("max", 2, 2, 0, name="pool")(x)
        return nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), kernel_init=ones, name="b")(x)


def test_the_patch_of_a_maximal_activation_contains_its_location():
    model = ConvPoolConv()
    # By hand: size 3, then 3 + 1 = 4 with jump 2, then 4 + 2 * 2 = 8; offset -1, -1, -1 - 2.
    geometry = layer_geometry(model, (16, 16, 1), "b")
    assert geometry == Geometry((-3.0, -3.0), (2.0, 2.0), (8.0, 8.0))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
    rng = np.random.default_rng(9)
    for y, x in rng.integers(0, 16, (10, 2)):
        image = np.zeros((1, 16, 16, 1), np.float32)
        image[0, y, x] = 1.0
        out = np.asarray(model.apply(variables, image))[0, ..., 0]
        row, col = np.unravel_index(out.argmax(), out.shape)
        top, left, bottom, right = geometry.box(row, col)
        assert top <= y < bottom and left <= x < right
        # And every unit whose field misses the pixel is silent.
        for r, c in zip(*np.nonzero(out), strict=True):
            t, lft, b, rgt = geometry.box(r, c)
            assert t <= y < b and lft <= x < rgt


def test_resnet_receptive_fields_follow_the_main_path():
    model = model_factory(compose_config(["model=resnet20", "dataset=fashion_mnist"]), 10)(None)
    # stem 3; each 3x3 conv adds 2 x jump; stage 2's first conv doubles the jump.
    assert layer_geometry(model, (28, 28, 1), "stage1_block1").size == (7.0, 7.0)
    assert layer_geometry(model, (28, 28, 1), "stage2_block1").size == (21.0, 21.0)
    assert layer_geometry(model, (28, 28, 1), "stage2_block1").jump == (2.0, 2.0)


def test_viz_filters_of_a_tiny_run_writes_pngs_and_logs_them_to_wandb(tmp_path: Path,
                                                                      fashion_dir: Path):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, fashion_dir)  # trained without W&B: viz starts the run's W&B id
    result = run_cli(["viz", "filters", str(run_dir), "wandb=offline"], cwd=tmp_path,
                     data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted(p.name for p in (run_dir / "viz").glob("*.png"))
    assert pngs == ["filters.png", "weight_histograms.png"]
    assert all((run_dir / "viz" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert str(run_dir / "viz" / "filters.png") in result.stdout
    first = np.load(run_dir / "viz" / "filters.npz")["first_layer"]
    assert first.shape == (3, 3, 1, 4)  # ResNet-8 at width 4: its stem
    [record_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert record_file.stem == f"run-{(run_dir / 'wandb_id.txt').read_text().strip()}"
    logged = {item.key or "/".join(item.nested_key) for r in read_wandb_records(record_file)
              if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert {"viz/filters/filters/_type", "viz/filters/weight_histograms/_type"} <= logged

    # A gradient kind on the same run, files only.
    result = run_cli(["viz", "saliency", str(run_dir), "images=3", "wandb=disabled"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    saliency = np.load(run_dir / "viz" / "saliency.npz")
    assert saliency["saliency"].shape == (3, 28, 28) and saliency["saliency"].max() > 0


@pytest.mark.parametrize("args, message", [
    (["salency", "RUN"], "unknown viz kind 'salency'; valid choices: activations,"),
    (["saliency", "RUN", "imagez=3"], "unknown option 'imagez'; valid choices: weights,"),
    (["saliency", "RUN", "target=cat"], "target='cat'; valid choices: label, predicted"),
])
def test_a_bad_kind_or_option_is_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                     message: str):
    (tmp_path / "RUN").mkdir()
    result = run_cli(["viz", *args], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
