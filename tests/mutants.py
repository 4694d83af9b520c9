"""`make mutants`: break one technique at a time in a copy of the repo and see a test fail.

Each mutant replaces one snippet of cnnlab's code (which must occur exactly once, so a mutant
that no longer applies is reported, not silently skipped) in a temporary copy of the tracked
files, then runs the tests that claim the behaviour, from `make test`'s set (not slow). A
mutant is killed when a test fails. Mutation tools (mutmut, cosmic-ray) mutate operators at
random across every line; these are the regressions the suite exists to catch, named.

    python tests/mutants.py [--only NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The copy lives in a temporary folder, so tests/helpers.py's default (../shared next to the
# repo) would not find the offline data there and every test that reads it would skip: a mutant
# would survive unseen. The copy reads this repo's data instead.
SHARED_DATA = Path(os.environ.get("CNNLAB_SHARED_DATA",
                                  REPO.parent / "shared" / "data" / "tfds_array_record"))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("weight decay never applies", "cnnlab/training/optim.py",
           "optax.add_decayed_weights(opt.weight_decay)", "optax.add_decayed_weights(0.0)",
           ("tests/test_optim.py", "tests/test_recipes.py")),
    Mutant("dropout is the identity in training", "cnnlab/models/blocks.py",
           "nn.Dropout(self.rate, deterministic=not train)",
           "nn.Dropout(self.rate, deterministic=True)",
           ("tests/test_model_regularization.py",)),
    Mutant("label smoothing is ignored", "cnnlab/training/losses.py",
           "smoothed_cross_entropy(logits, labels, smoothing)",
           "smoothed_cross_entropy(logits, labels, 0.0)",
           ("tests/test_recipes.py", "tests/test_optim.py")),
    Mutant("the flip augmentation is the identity", "cnnlab/data/augment/ops.py",
           "return jnp.where(flip, images[:, :, ::-1, :], images)", "return images",
           ("tests/test_augment.py", "tests/test_augment_recipes.py")),
    Mutant("a CIFAR ResNet's unscanned blocks are skipped", "cnnlab/models/cifar_resnet.py",
           "x = self._block(stage, block, survival[block], name=name)(x, train)",
           "self._block(stage, block, survival[block], name=name)",
           ("tests/test_zoo.py", "tests/test_models.py", "tests/test_scan.py")),
    Mutant("BatchNorm's running statistics never move", "cnnlab/models/layers.py",
           "norm = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,",
           "norm = nn.BatchNorm(use_running_average=not train, momentum=1.0,",
           ("tests/test_layers.py", "tests/test_models.py")),
    Mutant("a resumed run's loop restarts its step count at 0", "cnnlab/training/loop.py",
           "step = int(state.step)\n    while step < total:", "step = 0\n    while step < total:",
           ("tests/test_train.py", "tests/test_faults.py", "tests/test_chunk_loop.py")),
    Mutant("EMA weights do not average (decay 0)", "cnnlab/training/steps.py",
           "return optax.ema(decay, debias=True)", "return optax.ema(0.0, debias=True)",
           ("tests/test_steps.py", "tests/test_evaluate.py")),
    Mutant("a chunk's stacked blocks drop their batch statistics", "cnnlab/models/scan.py",
           "parent.put_variable(col, key, values)", "del values",
           ("tests/test_scan.py",)),
    # The scanned paths: initialization always unrolls, so the weights and counts stay right
    # and only a dependence check (gradients of the logits reach every weight) sees these.
    Mutant("a CIFAR ResNet's scanned blocks are skipped", "cnnlab/models/cifar_resnet.py",
           "x = scan_blocks(self, names[first:],", "x = x + 0 * scan_blocks(self, names[first:],",
           ("tests/test_zoo.py::test_zoo_model_output_depends_on_every_layer[resnet110]",)),
    Mutant("a stack net's scanned blocks are skipped", "cnnlab/models/stack.py",
           "return scan_blocks(self, [spec.name for spec in run], block, x, train,",
           "return x + 0 * scan_blocks(self, [spec.name for spec in run], block, x, train,",
           ("tests/test_zoo.py::test_scanned_residual_blocks_each_count",)),
    Mutant("the CPU matmul kernel gradient sums only its first batch tile",
           "cnnlab/models/conv.py",
           "lax.fori_loop(0, n // tile, add_tile,", "lax.fori_loop(0, 1, add_tile,",
           ("tests/test_models.py", "tests/test_fidelity.py")),
    Mutant("the strided input gradient's phases interleaved in the wrong order",
           "cnnlab/models/conv.py",
           "grad = grad.reshape(n, *phases, sr, sc, c).transpose(0, 1, 3, 2, 4, 5)",
           "grad = grad.reshape(n, *phases, sc, sr, c).transpose(0, 1, 4, 2, 3, 5)",
           ("tests/test_models.py", "tests/test_fidelity.py")),
    Mutant("the 1x1 kernel gradient reads consecutive pixels, not every s-th",
           "cnnlab/models/conv.py",
           "pixels = x[:, ::strides[0], ::strides[1]]", "pixels = x",
           ("tests/test_models.py",)),
)


def copy_repo(into: Path) -> None:
    """The tracked and untracked-but-not-ignored files, as CI's clean clone has them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apply(mutant: Mutant, root: Path, write: bool = True) -> None:
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name!r}: {mutant.old!r} occurs {count} times in "
                         f"{mutant.path}; update tests/mutants.py")
    if write:
        path.write_text(text.replace(mutant.old, mutant.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, str, int]:
    """(passed, the first failing test's id, how many tests skipped)."""
    env = {**os.environ, "PYTHONPATH": str(root), "CNNLAB_SHARED_DATA": str(SHARED_DATA)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
         "-n", "2", "--dist", "worksteal", "-rfEs", *tests],
        cwd=root, env=env, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    failed = [line.split(" ")[1] for line in lines if line.startswith("FAILED ")]
    # A skipped test claims nothing: the table shows how many did, so a survivor (or a kill)
    # that rests on a missing piece is visible.
    skipped = sum(int(line.split()[1].strip("[]")) for line in lines
                  if line.startswith("SKIPPED ["))
    return result.returncode == 0, (failed[0] if failed else lines[-1] if lines else ""), skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names (substrings) of the mutants to run")
    parser.add_argument("--out", type=Path, help="write the table here too (markdown)")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant still applies (no tests)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(o in m.name for o in args.only)]
    if args.check:
        for mutant in chosen:
            apply(mutant, REPO, write=False)
        print(f"{len(chosen)} mutants apply")
        return 0
    rows = ["| mutant | killed | by | skipped | seconds |", "|---|---|---|---|---|"]
    killed = 0
    for mutant in chosen:
        with tempfile.TemporaryDirectory(prefix="cnnlab-mutant-") as tmp:
            root = Path(tmp)
            copy_repo(root)
            apply(mutant, root)
            start = time.perf_counter()
            passed, by, skipped = run_tests(root, mutant.tests)
            seconds = time.perf_counter() - start
        killed += not passed
        rows.append(f"| {mutant.name} | {'no' if passed else 'yes'} | "
                    f"{'' if passed else f'`{by}`'} | {skipped} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join([*rows, "", f"{killed} of {len(chosen)} mutants killed"])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
