"""cnnlab against an independent PyTorch script, over seeds: do they differ beyond seed noise?

Both sides train the README's short resnet_vs_plain recipe (He et al. 2016's CIFAR recipe scaled
to `--steps`: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and
75%, pad-4 crop + flip, per-channel standardisation, He normal init, BN, option-A shortcuts) on
fashion_mnist, each model once per seed: cnnlab through its own CLI as one multirun, PyTorch
through `benchmarks/torch_recipe.py`. Train error is the mean of the last 10 steps' batch errors
(cnnlab: `final/train/error` with `train.log_every=10`), test error is measured at the end.

For each model and metric the table gives mean ± sample std per side and Welch's t-test; "no"
under "differs" means the two sides' difference is within their seeds' spread (p >= 0.05).

    TFDS_DATA_DIR=../shared/data/tfds_array_record python benchmarks/fidelity.py \\
        --models plain20 resnet20 --seeds 0 1 2 --steps 300 --out benchmarks/results/fidelity.md

An interrupted comparison resumes: rerun the same command. Its runs are kept in `--work-dir`
(cnnlab's jobs checkpoint there and resume like any cnnlab run; each finished PyTorch run is one
JSON file there and is not run again). `--include OLD.json` adds the runs of an earlier
comparison (its `.json`) to the table, e.g. the 20-layer nets' beside a later run of the 56-layer
ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = {"train_error": "final/train/error", "test_error": "final/test/error"}


def cnnlab_runs(models: list[str], seeds: list[int], steps: int, work_dir: Path) -> list[dict]:
    """Each model as one multirun over the seeds, in a sweep folder of its own (a rerun resumes
    its jobs; another model never meets them)."""
    results = []
    for model in models:
        sweep = work_dir / "cnnlab" / model
        cmd = [str(Path(sys.executable).parent / "cnnlab"), "train", "-m",
               "experiment=resnet_vs_plain", "dataset=fashion_mnist", "dataset.val_size=0",
               f"model={model}", f"seed={','.join(map(str, seeds))}", f"train.steps={steps}",
               "train.log_every=10", f"train.eval_every={steps}",
               f"checkpoint.every={max(steps // 6, 1)}", "logger.mode=disabled",
               "progress=false", f"hydra.sweep.dir={sweep}"]
        subprocess.run(cmd, check=True, cwd=REPO)
        for summary_file in sorted(sweep.glob("*/summary.json")):
            summary = json.loads(summary_file.read_text())
            if summary["seed"] not in seeds:
                continue  # a job of an earlier command with more seeds
            results.append({"framework": "cnnlab", "model": summary["model"],
                            "seed": summary["seed"],
                            **{k: summary[v] for k, v in METRICS.items()},
                            "wall_time": summary["wall_time"]})
    return results


def torch_runs(models: list[str], seeds: list[int], steps: int, work_dir: Path) -> list[dict]:
    done = work_dir / "pytorch"
    done.mkdir(parents=True, exist_ok=True)
    results = []
    for model in models:
        depth, plain = int(model.removeprefix("plain").removeprefix("resnet")), "plain" in model
        for seed in seeds:
            record = done / f"{model}_seed{seed}.json"  # work_dir is per step count
            if not record.exists():
                cmd = [sys.executable, "benchmarks/torch_recipe.py", "--depth", str(depth),
                       "--steps", str(steps), "--seed", str(seed), *(["--plain"] if plain else [])]
                line = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True,
                                      text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                result = json.loads(line.stdout.strip().splitlines()[-1])
                tmp = record.with_suffix(".tmp")
                tmp.write_text(json.dumps({**result, "model": model}))
                tmp.replace(record)  # atomic: a killed comparison never leaves half a record
            results.append(json.loads(record.read_text()))
            print(f"pytorch {model} seed {seed}: {results[-1]}", file=sys.stderr)
    return results


def compare(results: list[dict], models: list[str]) -> str:
    from scipy import stats

    rows = ["| model | metric | cnnlab (mean ± std) | PyTorch (mean ± std) | Welch p | differs |",
            "|---|---|---:|---:|---:|---|"]
    for model in models:
        for metric in METRICS:
            sides = [[r[metric] for r in results if r["model"] == model and
                      r["framework"] == framework] for framework in ("cnnlab", "pytorch")]
            cells = [f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"
                     f" (n={len(v)})" for v in sides]
            p = stats.ttest_ind(*sides, equal_var=False).pvalue if min(map(len, sides)) > 1 \
                else float("nan")
            differs = "n/a" if p != p else ("**yes**" if p < 0.05 else "no")
            rows.append(f"| {model} | {metric.replace('_', ' ')} (%) | {cells[0]} | {cells[1]} | "
                        f"{p:.3f} | {differs} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["plain20", "resnet20"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="markdown table (and .json beside)")
    p.add_argument("--work-dir", type=Path, default=REPO / "benchmarks/results/fidelity_runs",
                   help="the runs of both sides, kept so that rerunning the command resumes")
    p.add_argument("--include", type=Path, nargs="*", default=[],
                   help="the .json of earlier comparisons: their runs join the table")
    args = p.parse_args(argv)
    args.work_dir = args.work_dir / f"steps{args.steps}"
    results = [r for old in args.include for r in json.loads(old.read_text())]
    results += cnnlab_runs(args.models, args.seeds, args.steps, args.work_dir)
    results += torch_runs(args.models, args.seeds, args.steps, args.work_dir)
    models = list(dict.fromkeys([r["model"] for r in results]))
    table = compare(results, models)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python benchmarks/fidelity.py", *(argv or sys.argv[1:])])
        args.out.write_text(f"`{command}`\n\n{table}")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
