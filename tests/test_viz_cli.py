"""The nine `cnnlab viz` kinds tests/test_viz.py does not run through the CLI (it runs filters
and saliency), each through `cnnlab viz KIND RUN_DIR` on one tiny trained run: the command
succeeds, writes the PNGs it names, none blank, and numbers whose shapes and values say they are
the run's (its images, labels, layers and classes); labels and pixel distances are checked
against the offline fashion_mnist read straight through TFDS."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli, train_tiny

LAYER = "stage1_block1"  # ResNet-8 at width 4: 4 channels of 28x28


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("viz") / "run"
    assert train_tiny(run_dir, fashion_dir)["status"] == "finished"
    return run_dir


@pytest.fixture(scope="module")
def fashion(fashion_dir) -> object:
    """The first `n` images and labels of a fashion_mnist split, read through TFDS alone (the
    run's `dataset.max_examples=1024` keeps the first 1,024 of each)."""
    import tensorflow_datasets as tfds

    def split(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        source = tfds.data_source("fashion_mnist", split=name, data_dir=str(fashion_dir))
        rows = [source[i] for i in range(n)]
        return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])

    return split


def _viz(run_dir: Path, kind: str, options: list[str], cwd: Path, data_dir: Path) -> dict:
    """Runs the kind; returns its .npz arrays after checking its PNGs."""
    result = run_cli(["viz", kind, str(run_dir), *options, "wandb=disabled"], cwd=cwd,
                     data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted((run_dir / "viz").glob(f"{kind}*.png"))
    assert pngs, f"{kind} wrote no PNG"
    for png in pngs:
        assert str(png) in result.stdout  # the command names what it wrote
        pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
        assert min(pixels.shape) >= 100 and pixels.std() > 1.0, f"{png.name} is blank"
    return dict(np.load(run_dir / "viz" / f"{kind}.npz"))


def test_activations_are_the_chosen_images_maps_of_the_layer(tiny_run, tmp_path, fashion_dir):
    arrays = _viz(tiny_run, "activations", ["images=2", f"layer={LAYER}"], tmp_path,
                  fashion_dir)
    assert list(arrays["indices"]) == [0, 1]
    assert arrays[LAYER].shape == (2, 28, 28, 4) and np.ptp(arrays[LAYER]) > 0
    assert (tiny_run / "viz" / f"activations_{LAYER}.png").is_file()


def test_neighbors_are_sorted_nearest_first_in_both_spaces(tiny_run, tmp_path, fashion_dir,
                                                           fashion):
    arrays = _viz(tiny_run, "neighbors", ["images=2", "k=3", "search=256"], tmp_path,
                  fashion_dir)
    # In pixel space: the 3 smallest squared distances to the first 256 training images.
    (queries, _), (base, _) = fashion("test", 2), fashion("train", 256)
    d2 = ((queries[:, None].astype(np.float64) - base[None].astype(np.float64)) ** 2).reshape(
        2, 256, -1).sum(-1)
    np.testing.assert_allclose(arrays["pixel_d2"], np.sort(d2, axis=1)[:, :3], rtol=1e-5)
    for space in ("feature", "pixel"):
        found, d2 = arrays[f"{space}_neighbors"], arrays[f"{space}_d2"]
        assert found.shape == d2.shape == (2, 3) and found.max() < 256
        assert np.all(np.diff(d2, axis=1) >= 0) and np.all(d2 >= -1e-3)
        assert all(len(set(row)) == 3 for row in found)


def test_embedding_lays_out_the_drawn_test_points(tiny_run, tmp_path, fashion_dir, fashion):
    arrays = _viz(tiny_run, "embedding", ["points=60", "perplexity=5", "thumbnails=20"],
                  tmp_path, fashion_dir)
    assert len(arrays["indices"]) == 60 and np.all(np.diff(arrays["indices"]) > 0)
    assert arrays["pca"].shape == arrays["tsne"].shape == (60, 2)
    _, labels = fashion("test", 1024)
    np.testing.assert_array_equal(arrays["labels"], labels[arrays["indices"]])
    names = sorted(p.name for p in (tiny_run / "viz").glob("embedding_*.png"))
    assert names == ["embedding_pca.png", "embedding_thumbnails.png", "embedding_tsne.png"]


def test_patches_are_each_channels_top_activations_in_order(tiny_run, tmp_path, fashion_dir):
    import json

    arrays = _viz(tiny_run, "patches", [f"layer={LAYER}", "channels=[0,1]", "search=128"],
                  tmp_path, fashion_dir)
    values = arrays["values"]
    assert list(arrays["channels"]) == [0, 1] and values.shape[0] == 2
    assert np.all(np.diff(values, axis=1) <= 0)  # strongest first
    assert arrays["units"].shape == (*values.shape, 3) and arrays["units"][..., 0].max() < 128
    geometry = json.loads((tiny_run / "viz" / "patches_geometry.json").read_text())
    # The stem's 3x3 conv and the block's two: a 7-pixel field at stride 1 (test_viz.py).
    assert geometry["layer"] == LAYER and geometry["size"] == [7.0, 7.0]


@pytest.mark.parametrize("kind", ["guided_backprop", "deconvnet"])
def test_signed_gradient_kinds_give_one_image_sized_map_per_image(
        kind, tiny_run, tmp_path, fashion_dir):
    arrays = _viz(tiny_run, kind, ["images=3", "target=predicted"], tmp_path, fashion_dir)
    assert list(arrays["indices"]) == [0, 1, 2] and set(arrays["targets"]) <= set(range(10))
    grads = arrays["gradients"]
    assert grads.shape == (3, 28, 28, 1)
    assert all(np.abs(g).max() > 0 for g in grads)


@pytest.mark.parametrize("kind, options, targets", [
    ("class_model", ["target=3", "steps=8"], [3]),
    ("neuron_ascent", [f"layer={LAYER}", "channels=[0,2]", "steps=8"], [0, 2]),
])
def test_ascent_kinds_raise_the_score_of_each_target(kind, options, targets, tiny_run, tmp_path,
                                                     fashion_dir):
    arrays = _viz(tiny_run, kind, options, tmp_path, fashion_dir)
    assert list(arrays["targets"]) == targets
    assert arrays["pixels"].shape == (len(targets), 28, 28, 1)
    history = arrays["history"]
    # A unit dead on every start (a ReLU at 0: no gradient) stays; the others rise.
    assert history.shape[1] == len(targets) and np.all(history[-1] >= history[0])
    assert np.any(history[-1] > history[0])


def test_occlusion_maps_are_probabilities_and_the_unoccluded_one_predicted(
        tiny_run, tmp_path, fashion_dir):
    arrays = _viz(tiny_run, "occlusion", ["images=2", "size=8", "stride=4",
                                          "target=predicted"], tmp_path, fashion_dir)
    maps, plain = arrays["maps"], arrays["unoccluded"]
    assert maps.shape == (2, 6, 6)  # (28 - 8) / 4 + 1 positions a side
    assert np.all((maps >= 0) & (maps <= 1)) and np.all(plain >= 0.1)  # the top of 10 classes
