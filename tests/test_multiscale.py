"""Multi-scale evaluation (`eval.scales`, cnnlab/training/evaluate.py): each scale's softmax by
hand,
averaged in NumPy; composed with flip TTA; the one-line refusals; `cnnlab eval` on a real run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.cli.preflight import validate
from cnnlab.errors import ConfigError
from cnnlab.training import evaluate, steps
from tests.helpers import compose_config, run_cli, train_tiny
from tests.test_evaluate import IMAGE, plain_softmax, tiny_model


def multi_scale_softmax(scales: list[int], mode: str, views: steps.Views | None = None,
                        count: int = 16) -> np.ndarray:
    _, model, state, data = tiny_model()
    log_probs = jax.jit(steps.make_log_probs(
        model, evaluate.multi_scale_views(views, scales, mode, IMAGE)))
    images = data.images[:count]
    return np.exp(np.asarray(log_probs(state.params, state.batch_stats, data, images),
                             np.float64))


def torch_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """PyTorch's bilinear resize (half-pixel centres, antialiased when shrinking, as PIL and
    torchvision's Resize), rounded back to uint8."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear",
                                          align_corners=False, antialias=True)
    return np.clip(np.round(out.permute(0, 2, 3, 1).numpy()), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("side", [6, 8, 10, 15, 17, 24])
@pytest.mark.parametrize("shape", [(12, 12), (12, 9)])
def test_resize_shorter_side_is_pytorchs_antialiased_bilinear(side, shape):
    """torchvision's Resize(side) in numbers: the shorter side becomes `side`, the longer
    int(side * long / short), the pixels PyTorch's antialiased bilinear ones (a pixel may round
    the other way at a .5 level: float32 sums in another order)."""
    images = np.random.default_rng(side).integers(0, 256, (4, *shape, 3), dtype=np.uint8)
    got = np.asarray(evaluate.resize_shorter_side(jnp.asarray(images), side))
    short, long = min(shape), max(shape)
    want_shape = (side, side * long // short) if shape[0] <= shape[1] else (
        side * long // short, side)
    assert got.shape == (4, *want_shape, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - torch_resize(images, *want_shape).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def hand_softmaxes(scales: list[int], mode: str, count: int = 16) -> list[np.ndarray]:
    """Each scale's softmax through the plain evaluation path, on images resized by PyTorch
    (and, in crop mode, centre-cropped with the NumPy slicing written out here)."""
    _, model, state, data = tiny_model()
    softmax = plain_softmax(model, state.params, state.batch_stats, data)
    images = data.images[:count]
    out = []
    for scale in scales:
        resized = torch_resize(np.asarray(images), scale, scale)
        if mode == "crop":
            top = (scale - IMAGE[0]) // 2
            resized = resized[:, top:top + IMAGE[0], top:top + IMAGE[1]]
        out.append(softmax(resized))
    return out


@pytest.mark.parametrize("mode", ["dense", "crop"])
def test_one_scale_at_the_native_size_is_plain_evaluation(mode):
    _, model, state, data = tiny_model()
    plain = plain_softmax(model, state.params, state.batch_stats, data)(data.images[:16])
    np.testing.assert_allclose(multi_scale_softmax([IMAGE[0]], mode), plain, rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("mode,scales", [("dense", [8, 12, 17]), ("crop", [12, 15, 20])])
def test_multi_scale_is_the_numpy_mean_of_the_per_scale_softmaxes(mode, scales):
    per_scale = hand_softmaxes(scales, mode)
    expected = np.mean(per_scale, axis=0)
    # A pixel PyTorch rounds the other way moves a softmax by up to ~3e-4 (the resize test).
    np.testing.assert_allclose(multi_scale_softmax(scales, mode), expected, rtol=0, atol=5e-4)
    # The scales do differ, by far more: the mean is not one of them.
    assert max(np.max(np.abs(p - expected)) for p in per_scale) > 1e-2


def test_multi_scale_composes_with_flip_tta():
    scales = [12, 16]
    _, model, state, data = tiny_model()
    softmax = plain_softmax(model, state.params, state.batch_stats, data)
    images = data.images[:16]
    expected = np.mean([(softmax(x) + softmax(x[:, :, ::-1])) / 2 for x in
                        (torch_resize(np.asarray(images), q, q) for q in scales)], axis=0)
    np.testing.assert_allclose(multi_scale_softmax(scales, "dense", evaluate.flip_views),
                               expected, rtol=0, atol=5e-4)


def test_make_eval_views_is_plain_tta_without_scales():
    cfg = compose_config([])
    assert evaluate.make_eval_views(cfg.eval, cfg.augment, IMAGE) is None
    cfg = compose_config(["eval.tta=flip"])
    assert evaluate.make_eval_views(cfg.eval, cfg.augment, IMAGE) is evaluate.flip_views
    cfg = compose_config(["eval.scales=[12,16]"])
    views = evaluate.make_eval_views(cfg.eval, cfg.augment, IMAGE)
    stacks = views(jnp.zeros((2, *IMAGE), jnp.uint8))
    assert [s.shape for s in stacks] == [(1, 2, 12, 12, 1), (1, 2, 16, 16, 1)]


def test_scaled_size_keeps_the_aspect_ratio_of_the_shorter_side():
    assert evaluate.scaled_size(32, 28, 28) == (32, 32)
    assert evaluate.scaled_size(256, 300, 400) == (256, 341)
    assert evaluate.scaled_size(256, 400, 300) == (341, 256)


@pytest.mark.parametrize("overrides,message", [
    (["eval.scales=[20,36]", "eval.scale_mode=crop"],
     "eval.scales=[20, 36] with eval.scale_mode=crop: a 28x28 centre crop needs every scale "
     ">= 28"),
    (["model=lenet5", "eval.scales=[28,36]"],
     "eval.scale_mode=dense: model lenet5 brings every input to model.input_size=32"),
    (["model=pattern", "eval.scales=[28,36]"],
     "eval.scale_mode=dense: model pattern's head needs 28x28 inputs"),
    (["preprocess=mean_image", "eval.scales=[28,32]"],
     "eval.scale_mode=dense: preprocess=mean_image holds statistics of train-size images"),
    (["eval.scales=[28]", "eval.scale_mode=full"], "eval.scale_mode='full'; valid choices: "
                                                   "crop, dense"),
    (["eval.scales=[0,28]"], "eval.scales=[0, 28] must be a list of positive integers"),
])
def test_scales_a_model_or_setting_cannot_serve_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_dense_scales_of_gap_models_and_crop_scales_of_any_model_are_accepted():
    for overrides in (["eval.scales=[20,28,36]"],
                      ["model=pattern", "model.gap=true", "eval.scales=[20,28,36]"],
                      ["model=pattern", "eval.scales=[28,36]", "eval.scale_mode=crop"],
                      ["model=lenet5", "eval.scales=[28,36]", "eval.scale_mode=crop"]):
        validate(compose_config(overrides))


def test_cnnlab_eval_with_scales_reports_the_multi_scale_error(fashion_dir, tmp_path):
    run = tmp_path / "run"
    assert train_tiny(run, fashion_dir, ["train.steps=2", "train.steps_per_call=1",
                                         "train.log_every=1", "checkpoint.every=1"]
                      )["status"] == "finished"
    result = run_cli(["eval", str(run), "eval.scales=[28,36]", "eval.tta=flip",
                      "eval.format=json"], cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (report["scales"], report["scale_mode"], report["tta"]) == ([28, 36], "dense", "flip")
    refused = run_cli(["eval", str(run), "eval.scales=[20]", "eval.scale_mode=crop"],
                      cwd=tmp_path, data_dir=fashion_dir)
    assert refused.returncode == 2 and "eval.scale_mode=crop" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
