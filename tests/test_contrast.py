"""`compare.contrast`: a key's effect on the final error against seed noise
(cnnlab/analysis/contrast.py)."""

import pytest
from scipy import stats

from cnnlab.analysis.contrast import contrast_markdown, contrasts, group_keys, welch_p
from cnnlab.analysis.tables import Row, mean_std
from cnnlab.errors import ConfigError
from tests.helpers import run_cli
from tests.test_compare import sweep  # noqa: F401 (a fixture)

# Final (test, train) error per seed, as the depth-20/56 study might end.
SEEDS = {
    ("plain", 20): ([9.6, 9.9, 9.8], [9.5, 10.5, 10.1]),
    ("resnet", 20): ([8.7, 9.1, 8.9], [8.1, 9.8, 8.7]),
    ("plain", 56): ([12.0, 14.5, 11.0], [13.0, 15.0, 12.5]),
    ("resnet", 56): ([8.0, 8.4], [7.0, 7.5]),
}


def _row(kind: str, depth: int, seeds: dict | None = None) -> Row:
    test, train = (seeds or SEEDS)[kind, depth]
    config = {"model.name": f"{kind}{depth}", "model.depth": depth,
              "model.residual": kind == "resnet", "model.scan_blocks": depth > 20,
              "optimizer.lr": 0.1}
    stats_ = {"final_test_error": mean_std(test), "final_train_error": mean_std(train),
              "final_val_error": mean_std([])}
    return Row(f"model={kind}{depth}", len(test), len(test), stats_, config)


ROWS = [_row(kind, depth) for kind in ("plain", "resnet") for depth in (20, 56)]


def test_keys_that_the_other_keys_determine_are_not_grouped_by():
    # model.name follows from depth and residual, and scan_blocks (set per depth here) from depth.
    assert group_keys(ROWS, "model.residual") == ["model.depth"]
    assert group_keys(ROWS, "model.depth") == ["model.residual"]


def test_each_depth_pairs_plain_with_resnet_and_p_is_welchs_on_the_seeds():
    found = contrasts(ROWS, "model.residual")
    assert [(c.group, c.metric) for c in found] == [
        ((("model.depth", 20),), "final test error (%)"),
        ((("model.depth", 20),), "final train error (%)"),
        ((("model.depth", 56),), "final test error (%)"),
        ((("model.depth", 56),), "final train error (%)"),
    ]  # no val error: no run has one
    for c in found:
        assert (c.reference, c.value) == (False, True)
        depth = c.group[0][1]
        column = 0 if "test" in c.metric else 1
        plain, resnet = SEEDS["plain", depth][column], SEEDS["resnet", depth][column]
        # The reference: scipy's Welch test on the per-seed values themselves.
        want = stats.ttest_ind(resnet, plain, equal_var=False).pvalue
        assert c.p == pytest.approx(want, rel=1e-9)
        assert c.delta == pytest.approx(sum(resnet) / len(resnet) - sum(plain) / len(plain))
        assert c.verdict == ("yes" if want < 0.05 else "no")
    assert {c.verdict for c in found} == {"yes", "no"}  # both kinds of answer occur above


def test_depth_as_the_key_groups_by_residual():
    found = contrasts(ROWS, "model.depth")
    assert {(c.group, c.reference, c.value) for c in found} == {
        ((("model.residual", False),), 20, 56), ((("model.residual", True),), 20, 56)}


def test_one_seed_is_untested_and_equal_constant_samples_are_no_difference():
    one = dict(SEEDS) | {("resnet", 56): ([8.0], [7.0])}
    found = contrasts([_row(k, d, one) for k in ("plain", "resnet") for d in (20, 56)],
                      "model.residual")
    at56 = [c for c in found if c.group == (("model.depth", 56),)]
    assert [c.verdict for c in at56] == ["untested (fewer than 2 seeds)"] * 2
    assert welch_p(mean_std([5.0, 5.0]), mean_std([5.0, 5.0])) == 1.0
    assert welch_p(mean_std([5.0, 5.0]), mean_std([6.0, 6.0])) == 0.0


def test_markdown_rows():
    text = contrast_markdown(contrasts(ROWS, "model.residual"), "model.residual")
    p = stats.ttest_ind(SEEDS["resnet", 20][0], SEEDS["plain", 20][0], equal_var=False).pvalue
    assert ("| 20 | final test error (%) | False: 9.77 ± 0.15 (n=3) | True: 8.90 ± 0.20 (n=3) "
            f"| -0.87 | {p:.3g} | yes |") in text
    assert text.startswith("## Does residual change the final error?")


def test_a_key_that_does_not_vary_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"compare.contrast=optimizer.lr: the compared runs do "
                                          r"not differ in it; keys that differ here: model.name"):
        contrasts(ROWS, "optimizer.lr")


def test_cli_writes_contrast_md(sweep):  # noqa: F811 (the fixture)
    result = run_cli(["compare", str(sweep), "compare.contrast=model.residual"], cwd=sweep.parent)
    assert result.returncode == 0, result.stderr
    assert "## Does residual change the final error?" in result.stdout
    written = (sweep / "compare" / "contrast.md").read_text()
    assert "| final test error (%) | False:" in written and "contrast.md" in result.stderr
    bad = run_cli(["compare", str(sweep), "compare.contrast=train.steps"], cwd=sweep.parent)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
