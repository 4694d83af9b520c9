"""Data augmentation run inside the compiled train step: the batched operations (ops.py) and
their assembly from an `augment` config (pipeline.py)."""
