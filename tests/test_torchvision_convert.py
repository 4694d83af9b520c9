"""torchvision weights in cnnlab's models: the converted model computes torchvision's function.

Each network is built by torchvision itself with random weights, its batch-norm statistics and
biases set to random values (torchvision initializes them to 0 and 1, which would hide a swapped
or dropped tensor), then converted and run by cnnlab in eval mode on the same images. The last
layer is scaled so that torchvision's logits reach 1 in magnitude, so 1e-4 is a relative bound.
"""

import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from cnnlab.cli.preflight import compose
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, geometry
from cnnlab.models.spec import parse_layers
from cnnlab.transfer.torchvision import convert, read_weights_file

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

NUM_CLASSES = 10
TOLERANCE = 1e-4


def _randomized(net: "torch.nn.Module", images: np.ndarray) -> "torch.nn.Module":
    """`net` in eval mode with random biases and batch-norm statistics, its last layer scaled so
    that its logits on `images` have a largest magnitude of 1."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3),
                                          (module.running_mean, -0.3, 0.3),
                                          (module.running_var, 0.5, 2.0)):
                    tensor.copy_(torch.empty_like(tensor).uniform_(low, high,
                                                                   generator=generator))
            elif isinstance(module, torch.nn.Conv2d | torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        net.eval()
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        scale = _torch_logits(net, images).abs().max()
        last.weight /= scale
        last.bias /= scale
    return net


def _torch_logits(net: "torch.nn.Module", images: np.ndarray) -> "torch.Tensor":
    with torch.no_grad():
        return net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))


def _images(side: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, side, side, 3)).astype(np.float32)


def _cnnlab_logits(cfg, flat: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    model = build_model(cfg, NUM_CLASSES)
    variables = traverse_util.unflatten_dict(flat, sep="/")
    return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, images))


def _state_dict(net: "torch.nn.Module") -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in net.state_dict().items()}


def _compare(arch: str, overrides: list[str], side: int, flat_from=None) -> tuple:
    """(cnnlab's logits, torchvision's, the converted variables, the config)."""
    images = _images(side)
    net = _randomized(getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES),
                      images)
    state = flat_from(net) if flat_from else _state_dict(net)
    cfg = compose(overrides)
    flat = convert(state, cfg.model, cfg.norm.name)
    return _cnnlab_logits(cfg, flat, images), _torch_logits(net, images).numpy(), flat, cfg


# ---------------------------------------------------------------------------------------------
# Same function


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_through_a_weights_file_computes_torchvisions_logits(tmp_path, suffix):
    def through_file(net):
        path = tmp_path / f"resnet18{suffix}"
        if suffix == ".pth":
            torch.save(net.state_dict(), path)
        else:
            from safetensors.torch import save_file
            save_file(net.state_dict(), path)
        state = read_weights_file(path)
        assert all(value.dtype == np.float32 for value in state.values())
        assert not any(name.endswith("num_batches_tracked") for name in state)
        return state

    ours, theirs, flat, _ = _compare("resnet18", ["model=resnet18", "model.input_size=null"], 64,
                                     through_file)
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert "batch_stats/conv2_1/norm1/BatchNorm_0/var" in flat
    assert flat["params/conv1/conv/kernel"].shape == (7, 7, 3, 64)


def test_resnet50_v15_computes_torchvisions_logits():
    ours, theirs, _, _ = _compare(
        "resnet50", ["model=resnet50", "model.stride_at=3x3", "model.input_size=null"], 64)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_vgg11_computes_torchvisions_logits_and_needs_fc1_reordered():
    images = _images(224)
    ours, theirs, flat, cfg = _compare("vgg11", ["model=vgg_a", "norm=none"], 224)
    assert np.abs(ours - theirs).max() < TOLERANCE
    # The test can tell: fc1 merely transposed (inputs left in torch's C, H, W order) is wrong.
    kernel = flat["params/fc1/dense/kernel"]  # (7*7*512, 4096) in H, W, C order
    chw = kernel.reshape(7, 7, 512, -1).transpose(2, 0, 1, 3).reshape(kernel.shape)
    wrong = _cnnlab_logits(cfg, {**flat, "params/fc1/dense/kernel": chw}, images)
    assert np.abs(wrong - theirs).max() > 100 * TOLERANCE


def test_vgg11_bn_folds_the_conv_biases_into_the_norms():
    ours, theirs, flat, _ = _compare("vgg11_bn", ["model=vgg_a", "norm=batch"], 224)
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert "params/conv1/conv/bias" not in flat  # cnnlab has none before a batch norm


def test_alexnet_torchvision_computes_torchvisions_logits():
    ours, theirs, flat, _ = _compare("alexnet", ["model=alexnet_torchvision", "norm=none"], 224)
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert flat["params/fc6/dense/kernel"].shape == (6 * 6 * 256, 4096)


@pytest.mark.parametrize("arch, overrides", [
    ("resnet34", ["model=resnet34"]),
    ("resnet101", ["model=resnet101", "model.stride_at=3x3"]),
    ("resnet152", ["model=resnet152", "model.stride_at=3x3"]),
    ("vgg13", ["model=vgg_b", "norm=none"]),
    ("vgg16_bn", ["model=vgg_d", "norm=batch"]),
    ("vgg19", ["model=vgg_e", "norm=none"]),
])
def test_the_other_torchvision_networks_fill_every_variable(arch, overrides):
    """Names and shapes only (the layouts are the ones checked numerically above): every tensor
    of torchvision's state dict finds its place and every cnnlab variable is filled."""
    with torch.device("meta"):  # shapes without memory or initialization
        net = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    state = {name: np.zeros(tensor.shape, np.float32) for name, tensor in net.state_dict().items()}
    cfg = compose(overrides)
    flat = convert(state, cfg.model, cfg.norm.name)
    assert flat["params/classifier/dense/bias"].shape == (NUM_CLASSES,)
    assert sum(v.size for k, v in flat.items() if k.startswith("params/")) == sum(
        p.numel() for p in net.parameters()) - sum(  # less the VGG-BN conv biases, folded
        m.bias.numel() for m in net.modules()
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None and "bn" in arch)


def test_adaptive_pools_are_the_identity_at_224():
    """cnnlab has no adaptive pooling: the same function only because torchvision's is a no-op
    on the maps a 224 input gives (VGG 7x7, AlexNet 6x6)."""
    for arch, channels, side in (("vgg11", 512, 7), ("alexnet", 256, 6)):
        with torch.device("meta"):  # shapes only
            net = getattr(torchvision.models, arch)(weights=None)
            maps = net.features(torch.empty(2, 3, 224, 224))
        assert maps.shape == (2, channels, side, side)
        pool = torch.nn.AdaptiveAvgPool2d(net.avgpool.output_size)
        maps = torch.randn(2, 8, side, side)
        assert torch.equal(pool(maps), maps)


# ---------------------------------------------------------------------------------------------
# The asymmetric padding torchvision's AlexNet needs


def test_padding_pair_is_pytorchs_padding_with_the_dropped_row():
    pads = geometry.window_pads("conv1", (224, 224), 11, 4, (2, 1))
    assert pads == ((2, 1), (2, 1))
    assert geometry.output_size(224, 11, 4, pads[0]) == 55
    rng = np.random.default_rng(0)
    images = rng.normal(size=(1, 224, 224, 3)).astype(np.float32)
    kernel = rng.normal(size=(11, 11, 3, 8)).astype(np.float32)
    ours = jax.lax.conv_general_dilated(images, kernel, (4, 4), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    theirs = torch.nn.functional.conv2d(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), stride=4, padding=2)
    assert ours.shape == (1, 55, 55, 8)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), theirs.numpy(),
                               atol=1e-4)


def test_padding_pair_that_does_not_tile_or_is_not_a_pair_is_refused():
    with pytest.raises(ConfigError, match=r"conv1 \(11x11, stride 4, pad 2 before and 2 after\)"):
        geometry.window_pads("conv1", (224, 224), 11, 4, (2, 2))
    for bad in ((2,), (2, -1), (2, 1, 0), (True, 1)):
        with pytest.raises(ConfigError, match="a pair"):
            geometry.window_pads("conv1", (224, 224), 11, 4, bad)
    with pytest.raises(ConfigError, match=r"model.layers\[0\]: conv padding=\[2, 1, 0\]"):
        parse_layers([{"conv": 64, "kernel": 11, "padding": [2, 1, 0]}], "model.layers")
    assert parse_layers([{"conv": 64, "padding": [2, 1]}], "model.layers")[0]["padding"] == (2, 1)


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the value and what to set


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, np.ndarray]:
    return _state_dict(torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES))


def _refused(state, overrides: list[str], match: str) -> None:
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=match) as error:
        convert(state, cfg.model, cfg.norm.name)
    assert "\n" not in str(error.value)


def test_models_and_settings_torchvision_has_no_weights_for_are_refused(resnet18_state):
    _refused(resnet18_state, ["model=resnet20"], r"model=resnet20 has no torchvision weights")
    _refused({}, ["model=resnet50"], r"resnet50 weights need model.stride_at=3x3, not 1x1 .*"
                                     r"set model.stride_at=3x3")
    _refused(resnet18_state, ["model=resnet18", "model.shortcut=A"], r"set model.shortcut=B")
    _refused(resnet18_state, ["model=resnet18", "norm=none"], r"set norm=batch")
    bn_vgg = {"features.1.running_mean": np.zeros(64, np.float32)}
    _refused(bn_vgg, ["model=vgg_a", "norm=none"], r"vgg11_bn weights .* set norm=batch")
    _refused({}, ["model=vgg_a", "norm=batch"], r"vgg11 weights .* set norm=none")
    _refused({}, ["model=vgg_d", "norm=none", "model.input_size=32"],
             r"vgg16 weights need model.input_size=224")


def test_state_dicts_that_do_not_fit_are_refused_naming_the_tensor(resnet18_state):
    overrides = ["model=resnet18"]
    missing = {k: v for k, v in resnet18_state.items() if k != "layer2.0.downsample.0.weight"}
    _refused(missing, overrides, r"no 'layer2.0.downsample.0.weight' \(cnnlab's "
                                 r"params/conv3_1/shortcut/proj/kernel needs it\)")
    wrong = {**resnet18_state, "layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)}
    _refused(wrong, overrides, r"'layer1.0.conv2.weight' has shape \(64, 64, 1, 1\)")
    extra = {**resnet18_state, "layer5.0.conv1.weight": np.zeros(1, np.float32)}
    _refused(extra, overrides, r"'layer5.0.conv1.weight' has no place in model=resnet18")
    # ResNet-34 weights into a ResNet-18: layer1.2 and others are left over.
    _refused(_state_dict(torchvision.models.resnet34(weights=None)), overrides, "no place")


def test_weights_files_that_cannot_be_read_are_refused(tmp_path):
    for path, match in ((tmp_path / "missing.pth", "missing.pth does not exist"),
                        (tmp_path / "weights.npz", "unknown kind '.npz'")):
        with pytest.raises(ConfigError, match=match):
            read_weights_file(path)
    for name in ("garbage.pth", "garbage.safetensors"):
        (tmp_path / name).write_bytes(b"not a weights file")
        with pytest.raises(ConfigError, match=f"cannot read .*{name}") as error:
            read_weights_file(tmp_path / name)
        assert "\n" not in str(error.value)
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(ConfigError, match="holds no state dict"):
        read_weights_file(tmp_path / "ckpt.pth")


def test_a_torchvision_file_is_a_transfer_source_with_a_new_head(tmp_path):
    """`transfer.source=resnet18.pth`: the run starts from torchvision's weights (converted),
    with a new 5-class classifier, every other layer frozen by the linear probe."""
    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.training.build import build
    from cnnlab.transfer.sources import source_preprocess

    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    cfg = compose(["model=resnet18", "model.input_size=null", "dataset=cifar10",
                   "dataset.num_classes=5", "train.batch_size=8", "transfer=linear_probe",
                   f"transfer.source={path}"])
    run = build(cfg, synthetic_dataset(16, (32, 32, 3), 5), with_source=True)
    loaded = run.transfer.loaded
    assert loaded.head_reset and loaded.missing == () and "classifier" not in loaded.layers
    assert run.transfer.plan.with_role("head") == ("classifier",)
    np.testing.assert_array_equal(
        np.asarray(run.state.params["conv1"]["conv"]["kernel"]),
        net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        np.asarray(run.state.batch_stats["conv5_2"]["norm2"]["BatchNorm_0"]["var"]),
        net.layer4[1].bn2.running_var.numpy())
    assert run.state.params["classifier"]["dense"]["kernel"].shape == (512, 5)
    # Its inputs are normalized as torchvision's were: ImageNet's mean and std.
    stats = source_preprocess(cfg)
    np.testing.assert_allclose(stats.mean, [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(stats.std, [0.229, 0.224, 0.225], rtol=1e-6)
    # Greyscale images do not fit torchvision's RGB conv1: one line naming the key that adapts
    # it, before any data is read (tests/test_adapt_input.py adapts it).
    cfg = compose(["model=resnet18", "model.input_size=null", "dataset=fashion_mnist",
                   "train.batch_size=8", "transfer=linear_probe", f"transfer.source={path}"])
    with pytest.raises(ConfigError, match=r"trained on 3-channel images but this data has 1; "
                                          r"set transfer.adapt_input=timm"):
        build(cfg, synthetic_dataset(16, (28, 28, 1), 10), with_source=True)
    cfg.preprocess.name = "none"
    with pytest.raises(ConfigError, match="ImageNet's per-channel mean and std: it needs "
                                          "preprocess=channel, not none"):
        source_preprocess(cfg)
