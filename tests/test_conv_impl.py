"""The CPU convolution candidates (cnnlab.models.conv_impl) and the per-shape choice among
them (cnnlab.models.conv_choice, `train.conv_impl`): values and both gradients against
`lax.conv_general_dilated`, the gradients' matmul form, the choice's cache."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnlab.errors import ConfigError
from cnnlab.models import conv, conv_choice, conv_impl
from cnnlab.models.conv_choice import ConvChoice

DN = ("NHWC", "HWIO", "NHWC")
SAME3, VALID = ((1, 1), (1, 1)), ((0, 0), (0, 0))
# (x shape, kernel, out channels, stride, pads): odd sizes, strides 1 and 2, "same" (even and
# uneven, as cnnlab.models.geometry pads stride-2 layers) and valid padding, 1x1 and 7x7/2.
LAYERS = [
    ((3, 7, 9, 3), 3, 5, 1, SAME3),
    ((2, 8, 6, 4), 3, 6, 1, VALID),
    ((3, 9, 7, 4), 3, 5, 2, SAME3),
    ((2, 8, 8, 4), 3, 5, 2, ((1, 0), (1, 0))),
    ((2, 6, 6, 3), 1, 4, 1, VALID),
    ((2, 7, 7, 3), 1, 4, 2, VALID),
    ((2, 13, 11, 3), 7, 4, 2, ((3, 3), (3, 2))),
    ((2, 2, 2, 5), 3, 3, 1, SAME3),
]


def reference(x, w, stride, pads):
    return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=DN)


def values_and_grads(fn, x, w, stride, pads, dy):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, (stride, stride), pads), x, w)
    return (y, *vjp(dy))


def random_layer(shape, kernel, out, stride, pads, dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], shape, dtype)
    w = jax.random.normal(keys[1], (kernel, kernel, shape[-1], out), dtype)
    y = reference(x, w, stride, pads)
    return x, w, jax.random.normal(keys[2], y.shape, dtype)


def candidates_for(kernel, stride):
    return [n for n in conv_impl.IMPLS.names()
            if conv_impl.applies(n, (kernel, kernel), (stride, stride))]


@pytest.mark.parametrize("shape, kernel, out, stride, pads, budget", [
    *[(*layer, None) for layer in LAYERS],
    # One image per tile (a 1-byte budget): the loop over tiles and the kernel gradient's sum
    # over them.
    *[(*layer, 1) for layer in LAYERS[:4:3]],
    # Three tiles of two images each (images k and k + 3): each result back in its place.
    ((6, 7, 9, 3), 3, 5, 1, SAME3, "pairs"),
    ((6, 9, 7, 4), 3, 5, 2, SAME3, "pairs"),
])
def test_candidates_equal_xla_in_float64(shape, kernel, out, stride, pads, budget, monkeypatch):
    if budget == "pairs":
        monkeypatch.setattr(conv_impl, "batch_tile", lambda n, bytes_per_image: 2)
    elif budget is not None:
        monkeypatch.setattr(conv_impl, "TILE_BYTES", budget)
    with jax.enable_x64(True):
        x, w, dy = random_layer(shape, kernel, out, stride, pads, jnp.float64)
        expected = values_and_grads(reference_impl, x, w, stride, pads, dy)
        for name in candidates_for(kernel, stride):
            got = values_and_grads(conv_impl.IMPLS.get(name), x, w, stride, pads, dy)
            for what, e, g in zip(("y", "dx", "dw"), expected, got, strict=True):
                # Sums of up to 7*7*4 products of unit normals: rounding alone is ~1e-14.
                np.testing.assert_allclose(g, e, rtol=0, atol=1e-11 * float(jnp.abs(e).max()),
                                           err_msg=f"{name} {what}")


def reference_impl(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)


# How much larger than XLA's own float32 error each candidate's may be. im2col sums the same
# products in another order; Winograd adds the rounding of its transforms, whose entries reach
# 2 (F(2x2,3x3)) and 8 with 1/24 (F(4x4,3x3)): its outputs are sums of terms up to ~100x
# larger than they are (Lavin & Gray 2015; Barabasz et al. 2020 measure F(4,3)'s float32 error
# at ~10-100x direct convolution's).
ERROR_FACTOR = {"xla": 4, "im2col": 4, "winograd2": 8, "winograd4": 128}


@pytest.mark.parametrize("shape, kernel, out, stride, pads",
                         [LAYERS[0], LAYERS[3], LAYERS[6], ((4, 8, 8, 32), 3, 16, 1, SAME3)])
def test_candidates_float32_error_is_within_a_factor_of_xlas(shape, kernel, out, stride, pads):
    """Each candidate's float32 error against the float64 answer is bounded by a factor of
    XLA's own float32 convolution's error (itself ~eps * sqrt(kh*kw*C) of the output's scale,
    the random walk of the reduction's roundings), or by eps * (kh*kw*C) where XLA happened to
    be exact on this data."""
    with jax.enable_x64(True):
        x, w, dy = random_layer(shape, kernel, out, stride, pads, jnp.float64)
        truth = values_and_grads(reference_impl, x, w, stride, pads, dy)
        x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
        xla32 = values_and_grads(reference_impl, x32, w32, stride, pads, dy32)
        length = kernel * kernel * shape[-1]
        for name in candidates_for(kernel, stride):
            got = values_and_grads(conv_impl.IMPLS.get(name), x32, w32, stride, pads, dy32)
            for what, t, e, g in zip(("y", "dx", "dw"), truth, xla32, got, strict=True):
                scale = float(jnp.abs(t).max())
                floor = float(np.finfo(np.float32).eps) * length * scale
                bound = ERROR_FACTOR[name] * max(float(jnp.abs(e - t).max()), floor / 16)
                error = float(jnp.abs(g.astype(jnp.float64) - t).max())
                assert error <= bound, (name, what, error, bound)


@pytest.mark.parametrize("name", ["im2col", "winograd2", "winograd4"])
def test_candidates_and_their_gradients_are_matmuls(name):
    """No convolution left in the compiled forward and backward passes: both gradients are
    autodiff's of the matmul formulation (dots, slices, pads)."""
    x, w, dy = random_layer((4, 8, 8, 8), 3, 8, 1, SAME3, jnp.float32)
    impl = conv_impl.IMPLS.get(name)
    step = jax.jit(lambda x, w, dy: values_and_grads(impl, x, w, 1, SAME3, dy))
    hlo = step.lower(x, w, dy).compile().as_text()
    assert " convolution(" not in hlo
    assert " dot(" in hlo or "dot_general" in hlo or "__onednn$matmul" in hlo
    # The default path still runs XLA's convolution (the comparison can fail).
    xla_hlo = jax.jit(lambda x, w, dy: values_and_grads(conv_impl.IMPLS.get("xla"), x, w, 1,
                                                         SAME3, dy)).lower(x, w, dy)
    assert " convolution(" in xla_hlo.compile().as_text()


def test_batch_tile_divides_the_batch_within_the_budget(monkeypatch):
    monkeypatch.setattr(conv_impl, "TILE_BYTES", 1000)
    assert conv_impl.batch_tile(128, 100) == 8  # 10 would fit, but does not divide 128
    assert conv_impl.batch_tile(12, 250) == 4
    assert conv_impl.batch_tile(16, 5000) == 1  # one image over the budget: one per tile


def test_the_xla_mode_is_cnnlabs_previous_convolution():
    """`train.conv_impl=xla` computes exactly what the layers computed before the key."""
    x, w, _ = random_layer((3, 9, 9, 4), 3, 8, 2, ((1, 0), (1, 0)), jnp.float32)
    args = ((2, 2), ((1, 0), (1, 0)))
    before = jax.jit(lambda x, w: conv.conv_general_dilated(x, w, *args, dimension_numbers=DN))
    now = jax.jit(lambda x, w: ConvChoice("xla")(x, w, *args, dimension_numbers=DN))
    assert before.lower(x, w).as_text() == now.lower(x, w).as_text()
    np.testing.assert_array_equal(now(x, w), before(x, w))


def test_grouped_convolutions_keep_the_xla_path():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
    y = ConvChoice("winograd2")(x, w, (1, 1), SAME3, dimension_numbers=DN, feature_group_count=2)
    expected = lax.conv_general_dilated(x, w, (1, 1), SAME3, dimension_numbers=DN,
                                        feature_group_count=2)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh_choices(monkeypatch):
    """No choice remembered by this process (as in a new run)."""
    monkeypatch.setattr(conv_choice, "_CHOSEN", {})


def test_auto_times_the_candidates_and_a_forced_one_gives_the_same_numbers(tmp_path,
                                                                            fresh_choices):
    x, w, _ = random_layer((4, 8, 8, 8), 3, 8, 1, SAME3, jnp.float32)
    args = ((1, 1), SAME3)
    auto = jax.jit(lambda x, w: ConvChoice("auto", str(tmp_path))(x, w, *args,
                                                                 dimension_numbers=DN))
    y_auto = auto(x, w)
    table = json.loads((tmp_path / conv_choice.CACHE_FILE).read_text())
    (key, chosen), = table.items()
    assert key == conv_choice.layer_key(x, w, *args)
    assert chosen in conv_choice.candidates(w.shape, (1, 1), jnp.float32)
    for name in conv_choice.candidates(w.shape, (1, 1), jnp.float32):
        forced = ConvChoice(name)(x, w, *args, dimension_numbers=DN)
        np.testing.assert_allclose(forced, y_auto, rtol=1e-4, atol=1e-4 * float(
            jnp.abs(y_auto).max()), err_msg=name)
    np.testing.assert_array_equal(ConvChoice(chosen)(x, w, *args, dimension_numbers=DN),
                                  y_auto)


def fake_timings(times, calls):
    def timed(name, shapes, strides, pads):
        calls.append(name)
        return times[name]
    return timed


def test_the_choice_survives_a_second_run_and_a_corrupt_cache_is_ignored(
        tmp_path, fresh_choices, monkeypatch):
    x, w, _ = random_layer((2, 6, 6, 4), 3, 4, 1, SAME3, jnp.float32)
    calls = []
    # Timings made up so that the choice is known: im2col is "fastest".
    times = {"xla": 3.0, "im2col": 1.0, "winograd2": 2.0, "winograd4": 4.0}
    monkeypatch.setattr(conv_choice, "time_candidate", fake_timings(times, calls))
    path = tmp_path / conv_choice.CACHE_FILE
    assert conv_choice.choose(x, w, (1, 1), SAME3, path) == "im2col"
    assert sorted(calls) == sorted(times)
    # A second run (a new process: nothing in memory) reads the file and times nothing.
    monkeypatch.setattr(conv_choice, "_CHOSEN", {})
    calls.clear()
    times["im2col"] = 9.0
    assert conv_choice.choose(x, w, (1, 1), SAME3, path) == "im2col"
    assert calls == []
    # A corrupt file: timed again (winograd2 is now fastest) and rewritten.
    for corrupt in ("{not json", json.dumps({"k": "no_such_impl"}), json.dumps([1, 2])):
        path.write_text(corrupt)
        monkeypatch.setattr(conv_choice, "_CHOSEN", {})
        calls.clear()
        assert conv_choice.choose(x, w, (1, 1), SAME3, path) == "winograd2"
        assert calls
        assert json.loads(path.read_text()) == {conv_choice.layer_key(x, w, (1, 1), SAME3):
                                                "winograd2"}


def test_bfloat16_layers_do_not_choose_winograd():
    assert conv_choice.candidates((3, 3, 8, 8), (1, 1), jnp.bfloat16) == ["im2col", "xla"]
    assert "winograd2" in conv_choice.candidates((3, 3, 8, 8), (1, 1), jnp.float32)


def test_an_unknown_conv_impl_names_the_choices():
    with pytest.raises(ConfigError) as info:
        conv_choice.check_mode("winograd3")
    message = str(info.value)
    assert "train.conv_impl='winograd3'" in message and "auto" in message
    assert "winograd2" in message and "\n" not in message
    assert conv_choice.check_mode(None) == "xla"


def test_auto_does_not_time_the_one_image_initialization(tmp_path, fresh_choices, monkeypatch):
    monkeypatch.setattr(conv_choice, "time_candidate", lambda *a: pytest.fail("timed"))
    x, w, _ = random_layer((1, 6, 6, 4), 3, 4, 1, SAME3, jnp.float32)
    y = ConvChoice("auto", str(tmp_path))(x, w, (1, 1), SAME3, dimension_numbers=DN)
    np.testing.assert_array_equal(y, ConvChoice("xla")(x, w, (1, 1), SAME3,
                                                       dimension_numbers=DN))
    assert not (tmp_path / conv_choice.CACHE_FILE).exists()
