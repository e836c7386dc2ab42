"""tpllama: tensor-parallel LLaMA inference in plain PyTorch."""

__version__ = "0.1.0"

from .engine import Engine, load  # noqa: E402

__all__ = ["Engine", "load", "__version__"]
