"""`transfer.adapt_input`: a source trained on another channel count (cnnlab/transfer/adapt.py).

The summed kernel is checked end to end against torchvision: its ResNet-18 on a grey image copied
into R, G and B computes the logits cnnlab's adapted one-channel ResNet-18 computes on the grey
image. The repeat rule is checked by what it preserves, and against timm's formula on PyTorch's
OIHW layout; the CLI trains torchvision's RGB weights on fashion_mnist.
"""

import json
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from cnnlab.cli.preflight import compose
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, init_variables
from cnnlab.transfer import plan_for
from cnnlab.transfer.adapt import adapt_kernel, adapt_stats
from cnnlab.transfer.load import load
from cnnlab.transfer.sources import IMAGENET_MEAN, IMAGENET_STD, Source
from cnnlab.transfer.torchvision import convert
from tests.helpers import fashion_dir, run_cli  # noqa: F401  (fixture)
from tests.test_torchvision_convert import NUM_CLASSES, TOLERANCE, _randomized, _torch_logits

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

SIDE = 64


def _grey_resnet18(tmp_path, adapt: str):
    """(torchvision's ResNet-18 with random weights, the config of cnnlab's on 1 channel, the
    1-channel model's initial variables, its plan)."""
    grey = np.random.default_rng(0).normal(size=(2, SIDE, SIDE, 1)).astype(np.float32)
    net = _randomized(torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES),
                      np.repeat(grey, 3, axis=-1))
    cfg = compose(["model=resnet18", "model.input_size=null", "dataset=fashion_mnist",
                   "transfer=finetune_all", f"transfer.source={tmp_path / 'r18.pth'}",
                   f"transfer.adapt_input={adapt}"], for_training=False)
    model = build_model(cfg, NUM_CLASSES)
    variables = init_variables(model, jax.random.PRNGKey(0), (SIDE, SIDE, 1))
    return grey, net, cfg, model, variables, plan_for(cfg, model, (SIDE, SIDE, 1))


def _source(net, cfg) -> Source:
    state = {name: tensor.numpy() for name, tensor in net.state_dict().items()}
    return Source(convert(state, cfg.model, cfg.norm.name), "torchvision resnet18")


def test_summed_kernels_on_grey_images_compute_torchvisions_logits_on_them_in_rgb(tmp_path):
    grey, net, cfg, model, variables, plan = _grey_resnet18(tmp_path, "timm")
    source = _source(net, cfg)
    loaded = load(variables, source, plan, None, "timm")
    assert loaded.adapted == ("params/conv1/conv/kernel",) and not loaded.head_reset
    ours = np.asarray(model.apply(loaded.variables, grey, train=False))
    theirs = _torch_logits(net, np.repeat(grey, 3, axis=-1)).numpy()
    assert np.abs(ours - theirs).max() < TOLERANCE
    # The comparison can tell a wrong adaptation: the red kernel tripled is not the sum.
    flat = traverse_util.flatten_dict(loaded.variables, sep="/")
    red = source.arrays["params/conv1/conv/kernel"][:, :, :1] * 3
    wrong = traverse_util.unflatten_dict({**flat, ("params/conv1/conv/kernel"): red}, sep="/")
    assert np.abs(np.asarray(model.apply(wrong, grey, train=False)) - theirs).max() > \
        100 * TOLERANCE


def test_strict_refuses_the_rgb_kernel_in_one_line_naming_the_key(tmp_path):
    _, net, cfg, _, variables, plan = _grey_resnet18(tmp_path, "strict")
    with pytest.raises(ConfigError, match=r"^transfer.source \(torchvision resnet18\) was trained "
                                          r"on 3-channel images but this data has 1; set "
                                          r"transfer.adapt_input=timm"):
        load(variables, _source(net, cfg), plan, None, "strict")


def _response(kernel: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """A conv's output at one position: its (H, W, I, O) kernel on an (H, W, I) patch."""
    return np.einsum("hwi,hwio->o", patch, kernel)


def test_repeated_kernels_keep_the_response_to_repeated_channels():
    rng = np.random.default_rng(1)
    rgb_kernel, rgb = rng.normal(size=(3, 3, 3, 5)), rng.normal(size=(3, 3, 3))
    # 6 channels holding the RGB image twice: the source's response (scaled by 3/6, twice).
    six = adapt_kernel("timm", rgb_kernel, 6, "s")
    np.testing.assert_allclose(_response(six, np.concatenate([rgb, rgb], axis=-1)),
                               _response(rgb_kernel, rgb), rtol=1e-5)
    # A greyscale source on RGB: its kernel on the mean of R, G and B.
    grey_kernel = rng.normal(size=(3, 3, 1, 5))
    np.testing.assert_allclose(_response(adapt_kernel("timm", grey_kernel, 3, "s"), rgb),
                               _response(grey_kernel, rgb.mean(axis=-1, keepdims=True)),
                               rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 2, 4, 7])
def test_kernels_follow_timms_formula_on_torchs_layout(channels):
    """timm's adapt_input_conv, restated on PyTorch's OIHW weight."""
    oihw = torch.randn(5, 3, 7, 7, generator=torch.Generator().manual_seed(channels))
    if channels == 1:
        want = oihw.sum(dim=1, keepdim=True)
    else:
        want = oihw.repeat(1, math.ceil(channels / 3), 1, 1)[:, :channels] * (3 / channels)
    got = adapt_kernel("timm", oihw.numpy().transpose(2, 3, 1, 0), channels, "s")
    np.testing.assert_allclose(got, want.numpy().transpose(2, 3, 1, 0), rtol=1e-6, atol=1e-6)


def test_statistics_are_reduced_as_the_kernels_are():
    imagenet = PreprocessStats(mean=np.asarray(IMAGENET_MEAN), std=np.asarray(IMAGENET_STD))
    grey = adapt_stats("timm", imagenet, 1, "s")
    np.testing.assert_allclose(grey.mean, [(0.485 + 0.456 + 0.406) / 3], rtol=1e-6)
    np.testing.assert_allclose(grey.std, [(0.229 + 0.224 + 0.225) / 3], rtol=1e-6)
    four = adapt_stats("timm", imagenet, 4, "s")
    np.testing.assert_allclose(four.mean, [0.485, 0.456, 0.406, 0.485], rtol=1e-6)
    # A mean image (H, W, C) is reduced over its channels.
    image = np.random.default_rng(0).uniform(size=(4, 4, 3))
    np.testing.assert_allclose(adapt_stats("timm", PreprocessStats(mean=image), 1, "s").mean,
                               image.mean(axis=-1, keepdims=True), rtol=1e-6)
    assert adapt_stats("strict", imagenet, 3, "s") is imagenet
    with pytest.raises(ConfigError, match="set transfer.adapt_input=timm"):
        adapt_stats("strict", imagenet, 1, "transfer.source=x")
    zca = PreprocessStats(mean=image, whiten=np.eye(48))
    with pytest.raises(ConfigError, match="cannot adapt .* ZCA whitening"):
        adapt_stats("timm", zca, 1, "transfer.source=x")
    with pytest.raises(ConfigError, match=r"transfer.adapt_input='sum'; valid choices: "
                                          r"strict, timm"):
        compose(["transfer=finetune_all", "transfer.source=x.pth", "transfer.adapt_input=sum"],
                for_training=False)


def test_cli_trains_torchvisions_rgb_weights_on_fashion_mnist(tmp_path, fashion_dir):  # noqa: F811
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    args = ["train", "model=resnet18", "model.input_size=null", "dataset=fashion_mnist",
            "dataset.max_examples=64", "train.batch_size=8", "train.steps=2",
            "train.steps_per_call=1", "train.eval_every=0", "train.eval_batch_size=64",
            "checkpoint.enabled=false", "logger.mode=disabled", "progress=false",
            "transfer=finetune_all", f"transfer.source={path}"]
    refused = run_cli([*args, f"hydra.run.dir={tmp_path / 'refused'}"], tmp_path, fashion_dir)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"cnnlab: error: transfer.source={path} was trained on 3-channel images but this data "
        "has 1; set transfer.adapt_input=timm to adapt the first conv (kernels summed for 1 "
        "channel, repeated and rescaled for more; docs/transfer.md)"]
    run_dir = tmp_path / "run"
    done = run_cli([*args, "transfer.adapt_input=timm", f"hydra.run.dir={run_dir}"], tmp_path,
                   fashion_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["transfer"]["adapted_input"] == ["params/conv1/conv/kernel"]
    assert summary["transfer"]["loaded_layers"] == 9 and summary["transfer"]["head_reset"]
    assert "statistics adapted to 1 channel(s): mean [0.449], std [0.226]" in \
        (run_dir / "app.log").read_text()


def test_a_greyscale_run_as_source_of_an_rgb_run_is_refused_before_the_data(tmp_path):
    """A cnnlab run's channels are its dataset's: a fashion_mnist run as the source of a CIFAR-10
    run is a mismatch, said in one line before any data is read; with timm it passes."""
    from omegaconf import OmegaConf

    from cnnlab.transfer.sources import check_exists

    source = tmp_path / "grey_run"
    (source / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(["dataset=fashion_mnist"], for_training=False),
                   source / ".hydra" / "config.yaml")
    overrides = ["dataset=cifar10", "transfer=finetune_all", f"transfer.source={source}"]
    with pytest.raises(ConfigError, match=r"was trained on 1-channel images but this data has 3; "
                                          r"set transfer.adapt_input=timm"):
        check_exists(compose(overrides, for_training=False))
    check_exists(compose([*overrides, "transfer.adapt_input=timm"], for_training=False))
