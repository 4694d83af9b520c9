"""Help that explains: every config key has a one-line description beside its schema field,
`cnnlab train --help` shows the groups and each key with it, and `cnnlab viz` says (and
enforces) which kinds read which option, from one table (cnnlab.viz.options.READS)."""

import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnnlab.analysis.compare import CompareConfig
from cnnlab.config.groups import group_options
from cnnlab.config.keys import config_descriptions, key_descriptions
from cnnlab.config.schema import Config
from cnnlab.models import FAMILIES, ModelCommon
from cnnlab.viz.options import COMMON, READS, VizOptions, markdown_table
from tests.helpers import REPO, TINY, compose_config, run_cli, train_tiny

# A description starts where the key=value column ends (cnnlab.config.keys): one that fits in
# 62 characters keeps a help line within 100.
LONGEST = 62
SCHEMAS = [Config, ModelCommon, VizOptions, CompareConfig,
           *(FAMILIES.get(family).options for family in FAMILIES)]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_schema_key_has_a_one_line_description(schema):
    described = key_descriptions(schema)
    missing = [key for key, text in described.items() if not text.strip()]
    assert missing == [], f"{schema.__name__}: keys without a description: {missing}"
    long = {key: text for key, text in described.items()
            if "\n" in text or len(text) > LONGEST}
    assert long == {}, f"descriptions over one line of {LONGEST} characters: {long}"


def test_a_field_without_a_description_is_found():
    @dataclasses.dataclass
    class Section:
        described: int = dataclasses.field(default=1, metadata={"help": "one"})
        bare: int = 2

    assert key_descriptions(Section) == {"described": "one", "bare": ""}


def _leaves(node: object, prefix: str) -> list[str]:
    if isinstance(node, dict) and node:
        return [k for key, value in node.items() for k in _leaves(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


@pytest.mark.parametrize("model", ["resnet20", "vgg_a", "pattern"])
def test_every_composed_key_has_a_description(model):
    """The composed config's own keys (conf/ included), one model of each family."""
    cfg = OmegaConf.to_container(compose_config([f"model={model}"]), resolve=False)
    cfg.pop("hydra", None)
    described = config_descriptions(cfg["model"]["family"])
    assert [key for key in _leaves(cfg, "") if not described.get(key)] == []


def _expand(options: str) -> set[str]:
    """`resnet18/20/32` -> resnet18, resnet20, resnet32 (help's compact listing)."""
    found = set()
    for entry in options.split(", "):
        match = re.fullmatch(r"([a-z_]+?)(\d+(?:/\d+)+)", entry.rstrip("*"))
        if match:
            found |= {match[1] + digits for digits in match[2].split("/")}
        else:
            found.add(entry.rstrip("*"))
    return found


def _help(args: list[str], tmp_path: Path) -> list[str]:
    result = run_cli(["train", *args, "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_train_help_shows_each_group_and_each_key_with_its_description(tmp_path):
    lines = _help([], tmp_path)
    text = "\n".join(lines)
    # Group headers: the options of conf/GROUP/ (no private bases), the chosen one named.
    headers = re.findall(r"^(\w+) \([^\n]*?\): \1=(\S+); options: (.*?)(?=\n  \S)", text,
                         re.S | re.M)
    listed = {group: (choice, _expand(" ".join(options.split()))) for group, choice, options
              in headers}
    for group in ("model", "dataset", "norm", "optimizer", "schedule", "augment"):
        assert listed[group][1] == set(group_options(group)), group
    assert listed["model"][0] == "resnet20;" or listed["model"][0] == "resnet20"
    assert "_stack" not in text and "_base" not in text
    # Each key: KEY=VALUE and its description, or named among the keys for other options.
    cfg = OmegaConf.to_container(compose_config([]), resolve=False)
    cfg.pop("hydra", None)
    described = config_descriptions("cifar_resnet")
    shown = {line.split("=")[0].strip(): line for line in lines if re.match(r"  [\w.]+=", line)}
    others = " ".join(line for line in lines if "null, for other options" in line)
    for key in _leaves(cfg, ""):
        section = key.split(".")[0]
        if section in ("summary", "lr_find") or key.startswith("eval.") and key not in shown:
            continue
        if key in shown:
            assert shown[key].rstrip().endswith(described[key]), shown[key]
        else:
            assert re.search(rf"\b{key.split('.', 1)[1]}\b", others), key
    assert shown["train.steps"].split()[0] == "train.steps=500"
    assert "cnnlab lr_find --help" in text and "cnnlab summary --help" in text
    # Shorter than what it replaced: the config dump (a line per key and list item) and a
    # line per group.
    groups = [p for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "hydra"]
    assert len(lines) < len(OmegaConf.to_yaml(cfg).splitlines()) + len(groups)


def test_train_help_shows_the_keys_of_the_options_chosen(tmp_path):
    shown = {line.split("=")[0].strip(): line
             for line in _help(["model=vgg_a", "norm=lrn", "optimizer=adam"], tmp_path)
             if line.startswith("  ")}
    assert shown["model.layers"].split()[0].startswith("model.layers=[")  # a stack model
    assert "model.depth" not in shown
    assert shown["norm.size"].split()[0] == "norm.size=5" and "lrn: window" in shown["norm.size"]
    assert shown["optimizer.b1"].split()[0] == "optimizer.b1=0.9"
    assert "norm.momentum" not in shown and "optimizer.rho" not in shown


@pytest.mark.parametrize("command, schema", [
    ("summary", "SummaryConfig"), ("lr_find", "LrFindConfig"), ("eval", "EvalConfig")])
def test_command_help_describes_each_key(tmp_path, command, schema):
    from cnnlab.config import schema as config

    out = run_cli([command, "--help"], cwd=tmp_path).stdout
    described = key_descriptions(getattr(config, schema))
    described.pop("ema_decay", None)  # a training setting, refused by cnnlab eval
    for key, text in described.items():
        [line] = [line for line in out.splitlines() if line.startswith(f"  {command}.{key}=")]
        assert line.rstrip().endswith(text)


def test_viz_help_gives_each_option_its_meaning_and_the_kinds_that_read_it(tmp_path):
    result = run_cli(["viz", "--help"], cwd=tmp_path)
    assert result.returncode == 0
    lines = result.stdout.split("options (default, meaning):")[1].split("\nkinds")[0]
    blocks = re.split(r"\n(?=  \w+=)", lines.strip("\n"))
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(VizOptions)}
    assert len(blocks) == len(help_of)
    for block in blocks:
        key = block.split("=")[0].strip()
        first, *rest = block.splitlines()
        assert first.rstrip().endswith(help_of[key])
        kinds = " ".join(" ".join(rest).split()).removeprefix("read by: ")
        expected = [kind for kind, reads in READS.items() if key in reads or key in COMMON]
        assert (kinds == "every kind") if len(expected) == len(READS) else \
            kinds.split(", ") == sorted(expected)
    assert "  neuron_ascent    layer, channels, neuron_at, steps" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["filters", "RUN", "layer=stem"], "viz filters does not read layer=; it is read by "
     "activations, deconvnet, guided_backprop, neuron_ascent, patches, saliency"),
    (["embedding", "RUN", "images=3"], "viz embedding does not read images=; it is read by "
     "activations, deconvnet, guided_backprop, neighbors, occlusion, saliency"),
    (["occlusion", "RUN", "viz.k=3"], "viz occlusion does not read k=; it is read by neighbors"),
])
def test_an_option_the_kind_does_not_read_is_refused_in_one_line(tmp_path, args, message):
    (tmp_path / "RUN").mkdir()  # refused before the run directory is read
    result = run_cli(["viz", *args], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"cnnlab: error: {message}\n"


def test_the_docs_table_of_viz_options_is_the_registry():
    text = (REPO / "docs" / "viz.md").read_text()
    table = text.split("<!-- generated: cnnlab.viz.options.markdown_table(); tests/test_help.py "
                       "checks it -->\n")[1].split("\n<!-- end of generated table -->")[0]
    assert table == markdown_table()


class Recorder:
    """VizOptions that note which options are read."""

    def __init__(self, options: VizOptions) -> None:
        self._options, self.read = options, set()

    def __getattr__(self, name: str) -> object:
        self.read.add(name)
        return getattr(self._options, name)


# Each kind's calls that together take every path through its options (the gradient kinds
# explain a class without `layer`, a neuron with it).
CALLS = {
    "filters": [[]],
    "activations": [["layer=stem", "images=2", "maps=2"]],
    "occlusion": [["images=2", "size=14", "stride=14"]],
    "patches": [["layer=stem", "channels=[0]", "search=64", "top=2"]],
    "neighbors": [["images=2", "search=64", "k=2"]],
    "class_model": [["target=0", "steps=2"]],
    "neuron_ascent": [["layer=stem", "channels=[0]", "steps=2"]],
    "embedding": [["points=40", "thumbnails=4", "perplexity=5"]],
    **{kind: [["images=2"], ["images=2", "layer=stem", "channels=[1]"]]
       for kind in ("saliency", "guided_backprop", "deconvnet")},
}


def test_each_kind_reads_exactly_the_options_the_table_says(tmp_path, fashion_dir):
    """READS against what each kind's draw function reads of its options on a real run."""
    from cnnlab.viz import KINDS
    from cnnlab.viz.network import restore
    from cnnlab.viz.options import parse
    from cnnlab.viz.output import Output

    assert set(CALLS) == set(READS) == set(KINDS.names())
    run_dir = tmp_path / "run"
    train_tiny(run_dir, fashion_dir, ["train.steps=10", "checkpoint.every=10"])
    assert "model.depth=8" in TINY  # a small net: every kind compiles in seconds
    restored = restore(run_dir, splits=("train", "test"))  # every kind's data
    for kind, calls in CALLS.items():
        read: set[str] = set()
        for overrides in calls:
            options = Recorder(parse(overrides, kind))
            KINDS.get(kind).draw(restored, options, Output(run_dir, kind, 50))
            read |= options.read
        assert read - set(COMMON) == set(READS[kind]), kind
