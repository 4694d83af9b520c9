"""CIFAR ResNets and plain nets against He et al. 2016 and independent implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.models import build_model, count_params
from cnnlab.models.blocks import pad_shortcut
from tests.helpers import compose_config, optimized_xla  # noqa: F401  (fixture)

# He et al. 2016, Table 6 (CIFAR-10), in millions, as printed.
PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}
# Exact counts of option-A CIFAR ResNets with 10 classes as reported by the widely used
# PyTorch reproduction (github.com/akamaster/pytorch_resnet_cifar10, README table).
REFERENCE_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


def param_count(overrides, shape=(32, 32, 3), num_classes=10):
    model = build_model(compose_config(overrides), num_classes)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    return count_params(variables["params"])


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_param_counts_match_the_paper(depth):
    resnet = param_count([f"model=resnet{depth}"])
    assert resnet == REFERENCE_PARAMS[depth]
    assert round(resnet / 1e6, 2 if depth < 100 else 1) == PAPER_PARAMS_M[depth]
    # Option A shortcuts have no parameters: the plain net has exactly the same count.
    assert param_count([f"model=plain{depth}"]) == resnet


def test_the_1202_layer_net_has_the_papers_19_4m_parameters():
    """Table 6's 1202-layer net (n = 200), against the count of its layers by hand."""
    n, widths = 200, (16, 32, 64)
    stem, head = 3 * 3 * 3 * 16 + 2 * 16, 64 * 10 + 10
    # Two 3x3 convs and two batch norms per block; each stage's first block reads the
    # previous stage's width.
    blocks = sum(9 * w_in * w + 9 * w * w + 4 * w + (n - 1) * (2 * 9 * w * w + 4 * w)
                 for w_in, w in zip((16, 16, 32), widths, strict=True))
    count = param_count(["model=resnet1202"])
    assert count == stem + blocks + head
    assert round(count / 1e6, 1) == 19.4


def test_projection_shortcuts_add_exactly_the_1x1_convs():
    # Option B: 1x1 projections (no bias) + BN where the shape changes: 16->32 and 32->64.
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert param_count(["model=resnet20", "model.shortcut=B"]) == REFERENCE_PARAMS[20] + extra


def test_without_norm_convs_get_biases_and_no_bn_params():
    n_convs_channels = 16 + 3 * 2 * (16 + 32 + 64)  # stem + two convs per block, n = 3
    bn_params = 2 * n_convs_channels
    assert param_count(["model=resnet20", "norm=none"]) == (
        REFERENCE_PARAMS[20] - bn_params + n_convs_channels)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (40, 24, 4)])
def test_stem_adapts_to_channels_and_size(shape):
    model = build_model(compose_config(["model=resnet20", "model.depth=8"]), 7)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, *shape)), train=False)
    assert variables["params"]["stem"]["kernel"].shape == (3, 3, shape[-1], 16)
    logits = model.apply(variables, jnp.ones((2, *shape)), train=False)
    assert logits.shape == (2, 7)
    # Only the stem depends on the channel count.
    base = param_count(["model=resnet20", "model.depth=8"], shape=(32, 32, 3), num_classes=7)
    assert count_params(variables["params"]) == base + 9 * 16 * (shape[-1] - 3)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = np.arange(2 * 8 * 8 * 16, dtype=np.float32).reshape(2, 8, 8, 16)
    y = np.asarray(pad_shortcut(jnp.asarray(x), 32, 2))
    assert y.shape == (2, 4, 4, 32)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
    assert not y[..., :8].any() and not y[..., 24:].any()


def test_plain_block_has_no_identity_path():
    # With every conv zeroed, a residual net passes its stem activation through the
    # shortcuts while a plain net outputs only the head's bias.
    def features(model_name):
        cfg = compose_config([f"model={model_name}", "model.depth=8", "norm=none"])
        model = build_model(cfg, 10)
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        params = jax.tree_util.tree_map_with_path(
            lambda path, p: p if "stem" in jax.tree_util.keystr(path) else jnp.zeros_like(p),
            variables["params"])
        params["head"]["kernel"] = jnp.ones_like(params["head"]["kernel"])
        return model.apply({"params": params}, x, train=False)

    assert np.abs(np.asarray(features("plain20"))).max() == 0
    assert np.abs(np.asarray(features("resnet20"))).max() > 0


def test_matches_pytorch_reference_parameter_count():
    torch = pytest.importorskip("torch")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_resnet.py"
    spec = importlib.util.spec_from_file_location("torch_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for depth in (20, 56):
        net = module.CifarResNet(depth, num_classes=10)
        torch_count = sum(p.numel() for p in net.parameters())
        assert torch_count == param_count([f"model=resnet{depth}"])
    del torch


@pytest.mark.parametrize("stride, pad, kernel, shape", [
    (1, 1, 3, (2, 8, 8, 3)), (2, 1, 3, (2, 7, 7, 4)), (2, 0, 1, (2, 8, 8, 4)),
    (4, 0, 11, (1, 35, 35, 3)), (1, 2, 5, (2, 9, 9, 2)),
    # Output maps of at most 4 pixels take the matmul (im2col) path.
    (1, 1, 3, (3, 2, 2, 5)), (2, 1, 3, (2, 3, 4, 3)), (1, 0, 3, (2, 3, 3, 4)),
])
def test_cpu_conv_gradients_equal_xla_autodiff(stride, pad, kernel, shape):
    from jax import lax

    from cnnlab.models.conv import conv_general_dilated

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, shape[-1], 6))
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args, dimension_numbers=dn)))

    expected = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    got = jax.grad(loss(conv_general_dilated), (0, 1))(x, w)
    y = lax.conv_general_dilated(x, w, *args, dimension_numbers=dn)
    np.testing.assert_allclose(conv_general_dilated(x, w, *args, dimension_numbers=dn), y,
                               rtol=1e-5, atol=1e-6 * float(jnp.abs(y).max()))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()))


def _float64_conv_gradient(shape: tuple, kernel: tuple, strides: tuple, pads: tuple,
                           wrt: int) -> tuple:
    """One NHWC convolution's gradient with respect to its input (`wrt` 0) or kernel (1) in
    float64, as autodiff of lax's convolution computes it and as cnnlab's CPU convolution does,
    each with the StableHLO text of its jitted gradient: (expected, got, expected's text,
    got's text)."""
    from jax import lax

    from cnnlab.models import conv

    dn = ("NHWC", "HWIO", "NHWC")
    with jax.enable_x64(True):
        args = (jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64),
                jax.random.normal(jax.random.PRNGKey(1), kernel, jnp.float64))

        def gradient(fn):
            loss = lambda *a: jnp.sum(jnp.sin(fn(*a, strides, pads, dimension_numbers=dn)))  # noqa: E731
            grad = jax.grad(loss, wrt)
            return np.asarray(grad(*args)), jax.jit(grad).lower(*args).as_text()

        (expected, reference), (got, text) = (gradient(lax.conv_general_dilated),
                                              gradient(conv.conv_general_dilated))
    return expected, got, reference, text


@pytest.mark.parametrize("shape, out, pads, tile_bytes", [
    ((12, 16, 16, 8), 8, ((1, 1), (1, 1)), 1),  # one image per tile: 12 tiles
    ((6, 17, 18, 16), 32, ((1, 1), (1, 1)), None),  # the default budget: one tile
    ((8, 18, 20, 24), 16, ((0, 0), (0, 0)), 2 * 16 * 18 * 72 * 8),  # tiles of 2 images
    ((4, 16, 16, 8), 8, ((0, 2), (2, 0)), 1),  # uneven padding
])
def test_cpu_kernel_gradient_of_few_channels_is_a_tiled_matmul_equal_to_autodiff(
        monkeypatch, shape, out, pads, tile_bytes):
    """Stride-1 3x3 layers of 8-24 input channels on wide maps take their kernel gradient as
    matmuls over batch tiles (conv._matmul_kernel_gradient), equal to autodiff's in float64,
    however the batch is tiled; and no convolution computes it any more."""
    from cnnlab.models import conv
    from cnnlab.models.geometry import output_size

    if tile_bytes is not None:
        monkeypatch.setattr(conv, "MATMUL_TILE_BYTES", tile_bytes)
    kernel = (3, 3, shape[-1], out)
    y_shape = (shape[0], *(output_size(n, 3, 1, p)
                           for n, p in zip(shape[1:3], pads, strict=True)), out)
    assert conv.takes_matmul_kernel_gradient(kernel, (1, 1), pads, y_shape)
    expected, got, _, text = _float64_conv_gradient(shape, kernel, (1, 1), pads, wrt=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * abs(expected).max())
    assert text.count("stablehlo.convolution") == 1  # the forward pass's only


@pytest.mark.parametrize("shape, out, stride", [
    ((2, 8, 8, 16), 16, 1),  # an 8x8 map: the convolution was faster
    ((2, 16, 16, 32), 32, 1),  # 32 input channels: a tie
    ((2, 32, 32, 3), 16, 1),  # an RGB stem
    ((2, 32, 32, 16), 32, 2),  # stride 2
    ((2, 56, 56, 64), 64, 1),  # ResNet-18's 56x56x64: faster alone, slower in the step
])
def test_the_matmul_kernel_gradient_stays_where_it_was_measured_faster(shape, out, stride):
    from cnnlab.models import conv

    pads = ((1, 1), (1, 1))
    y_shape = (shape[0], shape[1] // stride, shape[2] // stride, out)
    assert not conv.takes_matmul_kernel_gradient((3, 3, shape[-1], out), (stride, stride), pads,
                                                 y_shape)


@pytest.mark.parametrize("shape, out, stride", [
    ((2, 9, 9, 16), 32, 2),  # a projection shortcut (option B): odd sizes, every other pixel
    ((3, 6, 5, 24), 8, 1),  # a bottleneck's 1x1
    ((2, 8, 8, 4), 6, 3),
])
def test_cpu_pointwise_kernel_gradient_is_one_matmul_equal_to_autodiff(shape, out, stride):
    """Unpadded 1x1 layers take their kernel gradient as one matmul of the pixels they read
    with dy (conv._pointwise_kernel_gradient), equal to autodiff's in float64; no convolution
    computes it any more."""
    expected, got, _, text = _float64_conv_gradient(
        shape, (1, 1, shape[-1], out), (stride, stride), ((0, 0), (0, 0)), wrt=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * abs(expected).max())
    assert text.count("stablehlo.convolution") == 1  # the forward pass's only


@pytest.mark.parametrize("shape, out, pads", [
    ((2, 32, 32, 16), 32, ((1, 1), (1, 1))),  # ResNet-20's 32x32x16 -> 32 layer
    ((3, 9, 7, 5), 6, ((1, 1), (1, 1))),  # odd sizes: the last phase row is cropped
    ((2, 8, 10, 4), 3, ((0, 1), (0, 1))),  # "SAME" for even sizes
    ((2, 7, 9, 2), 3, ((2, 0), (0, 2))),  # uneven padding
    ((2, 6, 6, 32), 8, ((0, 0), (0, 0))),  # none
])
def test_cpu_strided_input_gradient_is_one_undilated_convolution_equal_to_autodiff(
        shape, out, pads):
    """Stride-2 3x3 layers of few channels take their input gradient as one stride-1
    convolution of dy with the s*s phases as output channels (conv._phase_input_gradient),
    equal to autodiff's (dy dilated by the strides) in float64, and no dilated convolution
    is left in the program."""
    from cnnlab.models import conv

    kernel = (3, 3, shape[-1], out)
    assert conv.takes_phase_input_gradient(kernel, (2, 2))
    expected, got, reference, text = _float64_conv_gradient(shape, kernel, (2, 2), pads, wrt=0)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * abs(expected).max())
    assert "lhs_dilate = [2, 2]" in reference  # the check can fail
    assert "lhs_dilate = [2, 2]" not in text


@pytest.mark.parametrize("kernel, channels, stride", [
    (3, 64, 2),  # 64 channels (ResNet-18's 56x56x64 -> 128): the dilated form was faster
    (1, 16, 2),  # a 1x1 projection: 4x the multiply-adds
    (3, 16, 1),  # stride 1: nothing to interleave
])
def test_the_phase_input_gradient_stays_where_it_was_measured_faster(kernel, channels, stride):
    from cnnlab.models import conv

    assert not conv.takes_phase_input_gradient((kernel, kernel, channels, 32), (stride, stride))


@pytest.mark.parametrize("stride, kernel", [(1, 3), (2, 3), (2, 1)])
def test_cpu_conv_gradients_are_convolutions_in_the_forward_layout(stride, kernel):
    """Every convolution of the forward and backward pass is labelled as the forward one (NHWC
    input, HWIO kernel): autodiff's labels ([f, 0, 1, b]x[i, 0, 1, o] for the kernel gradient,
    an o/i-swapped kernel for the input gradient) let XLA:CPU choose layouts it ran ~30x slower
    in one-step programs (docs/speed.md)."""
    import re

    from jax import lax

    from cnnlab.models.conv import conv_general_dilated

    x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((kernel, kernel, 3, 4))

    def labels(conv):
        loss = lambda x, w: jnp.sum(conv(x, w, (stride, stride), ((1, 1), (1, 1)),  # noqa: E731
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
        text = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text().replace(", ", ",")
        return re.findall(r"convolution\(.*?dim_numbers = (\S+?),window", text)

    canonical = "[b,0,1,f]x[0,1,i,o]->[b,0,1,f]"
    assert labels(conv_general_dilated) == [canonical] * 3
    assert labels(lax.conv_general_dilated).count(canonical) < 3  # the check can fail


@pytest.mark.usefixtures("optimized_xla")
@pytest.mark.parametrize("store", [True, False])
def test_cpu_residual_stream_is_computed_once_not_in_every_consumer(monkeypatch, store):
    """Each block's output is a buffer of its own (Layers.stored), so no fusion of the
    optimized training gradient reads more than three convolutions' outputs, however deep the
    stage (the widest: a ReLU mask's backward, reading its block's last convolution, the stem's
    and the input gradient's). Without it, XLA:CPU recomputed the residual stream's
    BatchNorm/add/ReLU chain back to the stage's start in every consumer: fusions reading 6
    outputs here, 11 in ResNet-56, the time growing with the square of depth (docs/speed.md)."""
    import re

    from cnnlab.models import conv
    from cnnlab.training.numerics import compiler_options

    if not store:  # the check can fail: the same program without the stored outputs
        monkeypatch.setattr(conv, "stored", lambda x: x)
    cfg = compose_config(["model=resnet20", "model.width=8"])
    model = build_model(cfg, 10)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(out ** 2)

    hlo = (jax.jit(jax.grad(loss)).lower(variables["params"])
           .compile(compiler_options(cfg.train, "cpu")).as_text())
    convolutions = set(re.findall(r"%([\w.\-]+) = \S+ convolution\(", hlo))
    reads = [len(convolutions & set(re.findall(r"%([\w.\-]+)", operands))) for operands in
             re.findall(r"= \S+ fusion\((.*?)\), kind=", hlo)]
    assert (max(reads) <= 3) == store, max(reads)


@pytest.mark.parametrize("kernel, stride, pad, shape", [
    (2, 2, 0, (2, 8, 8, 3)), (3, 2, 1, (2, 9, 7, 4)), (3, 1, 1, (1, 6, 6, 2)),
    (3, 2, 0, (2, 11, 11, 3)),
])
def test_cpu_max_pool_gradient_equals_xla_autodiff(kernel, stride, pad, shape):
    import flax.linen as nn

    from cnnlab.models.pooling import max_pool

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    # Ties, as ReLU's zeros make them: the gradient goes to the first maximum of each window.
    x = jnp.where(x < 0.3, 0.0, x)
    args = ((kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)))

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(pool(x, *args)))

    np.testing.assert_array_equal(max_pool(x, *args), nn.max_pool(x, *args))
    np.testing.assert_allclose(jax.grad(loss(max_pool))(x), jax.grad(loss(nn.max_pool))(x),
                               rtol=1e-6, atol=1e-7)
