"""torch_ref: the same harness in PyTorch (nanoGPT style), the parity reference for jaxgpt.

Parameter names and shapes match jaxgpt one to one (see jaxgpt.convert for the layout rules).
"""

from .model import GPT, build_model

__all__ = ["GPT", "build_model"]
