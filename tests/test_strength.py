"""tests/strength.py, the classifier behind docs/development.md's strength counts, on test
functions written for it: each rule puts its test in the kind the rule says."""

import textwrap

from tests.strength import classify_source

SOURCE = textwrap.dedent('''
    import numpy as np
    import pytest
    import torch

    def run(overrides):
        summary = train(overrides)
        assert summary["status"] == "finished"
        assert np.isfinite(summary["loss"])
        return summary

    def test_smoke_only_finishes():
        result = run_cli(["train"])
        assert result.returncode == 0, result.stderr
        assert (tmp / "summary.json").exists()

    def test_smoke_through_a_helper_and_a_change():
        before, after = run([]), run(["x=1"])
        assert before["params"] != after["params"]
        assert not np.array_equal(before["w"], after["w"])
        assert all(np.isfinite(v) for v in after.values())
        assert metrics

    def test_smoke_asserts_nothing():
        validate(compose(["model=resnet20"]))

    def test_smoke_shape_only():
        assert model(x).shape == (2, 10) and model(x).dtype == np.float32

    def test_medium_value_written_in_the_test():
        summary = run([])
        assert summary["final_step"] == 20

    def test_medium_refusal():
        with pytest.raises(ValueError, match="lr=-1"):
            validate(["lr=-1"])

    def test_medium_by_hand():
        if summary(run([]))["count"] != 1:
            raise SystemExit("the snippet must occur once")

    def test_medium_bound():
        assert run([])["error"] < 50

    def test_strong_tolerance():
        np.testing.assert_allclose(softmax(x), np.exp(x) / np.exp(x).sum(), rtol=1e-6)

    def test_strong_approx_and_abs_difference():
        assert loss(x) == pytest.approx(2.3026, abs=1e-4)
        assert np.abs(ours - theirs).max() < 1e-5

    def test_strong_against_torch():
        assert ours(x).argmax() == torch.tensor(x).argmax().item()

    def test_strong_filtered_list():
        matches = [s for s in shifts if np.array_equal(out, shift(image, s))]
        assert matches

    def test_strong_wins_over_smoke():
        assert run([])["status"] == "finished"
        np.testing.assert_array_equal(resumed, straight)

    class TestInAClass:
        def test_medium_in_a_class(self):
            assert "error" in message
''')


def test_each_rule_gives_its_kind():
    kinds = classify_source(SOURCE)
    assert kinds == {name: name.split("_")[1] for name in kinds}
    assert len(kinds) == 14


def test_a_helper_in_tests_helpers_is_followed():
    helpers = "def train_tiny(d):\n    np.testing.assert_allclose(a, b)\n"
    test = "def test_x(tmp_path):\n    train_tiny(tmp_path)\n"
    assert classify_source(test, helpers) == {"test_x": "strong"}
    assert classify_source(test) == {"test_x": "smoke"}


def test_fixtures_of_the_file_are_followed():
    source = textwrap.dedent('''
        @pytest.fixture
        def trained():
            assert train()["error"] == 12.5

        def test_uses_it(trained):
            assert trained
    ''')
    assert classify_source(source) == {"test_uses_it": "medium"}
