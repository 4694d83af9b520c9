"""The benchmark suite (benchmarks/bench.py): a real quick run end to end, and its rows."""

import json

import pytest

from benchmarks import bench
from benchmarks.suite import ENTRIES
from cnnlab import host_memory

pytest.importorskip("torch")  # the PyTorch side (the bench extra; installed with dev)


def test_a_quick_run_reports_both_frameworks_beside_the_machine(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--models", "resnet20", "--frameworks", "cnnlab", "eager",
                       "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["model"] == "resnet20" and row["params_match"] and "compiled" not in row
    for framework in ("cnnlab", "eager"):
        run = row[framework]
        assert run["framework"] == framework and run["params"] == row["params"]
        assert run["images_per_sec"] > 0 and run["step_ms_median"] > 0
        assert run["peak_mib"] > 0 and run["peak_kind"] == "process peak RSS"
    assert row["cnnlab"]["compile_s"] >= 0 and row["eager"]["threads"] == 1
    machine = report["machine"]
    assert machine["usable_cores"] >= 1 and machine["versions"]["jax"]
    text = out.with_suffix(".md").read_text()
    assert machine["cpu"] in text and f"jax {machine['versions']['jax']}" in text
    assert machine["cpu_generation"] is None or f"({machine['cpu_generation']})" in text
    assert "GPU: " in text
    # cnnlab runs as the `cnnlab` command restarts itself (cnnlab/host_memory.py), PyTorch as a
    # script starts: each run says which it had, and the machine's lines say both.
    restarts = host_memory.command_tunables() is not None
    assert row["cnnlab"]["host_huge_pages"] == (restarts or host_memory.huge_pages())
    assert row["eager"]["host_huge_pages"] == host_memory.huge_pages()
    said = "on" if row["cnnlab"]["host_huge_pages"] else "off"
    assert f"Host huge pages (the kernel's THP mode: {machine['thp_mode'] or 'none'}): " \
           f"cnnlab {said}, eager " in text
    assert sum(line.startswith("| resnet20 ") for line in text.splitlines()) == 2  # 2 tables


def fake_child(calls: list[list[str]], envs: list[dict] | None = None):
    def run_child(cmd: list[str], env: dict[str, str]) -> dict:
        calls.append(cmd)
        (envs if envs is not None else []).append(env)
        framework = "cnnlab" if "benchmarks.bench_cnnlab" in cmd else (
            "compiled" if "--compile" in cmd else "eager")
        return {"framework": framework, "params": 10, "input": "32x32x3", "batch_size": 8,
                "images_per_sec": 4.0 if framework == "cnnlab" else 2.0, "wall_s": 1.0}
    return run_child


def test_a_variant_is_a_row_of_its_own_beside_the_same_pytorch_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "run_child", fake_child(calls))
    args = bench.parse_args(["--models", "resnet56", "--overrides", "seed=1",
                             "--variant", "spc1=train.steps_per_call=1 train.log_every=5"])
    base, variant = bench.run_entry("resnet56", args)
    assert (base["variant"], variant["variant"]) == ("", "spc1")
    assert variant["overrides"] == ["seed=1", "train.steps_per_call=1", "train.log_every=5"]
    assert base["eager"] is variant["eager"] and base["compiled"] is variant["compiled"]
    cnnlab_cmds = [c for c in calls if "benchmarks.bench_cnnlab" in c]
    assert [c[c.index("--overrides") + 1:] for c in cnnlab_cmds] == [
        ["seed=1"], ["seed=1", "train.steps_per_call=1", "train.log_every=5"]]
    assert len(calls) == 4  # PyTorch runs once per entry, whatever the variants
    lines = bench.results_markdown([base, variant])
    assert any(line.startswith("| resnet56 [spc1] |") and "| 2.00x |" in line for line in lines)


def test_cnnlab_runs_with_the_huge_pages_its_command_sets_and_pytorch_when_asked(monkeypatch):
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for torch_too in (False, True):
        calls, envs = [], []
        monkeypatch.setattr(bench, "run_child", fake_child(calls, envs))
        args = bench.parse_args(["--models", "resnet20", "--frameworks", "cnnlab", "eager",
                                 *(["--torch-huge-pages"] if torch_too else [])])
        bench.run_entry("resnet20", args)
        tunables = {("cnnlab" if "benchmarks.bench_cnnlab" in cmd else "eager"):
                    env.get("GLIBC_TUNABLES") for cmd, env in zip(calls, envs, strict=True)}
        on = "glibc.malloc.hugetlb=1"
        assert tunables == {"cnnlab": on, "eager": on if torch_too else None}


def test_rounds_alternate_the_order_and_report_each_frameworks_median_run(monkeypatch):
    """--rounds 3: the runs' order reversed each round, each framework's median run reported,
    and every round's images/s listed (each fake run is faster than the one before it)."""
    order = []

    def run_child(cmd: list[str], env: dict[str, str]) -> dict:
        framework = "cnnlab" if "benchmarks.bench_cnnlab" in cmd else "eager"
        order.append(framework)
        speed = float(len(order))
        return {"framework": framework, "params": 10, "input": "32x32x3", "batch_size": 8,
                "images_per_sec": speed, "step_ms_median": 1000 / speed, "peak_mib": speed,
                "wall_s": 1.0}

    monkeypatch.setattr(bench, "run_child", run_child)
    args = bench.parse_args(["--models", "resnet20", "--frameworks", "cnnlab", "eager",
                             "--rounds", "3"])
    (row,) = bench.run_entry("resnet20", args)
    assert order == ["eager", "cnnlab", "cnnlab", "eager", "eager", "cnnlab"]
    # cnnlab ran at 2, 3, 6 images/s, eager at 1, 4, 5: the medians are whole runs of their own.
    assert row["cnnlab"]["images_per_sec"] == 3.0 and row["cnnlab"]["peak_mib"] == 3.0
    assert row["eager"]["images_per_sec"] == 4.0
    assert [r["images_per_sec"] for r in row["cnnlab"]["rounds"]] == [2.0, 3.0, 6.0]
    assert "| 0.75x |" in bench.results_markdown([row])[2]
    assert bench.rounds_markdown([row])[-1] == (
        "| resnet20 | 2.0, 3.0, 6.0 | 1.0, 4.0, 5.0 | - | 2.00x, 0.75x, 1.20x |")


def test_a_median_run_of_an_even_count_is_the_slower_middle_one_and_a_failure_wins():
    runs = [{"images_per_sec": v, "step_ms_median": 1000 / v} for v in (4.0, 1.0, 3.0, 2.0)]
    assert bench.median_run(runs)["images_per_sec"] == 2.0
    assert bench.median_run([runs[0], {"error": "killed"}, runs[1]]) == {"error": "killed"}
    # One round (the default): the run as it came, and no table of rounds.
    assert bench.median_run(runs[:1]) is runs[0]
    row = bench.finish_row({"model": "resnet20", "variant": "", "overrides": [],
                            "cnnlab": {**runs[0], "params": 1, "input": "-", "batch_size": 8}})
    assert bench.rounds_markdown([row]) == []


def test_rounds_must_be_a_whole_number_of_at_least_one(capsys):
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(["--rounds", bad])
        assert stop.value.code == 2 and f"got {bad!r}" in capsys.readouterr().err


def test_the_machine_names_its_cpu_generation_and_vector_width():
    zen4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f avx512bw\n\n"
            "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: avx2\n")
    assert bench.cpu_generation(zen4) == "family 25 model 17, AVX-512"
    assert bench.cpu_generation(zen4.replace(" avx512f avx512bw", "")) == (
        "family 25 model 17, AVX2")
    assert bench.cpu_generation("processor\t: 0\nCPU implementer\t: 0x41\n") is None


def test_disagreeing_parameter_counts_are_reported_and_fail_the_suite():
    run = {"input": "32x32x3", "batch_size": 8, "images_per_sec": 1.0}
    row = bench.finish_row({"model": "vgg11", "variant": "", "overrides": [],
                            "cnnlab": {**run, "params": 5}, "eager": {**run, "params": 6}})
    assert not row["params_match"] and "MISMATCH 5 / 6" in bench.results_markdown([row])[2]


def test_a_failed_run_is_marked_and_its_error_listed():
    row = bench.finish_row({"model": "resnet20", "variant": "bad", "overrides": [],
                            "cnnlab": {"error": "Traceback\nKeyError: 'nope'"},
                            "eager": {"params": 6, "input": "32x32x3", "batch_size": 8,
                                      "images_per_sec": 1.0}})
    assert row["params_match"] and row["params"] == 6
    assert "| failed |" in bench.results_markdown([row])[2]
    assert bench.failures_markdown([row])[-1] == "- resnet20 [bad] cnnlab: KeyError: 'nope'"


def test_a_variant_needs_a_label_and_overrides():
    assert bench.parse_variant("scan=model.scan_blocks=true") == bench.Variant(
        "scan", ("model.scan_blocks=true",))
    for bad in ("model.scan_blocks", "=a=b", "scan="):
        with pytest.raises(Exception, match="LABEL=OVERRIDE"):
            bench.parse_variant(bad)


def test_every_entry_runs_whole_chunks_and_pads_only_small_images():
    for entry in ENTRIES.values():
        assert entry.steps % entry.steps_per_call == 0 and entry.warmup >= 1
        assert entry.crop_pad == 0 or entry.shape[0] == 32
