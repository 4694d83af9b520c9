"""`cnnlab summary [OVERRIDES]`: the model's per-layer table, without data."""

from cnnlab.cli.args import fail
from cnnlab.cli.preflight import check_config
from cnnlab.cli.usage import command_help


def summary_command(args: list[str]) -> None:
    if any(arg.startswith("-") for arg in args):
        print(command_help("summary"))
        return
    cfg = check_config(args, for_training=False).cfg
    if cfg.dataset.image_shape is None or cfg.dataset.num_classes is None:
        fail(f"dataset {cfg.dataset.name} does not declare image_shape and num_classes; "
             "set dataset.image_shape=[H,W,C] dataset.num_classes=N")
    from cnnlab.models import build_model
    from cnnlab.models.summary import FORMATS, summarize

    model = build_model(cfg, cfg.dataset.num_classes)
    summary = summarize(model, tuple(cfg.dataset.image_shape), cfg.model.name)
    print(FORMATS.get(cfg.summary.format)(summary, cfg.summary.depth))
