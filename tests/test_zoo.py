"""The classic architectures against their papers, the lecture notes and torchvision.

Every expected figure here comes from outside cnnlab: the papers' tables, the lecture notes'
worked examples, torchvision's published model statistics, or arithmetic written out in the
test from the layer widths the papers give.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.cli.preflight import validate
from cnnlab.config.groups import group_options
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, check_geometry, init_variables, model_options
from cnnlab.models.blocks import AUX_COLLECTION, CONNECTION_TABLES, TableConv
from cnnlab.models.summary import Summary, summarize
from tests.helpers import compose_config, run_cli

IMAGENET = ["dataset=imagenet"]
# The papers' networks predate batch norm (except ResNet).
NO_NORM = ["norm=none"]


def summary_of(model: str, *overrides: str, dataset: str = "imagenet",
               training_memory: bool = False) -> Summary:
    cfg = compose_config([f"model={model}", f"dataset={dataset}", *overrides])
    return summarize(build_model(cfg, cfg.dataset.num_classes), tuple(cfg.dataset.image_shape),
                     model, training_memory)


def rows(summary: Summary) -> dict:
    return {row.name: row for row in summary.rows}


def conv_params(k: int, c_in: int, c_out: int, bias: bool = True) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


# ------------------------------------------------------------------------------------- VGG
# torchvision's published statistics (num_params, GFLOPS = 1e9 multiply-adds) for vgg11/13/16/19,
# which are configurations A, B, D, E of Simonyan & Zisserman's Table 1.
TORCHVISION_VGG = {"vgg_a": (132_863_336, 7.61), "vgg_b": (133_047_848, 11.31),
                   "vgg_d": (138_357_544, 15.47), "vgg_e": (143_667_240, 19.63)}
# The paper's Table 2: parameters in millions.
PAPER_VGG_M = {"vgg_a": 133, "vgg_a_lrn": 133, "vgg_b": 133, "vgg_c": 134, "vgg_d": 138,
               "vgg_e": 144}


def vgg_params_by_hand(convs: list[tuple[int, int]]) -> int:
    """Parameters of a VGG column of Table 1 with 1000 classes: (kernel, width) per conv."""
    total, c_in = 0, 3
    for k, c_out in convs:
        total += conv_params(k, c_in, c_out)
        c_in = c_out
    return total + (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)


@pytest.mark.parametrize("model", sorted(PAPER_VGG_M))
def test_vgg_parameters_match_table_2_and_torchvision(model):
    summary = summary_of(model, *NO_NORM)
    assert round(summary.params / 1e6) == PAPER_VGG_M[model]
    if model in TORCHVISION_VGG:
        params, gflops = TORCHVISION_VGG[model]
        assert summary.params == params
        assert round(summary.macs / 1e9, 2) == gflops


def test_vgg_c_differs_from_d_by_its_three_1x1_convs():
    c = [(3, 64)] * 2 + [(3, 128)] * 2 + [(3, 256)] * 2 + [(1, 256)] + (
        [(3, 512)] * 2 + [(1, 512)]) * 2
    assert summary_of("vgg_c", *NO_NORM).params == vgg_params_by_hand(c) == 133_638_952


def test_vgg_output_sizes_halve_at_each_pool():
    table = rows(summary_of("vgg_e", *NO_NORM))
    pools = [table[f"maxpool{i}"].output_shape for i in range(1, 6)]
    assert pools == [(112, 112, 64), (56, 56, 128), (28, 28, 256), (14, 14, 512), (7, 7, 512)]


def test_vgg_a_lrn_adds_one_lrn_and_no_parameters():
    with_lrn, without = summary_of("vgg_a_lrn", *NO_NORM), summary_of("vgg_a", *NO_NORM)
    assert [r.kind for r in with_lrn.at_depth(1)][:3] == ["conv 3x3/1", "lrn", "maxpool 2x2/2"]
    assert len(with_lrn.at_depth(1)) == len(without.at_depth(1)) + 1
    assert (with_lrn.params, with_lrn.macs) == (without.params, without.macs)


@pytest.mark.parametrize("model", ["vgg_a_cifar", "vgg_e_cifar"])
def test_vgg_cifar_variants_keep_the_stack_and_end_at_1x1(model):
    summary = summary_of(model, *NO_NORM, dataset="cifar10")
    table = rows(summary)
    assert table["maxpool5"].output_shape == (1, 1, 512)
    full = summary_of(model.removesuffix("_cifar"), *NO_NORM)
    conv_part = sum(r.params for r in full.at_depth(1) if r.name.startswith("conv"))
    assert sum(r.params for r in summary.at_depth(1) if r.name.startswith("conv")) == conv_part
    # head: FC 512 + classifier 512 -> 10
    assert summary.params == conv_part + (512 * 512 + 512) + (512 * 10 + 10)


# --------------------------------------------------------------------------------- AlexNet
def test_alexnet_conv1_as_in_the_notes():
    # Notes: kernel 11x11x3x96, stride 4, output (55, 55, 96), 34,944 parameters.
    conv1 = rows(summary_of("alexnet", *NO_NORM))["conv1"]
    assert conv1.output_shape == (55, 55, 96)
    assert conv1.params == 34_944


def test_alexnet_layer_sizes_and_total_as_in_the_notes():
    # The notes' layer list: CONV1 55x55x96, POOL1 27x27x96, CONV2 27x27x256, POOL2 13x13x256,
    # CONV3/4 13x13x384, CONV5 13x13x256, POOL3 6x6x256, FC 4096, 4096, 1000.
    table = rows(summary_of("alexnet", *NO_NORM))
    assert table["pool1"].output_shape == (27, 27, 96)
    assert table["conv2"].output_shape == (27, 27, 256)
    assert table["pool2"].output_shape == (13, 13, 256)
    assert table["conv4"].output_shape == (13, 13, 384)
    assert table["pool5"].output_shape == (6, 6, 256)
    expected = (conv_params(11, 3, 96) + conv_params(5, 96, 256) + conv_params(3, 256, 384)
                + conv_params(3, 384, 384) + conv_params(3, 384, 256)
                + (6 * 6 * 256 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000))
    assert summary_of("alexnet", *NO_NORM).params == expected == 62_378_344


def test_alexnet_two_gpu_split_has_the_papers_60_million():
    # Krizhevsky et al.: "60 million parameters"; conv2, conv4, conv5 see half their inputs.
    summary = summary_of("alexnet_2gpu", *NO_NORM)
    saved = sum((k * k * c_in * c_out) // 2 for k, c_in, c_out in
                [(5, 96, 256), (3, 384, 384), (3, 384, 256)])
    assert summary.params == 62_378_344 - saved == 60_965_224


def test_alexnet_at_224_is_the_classic_geometry_error():
    cfg = compose_config(["model=alexnet", "model.input_size=224", *IMAGENET])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith("conv1 (11x11, stride 4) cannot be applied to a 224x224")


def test_alexnet_cifar_fits_32x32():
    table = rows(summary_of("alexnet_cifar", *NO_NORM, dataset="cifar10"))
    assert table["conv1"].output_shape == (32, 32, 96)
    assert table["pool5"].output_shape == (4, 4, 256)


# -------------------------------------------------------------------------------- GoogLeNet
# Szegedy et al. 2015, Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), input
# channels, output side, then the table's params (K = 1024) and ops (M = 1e6).
INCEPTION_TABLE = {
    "inception3a": ((64, 96, 128, 16, 32, 32), 192, 28, 159, 128),
    "inception3b": ((128, 128, 192, 32, 96, 64), 256, 28, 380, 304),
    "inception4a": ((192, 96, 208, 16, 48, 64), 480, 14, 364, 73),
    "inception4b": ((160, 112, 224, 24, 64, 64), 512, 14, 437, 88),
    "inception4c": ((128, 128, 256, 24, 64, 64), 512, 14, 463, 100),
    "inception4d": ((112, 144, 288, 32, 64, 64), 512, 14, 580, 119),
    "inception4e": ((256, 160, 320, 32, 128, 128), 528, 14, 840, 170),
    "inception5a": ((256, 160, 320, 32, 128, 128), 832, 7, 1072, 54),
    "inception5b": ((384, 192, 384, 48, 128, 128), 832, 7, 1388, 71),
}
# Two entries of the paper's table disagree with the widths it lists: 4c's params (463K) are
# not its own ops / 14^2 (100M / 196 = 510K, which the widths give), and 5a's params and ops are
# both about 5% above what its widths (identical to 4e's) give.
PAPER_TABLE_SLIPS = {"inception4c": "params", "inception5a": "both"}


def inception_weights(widths, c_in):
    n1, r3, n3, r5, n5, pp = widths
    return c_in * n1 + c_in * r3 + 9 * r3 * n3 + c_in * r5 + 25 * r5 * n5 + c_in * pp


@pytest.mark.parametrize("module", sorted(INCEPTION_TABLE))
def test_inception_modules_match_table_1(module):
    widths, c_in, side, paper_k, paper_mops = INCEPTION_TABLE[module]
    row = rows(summary_of("googlenet", *NO_NORM))[module]
    weights = inception_weights(widths, c_in)
    assert row.params == weights + sum(widths)  # one bias per filter
    assert row.macs == weights * side * side
    assert row.output_shape == (side, side, widths[0] + widths[2] + widths[4] + widths[5])
    slip = PAPER_TABLE_SLIPS.get(module)
    tolerance = 0.06 if slip == "both" else 0.02
    assert row.macs / 1e6 == pytest.approx(paper_mops, rel=tolerance)
    if slip == "params":
        assert paper_mops * 1e6 / side**2 / 1024 == pytest.approx(weights / 1024, rel=0.02)
    else:
        assert weights / 1024 == pytest.approx(paper_k, rel=tolerance)


def test_googlenet_stem_head_and_budget():
    summary = summary_of("googlenet", *NO_NORM)
    table = rows(summary)
    # Table 1: conv 3x3 reduce 64 + 3x3 192 at 56x56: 112K params, 360M ops; linear 1000K, 1M.
    stem_weights = 64 * 64 + 9 * 64 * 192
    assert (table["conv2_reduce"].params + table["conv2"].params) - (64 + 192) == stem_weights
    assert round(stem_weights / 1024) == 112
    assert round((table["conv2_reduce"].macs + table["conv2"].macs) / 1e6) == 360
    assert round((table["classifier"].params - 1000) / 1024) == 1000
    assert table["pool5"].output_shape == (1, 1, 1024)
    # "a computational budget of 1.5 billion multiply-adds at inference time"
    assert summary.macs / 1e9 == pytest.approx(1.5, rel=0.06)
    # The auxiliary heads hold parameters but cost nothing at inference.
    assert table["aux1"].train_only and table["aux1"].params > 0
    no_aux = summary_of("googlenet", *NO_NORM, "model.aux_classifiers=false")
    assert no_aux.macs == summary.macs
    assert no_aux.params == summary.params - table["aux1"].params - table["aux2"].params


def test_the_notes_1x1_reduction_arithmetic():
    # Notes: a 5x5 conv with 32 filters on 28x28x192 costs 5^2 * 28^2 * 192 * 32 = 120,422,400
    # multiplies; a 1x1 reduction to 16 maps first costs 2,408,448 + 10,035,200 = 12,443,648.
    direct = summary_of("vgg_a", "model.layers=[{conv: 32, kernel: 5}]", "model.head=[]",
                        "model.input_size=28", "dataset.image_shape=[28,28,192]")
    assert rows(direct)["conv1"].macs == 120_422_400
    parts = rows(summary_of("googlenet", *NO_NORM, "summary.depth=2"))
    assert parts["inception3a/5x5_reduce"].macs == 2_408_448
    assert parts["inception3a/5x5"].macs == 10_035_200


# ----------------------------------------------------------------------------------- ResNet
# torchvision's published statistics. Its bottleneck nets stride in the 3x3 ("v1.5").
TORCHVISION_RESNET = {18: (11_689_512, 1.81), 34: (21_797_672, 3.66), 50: (25_557_032, 4.09),
                      101: (44_549_160, 7.80), 152: (60_192_808, 11.51)}
# He et al. 2016, Table 1: FLOPs (multiply-adds) x 1e9, with the stride in the first 1x1.
PAPER_RESNET_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


@pytest.mark.parametrize("depth", sorted(PAPER_RESNET_GMACS))
def test_imagenet_resnets_match_the_paper_and_torchvision(depth):
    paper = summary_of(f"resnet{depth}")
    assert paper.macs / 1e9 == pytest.approx(PAPER_RESNET_GMACS[depth], rel=0.02)
    params, gflops = TORCHVISION_RESNET[depth]
    torchvision_like = summary_of(f"resnet{depth}", "model.stride_at=3x3")
    assert paper.params == torchvision_like.params == params
    assert round(torchvision_like.macs / 1e9, 2) == gflops


@pytest.mark.parametrize("depth,expansion,stage_widths", [(18, 1, (64, 128, 256, 512)),
                                                         (50, 4, (64, 128, 256, 512))])
def test_plain_nets_are_resnets_without_the_projections(depth, expansion, stage_widths):
    outs = [w * expansion for w in stage_widths]
    # Option B projects (1x1 conv without bias + BN scale and shift) where the shape changes:
    # into each stage after the first, and, for bottlenecks, 64 -> 256 into the first.
    changes = list(zip([64, *outs[:-1]], outs, strict=True))
    if expansion == 1:
        changes = changes[1:]
    projections = sum(c_in * c_out + 2 * c_out for c_in, c_out in changes)
    assert summary_of(f"plain{depth}").params == summary_of(f"resnet{depth}").params - projections


def test_resnet50_is_about_25_6_million_parameters_and_4_gmacs():
    # The notes: "ResNet50 ... 25M [parameters] vs 138M [VGG-16]; 3.8B Flops vs 15.3B Flops".
    summary = summary_of("resnet50")
    assert summary.params / 1e6 == pytest.approx(25.6, abs=0.05)
    assert 3.8 <= summary.macs / 1e9 <= 4.1


def test_resnet_stage_outputs():
    table = rows(summary_of("resnet34"))
    assert table["conv1"].output_shape == (112, 112, 64)
    assert table["pool1"].output_shape == (56, 56, 64)
    assert [table[f"conv{s}_1"].output_shape for s in (2, 3, 4, 5)] == [
        (56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)]


# ------------------------------------------------------------------------------------ LeNet
def test_lenet5_has_the_papers_parameters_and_connections():
    # LeCun et al. 1998, section II-B: trainable parameters / connections per layer.
    table = rows(summary_of("lenet5", *NO_NORM, dataset="mnist"))
    expected = {"C1": (156, 122_304), "S2": (12, 5_880), "C3": (1_516, 151_600),
                "S4": (32, 2_000), "C5": (48_120, 48_120), "F6": (10_164, 10_164)}
    for name, (params, connections) in expected.items():
        row = table[name]
        outputs = int(np.prod(row.output_shape))
        # A connection is a multiply-add or a bias; an S unit sums 4 inputs and adds its bias.
        links = row.macs + outputs if row.macs else outputs * (2 * 2 + 1)
        assert (row.params, links) == (params, connections), name
    assert sum(table[n].params for n in expected) == 60_000  # "60,000 trainable parameters"
    assert table["C1"].output_shape == (28, 28, 6)
    assert table["C5"].output_shape == (1, 1, 120)


def test_lenet5_pads_28x28_digits_to_32x32():
    summary = summary_of("lenet5", *NO_NORM, dataset="mnist")
    assert summary.input_shape == (28, 28, 1) and summary.model_input_shape == (32, 32, 1)
    model = build_model(compose_config(["model=lenet5", "norm=none"]), 10)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
    variables = init_variables(model, jax.random.PRNGKey(1), (28, 28, 1))
    padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(variables, x), apply(variables, padded), rtol=1e-6)


def test_lenet5_c3_follows_table_1():
    # C3 map j must depend on exactly the S2 maps Table I lists for it: perturb each in turn.
    table = CONNECTION_TABLES.get("lenet5_c3")
    model = build_model(compose_config(["model=lenet5", "norm=none"]), 10)
    variables = init_variables(model, jax.random.PRNGKey(1), (32, 32, 1))
    conv = TableConv(5, table, model.layers, padding=0)
    params = {"params": variables["params"]["C3"]["conv"]}
    s2 = jax.random.normal(jax.random.PRNGKey(2), (1, 14, 14, 6))
    base = conv.apply(params, s2)
    for i in range(6):
        changed = conv.apply(params, s2.at[..., i].add(1.0))
        moved = np.abs(np.asarray(changed - base)).reshape(-1, 16).max(0) > 0
        assert {j for j in range(16) if moved[j]} == {j for j in range(16) if i in table[j]}


# ------------------------------------------------------------------------- geometry, summary
def test_geometry_error_names_layer_kernel_stride_and_input():
    cfg = compose_config(["model=vgg_a", "model.input_size=7", "model.head=[]",
                          "model.layers=[conv3-8, conv3-8, {conv: 8, kernel: 3, stride: 3, "
                          "padding: 0}]"])
    with pytest.raises(ConfigError) as info:
        check_geometry(cfg, (28, 28, 1))
    assert str(info.value).startswith("conv3 (3x3, stride 3) cannot be applied to a 7x7 input")


def test_cli_rejects_impossible_geometry_before_compiling(tmp_path):
    result = run_cli(["train", "model=vgg_a_cifar", "model.input_size=null",
                      f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "cnnlab: error: maxpool3 (2x2, stride 2) cannot be applied to a 7x7 input: "
        "(N - F + 2P) / S + 1 is not a whole positive number")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("entry,message", [
    ("{conv: 8, kernl: 3}", "model.layers[0]: conv has no option 'kernl'"),
    ("conv3-x", "model.layers[0]: unknown layer 'conv3-x'"),
    ("{conv: 8, stride: 0}", "model.layers[0]: conv stride=0 must be a positive integer"),
    ("{maxpool: 2, conv: 3}", "model.layers[0]: a layer mapping needs exactly one kind key"),
    ("{inception: [1, 2, 3]}", "model.layers[0]: inception widths=[1, 2, 3] must be six"),
])
def test_bad_layer_entries_are_one_line_errors(entry, message):
    cfg = compose_config(["model=vgg_a", f"model.layers=[{entry}]"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_summary_json_totals_and_rows(tmp_path):
    result = run_cli(["summary", "model=resnet18", "dataset=imagenet", "summary.format=json"],
                     cwd=tmp_path, fresh_process=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["params"] == TORCHVISION_RESNET[18][0]
    assert report["macs"] == sum(layer["macs"] for layer in report["layers"])
    assert report["params"] == sum(layer["params"] for layer in report["layers"])
    names = [layer["name"] for layer in report["layers"]]
    assert names[:2] == ["conv1", "pool1"] and names[-1] == "classifier"
    assert report["layers"][0]["output_shape"] == [112, 112, 64]


def test_summary_table_lists_layers_and_totals(tmp_path):
    result = run_cli(["summary", "model=alexnet", "dataset=imagenet", "norm=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    conv1 = next(line for line in lines if line.startswith("conv1"))
    # ... receptive field 11, jump 4, 55*55*96 floats forward, their ReLU output and mask kept.
    assert conv1.split() == ["conv1", "conv", "11x11/4", "55x55x96", "34,944", "105,415,200",
                             "11", "4", "1,161.6", "1,452.0"]
    body = lines[lines.index(next(x for x in lines if x.startswith("layer"))) + 2:-2]
    total = lines[-1].split()
    assert total[:2] == ["total", "62,378,344"]
    assert int(total[2].replace(",", "")) == sum(int(x.split()[-5].replace(",", "")) for x in body)


def test_summary_needs_no_data(tmp_path):
    result = run_cli(["summary", "model=resnet20", "dataset=cifar10",
                      f"dataset.data_dir={tmp_path}", "dataset.download=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "269,722 parameters" in result.stdout


# ------------------------------------------------------------------ every layer is wired in
# The smallest square input each ImageNet net's geometry allows (worked out from its layer list),
# with its own input_size (a resize up to 224) switched off: the dependence check below compiles
# a backward pass, and this keeps it cheap. Every other model runs at its own input size.
# AlexNet: conv1 11x11/4 needs 11 + 4k pixels and each 3x3/2 pool an odd side: 67 -> 15, 7, 3, 1
# (torchvision's pads 2 + 1: 64 -> 15). ZFNet: 55 -> 25, 13, 5, 3, 1. GoogLeNet: five
# 'same' halvings must leave the 7x7 of its last average pool, and four a side its auxiliary
# heads' 5x5/3 pool tiles: 209 -> 14, 7. VGG: five 2x2/2 pools,
# 32 -> 1. ResNets: 32 -> 16, 8, 4, 2, 1 before the global pool.
SMALL_INPUT = {"alexnet": 67, "alexnet_2gpu": 67, "alexnet_torchvision": 64, "zfnet": 55,
               "googlenet": 209,
               **{f"vgg_{c}": 32 for c in ("a", "a_lrn", "b", "c", "d", "e")},
               **{f"{kind}{depth}": 32 for kind in ("resnet", "plain")
                  for depth in (18, 34, 50, 101, 152)}}
# The CIFAR ResNets, DenseNet and the pattern take any size their strides divide.
SIDE_WITHOUT_INPUT_SIZE = 8
# Layer kinds that hold weights (cnnlab.models.spec), each a top-level entry of the parameters.
WEIGHTED_KINDS = {"conv", "fc", "subsample", "inception", "aux", "basic", "bottleneck", "dense",
                  "transition", "preact"}


def dependence_case(model_name: str, *overrides: str) -> tuple:
    """(config, input shape) of a model's dependence check: width 1/16 for the stack nets (every
    layer kept, LeNet-5's connection table only exists at width 1), the input above."""
    extra = _reduced(model_name)
    if model_name in SMALL_INPUT:
        extra.append("model.input_size=null")
    cfg = compose_config([f"model={model_name}", *extra, *overrides])
    side = SMALL_INPUT.get(model_name) or cfg.model.input_size or SIDE_WITHOUT_INPUT_SIZE
    return cfg, (side, side, 3)


def listed_layers(cfg) -> set[str]:
    """The top-level names of the layers with weights that the model's config lists."""
    if cfg.model.family == "cifar_resnet":
        # He et al.'s 6n+2: a stem, three stages of n two-conv blocks, the classifier.
        blocks_per_stage = (cfg.model.depth - 2) // 6
        return {"stem", "stem_norm", "head"} | {
            f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(1, blocks_per_stage + 1)}
    options = model_options(cfg.model)
    options = options.stack_options() if cfg.model.family == "pattern" else options
    body, head = options.specs()
    return {"classifier"} | {s.name for s in body + head if s.kind in WEIGHTED_KINDS
                             and (s.kind != "aux" or options.aux_classifiers)}


def output_gradient(model, variables: dict, x: jax.Array) -> dict:
    """The gradient of a fixed random projection of the logits with respect to every weight.

    In training mode (batch statistics, dropout with a fixed key), auxiliary classifiers' logits
    included. Not in eval mode: with the running statistics of a fresh net (mean 0, variance 1)
    every block of a residual net about doubles its input's variance, and ResNet-1202's 600
    blocks overflow float32, zeroing every gradient; a width-1/16 net's one-map ReLUs can also
    be all zero on a small input, which batch statistics rule out."""
    key = jax.random.PRNGKey(5)

    def projected(params):
        logits, state = model.apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats", AUX_COLLECTION],
                                    rngs={"dropout": jax.random.PRNGKey(6)})
        heads = jax.tree.leaves(state.get(AUX_COLLECTION, {}),
                                is_leaf=lambda t: isinstance(t, dict) and "logits" in t)
        logits = jnp.concatenate([logits, *(h["logits"] for h in heads)], axis=-1)
        return jnp.sum(logits * jax.random.normal(key, logits.shape))

    return jax.jit(jax.grad(projected))(variables["params"])


def check_every_layer_counts(model_name: str, *overrides: str) -> None:
    cfg, shape = dependence_case(model_name, *overrides)
    check_geometry(cfg, shape)
    model = build_model(cfg, 10)
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    # A layer the forward pass skips has no weights (Flax creates them on the first call) ...
    assert set(variables["params"]) == listed_layers(cfg)
    # ... or weights the output does not depend on: a zero gradient. (No zoo model starts a layer
    # at zero, e.g. a zero-init last BN scale, which would zero the layers before it too.)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, *shape))
    gradient = output_gradient(model, variables, x)
    leaves = jax.tree_util.tree_leaves_with_path(gradient)
    dead = [jax.tree_util.keystr(path) for path, g in leaves if not np.any(np.asarray(g))]
    assert not dead, f"{model_name}: the output does not depend on {dead}"


@pytest.mark.parametrize("model_name", group_options("model"))
def test_zoo_model_output_depends_on_every_layer(model_name):
    check_every_layer_counts(model_name)


def test_scanned_residual_blocks_each_count():
    # The CIFAR ResNets from 56 layers on scan their blocks by default (checked above), the stack
    # nets only when asked: ResNet-50's runs of 2, 3, 5 and 2 identical bottlenecks are scans.
    check_every_layer_counts("resnet50", "model.scan_blocks=true")


def _reduced(model_name: str) -> list[str]:
    """Width 1/16 keeps the full depth and geometry at a fraction of the compute."""
    family = compose_config([f"model={model_name}"]).model.family
    return ["model.width=0.0625"] if family == "stack" and model_name != "lenet5" else []


def test_googlenet_aux_heads_are_trained_only_through_their_loss():
    cfg = compose_config(["model=googlenet", "model.width=0.0625"])
    model = build_model(cfg, 10)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 224, 224, 3))
    variables = init_variables(model, jax.random.PRNGKey(1), (224, 224, 3))
    train_apply = jax.jit(functools.partial(
        model.apply, train=True, mutable=["batch_stats", AUX_COLLECTION]))
    _, state = train_apply(variables, x, rngs={"dropout": jax.random.PRNGKey(2)})
    heads = jax.tree.leaves(state[AUX_COLLECTION],
                            is_leaf=lambda t: isinstance(t, dict) and "logits" in t)
    assert len(heads) == 2 and all(h["logits"].shape == (2, 10) for h in heads)
    assert [float(h["weight"]) for h in heads] == pytest.approx([0.3, 0.3])
    # At inference the heads are skipped: no output, and the logits do not depend on them.
    apply = jax.jit(model.apply)
    logits = apply(variables, x)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "aux" in jax.tree_util.keystr(p) else v,
        variables["params"])
    np.testing.assert_array_equal(logits, apply({**variables, "params": zeroed}, x))


# The few models a small fixed batch is fitted with through the CLI: one of each family of
# block a run uses on small images (table conv and subsampling, plain conv stack with dropout,
# residual), at a width that keeps a step cheap.
# Steps each needs: VGG-A at width 1/4 was at 20.6% after 30 (61, 30, 21% over each 10).
FITTED = {"lenet5": ([], 60), "vgg_a_cifar": (["model.width=0.25"], 60), "resnet20": ([], 30)}


def fit_64_images(tmp_path, data_dir, *overrides: str,
                  steps: int = 30) -> tuple[list[float], dict]:
    """Train on one full batch of the same 64 images, no augmentation, for `steps` steps through
    the CLI: the training error logged over every 10 steps, and the run's summary."""
    result = run_cli(["train", *overrides, "dataset.max_examples=64", "train.batch_size=64",
                      f"train.steps={steps}", "train.steps_per_call=10", "train.log_every=10",
                      "train.eval_every=0", "augment=none", "checkpoint.enabled=false",
                      "logger.mode=disabled", "progress=false", f"dataset.data_dir={data_dir}",
                      f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    return [e["train/error"] for e in events if "train/error" in e], summary


@pytest.mark.parametrize("model_name", sorted(FITTED))
def test_small_model_fits_64_images(model_name, tmp_path, fashion_dir):
    # A net that trains drives its training error on the batch from about chance (90%) to near
    # zero within a few dozen steps (ResNet-20: 0.5% over steps 11-20, 0% after); one whose
    # layers or updates are miswired does not.
    overrides, steps = FITTED[model_name]
    errors, _ = fit_64_images(tmp_path, fashion_dir, f"model={model_name}", *overrides,
                              steps=steps)
    assert len(errors) == steps // 10 and errors[-1] < 10, errors


def test_lenet5_trains_end_to_end_on_fashion_mnist(tmp_path, fashion_dir):
    result = run_cli(["train", "model=lenet5", "activation=scaled_tanh", "norm=none",
                      "dataset.max_examples=512", "train.batch_size=32", "train.steps=20",
                      "train.log_every=10", "train.eval_every=0", "checkpoint.every=10",
                      "logger.mode=disabled", "progress=false", f"dataset.data_dir={fashion_dir}",
                      f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["params"] == 60_850
    # Chance is 90%; 20 steps reach 56.1% with this seed (0) and 49.6, 56.1, 62.3% with seeds
    # 1-3 (test error on the 512 test images), so a net that only starts to learn fails.
    assert summary["final/test/error"] < 65
