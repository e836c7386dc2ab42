"""tpllama: tensor-parallel LLaMA inference in plain PyTorch."""

from .version import __version__

__all__ = ["Engine", "EngineConfig", "RankFailure", "load", "__version__"]


def __getattr__(name: str):
    """``tpllama.load`` / ``Engine`` / ``EngineConfig`` are imported on first use, so ``import
    tpllama`` (and the CLI's start) pay only for what they run."""
    if name in ("load", "Engine"):
        from .engine import engine, load

        return {"load": load.load, "Engine": engine.Engine}[name]
    if name == "EngineConfig":
        from .config import EngineConfig

        return EngineConfig
    if name == "RankFailure":
        from .errors import RankFailure

        return RankFailure
    raise AttributeError(f"module 'tpllama' has no attribute {name!r}")
