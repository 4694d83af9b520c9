"""Receptive fields and activation memory in `cnnlab summary`, ZFNet, DenseNet-BC and the
ConvNetJS CIFAR-10 demo, against figures computed by hand here or taken from the papers."""

import jax
import pytest

from cnnlab.cli.preflight import validate
from cnnlab.errors import ConfigError
from cnnlab.models import abstract_variables, build_model, check_geometry
from cnnlab.models.summary import summarize
from tests.helpers import compose_config
from tests.test_experiments import compose_study, training_config
from tests.test_zoo import conv_params, fit_64_images, rows, summary_of

NO_NORM = ["norm=none"]


def fields(summary, names):
    table = rows(summary)
    return [(table[n].receptive_field, table[n].jump) for n in names]


def by_hand(layers):
    """The notes' rule, r_out = r_in + (k - 1) j_in, j_out = j_in s, from (1, 1)."""
    r, j, out = 1, 1, []
    for k, s in layers:
        r, j = r + (k - 1) * j, j * s
        out.append((r, j))
    return out


# ------------------------------------------------------------------------ receptive fields
def test_vgg16_receptive_fields_by_hand():
    # Table 1, column D: 3x3/1 convs, 2x2/2 pools.
    stages = [2, 2, 3, 3, 3]
    layers = [w for n in stages for w in [(3, 1)] * n + [(2, 2)]]
    summary = summary_of("vgg_d", *NO_NORM)
    names = [r.name for r in summary.at_depth(1) if r.name.startswith(("conv", "maxpool"))]
    assert fields(summary, names) == by_hand(layers)
    # conv5_3: 1 + 2 + 2 = 5, pool1 +1 = 6 (j 2), +4 +4 = 14, pool2 +2 = 16 (j 4),
    # +8 x 3 = 40, pool3 +4 = 44 (j 8), +16 x 3 = 92, pool4 +8 = 100 (j 16), +32 x 3 = 196,
    # pool5 +16 = 212 (j 32).
    assert fields(summary, ["conv13", "maxpool5"]) == [(196, 16), (212, 32)]
    # fc6 sees the whole 7x7 map: a 7x7 window, 212 + 6 * 32.
    assert fields(summary, ["fc1"]) == [(404, 32)]


def test_alexnet_receptive_fields_by_hand():
    summary = summary_of("alexnet", *NO_NORM)
    names = ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"]
    # conv1 11 (j 4); pool1 11 + 2*4 = 19 (j 8); conv2 19 + 4*8 = 51; pool2 51 + 2*8 = 67 (j 16);
    # conv3 67 + 2*16 = 99; conv4 131; conv5 163; pool5 163 + 2*16 = 195 (j 32).
    assert fields(summary, names) == [(11, 4), (19, 8), (51, 8), (67, 16), (99, 16), (131, 16),
                                      (163, 16), (195, 32)]
    # LRN and dropout keep their input's field.
    assert fields(summary, ["norm1", "norm2"]) == [(11, 4), (51, 8)]


def test_parallel_branches_take_the_widest():
    # inception3a after pool2 (27, j 8): 1x1 27, 3x3 27 + 16 = 43, 5x5 27 + 32 = 59,
    # 3x3 pool + 1x1 43 -> 59.
    googlenet = summary_of("googlenet", *NO_NORM, "model.width=0.0625")
    assert fields(googlenet, ["pool2", "inception3a"]) == [(27, 8), (59, 8)]
    # A basic block after pool1 (11, j 4): two 3x3 convs, 11 + 8 + 8; the shortcut adds 11.
    resnet = summary_of("resnet18", "model.width=0.0625")
    assert fields(resnet, ["pool1", "conv2_1", "conv2_1/shortcut"]) == [(11, 4), (27, 4),
                                                                        (11, 4)]
    # conv3_1 downsamples: 3x3/2 then 3x3/1: 43 + 2*4 = 51 (j 8), + 2*8 = 67.
    assert fields(resnet, ["conv3_1/conv1", "conv3_1"]) == [(51, 8), (67, 8)]


def test_lenet5_connection_table_groups_are_parallel():
    # C3's groups of output maps all read S2 (6, j 2): 6 + 4*2 = 14, not one after another.
    summary = summary_of("lenet5", *NO_NORM, dataset="mnist")
    assert fields(summary, ["C1", "S2", "C3", "S4", "C5"]) == by_hand(
        [(5, 1), (2, 2), (5, 1), (2, 2), (5, 1)])


# ----------------------------------------------------------------------- activation memory
# VGG-16's per-layer activations as the CS231n notes list them (float counts, input included):
# 224x224x3, then each conv and pool output, then FC 4096, 4096, 1000. The notes' total line
# says "24M * 4 bytes ~= 93MB / image"; their own lines add up to 15.2M (61 MB).
VGG16_ACTIVATIONS = (
    224 * 224 * 3
    + 2 * 224 * 224 * 64 + 112 * 112 * 64
    + 2 * 112 * 112 * 128 + 56 * 56 * 128
    + 3 * 56 * 56 * 256 + 28 * 28 * 256
    + 3 * 28 * 28 * 512 + 14 * 14 * 512
    + 3 * 14 * 14 * 512 + 7 * 7 * 512
    + 4096 + 4096 + 1000)


def test_vgg16_forward_activations_are_the_notes_layer_list():
    assert VGG16_ACTIVATIONS == 15_237_608
    summary = summary_of("vgg_d", *NO_NORM)
    assert summary.activation_bytes == 4 * VGG16_ACTIVATIONS
    assert rows(summary)["conv1"].activation_bytes == 224 * 224 * 64 * 4
    # Dropout at inference returns its input: no new memory.
    assert rows(summary)["dropout1"].activation_bytes == 0


def test_vgg16_memory_kept_for_training_by_hand():
    summary = summary_of("vgg_d", *NO_NORM, training_memory=True)
    conv_outputs = (2 * 224 * 224 * 64 + 2 * 112 * 112 * 128 + 3 * 56 * 56 * 256
                    + 3 * 28 * 28 * 512 + 3 * 14 * 14 * 512)
    pool_outputs = 112 * 112 * 64 + 56 * 56 * 128 + 28 * 28 * 256 + 14 * 14 * 512
    expected = (
        224 * 224 * 3 * 4          # the image, for conv1's kernel gradient
        + conv_outputs * (4 + 1)   # each ReLU's float output and its one-byte mask
        + pool_outputs * 4         # pools 1-4: the next conv's input
        + 7 * 7 * 512 * 4          # pool5 flattened, fc6's input
        + 4096 * 1                 # fc6's ReLU mask (dropout keeps its output)
        + 4096 * (1 + 4)           # dropout 1: mask and output, fc7's input
        + 4096 * 1                 # fc7's ReLU mask
        + 4096 * (1 + 4))          # dropout 2: mask and output, the classifier's input
    assert summary.saved_bytes == expected == 74_510_336
    table = rows(summary)
    assert table["conv1"].saved_bytes == 224 * 224 * 64 * 5
    assert table["maxpool1"].saved_bytes == 112 * 112 * 64 * 4


def test_batch_norm_keeps_two_maps_and_summary_json_has_the_fields():
    summary = summary_of("resnet20", dataset="cifar10", training_memory=True)
    stem_norm = rows(summary)["stem_norm"]
    # Centred input and normalized value (32x32x16 floats each) plus a few per-channel vectors.
    assert 2 * 32 * 32 * 16 * 4 <= stem_norm.saved_bytes < 2 * 32 * 32 * 16 * 4 + 1000
    report = summary.to_dict(depth=1)
    assert report["activation_bytes"] == summary.activation_bytes > 32 * 32 * 3 * 4
    assert report["saved_bytes"] == summary.saved_bytes > 0
    layer = report["layers"][0]
    assert {k: layer[k] for k in ("receptive_field", "jump")} == {"receptive_field": 3, "jump": 1}
    assert layer["activation_bytes"] == 32 * 32 * 16 * 4
    assert "saved_bytes" in layer


# ------------------------------------------------------------------------------------ ZFNet
def test_zfnet_layer_sizes_are_figure_3():
    table = rows(summary_of("zfnet", *NO_NORM))
    sizes = {name: table[name].output_shape for name in
             ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5")}
    assert sizes == {"conv1": (110, 110, 96), "pool1": (55, 55, 96), "conv2": (26, 26, 256),
                     "pool2": (13, 13, 256), "conv3": (13, 13, 512), "conv4": (13, 13, 1024),
                     "conv5": (13, 13, 512), "pool5": (6, 6, 512)}


def test_zfnet_parameters_by_hand():
    expected = (conv_params(7, 3, 96) + conv_params(5, 96, 256) + conv_params(3, 256, 512)
                + conv_params(3, 512, 1024) + conv_params(3, 1024, 512)
                + (6 * 6 * 512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000))
    summary = summary_of("zfnet", *NO_NORM)
    assert summary.params == expected == 107_627_624
    # Same fc7/fc8 as AlexNet; conv1 7x7x3x96 + 96.
    assert rows(summary)["conv1"].params == 7 * 7 * 3 * 96 + 96 == 14_208


# --------------------------------------------------------------------------------- DenseNet
def densenet_bc_params(depth: int, k: int, classes: int, c_in: int = 3) -> int:
    """Huang et al.'s DenseNet-BC for CIFAR with batch norm, counted layer by layer."""
    n = (depth - 4) // 6
    maps = 2 * k
    total = conv_params(3, c_in, maps, bias=False)
    for block in range(3):
        for _ in range(n):
            total += 2 * maps + conv_params(1, maps, 4 * k, bias=False)   # BN, 1x1
            total += 2 * 4 * k + conv_params(3, 4 * k, k, bias=False)     # BN, 3x3
            maps += k
        if block < 2:
            total += 2 * maps + conv_params(1, maps, maps // 2, bias=False)
            maps //= 2
    return total + 2 * maps + maps * classes + classes


def test_densenet_bc100_parameters_match_table_2():
    summary = summary_of("densenet_bc100", "norm=batch", dataset="cifar10")
    assert summary.params == densenet_bc_params(100, 12, 10) == 769_162
    assert round(summary.params / 1e6, 1) == 0.8  # Table 2: 0.8M
    table = rows(summary)
    assert [table[n].output_shape for n in ("dense1", "transition1", "dense2", "transition2",
                                            "dense3")] == [
        (32, 32, 216), (16, 16, 108), (16, 16, 300), (8, 8, 150), (8, 8, 342)]
    # Depth 100: conv1, 3 x 16 layers of two convs, 2 transition convs, the classifier.
    cfg = compose_config(["model=densenet_bc100", "dataset=cifar10"])
    kernels = [x for x in jax.tree_util.tree_leaves(
        abstract_variables(build_model(cfg, 10), (32, 32, 3))["params"]) if x.ndim == 4]
    assert len(kernels) + 1 == 1 + 3 * 16 * 2 + 2 + 1 == 100
    # Each 3x3 adds 2 to the field: 3 after conv1, 35 after the 16 layers of dense1.
    assert fields(summary, ["conv1", "dense1"]) == [(3, 1), (35, 1)]


@pytest.mark.parametrize("overrides", [["norm=none"], ["norm=group", "activation=elu",
                                                        "init=glorot_uniform"]])
def test_densenet_takes_the_layer_options(overrides):
    cfg = compose_config(["model=densenet_bc100", "dataset=cifar10", *overrides])
    variables = abstract_variables(build_model(cfg, 10), (32, 32, 3))
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    biases = [p for p, _ in leaves if "bias" in jax.tree_util.keystr(p)
              and "conv" in jax.tree_util.keystr(p)]
    # Without a norm with a shift, every conv gets a bias (99 convs).
    assert len(biases) == (99 if overrides == ["norm=none"] else 0)


@pytest.mark.parametrize("entry,message", [
    ("{dense: 16}", "model.layers[0]: dense needs its growth"),
    ("{dense: 16, growth: 12, bottleneck_width: -1}",
     "model.layers[0]: dense bottleneck_width=-1 must be a non-negative integer"),
    ("{transition: 1.5}", "model.layers[0]: transition compression=1.5 must be a number in"),
])
def test_bad_dense_entries_are_one_line_errors(entry, message):
    cfg = compose_config(["model=densenet_bc100", f"model.layers=[{entry}]"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
def test_densenet_growth_and_transitions_at_width_a_quarter(shape):
    # Width 1/4: growth k = 3, a first conv of 2k = 6 maps, bottlenecks of 4k = 12. Each block
    # adds 16 x 3 maps; a transition keeps floor(m / 2) of m maps and halves the side (28: the
    # odd 7 of the last block).
    cfg = compose_config(["model=densenet_bc100", "norm=batch", "model.width=0.25"])
    check_geometry(cfg, shape)
    summary = summarize(build_model(cfg, 10), shape, "densenet_bc100", training_memory=False)
    assert summary.params == densenet_bc_params(100, 3, 10, c_in=shape[-1])
    table, side = rows(summary), shape[0]
    maps, expected = 6, {"conv1": (side, side, 6)}
    for block in (1, 2, 3):
        for layer in range(1, 17):
            prefix = f"dense{block}/layer{layer}"
            expected[f"{prefix}/conv1"] = (side, side, 12)
            expected[prefix] = (side, side, maps + 3 * layer)
        maps += 16 * 3
        expected[f"dense{block}"] = (side, side, maps)
        if block < 3:
            maps, side = maps // 2, side // 2
            expected[f"transition{block}"] = (side, side, maps)
    assert {name: table[name].output_shape for name in expected} == expected
    assert (maps, side) == (85, shape[0] // 4)
    # That every one of the 100 layers feeds the logits: test_zoo's dependence check.


def test_a_densenet_bc_fits_64_images(tmp_path, fashion_dir):
    # DenseNet-BC of depth 6n + 4 = 28 (n = 4, k = 12): the 100-layer net's blocks, transitions
    # and final BN-ReLU at a depth whose training step compiles in seconds.
    layers = ("[{conv: 24, kernel: 3, norm_act: false, name: conv1},"
              " {dense: 4, growth: 12, name: dense1}, {transition: 0.5, name: transition1},"
              " {dense: 4, growth: 12, name: dense2}, {transition: 0.5, name: transition2},"
              " {dense: 4, growth: 12, name: dense3}, {preact: null, name: final_norm_act},"
              " global_avgpool]")
    errors, summary = fit_64_images(tmp_path, fashion_dir, "model=densenet_bc100", "norm=batch",
                                    f"model.layers={layers}")
    assert summary["params"] == densenet_bc_params(28, 12, 10, c_in=1)
    assert len(errors) == 3 and errors[-1] < 10, errors


# -------------------------------------------------------------------------------- ConvNetJS
def test_convnetjs_parameters_by_hand():
    # conv 5x5x3x16, 5x5x16x20, 5x5x20x20 (all with biases), fc 4x4x20 -> 10.
    expected = (conv_params(5, 3, 16) + conv_params(5, 16, 20) + conv_params(5, 20, 20)
                + 4 * 4 * 20 * 10 + 10)
    summary = summary_of("convnetjs", *NO_NORM, dataset="cifar10")
    assert summary.params == expected == 22_466
    assert rows(summary)["pool3"].output_shape == (4, 4, 20)
    # fashion_mnist: padded to 32x32, one channel.
    fashion = summary_of("convnetjs", *NO_NORM, dataset="fashion_mnist")
    assert fashion.model_input_shape == (32, 32, 1)
    assert fashion.params == expected - 5 * 5 * 2 * 16


def test_convnetjs_experiment_is_the_demo_trainer():
    cfg = training_config(compose_study("convnetjs_cifar10"))
    assert cfg.model.name == "convnetjs" and cfg.dataset.name == "cifar10"
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.rho, cfg.optimizer.eps) == (
        "adadelta", 1.0, 0.95, 1e-6)
    assert cfg.train.batch_size == 4
    # l2_decay 1e-4 on the batch's summed gradient, divided by the batch size of 4; kernels only.
    assert cfg.regularization.l2 == pytest.approx(1e-4 / 4)
    assert cfg.regularization.apply_to == "kernels" and cfg.optimizer.weight_decay == 0
    # Random flips and shifts of up to 2 px.
    assert (cfg.augment.crop_pad, cfg.augment.flip) == (2, True)
    assert cfg.norm.name == "none"
