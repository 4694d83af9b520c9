"""Transfer learning (cnnlab/transfer): plans, loading by path, frozen layers, two phases."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cnnlab.cli import preflight
from cnnlab.config import load as config_load
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, init_variables
from cnnlab.models.summary import summarize
from cnnlab.training import build as run
from cnnlab.transfer.load import load
from cnnlab.transfer.plan import make_plan
from cnnlab.transfer.sources import Source
from tests.helpers import TINY, train_tiny

RESNET8 = ["resnet20", "stem", "stem_norm", "stage1_block1", "stage2_block1", "stage3_block1",
           "head"]
ORDER = RESNET8[1:]


def _tr(**values):
    cfg = config_load.compose(["transfer=finetune_all", "transfer.source=/nowhere",
                             "transfer.backbone_lr_mult=1.0"])
    for key, value in values.items():
        cfg.transfer[key] = value
    return cfg.transfer


@pytest.mark.parametrize("mode,extra,roles", [
    ("linear_probe", {}, "FFFFFH"),
    ("finetune_top", {"freeze_through": "stage1"}, "FFFBBH"),
    ("finetune_top", {"freeze_through": "stem_norm", "load_through": "stage2_block1"},
     "FFBBHH"),
    ("finetune_all", {}, "BBBBBH"),
    ("finetune_all", {"load_through": "stage1"}, "BBBHHH"),
    ("two_phase", {"probe_steps": 4}, "BBBBBH"),
])
def test_plan_gives_each_layer_its_role(mode, extra, roles):
    tr = _tr(mode=mode, backbone_lr_mult=1.0, **extra)
    plan = make_plan(tr, ORDER, ORDER)
    assert "".join(plan.roles[layer][0].upper() for layer in ORDER) == roles
    if mode == "two_phase":
        assert plan.frozen_in("probe") == tuple(ORDER[:-1]) and plan.frozen_in("main") == ()


def test_plan_names_layers_and_stages():
    order = ["conv1", "pool1", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "pool5", "classifier"]
    with_params = [name for name in order if "pool" not in name]
    plan = make_plan(_tr(mode="finetune_top", freeze_through="conv2"), order, with_params)
    assert plan.with_role("frozen") == ("conv1", "conv2_1", "conv2_2")
    # A layer without parameters cuts the list too: through pool1 = conv1.
    plan = make_plan(_tr(mode="finetune_top", freeze_through="pool1"), order, with_params)
    assert plan.with_role("frozen") == ("conv1",)
    with pytest.raises(ConfigError, match=r"freeze_through=conv9 is not a layer.*stages: conv2"):
        make_plan(_tr(mode="finetune_top", freeze_through="conv9"), order, with_params)
    with pytest.raises(ConfigError, match="would freeze random weights"):
        make_plan(_tr(mode="finetune_top", freeze_through="conv3", load_through="conv2"),
                  order, with_params)
    with pytest.raises(ConfigError, match="nothing would train"):
        make_plan(_tr(mode="finetune_top", freeze_through="classifier"), order, with_params)


@pytest.mark.parametrize("overrides,message", [
    (["transfer.source=/x"], "transfer.source=/x is set but transfer=scratch"),
    (["transfer=linear_probe"], "needs transfer.source=RUN_DIR"),
    (["transfer=finetune_top", "transfer.source=/x"], "needs transfer.freeze_through"),
    (["transfer=linear_probe", "transfer.source=/x", "transfer.probe_steps=5"],
     "transfer.probe_steps=5 is not used by transfer=linear_probe"),
    (["transfer=two_phase", "transfer.source=/x", "transfer.probe_steps=15"],
     "must be a multiple of train.steps_per_call=10"),
    (["transfer=finetune_all", "transfer.source=/x", "transfer.bn=maybe"],
     "transfer.bn='maybe'; valid choices: frozen, train"),
    (["transfer.mode=sideways"], "sideways"),
])
def test_bad_transfer_values_are_one_line_errors(overrides, message):
    with pytest.raises(Exception) as error:
        preflight.compose(overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def _variables(overrides, classes=10, shape=(28, 28, 1), seed=0):
    """(the model's layers in order, its initial variables)."""
    cfg = config_load.compose(["model=resnet20", *overrides])
    model = build_model(cfg, classes)
    order = [row.name for row in summarize(model, shape).at_depth(1)]
    return order, init_variables(model, jax.random.PRNGKey(seed), shape)


def _flat(variables):
    return {k: np.asarray(v) for k, v in flatten_dict(variables, sep="/").items()}


def test_a_deeper_net_loads_a_shallower_ones_layers_by_path():
    """ResNet-8 -> ResNet-14 (He et al.'s deeper net from a shallower one): the stem, each
    stage's first block and, with the same classes, the classifier come from the source; the
    second blocks keep their initialization."""
    _, small = _variables(["model.depth=8", "model.width=4"], seed=1)
    order, deep = _variables(["model.depth=14", "model.width=4"], seed=2)
    plan = make_plan(_tr(mode="finetune_all"), order, list(deep["params"]))
    loaded = load(deep, Source(_flat(small), "ResNet-8"), plan, None)
    got, source, init = _flat(loaded.variables), _flat(small), _flat(deep)
    assert loaded.missing == ("stage1_block2", "stage2_block2", "stage3_block2")
    assert not loaded.head_reset
    for key in got:
        expected = source[key] if key in source else init[key]
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
    assert any(k.startswith("batch_stats/stage1_block1") for k in got)


def test_the_classifier_is_reset_when_the_classes_differ_and_shapes_must_fit():
    _, source = _variables(["model.depth=8", "model.width=4"], classes=5, seed=1)
    order, target = _variables(["model.depth=8", "model.width=4"], classes=10, seed=2)
    assert order == ORDER
    plan = make_plan(_tr(mode="finetune_all"), order, list(target["params"]))
    loaded = load(target, Source(_flat(source), "five classes"), plan, None)
    assert loaded.head_reset and "head" not in loaded.layers
    np.testing.assert_array_equal(_flat(loaded.variables)["params/head/kernel"],
                                  _flat(target)["params/head/kernel"])
    with pytest.raises(ConfigError, match=r"reset_head=false.*params/head/bias is \(5,\)"):
        load(target, Source(_flat(source), "five classes"), plan, False)
    _, wide = _variables(["model.depth=8", "model.width=8"], seed=1)
    with pytest.raises(ConfigError, match=r"params/stem/.*does not fit layer stem"):
        load(target, Source(_flat(wide), "wider"), plan, None)
    _, vgg = _variables(["model=vgg_a_cifar", "model.width=0.125"], shape=(32, 32, 3))
    with pytest.raises(ConfigError, match="has none of this model's layers"):
        load(target, Source(_flat(vgg), "VGG"), plan, None)


def test_vgg_warm_start_loads_mapped_layers():
    """Simonyan & Zisserman's warm start: net D's conv1, conv3, conv5, conv6 and the FC layers
    (two in the CIFAR variants) from net A's conv1..conv4 and FC layers, the others random."""
    common = ["model.width=0.125", "norm=none"]
    _, net_a = _variables(["model=vgg_a_cifar", *common], shape=(32, 32, 3), seed=1)
    order, net_d = _variables(["model=vgg_d_cifar", *common], shape=(32, 32, 3), seed=2)
    mapping = {"conv1": "conv1", "conv3": "conv2", "conv5": "conv3", "conv6": "conv4",
               "fc1": "fc1", "classifier": "classifier"}
    plan = make_plan(_tr(mode="finetune_all", layer_map=mapping), order, list(net_d["params"]))
    loaded = load(net_d, Source(_flat(net_a), "VGG-A"), plan, None)
    got, a, d = _flat(loaded.variables), _flat(net_a), _flat(net_d)
    for here, there in mapping.items():
        np.testing.assert_array_equal(got[f"params/{here}/conv/kernel" if "conv" in here else
                                          f"params/{here}/dense/kernel"],
                                      a[f"params/{there}/conv/kernel" if "conv" in there else
                                        f"params/{there}/dense/kernel"])
    np.testing.assert_array_equal(got["params/conv2/conv/kernel"], d["params/conv2/conv/kernel"])


# ------------------------------------------------------------------ runs with a real source


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, fashion_dir) -> Path:
    path = tmp_path_factory.mktemp("transfer") / "source"
    assert train_tiny(path, fashion_dir, ["train.steps=10"])["status"] == "finished"
    return path


def _run(source: Path, fashion_dir: Path, overrides: list[str]) -> run.Run:
    cfg = preflight.compose([*TINY, "logger.mode=disabled", f"dataset.data_dir={fashion_dir}",
                             f"transfer.source={source}", *overrides])
    return run.build(cfg, with_source=True)


def _train(r: run.Run, chunks: int = 2):
    state = r.state
    for _ in range(chunks):
        state, _ = r.chunk_at(int(state.step))(state, r.train_data, 5)
    return state


def _layers_equal(a, b) -> dict[str, bool]:
    return {layer: all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(a[layer]), jax.tree.leaves(b[layer]), strict=True)) for layer in a}


def test_a_missing_source_is_said_before_the_data_is_read(tmp_path):
    cfg = preflight.compose(["transfer=linear_probe", f"transfer.source={tmp_path}/gone",
                             "dataset.data_dir=/nonexistent"])
    with pytest.raises(ConfigError, match=r"transfer.source=.*/gone does not exist; give a "
                                          r"cnnlab run directory or a .pth/.pt/.safetensors"):
        run.build(cfg, with_source=True)
    cfg = preflight.compose(["transfer=linear_probe", f"transfer.source={tmp_path}",
                             "dataset.data_dir=/nonexistent"])
    with pytest.raises(ConfigError, match="is a folder but not a cnnlab run directory"):
        run.build(cfg, with_source=True)


def test_linear_probe_trains_only_the_classifier(source_run, fashion_dir):
    r = _run(source_run, fashion_dir, ["transfer=linear_probe"])
    start = jax.device_get(r.state)
    end = jax.device_get(_train(r))
    unchanged = _layers_equal(start.params, end.params)
    assert unchanged == {layer: layer != "head" for layer in start.params}
    # Frozen batch norm: the running statistics did not move either.
    assert all(_layers_equal(start.batch_stats, end.batch_stats).values())
    # The loaded layers are the source's final weights, bit for bit; the classifier is new.
    source = _checkpoint(source_run, 10)["params"]
    assert _layers_equal(source, start.params) == {layer: layer != "head" for layer in source}
    assert r.transfer.loaded.head_reset and len(r.transfer.loaded.layers) == 5
    # No optimizer state for frozen parameters: the momentum buffers hold the head alone.
    buffers = sum(x.size for x in jax.tree.leaves(end.opt_state) if np.ndim(x) > 0)
    assert buffers == sum(x.size for x in jax.tree.leaves(start.params["head"]))


def test_finetune_top_freezes_through_a_stage_and_bn_train_moves_statistics(source_run,
                                                                           fashion_dir):
    r = _run(source_run, fashion_dir, ["transfer=finetune_top",
                                       "transfer.freeze_through=stage1", "transfer.bn=train"])
    start, end = jax.device_get(r.state), jax.device_get(_train(r))
    unchanged = _layers_equal(start.params, end.params)
    frozen = {"stem", "stem_norm", "stage1_block1"}
    assert unchanged == {layer: layer in frozen for layer in start.params}
    stats = _layers_equal(start.batch_stats, end.batch_stats)
    assert not stats["stem_norm"] and not stats["stage1_block1"]


def test_linear_probe_does_no_backward_pass_through_the_backbone(source_run, fashion_dir):
    """The compiled linear-probe step has the forward pass's convolutions only; fine-tuning
    adds the backward ones."""
    def convolutions(overrides):
        r = _run(source_run, fashion_dir, overrides)
        text = r.train_chunk.lower(r.state, r.train_data, num_steps=1).as_text()
        return text.count("stablehlo.convolution")

    probe = convolutions(["transfer=linear_probe"])
    finetune = convolutions(["transfer=finetune_all"])
    assert probe == 7  # ResNet-8: the stem and two per block, forward only
    assert finetune > probe


def test_two_phase_switches_at_probe_steps_and_resumes_across_the_switch(source_run,
                                                                         fashion_dir, tmp_path):
    common = ["transfer=two_phase", f"transfer.source={source_run}", "transfer.probe_steps=10",
              "checkpoint.every=5", "checkpoint.keep=10"]
    whole = train_tiny(tmp_path / "whole", fashion_dir, common)
    assert whole["status"] == "finished" and whole["transfer"]["head_reset"]
    # The phases: the backbone holds still through step 10 and trains after it.
    saved = {step: _checkpoint(tmp_path / "whole", step) for step in (5, 10, 15)}
    loaded = run.build(config_load.load_run_config(tmp_path / "whole"), with_source=True).state
    for step in (5, 10):
        same = _layers_equal(jax.device_get(loaded.params), saved[step]["params"])
        assert same == {layer: layer != "head" for layer in same}, step
    assert not any(_layers_equal(saved[10]["params"], saved[15]["params"]).values())
    # Interrupted at step 5 (in the probe phase), then resumed: the same run, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed)
    for step in (10, 15, 20):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    summary = json.loads((resumed / "summary.json").read_text())
    (resumed / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    again = train_tiny(resumed, fashion_dir, common)
    assert again["status"] == "finished" and again["resumed_from"] == 5
    assert again["transfer"]["head_reset"]  # the first start's record is kept
    final, final_again = _checkpoint(tmp_path / "whole", 20), _checkpoint(resumed, 20)
    assert all(_layers_equal(final["params"], final_again["params"]).values())
    # The log has every logged step; from the first window begun after the resume (step 10's
    # mean covers only steps 6-10 there) it is the whole run's, value for value.
    assert [step for step, _ in _losses(resumed)] == [10, 20]
    assert _losses(resumed)[1:] == _losses(tmp_path / "whole")[1:]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]


def _checkpoint(run_dir: Path, step: int) -> dict:
    from cnnlab.transfer.sources import _restore_raw

    return _restore_raw(run_dir / "checkpoints", step)


def test_inputs_are_normalized_as_the_source_was_trained(source_run, fashion_dir):
    """transfer.preprocess=source: the source's training-set statistics (here of 1,024 images
    of all classes), not those of this run's data (task B alone); own: this run's."""
    from cnnlab.training.build import load_data

    common = [*TINY, "logger.mode=disabled", f"dataset.data_dir={fashion_dir}",
              "transfer=linear_probe", f"transfer.source={source_run}",
              "dataset.classes=[5,6,7,8,9]"]
    source_stats = load_data(config_load.load_run_config(source_run)).preprocess
    inherited = load_data(preflight.compose(common)).preprocess
    own = load_data(preflight.compose([*common, "transfer.preprocess=own"])).preprocess
    np.testing.assert_array_equal(inherited.mean, source_stats.mean)
    np.testing.assert_array_equal(inherited.std, source_stats.std)
    assert abs(float(own.mean[0]) - float(source_stats.mean[0])) > 0.01
    with pytest.raises(ConfigError, match="the source was trained with preprocess=channel"):
        load_data(preflight.compose([*common, "preprocess=mean_image"]))


def test_ema_weights_of_a_run_are_its_bias_corrected_average(source_run, fashion_dir,
                                                              tmp_path):
    """transfer.weights=ema: the averaged weights `cnnlab eval eval.weights=ema` would use,
    m_t / (1 - decay^t), not the raw ones; a run without an average is refused in one line."""
    import optax

    from cnnlab.runs.weights import ema_variables
    from cnnlab.transfer.sources import _restore_raw, read_run

    path = tmp_path / "ema"
    assert train_tiny(path, fashion_dir, ["train.steps=10", "eval.ema_decay=0.9"])[
        "status"] == "finished"
    state = _restore_raw(path / "checkpoints", 10)
    ema = optax.EmaState(count=state["ema"]["count"], ema=state["ema"]["ema"])
    params, _ = ema_variables(ema, 0.9)
    got = read_run(path, "ema").arrays
    expected = _flat({"params": params})
    assert set(expected) <= set(got)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=0, err_msg=key)
    raw = _flat({"params": state["params"]})
    assert any(not np.array_equal(got[k], raw[k]) for k in raw)
    with pytest.raises(ConfigError, match="trained without eval.ema_decay"):
        read_run(source_run, "ema")

