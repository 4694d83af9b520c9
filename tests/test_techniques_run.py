"""Every training technique in conf/ does what it claims, checked against an answer written out
here (NumPy formulas, PyTorch), and the table that says which test checks each option.

`CHECKS` names, for every option of every technique group and every technique key in conf/,
the tests that check its effect; `test_every_technique_option_has_a_behavioural_check` fails
when conf/ gains an option without one. The checks of this file are the ones that need a built
model or the train step: the configured initializer, activation and norm reach every layer of a
model; each optimizer and each loss fits a fixed batch; each augmentation changes the batch the
step trains on and keeps its labels. Two `cnnlab train` runs switch many techniques on at once
through Hydra. The formulas of each technique alone are in the files `CHECKS` names.
"""

import ast
import functools
import json
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from scipy.special import erf

from cnnlab.config.groups import group_options, option_values
from cnnlab.data.augment.pipeline import make_augment
from cnnlab.data.device import GivenBatch
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.models import build_model, init_variables
from cnnlab.models import layers as layers_lib
from tests.helpers import REPO, augment_config, compose_config, random_device_split, run_cli
from tests.test_layers import VARIANCE, fans, lrn_by_hand

# ------------------------------------------------------------------------------ the table

L, OP, M, R = "test_layers.py", "test_optim.py", "test_model_regularization.py", "test_recipes.py"
A, AR, E, S = "test_augment.py", "test_augment_recipes.py", "test_evaluate.py", "test_selection.py"
P, T, MS = "test_preprocess.py", "test_techniques_run.py", "test_multiscale.py"

WIRED = f"{T}::test_init_activation_and_norm_reach_every_layer_of_a_model"
FITS = f"{T}::test_each_optimizer_and_loss_fits_a_fixed_batch"
AUGMENTS = f"{T}::test_each_augmentation_changes_the_batch_and_keeps_the_labels"
CLI = f"{T}::test_cnnlab_train_switches_many_techniques_on_at_once"

INIT = [f"{L}::test_initializer_variance_matches_its_formula", WIRED]
ACTIVATION = [f"{L}::test_activation_value_and_derivative", WIRED]
OPTIMIZER = [f"{OP}::test_two_steps_match_the_papers_update_rule", FITS]
SCHEDULE = [f"{OP}::test_schedules_give_pytorchs_lr_curves"]

CHECKS: dict[str, list[str]] = {
    # initializers: the variance (or orthogonality) each claims, alone and in a built model
    **{f"init={name}": INIT for name in (
        "glorot_normal", "glorot_uniform", "he_normal", "he_normal_fan_out", "he_uniform",
        "he_uniform_fan_out", "lecun_normal", "lecun_uniform", "torch_uniform")},
    "init=orthogonal": [f"{L}::test_orthogonal_columns_are_orthonormal_times_the_gain", WIRED],
    "init=orthogonal_relu": [f"{L}::test_orthogonal_columns_are_orthonormal_times_the_gain",
                             WIRED],
    "init.conv": [WIRED], "init.dense": [WIRED],
    "init.bias": [f"{L}::test_zeros_and_fan_initializers_on_a_bias", WIRED],
    # activations: value and slope at chosen points; every layer of a model applies the formula
    **{f"activation={name}": ACTIVATION for name in (
        "relu", "leaky_relu", "sigmoid", "tanh", "elu", "gelu", "silu")},
    "activation=scaled_tanh": [*ACTIVATION,
                               f"{L}::test_scaled_tanh_maps_plus_minus_one_to_plus_minus_one"],
    "activation.negative_slope": [f"{L}::test_activation_value_and_derivative", WIRED],
    # norms: the axes each normalizes, alone and in a model
    "norm=batch": [f"{L}::test_batch_norm_uses_batch_statistics_in_training_and_running_ones_"
                   "in_eval", WIRED],
    "norm=group": [f"{L}::test_group_norm_normalizes_each_example_and_group", WIRED],
    "norm=layer": [f"{L}::test_layer_norm_normalizes_each_example_over_h_w_c", WIRED],
    "norm=lrn": [f"{L}::test_lrn_matches_the_paper_formula", WIRED],
    "norm=none": [f"{L}::test_convs_keep_a_bias_only_before_norms_without_a_shift", WIRED],
    "norm.momentum": [f"{L}::test_batch_norm_uses_batch_statistics_in_training_and_running_ones_"
                      "in_eval"],
    "norm.running_var": [f"{L}::test_batch_norm_running_variance_is_unbiased_by_default"],
    "norm.epsilon": [f"{L}::test_group_norm_normalizes_each_example_and_group", WIRED],
    "norm.num_groups": [f"{L}::test_group_norm_normalizes_each_example_and_group", WIRED],
    **{f"norm.{key}": [f"{L}::test_lrn_matches_the_paper_formula"]
       for key in ("size", "k", "alpha", "beta")},
    # optimizers: two steps against the papers' update rules; each fits a batch in a real step
    **{f"optimizer={name}": OPTIMIZER for name in (
        "sgd", "momentum", "nesterov", "adadelta", "adam")},
    "optimizer=adamw": [*OPTIMIZER,
                        f"{OP}::test_adamw_is_adam_plus_lr_times_wd_times_w_and_coupled_adam_is_not"],
    **{f"optimizer.{key}": [f"{OP}::test_two_steps_match_the_papers_update_rule"]
       for key in ("lr", "momentum", "nesterov", "b1", "b2", "eps", "rho")},
    "optimizer.weight_decay": [f"{OP}::test_two_steps_match_the_papers_update_rule",
                               f"{OP}::test_weight_decay_shrinks_every_weight_in_a_real_step"],
    "optimizer.decay": [f"{OP}::test_sgd_coupled_and_decoupled_decay_agree_without_momentum_only",
                        f"{OP}::test_weight_decay_shrinks_every_weight_in_a_real_step"],
    "optimizer.clip_norm": [
        f"{OP}::test_clipping_rescales_a_large_gradient_to_clip_norm_and_leaves_a_small_one"],
    # schedules: the lr curve of each, against torch.optim.lr_scheduler
    **{f"schedule={name}": SCHEDULE for name in ("constant", "step", "cosine")},
    "schedule=cyclic_cosine": [*SCHEDULE, f"{E}::test_cyclic_cosine_follows_huang_et_al_formula"],
    "schedule=plateau": [f"{S}::test_plateau_matches_torch_reduce_lr_on_plateau",
                         f"{S}::test_plateau_run_logs_the_reduced_lr_and_resumes_identically"],
    **{f"schedule.{key}": SCHEDULE for key in (
        "warmup_steps", "milestones", "factor", "final_factor", "cycles")},
    **{f"schedule.{key}": [f"{S}::test_plateau_reduces_exactly_when_the_rule_says"]
       for key in ("patience", "threshold", "max_reductions")},
    "schedule.metric": [f"{S}::test_plateau_run_logs_the_reduced_lr_and_resumes_identically"],
    # losses: value and gradient by hand, the logged loss, fitting a batch
    **{f"loss={name}": [f"{R}::test_each_loss_value_and_gradient_match_the_hand_formulas",
                        f"{R}::test_the_train_step_optimizes_each_loss_and_logs_cross_entropy",
                        FITS] for name in ("cross_entropy", "mse", "mse_sigmoid", "sigmoid_bce")},
    "loss.output": [f"{R}::test_each_loss_value_and_gradient_match_the_hand_formulas"],
    # regularization
    "regularization.l1": [
        f"{OP}::test_l1_and_l2_add_lambda_sign_w_and_lambda_w_to_the_selected_gradients"],
    "regularization.l2": [
        f"{OP}::test_l1_and_l2_add_lambda_sign_w_and_lambda_w_to_the_selected_gradients",
        f"{OP}::test_l2_joins_the_objective_for_kernels_only_and_the_logged_loss_stays_cross_"
        "entropy"],
    "regularization.apply_to": [
        f"{OP}::test_l1_and_l2_add_lambda_sign_w_and_lambda_w_to_the_selected_gradients"],
    "regularization.label_smoothing": [
        f"{OP}::test_label_smoothing_is_cross_entropy_against_the_smoothed_targets",
        f"{OP}::test_label_smoothing_raises_the_minimum_loss_to_the_targets_entropy",
        f"{OP}::test_label_smoothing_changes_the_step_but_not_the_logged_loss"],
    "model.stochastic_depth": [f"{M}::test_empirical_survival_matches_the_rule_per_batch",
                               f"{M}::test_block_by_hand_in_training_and_at_test_time"],
    "model.stochastic_depth_mode": [f"{M}::test_empirical_survival_per_example_mode"],
    **{f"model.dropout_at.{place}": [
        f"{M}::test_dropout_appears_exactly_where_configured",
        f"{M}::test_rates_numerically_and_eval_is_identity"]
       for place in ("conv", "stage", "fc", "head", "block")},
    # preprocessing
    "preprocess=channel": [f"{P}::test_channel_is_the_old_normalize_bit_for_bit",
                           f"{P}::test_each_method_trains_and_evaluates_with_the_same_statistics"],
    "preprocess=mean_image": [
        f"{P}::test_mean_image_subtracts_the_per_pixel_mean_and_nothing_else"],
    "preprocess=zca": [f"{P}::test_zca_whitened_training_data_has_zero_mean_and_covariance_u_"
                       "lambda_over_lambda_eps"],
    "preprocess=none": [f"{P}::test_none_is_the_pixels_on_the_unit_scale_and_float_input_is_"
                        "taken_as_unit_scale"],
    "preprocess.epsilon": [f"{P}::test_zca_whitened_training_data_has_zero_mean_and_covariance_u_"
                           "lambda_over_lambda_eps"],
    # augmentation: each against its definition, and through the train step
    **{f"augment={name}": [AUGMENTS] for name in (
        "alexnet", "color_jitter", "crop", "crop_flip", "cutout", "default", "flip", "inception",
        "mixup")},
    "augment=none": [f"{A}::test_augment_none_keeps_the_batch_and_presets_all_build_and_run",
                     AUGMENTS],
    "augment.crop_pad": [f"{A}::test_default_pipeline_is_bit_identical_to_crop_flip_then_"
                         "normalize", f"{AR}::test_crop_flip_pipeline_is_numpys_pad_crop_flip_"
                         "then_normalize", AUGMENTS],
    "augment.flip": [f"{AR}::test_crop_flip_pipeline_is_numpys_pad_crop_flip_then_normalize",
                     AUGMENTS],
    "augment.resized_crop": [f"{A}::test_a_known_box_is_resized_as_bilinear_crop_then_"
                             "interpolate", AUGMENTS],
    "augment.crop_scale": [f"{A}::test_crop_box_area_and_log_aspect_ratio_follow_their_uniform_"
                           "distributions", AUGMENTS],
    "augment.crop_ratio": [f"{A}::test_crop_box_area_and_log_aspect_ratio_follow_their_uniform_"
                           "distributions", AUGMENTS],
    "augment.brightness": [f"{A}::test_brightness_multiplies_each_image_by_one_uniform_factor_"
                           "then_clips", AUGMENTS],
    "augment.contrast": [f"{A}::test_contrast_and_saturation_match_torchvisions_formulas",
                         AUGMENTS],
    "augment.saturation": [f"{A}::test_contrast_and_saturation_match_torchvisions_formulas",
                           AUGMENTS],
    "augment.lighting": [f"{A}::test_pca_lighting_adds_p_alpha_lambda_to_every_pixel_with_the_"
                         "papers_covariance", AUGMENTS],
    "augment.cutout": [f"{A}::test_cutout_zeroes_one_clipped_square_and_the_expected_share_of_"
                       "pixels", AUGMENTS],
    "augment.mixup": [f"{A}::test_mixup_mixes_the_batch_with_a_permutation_of_itself",
                      f"{A}::test_mixup_loss_is_lambda_ce_a_plus_one_minus_lambda_ce_b_with_or_"
                      "without_smoothing", AUGMENTS],
    "augment.scale_jitter": [f"{AR}::test_scale_jitter_is_resize_then_crop", AUGMENTS],
    "augment.affine.rotate": [f"{AR}::test_rotation_by_90_degrees_is_np_rot90_counter_clockwise",
                              AUGMENTS],
    "augment.affine.scale": [f"{AR}::test_zoom_and_shear_move_pixels_where_the_matrix_says",
                             AUGMENTS],
    "augment.affine.shear": [f"{AR}::test_zoom_and_shear_move_pixels_where_the_matrix_says",
                             AUGMENTS],
    "augment.affine.translate": [f"{AR}::test_translation_is_whole_pixels_within_the_fraction",
                                 AUGMENTS],
    "augment.hue": [f"{AR}::test_hue_rotation_of_120_degrees_cycles_the_channels", AUGMENTS],
    "augment.color_cast": [f"{AR}::test_color_cast_adds_one_integer_offset_per_channel_within_"
                           "the_range", AUGMENTS],
    # evaluation and model selection
    "eval.ema_decay": [f"{E}::test_ema_is_off_by_default_and_its_decay_is_checked", CLI],
    "eval.tta": [f"{E}::test_flip_tta_is_the_mean_of_the_softmaxes_of_the_image_and_its_mirror",
                 f"{E}::test_ten_crop_tta_averages_the_softmaxes_of_exactly_the_ten_windows"],
    "eval.crop_size": [f"{E}::test_ten_crop_with_a_crop_size_takes_windows_of_the_image_scaled_"
                       "to_its_size"],
    "eval.scales": [f"{MS}::test_multi_scale_is_the_numpy_mean_of_the_per_scale_softmaxes"],
    "eval.scale_mode": [f"{MS}::test_multi_scale_is_the_numpy_mean_of_the_per_scale_softmaxes"],
    "early_stopping.patience": [
        f"{S}::test_early_stopping_stops_after_patience_stalled_evaluations"],
    "early_stopping.metric": [f"{S}::test_early_stopping_keeps_the_best_checkpoint_and_stays_"
                              "stopped"],
    "early_stopping.keep_best": [f"{S}::test_early_stopping_keeps_the_best_checkpoint_and_stays_"
                                 "stopped"],
}

# Sections whose every key is a technique (besides the choice itself, `name`), and the technique
# keys of sections that also hold plumbing (eval's output format, the model's geometry).
TECHNIQUE_GROUPS = ("init", "activation", "norm", "optimizer", "schedule", "loss", "preprocess",
                    "augment")
TECHNIQUE_SECTIONS = ("regularization", "early_stopping")
TECHNIQUE_KEYS = ("eval.ema_decay", "eval.tta", "eval.crop_size", "eval.scales",
                  "eval.scale_mode", "model.stochastic_depth", "model.stochastic_depth_mode")


def _leaves(tree: dict, prefix: str) -> set[str]:
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        elif key != "name":
            out.add(f"{prefix}{key}")
    return out


def technique_options() -> set[str]:
    """Every option and key conf/ offers for a training technique."""
    cfg = compose_config(["model=resnet20"])
    options = set(TECHNIQUE_KEYS)
    for group in TECHNIQUE_GROUPS:
        for name in group_options(group):
            options.add(f"{group}={name}")
            options |= _leaves(OmegaConf.to_container(option_values(group, name)), f"{group}.")
    for section in TECHNIQUE_SECTIONS:
        options |= _leaves(OmegaConf.to_container(cfg[section]), f"{section}.")
    options |= _leaves(OmegaConf.to_container(cfg.model.dropout_at), "model.dropout_at.")
    return options


def test_every_technique_option_has_a_behavioural_check():
    options = technique_options()
    missing = sorted(options - set(CHECKS))
    assert not missing, f"options with no check of what they do (add one to CHECKS): {missing}"
    assert not sorted(set(CHECKS) - options), "CHECKS names options conf/ does not have"


@functools.cache
def _test_names(file: str) -> set[str]:
    tree = ast.parse((REPO / "tests" / file).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            and node.name.startswith("test_")}


def test_every_check_names_an_existing_test():
    for option, checks in CHECKS.items():
        assert checks, option
        for check in checks:
            file, name = check.split("::")
            assert name in _test_names(file), f"{option}: {check} does not exist"


# ------------------------------------------- the configured layers reach every layer of a model

# A small convnet of the zoo (conv -> norm -> activation everywhere, a hidden dense layer), wide
# enough for its kernels' variance to show: about 90,000 weights.
PATTERN = ["model=pattern", "model.n=1", "model.m=2", "model.k=1", "model.width=16",
           "model.fc_width=64"]
SHAPE = (12, 12, 3)

# The variance each initializer claims: test_layers.VARIANCE (He, Glorot, LeCun, PyTorch's).
GAIN = {"orthogonal": 1.0, "orthogonal_relu": 2.0**0.5}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


ACTIVATIONS = {
    "relu": lambda x, a: np.maximum(x, 0),
    "leaky_relu": lambda x, a: np.where(x > 0, x, a * x),
    "sigmoid": lambda x, a: _sigmoid(x),
    "tanh": lambda x, a: np.tanh(x),
    "scaled_tanh": lambda x, a: 1.7159 * np.tanh(2 / 3 * x),  # LeCun et al. 1998
    "elu": lambda x, a: np.where(x > 0, x, np.expm1(x)),
    "gelu": lambda x, a: x * 0.5 * (1 + erf(x / np.sqrt(2))),  # exact, not the tanh form
    "silu": lambda x, a: x * _sigmoid(x),
}

# Each initializer once, each activation and norm at least once (one model per row).
WIRINGS = [
    ("he_normal", "relu", "batch"), ("he_uniform", "leaky_relu", "group"),
    ("glorot_normal", "sigmoid", "layer"), ("glorot_uniform", "tanh", "lrn"),
    ("lecun_normal", "scaled_tanh", "none"), ("lecun_uniform", "elu", "batch"),
    ("he_normal_fan_out", "gelu", "group"), ("he_uniform_fan_out", "silu", "layer"),
    ("orthogonal", "relu", "lrn"), ("orthogonal_relu", "leaky_relu", "batch"),
    ("torch_uniform", "sigmoid", "group"),
]


def test_wirings_cover_every_initializer_activation_and_norm():
    for group, column in (("init", 0), ("activation", 1), ("norm", 2)):
        assert {row[column] for row in WIRINGS} == set(group_options(group)), group
    assert set(VARIANCE) | set(GAIN) == set(group_options("init")) == {r[0] for r in WIRINGS}


def _kernels(params: dict) -> list[np.ndarray]:
    return [np.asarray(w, np.float64) for path, w in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "kernel"]


def _check_init(init: str, params: dict) -> None:
    kernels = _kernels(params)
    assert len(kernels) >= 4, "the model's convs and dense layers"
    if init in GAIN:
        for w in kernels:
            # Saxe et al.: the (n_in, n_out) matrix has orthonormal columns (or rows) x gain.
            m = w.reshape(-1, w.shape[-1])
            gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
            np.testing.assert_allclose(gram, GAIN[init] ** 2 * np.eye(len(gram)), atol=1e-4)
        return
    # Each kernel's mean square over the variance the formula gives for its fans, pooled over
    # the ~90,000 weights: 1 within a few percent (He vs LeCun is 2, fan_in vs fan_out 2-9).
    ratios, counts = [], []
    for w in kernels:
        n_in, n_out = fans(w.shape)
        ratios.append(np.mean(w**2) / VARIANCE[init](n_in, n_out))
        counts.append(w.size)
    pooled = np.average(ratios, weights=counts)
    assert pooled == pytest.approx(1.0, abs=0.05), (init, ratios)
    assert min(ratios) > 0.6 and max(ratios) < 1.6, (init, ratios)


def _capture(model: nn.Module, variables: dict, x: jax.Array, monkeypatch: pytest.MonkeyPatch
             ) -> tuple[list, list]:
    """(activation (input, output) pairs, norm (module, input, output) triples) of one
    training-mode forward pass, run eagerly so that the values are concrete."""
    acts, norms = [], []
    original = layers_lib.Recorded.__call__

    def recorded(self: layers_lib.Recorded, value: jax.Array) -> jax.Array:
        out = original(self, value)
        acts.append((np.asarray(value, np.float64), np.asarray(out, np.float64)))
        return out

    norm_types = (layers_lib.BatchNorm, layers_lib.GroupNorm, layers_lib.LayerNorm,
                  layers_lib.LocalResponseNorm, layers_lib.Identity)

    def intercept(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, norm_types) and context.method_name == "__call__":
            norms.append((context.module, np.asarray(args[0], np.float64),
                          np.asarray(out, np.float64)))
        return out

    monkeypatch.setattr(layers_lib.Recorded, "__call__", recorded)
    with nn.intercept_methods(intercept):
        model.apply(variables, x, train=True, mutable=["batch_stats"],
                    rngs={"dropout": jax.random.PRNGKey(1)})
    return acts, norms


def _groups(channels: int, num_groups: int) -> int:
    # GroupNorm's groups: the most, up to num_groups, that divide the channels evenly.
    return max(g for g in range(1, min(channels, num_groups) + 1) if channels % g == 0)


def _check_norm(name: str, cfg: object, module: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    n, h, w, c = x.shape
    expected = {"batch": layers_lib.BatchNorm, "group": layers_lib.GroupNorm,
                "layer": layers_lib.LayerNorm, "lrn": layers_lib.LocalResponseNorm,
                "none": layers_lib.Identity}[name]
    assert isinstance(module, expected), (name, type(module))
    if name == "none":
        np.testing.assert_array_equal(y, x)
        return
    if name == "lrn":
        np.testing.assert_allclose(y, lrn_by_hand(x, cfg.size, cfg.k, cfg.alpha, cfg.beta),
                                   rtol=1e-4, atol=1e-5)
        return
    # At initialization (scale 1, shift 0) the output is the input standardized over the axes
    # the norm claims: batch over (N, H, W) per channel, layer over (H, W, C) per example, group
    # over (H, W, channels of the group) per example and group.
    groups = _groups(c, cfg.num_groups) if name == "group" else 1
    if name == "batch":
        flat = x.reshape(n * h * w, 1, c).transpose(1, 0, 2)  # (1, N*H*W, C)
        out = y.reshape(n * h * w, 1, c).transpose(1, 0, 2)
    else:
        flat = x.reshape(n, h * w, groups, c // groups).transpose(0, 2, 1, 3).reshape(
            n, groups, -1)
        out = y.reshape(n, h * w, groups, c // groups).transpose(0, 2, 1, 3).reshape(
            n, groups, -1)
    axis = 1 if name == "batch" else -1
    mean, var = flat.mean(axis=axis, keepdims=True), flat.var(axis=axis, keepdims=True)
    np.testing.assert_allclose(out, (flat - mean) / np.sqrt(var + cfg.epsilon), rtol=1e-3,
                               atol=1e-4)


@pytest.mark.parametrize("init,activation,norm", WIRINGS, ids=["-".join(r) for r in WIRINGS])
def test_init_activation_and_norm_reach_every_layer_of_a_model(init, activation, norm,
                                                               monkeypatch):
    """`init=`, `activation=` and `norm=` as a built model uses them: every kernel has the
    initializer's variance, every activation's output is its formula of its input, every norm
    layer is the configured one and normalizes the axes it claims."""
    slope = ["activation.negative_slope=0.2"] if activation == "leaky_relu" else []
    cfg = compose_config([*PATTERN, f"init={init}", f"activation={activation}", f"norm={norm}",
                          *slope])
    model = build_model(cfg, 10)
    variables = init_variables(model, jax.random.PRNGKey(0), SHAPE)
    _check_init(init, variables["params"])
    biases = [np.asarray(b) for path, b in jax.tree_util.tree_leaves_with_path(
        variables["params"]) if path[-1].key == "bias"]
    assert biases and all(not b.any() for b in biases), "init.bias=zeros"

    x = jax.random.normal(jax.random.PRNGKey(2), (8, *SHAPE))
    acts, norms = _capture(model, variables, x, monkeypatch)
    assert len(acts) >= 3 and len(norms) >= 2, (len(acts), len(norms))
    formula = ACTIVATIONS[activation]
    a = cfg.activation.negative_slope
    assert a is None or a == pytest.approx(0.2)
    for value, out in acts:
        np.testing.assert_allclose(out, formula(value, a), rtol=1e-5, atol=1e-6)
    for module, value, out in norms:
        _check_norm(norm, cfg.norm, module, value, out)


# --------------------------------------------------------------- each optimizer and loss fits

FIT_STEPS, FIT_BATCH = 60, 16


@pytest.mark.parametrize("overrides", [
    *[[f"optimizer={name}"] for name in group_options("optimizer")],
    *[[f"loss={name}", "optimizer=adam", "optimizer.lr=0.01"] for name in group_options("loss")],
], ids=lambda o: o[0])
def test_each_optimizer_and_loss_fits_a_fixed_batch(overrides):
    """The train step with each optimizer (its preset's lr) and each loss memorizes 16 random
    images with random labels: at most 3 of them wrong (chance: 14.4) within 60 steps, and the
    logged cross entropy well below its start."""
    from cnnlab.training import steps
    from cnnlab.training.build import init_state
    from cnnlab.training.optim import make_optimizer, make_schedule

    cfg = compose_config([*PATTERN[:-2], "model.width=8", "model.fc_width=32", "augment=none",
                          "schedule=constant", "optimizer.weight_decay=0", *overrides])
    from cnnlab.cli.preflight import validate

    validate(cfg)
    model = build_model(cfg, 10)
    tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, cfg.optimizer.lr, FIT_STEPS))
    state = init_state(cfg, model, tx, (12, 12, 1))
    data = random_device_split((12, 12, 1), FIT_BATCH)
    step = jax.jit(steps.make_train_step(model, tx, make_augment(cfg.augment), FIT_BATCH,
                                         cfg.regularization, loss_config=cfg.loss))
    losses, errors = [], []
    for _ in range(FIT_STEPS):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss_sum"]) / FIT_BATCH)
        errors.append(1 - int(metrics["correct"]) / FIT_BATCH)
    assert min(errors) <= 3 / 16 and errors[-1] <= 4 / 16, errors
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------- each augmentation, as the train step sees it

K, N_AUG, AUG_SHAPE = 10, 16, (16, 16, 3)

# Each augmentation key alone (and the preset each conf/augment option is): the options it is
# compared against are the same ones without it. Sub-keys are compared with their parent on.
AUGMENTATIONS: dict[str, tuple[dict, dict]] = {
    "crop_pad": ({"crop_pad": 4}, {}),
    "flip": ({"flip": True}, {}),
    "resized_crop": ({"resized_crop": True}, {}),
    "crop_scale": ({"resized_crop": True, "crop_scale": [0.2, 0.3]}, {"resized_crop": True}),
    "crop_ratio": ({"resized_crop": True, "crop_ratio": [2.0, 3.0]}, {"resized_crop": True}),
    "brightness": ({"brightness": 0.4}, {}),
    "contrast": ({"contrast": 0.4}, {}),
    "saturation": ({"saturation": 0.4}, {}),
    "lighting": ({"lighting": 0.1}, {}),
    "cutout": ({"cutout": 8}, {}),
    "mixup": ({"mixup": 1.0}, {}),
    "scale_jitter": ({"scale_jitter": [17, 24]}, {}),
    "affine.rotate": ({"affine": {"rotate": 20.0}}, {}),
    "affine.scale": ({"affine": {"scale": [0.8, 1.2]}}, {}),
    "affine.shear": ({"affine": {"shear": 15.0}}, {}),
    "affine.translate": ({"affine": {"translate": 0.2}}, {}),
    "hue": ({"hue": 60.0}, {}),
    "color_cast": ({"color_cast": 20}, {}),
    **{f"augment={name}": ({"preset": name}, {}) for name in group_options("augment")
       if name != "none"},
}
MEAN, STD = np.array([0.5, 0.4, 0.3]), np.array([0.25, 0.2, 0.3])


def test_augmentations_cover_every_augment_key_and_preset():
    keys = _leaves(OmegaConf.to_container(option_values("augment", "_base")), "")
    presets = {f"augment={name}" for name in group_options("augment") if name != "none"}
    assert set(AUGMENTATIONS) == keys | presets


class _Probe(nn.Module):
    """Logits that are one bias vector for every image, so their gradient is the batch's label
    histogram (softmax(0) - mean one-hot target); the input the step feeds it goes to `record`."""

    record: Callable[[np.ndarray], None]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self.record(np.asarray(x))
        bias = self.param("bias", nn.initializers.zeros, (K,))
        return jnp.broadcast_to(bias, (x.shape[0], K))


def _step_input(options: dict, images: np.ndarray, labels: np.ndarray) -> tuple:
    """(the network input, the bias gradient) of one train step's batch with `options` on."""
    from cnnlab.training import steps

    if "preset" in options:
        cfg = compose_config([f"augment={options['preset']}"]).augment
    else:
        cfg = augment_config(**options)
    pca = (np.array([0.2, 0.02, 0.004], np.float32), np.eye(3, dtype=np.float32))
    seen: list = []
    gradients = steps.make_gradients(_Probe(seen.append), make_augment(cfg, pca), N_AUG)
    state = steps.TrainState(step=jnp.asarray(3), params={"bias": jnp.zeros(K)}, batch_stats={},
                             opt_state=None, rng=jax.random.PRNGKey(5))
    batch = GivenBatch(images=jnp.asarray(images), labels=jnp.asarray(labels),
                       stats=PreprocessStats(mean=jnp.asarray(MEAN, jnp.float32),
                                             std=jnp.asarray(STD, jnp.float32)))
    out = gradients(state, batch)  # eagerly: the probe sees concrete arrays
    assert len(seen) == 1
    return seen[0], np.asarray(out.grads["bias"])


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_each_augmentation_changes_the_batch_and_keeps_the_labels(name):
    """Through `make_gradients`, as the train step runs it: the network sees a changed batch of
    the same shape, and trains on the batch's own labels (mixup: a permutation of them mixed in,
    which keeps the histogram the gradient shows)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_AUG, *AUG_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, K, N_AUG).astype(np.int32)
    options, baseline = AUGMENTATIONS[name]
    x, grad = _step_input(options, images, labels)
    reference, _ = _step_input(baseline, images, labels)
    if not baseline:  # nothing on: the images standardized per channel, as written here
        np.testing.assert_allclose(reference, (images / 255.0 - MEAN) / STD, rtol=1e-5,
                                   atol=1e-5)
    assert x.shape == reference.shape == (N_AUG, *AUG_SHAPE)
    changed = np.abs(x - reference).reshape(N_AUG, -1).max(-1) > 1e-3
    assert changed.sum() >= N_AUG // 4, f"{name} changed {changed.sum()} of {N_AUG} images"
    histogram = np.bincount(labels, minlength=K) / N_AUG
    np.testing.assert_allclose(grad, 1 / K - histogram, atol=1e-6)


# ----------------------------------------------------------------- through Hydra, all at once

# Two `cnnlab train` runs that between them switch on a technique of every kind; what each does
# is checked above and in CHECKS' tests, these check that the command line reaches the run.
RUNS = {
    "adamw": ["init=he_uniform", "activation=elu", "norm=group", "optimizer=adamw",
              "optimizer.clip_norm=1.0", "schedule=cosine", "schedule.warmup_steps=2",
              "regularization.l1=1e-5", "regularization.label_smoothing=0.1",
              "model.stochastic_depth=0.5", "model.dropout_at.block=0.2", "preprocess=zca",
              "augment=crop_flip", "augment.cutout=8", "augment.mixup=0.4",
              "augment.affine.rotate=10", "eval.ema_decay=0.9", "eval.tta=flip"],
    "nesterov": ["init=orthogonal_relu", "activation=leaky_relu",
                 "activation.negative_slope=0.2", "norm=layer", "optimizer=nesterov",
                 "schedule=step", "schedule.milestones=[0.5]", "loss=mse_sigmoid",
                 "preprocess=mean_image", "augment=inception", "eval.tta=ten_crop",
                 "eval.crop_size=24"],
}


def _lr(name: str, step: int, lr: float, steps: int) -> float:
    """The lr the runs' schedules give at `step` (0-based), written out here."""
    if name == "adamw":  # 2 warm-up steps to lr, then cosine to 0 over the run
        if step < 2:
            return lr * (step + 1) / 2
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    return lr if step < steps // 2 else lr * 0.1


@pytest.mark.parametrize("name", sorted(RUNS))
def test_cnnlab_train_switches_many_techniques_on_at_once(name, fashion_dir, tmp_path):
    steps = 6
    overrides = [*RUNS[name], "model=resnet20", "model.depth=8", "model.width=4",
                 "dataset.max_examples=256", "train.batch_size=32", f"train.steps={steps}",
                 "train.steps_per_call=1", "train.log_every=1", "train.eval_every=0",
                 "train.eval_batch_size=256", "checkpoint.enabled=false", "progress=false",
                 "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_cli(["train", *overrides], cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    _check_saved(saved, RUNS[name])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "lr" in r]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    for record in logged:
        want = _lr(name, record["step"] - 1, saved.optimizer.lr, steps)
        assert record["lr"] == pytest.approx(want, rel=1e-5), record
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_step"] == steps
    # The averaged weights and the test-time views are evaluated besides the plain weights, and
    # give other predictions than they do.
    extra = ["test_tta"] + (["test_ema"] if saved.eval.ema_decay else [])
    for prefix in extra:
        assert summary[f"final/{prefix}/loss"] != summary["final/test/loss"], prefix


def _check_saved(saved: DictConfig, overrides: list[str]) -> None:
    """The run's saved config holds every override: a key's value, and a group choice's option
    values (conf/<group>/<option>.yaml) where no key of the same run overrides them."""
    keys = dict(o.split("=", 1) for o in overrides if "." in o.split("=", 1)[0])
    for override in overrides:
        key, value = override.split("=", 1)
        if "." in key:
            got = OmegaConf.select(saved, key)
            assert str(got).replace(" ", "") == value or float(got) == float(value), (key, got)
            continue
        chosen = OmegaConf.to_container(option_values(key, value))
        for leaf in _leaves(chosen, "") | ({"name"} if "name" in chosen else set()):
            if f"{key}.{leaf}" not in keys:
                assert OmegaConf.select(saved[key], leaf) == OmegaConf.select(
                    OmegaConf.create(chosen), leaf), (key, leaf)
