"""cnnlab: a config-driven experiment runner for convolutional networks (JAX/Flax, Hydra, W&B)."""

__version__ = "0.1.0"
