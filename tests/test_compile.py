"""`cnnlab compile`: the training chunk compiled by the real TPU compiler (libtpu) for a slice
this host does not have; its memory, FLOPs and collectives checked against independent counts.

The compiles run in a separate interpreter that has the `tpu` extra (libtpu), so that no other
test's JAX ever probes for a TPU: $CNNLAB_TPU_PYTHON, else .venv-tpu/bin/python (`make
setup-tpu`). Without one the compiles are skipped, except under CI=true, where they fail.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from cnnlab.cli.main import main
from cnnlab.training import chips
from tests.helpers import REPO

# ResNet-20 at its real depth and width, on few images and small batches: each compile is
# tens of seconds.
SMALL = ["model=resnet20", "dataset=fashion_mnist", "dataset.max_examples=512",
         "train.steps_per_call=1", "augment=none"]


def _tpu_python() -> str | None:
    for candidate in (os.environ.get("CNNLAB_TPU_PYTHON"), REPO / ".venv-tpu" / "bin" / "python"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def tpu_python() -> str:
    found = _tpu_python()
    if found is None:
        message = ("no interpreter with libtpu: make setup-tpu (or set CNNLAB_TPU_PYTHON); "
                   "see docs/scale.md")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def compile_cli(python: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([python, "-m", "cnnlab.cli", "compile", *args], capture_output=True,
                          text=True, env=env, timeout=900, cwd=REPO)


def test_resnet20_compiles_for_four_v5e_chips_with_an_all_reduce(tpu_python):
    batch = 32
    result = compile_cli(tpu_python, "tpu:v5e:2x2", *SMALL, f"train.batch_size={batch}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert "fits" in "\n".join(lines[:-1])  # the table before the JSON line
    assert summary["target"] == "tpu:v5e:2x2" and summary["devices"] == 4
    assert summary["fits"] is True
    assert summary["device_memory_bytes"] == 16 * 2**30
    # The gradients (and BN statistics) are summed over the 4 chips.
    assert summary["collectives"].get("all-reduce", 0) >= 1

    # Independent of the compiler: the parameters Flax's own shapes give (float32, with SGD
    # momentum's buffer, a copy each) and the 512 28x28 uint8 images held on every chip; the
    # FLOPs per chip from the model summary's multiply-adds: forward 2 x MACs per image,
    # backward about twice that, on batch/4 images.
    from cnnlab.cli.preflight import check_config, without_hydra
    from cnnlab.models import abstract_variables, build_model, count_params
    from cnnlab.models.summary import summarize

    model = build_model(without_hydra(check_config(SMALL, for_training=False).cfg), 10)
    params = count_params(abstract_variables(model, (28, 28, 1))["params"])
    assert 260_000 < params < 280_000  # He et al. 2016's 0.27M
    memory = summary["memory"]
    state_and_data = params * 4 * 2 + 512 * 28 * 28
    # Above: TPU layouts pad small minor dimensions (a 3x3x16x16 kernel's 16x16) to whole
    # tiles; 2.4x here.
    assert state_and_data <= memory["argument"] <= 4 * state_and_data
    assert summary["per_device_bytes"] == (memory["argument"] + memory["output"]
                                           - memory["alias"] + memory["temp"] + memory["code"])
    assert memory["alias"] >= params * 4 * 2  # the donated state is updated in place
    expected = 6 * summarize(model, (28, 28, 1)).macs * batch / 4
    assert 0.7 * expected <= summary["flops_per_step"] <= 2 * expected

    chip = chips.CHIPS.get("v5e")
    assert summary["roofline_step_s"] == pytest.approx(max(
        summary["flops_per_step"] / chip.peak_fp32,
        summary["bytes_per_step"] / chip.bandwidth))


def test_an_impossible_batch_is_one_line_and_exit_2(tpu_python):
    # 60,000 images at once on one chip: ResNet-20's first stage alone keeps 60,000 x 28 x 28
    # x 16 float32 activations (3 GB) per layer for the backward pass, about 20 of them.
    result = compile_cli(tpu_python, "tpu:v5e:2x2", *SMALL[:2], "train.steps_per_call=1",
                         "train.devices=1", "train.batch_size=60000")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("cnnlab: error:")]
    assert len(errors) == 1 and "does not fit tpu:v5e:2x2" in errors[0], result.stderr[-3000:]


@pytest.mark.parametrize("target, expected", [
    ("tpu:v9:2x2", "unknown chip 'v9'; valid choices: a100, h100, v4, v5e, v5p, v6e"),
    ("gpu:v5e:2x2", "v5e is a tpu chip; write tpu:v5e:2x2"),
    ("tpu:v5e:2y2", "topology '2y2' must be 2 or 3 positive sizes"),
    ("v5e", "is not PLATFORM:CHIP:TOPOLOGY"),
])
def test_a_bad_target_is_one_line_and_exit_2(target, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compile", target, "model=resnet20"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err


def test_a_missing_compiler_names_the_extra_to_install(monkeypatch, capsys):
    # As on an install without the extra: the module libtpu is imported as is not there.
    monkeypatch.setitem(chips.EXTRAS, "tpu", ("cnnlab_no_such_libtpu", "tpu"))
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "tpu:v5e:2x2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cnnlab: error: compiling for tpu:v5e:2x2 needs cnnlab_no_such_libtpu: pip "
                   "install 'cnnlab[tpu]' (in its own environment: docs/scale.md, `cnnlab "
                   "compile`)")
