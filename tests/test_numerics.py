"""Numerics off CPU (cnnlab/training/numerics.py) and what must not recompile on several
devices: settings validated and applied, the plateau's lr change reusing the compiled chunk,
and the checkpoint checksum of sharded state."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cnnlab.cli.preflight import validate
from cnnlab.errors import ConfigError
from cnnlab.training import numerics, steps
from tests.helpers import REPO, TINY, compose_config, optimized_xla  # noqa: F401


def test_a_bad_matmul_precision_is_one_line_naming_the_choices():
    cfg = compose_config([*TINY, "train.matmul_precision=tf32"])
    with pytest.raises(ConfigError, match="train.matmul_precision=tf32 is not one of highest, "
                                          "high, default"):
        validate(cfg)


def test_defaults_are_highest_and_deterministic_and_saved_configs_read_so():
    cfg = compose_config(TINY)
    assert cfg.train.matmul_precision == "highest" and cfg.train.deterministic is True
    old = compose_config(TINY)
    old.train.matmul_precision, old.train.deterministic = None, None  # configs saved before
    old.train.cpu_kernels = None
    assert numerics.matmul_precision(old.train) == "highest"
    # Saved before train.cpu_kernels: XLA's default library (YNNPACK), as they trained.
    assert numerics.compiler_options(old.train, "cpu") == {"xla_gpu_deterministic_ops": True}
    old.train.deterministic = False
    assert numerics.compiler_options(old.train, "cpu") == {}


def test_cpu_kernels_are_a_compiler_option_of_cpu_steps_only():
    cfg = compose_config(TINY)
    assert cfg.train.cpu_kernels == "eigen"
    no_ynn_convolutions = {"xla_cpu_experimental_ynn_fusion_type":
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert numerics.compiler_options(cfg.train, "cpu") == {"xla_gpu_deterministic_ops": True,
                                                          **no_ynn_convolutions}
    assert numerics.compiler_options(cfg.train, "gpu") == {"xla_gpu_deterministic_ops": True}
    assert numerics.compiler_options(cfg.train, "tpu") == {"xla_gpu_deterministic_ops": True}
    cfg.train.cpu_kernels = "ynnpack"
    assert numerics.compiler_options(cfg.train, "cpu") == {"xla_gpu_deterministic_ops": True}


def test_a_bad_cpu_kernels_value_is_one_line_naming_the_choices():
    cfg = compose_config([*TINY, "train.cpu_kernels=mkl"])
    with pytest.raises(ConfigError, match="train.cpu_kernels=mkl is not one of eigen, ynnpack"):
        validate(cfg)


@pytest.mark.usefixtures("optimized_xla")
def test_the_cpu_step_compiles_with_the_kernel_library_the_config_names():
    """Through `build`, as `cnnlab train` compiles them: with ynnpack the training step's and
    the evaluation's (and `cnnlab eval`'s ensemble predictions') convolutions are inside
    XLA's YNNPACK fusions, with eigen none is (they stay XLA's own, run by Eigen), while the
    step's reductions are YNNPACK's either way."""
    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.training import build, ensemble, evaluate

    def programs(kernels: str) -> tuple[str, str, str]:
        # Width 16: YNNPACK takes no convolution of width-4 layers.
        cfg = compose_config([*TINY, "dataset=cifar10", "train.batch_size=8", "model.width=16",
                              "train.eval_batch_size=8", f"train.cpu_kernels={kernels}"])
        run = build.build(cfg, synthetic_dataset(16, (8, 8, 3), 10))
        ev = run.evaluator
        split, index = next(evaluate._batches(ev.splits["test"], ev.batch_size))
        variables = (run.state.params, run.state.batch_stats, split, index)
        return (run.train_chunk.lower(run.state, run.train_data, 1).compile().as_text(),
                ev._eval_batch.lower(*variables).compile().as_text(),
                ensemble.jitted_predict(run, ev.batch_size, None).lower(*variables)
                .compile().as_text())

    def in_ynnpack(hlo: str) -> tuple[bool, bool]:
        """(a convolution, a reduction) inside a computation a YNNPACK fusion calls."""
        called = set(re.findall(r'calls=%([\w.\-]+).*"__ynn_fusion"', hlo))
        bodies = {m.group(1): m.group(0)
                  for m in re.finditer(r"^%([\w.\-]+) .*?^}", hlo, re.M | re.S)}
        inside = " ".join(bodies[name] for name in called if name in bodies)
        return " convolution(" in inside, " reduce(" in inside

    ynnpack, *ynnpack_evals = programs("ynnpack")
    assert in_ynnpack(ynnpack) == (True, True)
    assert all(in_ynnpack(hlo)[0] for hlo in ynnpack_evals)
    eigen, *eigen_evals = programs("eigen")
    assert in_ynnpack(eigen) == (False, True) and " convolution(" in eigen
    assert all(not in_ynnpack(hlo)[0] and " convolution(" in hlo for hlo in eigen_evals)


def test_configure_sets_jax_matmul_precision():
    before = jax.config.jax_default_matmul_precision
    try:
        for value in ("default", "highest"):
            numerics.configure(compose_config([*TINY, f"train.matmul_precision={value}"]).train)
            assert jax.config.jax_default_matmul_precision == value
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def test_the_chunk_is_compiled_with_the_options_it_is_given():
    """The deterministic-ops option reaches XLA (accepted on CPU, where it changes nothing);
    an unknown one is refused by XLA, which shows the options are passed on."""
    def step(state, data):  # noqa: ANN001, ANN202
        return state.replace(step=state.step + 1), steps.zero_metrics()

    state = steps.TrainState(step=jnp.int32(0), params={}, batch_stats={}, opt_state=(),
                             rng=jax.random.PRNGKey(0))
    chunk = steps.make_train_chunk(step, compiler_options={"xla_gpu_deterministic_ops": True})
    assert int(chunk(state, {}, num_steps=2)[0].step) == 2
    state = steps.TrainState(step=jnp.int32(0), params={}, batch_stats={}, opt_state=(),
                             rng=jax.random.PRNGKey(0))
    wrong = steps.make_train_chunk(step, compiler_options={"xla_no_such_option": True})
    with pytest.raises(Exception, match="xla_no_such_option"):
        wrong(state, {}, num_steps=2)


def test_on_two_devices_the_plateau_does_not_recompile_and_sharded_state_checksums(
        tmp_path, fashion_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "two_device_checks.py"),
                           str(fashion_dir), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device_count"] == 2 and result["devices"] == 2
    assert result["status"] == "finished"
    assert result["lrs"] == [0.1, 0.1, pytest.approx(0.01), pytest.approx(0.001)]
    assert result["chunk_compiles"] == 1  # the lr changed twice, the program did not
    assert result["shards"] == 2 and result["same_checksum"]
    assert result["restored_equal"] and result["restored_sharded"]
