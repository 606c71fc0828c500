"""jaxgpt: the MLS-Bench GPT-2 pretraining harness in JAX/Flax, with a parity-tested PyTorch twin."""

__version__ = "0.1.0"
