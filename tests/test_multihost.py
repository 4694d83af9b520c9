"""A multi-host job, reproduced with two processes of a "Slurm job" on this machine
(tests/multihost_run.py's `launch`: 2 processes of 2 forced host devices each, the Slurm
environment read by jax.distributed): each process reads and places only its share of the data,
a signal to one process stops both at one step, one-time work runs once, and a process started
late joins the same run directory. The two-process run of the device-resident training set is in
tests/test_parallel.py (it shares that file's sharded runs)."""

import json
import signal
from pathlib import Path

import jax.numpy as jnp
import pytest

from cnnlab.runs.checkpoint import Checkpointer
from tests.helpers import TINY, train_tiny
from tests.multihost_run import launch, report
from tests.sharded_runs import COMMON, losses, losses_agree

ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> dict:
    """The losses of the tiny run on one device in one process."""
    run_dir = tmp_path_factory.mktemp("one_device")
    train_tiny(run_dir, fashion_dir, COMMON)
    return losses(run_dir)


# A training set that pads: 1,024 - 98 held out = 926 rows, padded to 928 over 4 devices (no
# evaluation: the training set is what this is about).
HELD_OUT = ["dataset.val_size=98", "train.eval_every=0"]


def test_a_device_resident_job_decodes_and_places_only_each_process_share(
        tmp_path: Path, fashion_dir: Path) -> None:
    """The training set on the devices, split by rows over the 4 devices of 2 processes: each
    process decodes only the training images its devices hold (of the 926, rows 0-463 and
    464-925 of the set padded to 928), puts only those on them, and the job trains as one
    process on one device does."""
    one = tmp_path / "one"
    train_tiny(one, fashion_dir, [*COMMON, *HELD_OUT])
    run_dir = tmp_path / "run"
    reports = [report(r) for r in launch([str(fashion_dir), str(run_dir), *HELD_OUT], env=ENV)]
    assert [r["status"] for r in reports] == ["finished", "finished"]
    # Decoded from the TFDS train split: its share of the training set plus the 98 held-out
    # images (replicated, as the test split, which comes whole from the data cache or TFDS).
    assert [r["decoded"]["train"] for r in reports] == [464 + 98, 462 + 98]
    assert [r["placed_rows"] for r in reports] == [464, 464]  # the padding's 2 rows included
    assert [r["placed_bytes"] for r in reports] == [464 * 28 * 28] * 2
    assert [r["equality_checks"] for r in reports] == [0, 0]
    # The statistics summed over the processes, the batches drawn in one process's order.
    assert losses_agree(losses(run_dir), losses(one))


@pytest.mark.parametrize("subsets", [
    {"val_size": 98},
    {"classes": [7, 2, 5], "val_size": 30, "per_class": 60},
    {"folds": 5, "fold": 2, "per_class": 0.5},
])
def test_each_process_share_is_its_rows_of_the_one_process_split(
        fashion_dir: Path, monkeypatch: pytest.MonkeyPatch, subsets: dict) -> None:
    """Planned on row ids, each process's decoded share is exactly its rows of the training
    split one process loads, after every subset (classes, hold-out, folds, per_class); the
    held-out split is the same whole; only the share's rows are decoded."""
    import numpy as np

    from cnnlab.data import tfds_reader
    from cnnlab.data.load import load_dataset
    from cnnlab.data.share import Share

    def load(share: Share | None = None) -> object:
        return load_dataset("fashion_mnist", data_dir=str(fashion_dir), max_examples=1024,
                            download=False, share=share, **subsets)

    whole = load()
    n, decoded = len(whole.train), []
    read = tfds_reader._read_data_source

    def counted(builder: object, split: str, *args: object, **kwargs: object) -> tuple:
        images, labels = read(builder, split, *args, **kwargs)
        decoded.append((split, len(images)))
        return images, labels

    monkeypatch.setattr(tfds_reader, "_read_data_source", counted)
    padded = -(-n // 4) * 4
    for start, stop in ((0, padded // 2), (padded // 2, padded)):
        decoded.clear()
        part = load(Share(rows=lambda _, r=(start, stop): r, multiple=4, total=lambda x: x))
        real = slice(start, min(stop, n))
        assert len(part.train) == n and (part.train.start, part.train.stop) == (start, stop)
        np.testing.assert_array_equal(part.train.images, whole.train.images[real])
        np.testing.assert_array_equal(part.train.labels, whole.train.labels[real])
        np.testing.assert_array_equal(part.val.images, whole.val.images)
        np.testing.assert_array_equal(part.val.labels, whole.val.labels)
        # The test split whole; of the train split the held-out rows, then the share.
        assert decoded == [("test", 1024), ("train", len(whole.val)),
                           ("train", real.stop - real.start)]


def test_a_streamed_job_reads_and_places_only_each_process_share(
        tmp_path: Path, fashion_dir: Path, reference: dict) -> None:
    run_dir = tmp_path / "run"
    reports = [report(r) for r in launch(
        [str(fashion_dir), str(run_dir), "dataset.on_device=false", "dataset.stream_workers=0"],
        env=ENV)]
    assert [r["status"] for r in reports] == ["finished", "finished"]
    # 20 steps of 32 images: each process decodes and puts on its 2 devices its 16 of each
    # batch, and nothing goes through device_put's cross-process check (an all-gather of
    # every process's copy).
    assert [r["decoded_rows"] for r in reports] == [320, 320]
    assert [r["placed_rows"] for r in reports] == [320, 320]
    assert [r["equality_checks"] for r in reports] == [0, 0]
    # The batches are the one-process run's, in its order.
    assert losses_agree(losses(run_dir), reference)


# The signal test's runs, small so that its two two-process jobs stay in `make test`: 12 steps
# in chunks of 2, no evaluation.
SHORT = ["train.steps=12", "train.steps_per_call=2", "checkpoint.every=4", "train.log_every=2",
         "train.eval_every=0"]


def test_a_signal_to_one_process_stops_both_at_one_step_and_the_job_resumes(
        tmp_path: Path, fashion_dir: Path) -> None:
    """SIGUSR2 (submitit's time-limit warning) to process 1 only, once it has trained to step
    4: it is reduced over the processes after the chunk of steps 5-6 and read at the next step
    boundary (one chunk later, by design: training/signals.py), so both stop at step 8, save it
    together and hand the signal on (submitit would requeue); the requeued job resumes there
    and ends as the uninterrupted run."""
    one = tmp_path / "one"
    train_tiny(one, fashion_dir, [*COMMON, *SHORT])
    run_dir = tmp_path / "run"
    args = [str(fashion_dir), str(run_dir), *SHORT]
    stopped = [report(r) for r in launch(args, env={**ENV, "CNNLAB_TEST_SIGNAL": "4:SIGUSR2"})]
    assert [(r["status"], r["final_step"], r["signal"]) for r in stopped] == [
        ("interrupted", 8, signal.SIGUSR2)] * 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final_step"] == 8
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [4, 8]
    forwarded = [json.loads((run_dir / f"forwarded-{i}.json").read_text()) for i in (0, 1)]
    assert [f["signal"] for f in forwarded] == [signal.SIGUSR2] * 2
    # Handed on once the checkpoint and the summary were written.
    assert forwarded[0]["summary_status"] == "interrupted"
    assert 8 in forwarded[0]["checkpoints"]

    resumed = [report(r) for r in launch(args, env=ENV)]
    assert [(r["status"], r["final_step"]) for r in resumed] == [("finished", 12)] * 2
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 8
    # 4 devices sum in another order than one, and the difference grows with the steps (4.5e-4
    # relative at step 8 seen on 256 images; step 2 equal): 1e-3, not the 1e-4 of 20 steps of 5.
    assert losses_agree(losses(run_dir), losses(one))


def test_one_time_work_is_done_by_process_0_while_the_other_waits(tmp_path: Path) -> None:
    """A dataset missing from dataset.data_dir is prepared once, by process 0, and read by
    both; an unusable latest checkpoint is moved aside once, and both resume from the one
    before."""
    checkpoints = tmp_path / "checkpoints"
    saver = Checkpointer(checkpoints, keep=None)
    saver.save(1, {"w": jnp.ones(4)}, {})
    saver.save(2, {"w": jnp.full(4, 2.0)}, {})
    saver.close()
    for path in (checkpoints / "2" / "meta").rglob("*"):
        if path.is_file():
            path.write_text("{not json")
    data_dir = tmp_path / "tfds"
    reports = [report(r) for r in launch([str(data_dir), str(checkpoints)],
                                         script="multihost_once.py", env=ENV)]
    assert [r["processes"] for r in reports] == [2, 2]
    # Generated once (its train and test splits), by process 0; both read the same examples.
    assert (data_dir / "generated.log").read_text().split() == ["0", "0"]
    assert reports[0]["labels"] == reports[1]["labels"]
    assert sorted(reports[0]["labels"]) == [0] * 8 + [1] * 8  # (in the order TFDS shuffled)
    assert [(r["restored"], r["w"]) for r in reports] == [(1, [1.0] * 4)] * 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2.unusable"]


def test_a_process_started_late_trains_in_the_same_run_directory(
        tmp_path: Path, fashion_dir: Path) -> None:
    """`cnnlab train` with the default run directory (named by the time it starts): the second
    process, started 3 s after the first, trains in the first one's directory."""
    outputs = launch(["cnnlab.cli", "train", *TINY, *COMMON, "train.distributed=auto",
                      f"dataset.data_dir={fashion_dir}"], delay=3, script="-m", env=ENV,
                     cwd=tmp_path)
    for code, _, err in outputs:
        assert code == 0, err[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["processes"] == 2


def test_a_training_split_padded_to_split_over_the_devices_draws_the_same_batches() -> None:
    """Split by rows over D devices, a training set is padded to a multiple of D: its steps
    still draw from the real examples, in the unpadded set's order."""
    import jax
    import numpy as np

    from cnnlab.data.device import host_split, select_batch
    from cnnlab.data.preprocess import PreprocessStats
    from cnnlab.data.types import ArraySplit

    rng = np.random.default_rng(0)
    split = ArraySplit(rng.integers(0, 256, (10, 2, 2, 1), dtype=np.uint8),
                       np.arange(10, dtype=np.int32))
    stats = PreprocessStats(mean=np.zeros(1, np.float32), std=np.ones(1, np.float32))
    plain = host_split(split, stats)
    padded = host_split(split, stats, pad_to=4).replace(examples=10)
    assert len(padded.labels) == 12
    key = jax.random.PRNGKey(3)
    for step in range(7):  # across epochs (3 batches of 3 per epoch)
        _, want = select_batch(plain, key, jnp.asarray(step), 3)
        _, got = select_batch(padded, key, jnp.asarray(step), 3)
        np.testing.assert_array_equal(got, want)


def test_two_checkpoint_folders_saving_at_once_do_not_collide(tmp_path: Path) -> None:
    """A run with train.keep_best saves checkpoints/ and best/ at the same step; on several
    hosts the two background saves met at Orbax barriers of the same name, and one process hung
    at its last save (seen in CI under load). Eight overlapping pairs of saves complete."""
    reports = [report(r) for r in launch([str(tmp_path), "8"], script="multihost_saves.py",
                                         env=ENV, timeout=120)]
    assert [r["steps"] for r in reports] == [[list(range(1, 9))] * 2] * 2
