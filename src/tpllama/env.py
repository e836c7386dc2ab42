"""The one module that reads environment variables.

Only for what a flag cannot carry: where the cache lives (shared by every command and by the ranks
a command starts), three switches that tests and bisecting users flip without touching a command
line, and what torchrun tells each process it starts. Everything else is a field of
``config.EngineConfig``, set from flags or ``tpllama.load`` keywords.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TPLLAMA_CACHE``, default ``~/.cache/tpllama``: the default model, converted tokenizers,
    cuts made by ``run``/``load``, synthetic models, built extensions."""
    return Path(os.environ.get("TPLLAMA_CACHE") or Path.home() / ".cache" / "tpllama").expanduser()


def _switch(name: str) -> bool:
    v = os.environ.get(name)
    return bool(v) and v.strip().lower() not in ("", "0", "false", "no")


def kernels_disabled() -> bool:
    """``TPLLAMA_NO_KERNELS=1``: the PyTorch fallbacks instead of the C++ kernels (read at every
    call, so a test can compare both paths in one process)."""
    return _switch("TPLLAMA_NO_KERNELS")


def forced_kernel_path() -> str | None:
    """``TPLLAMA_KERNEL_PATH=avx2``: run that kernel path even where the CPU has a wider one (tests
    of every path on one machine, A/B benchmarks); unset or empty: the widest the CPU runs.
    Checked by ``tpllama.kernels.kernel_path`` (read at every call, as ``kernels_disabled``)."""
    return (os.environ.get("TPLLAMA_KERNEL_PATH") or "").strip().lower() or None


def shared_memory_disabled() -> bool:
    """``TPLLAMA_NO_SHM=1``: gloo instead of shared memory between the ranks of one host."""
    return _switch("TPLLAMA_NO_SHM")


@dataclasses.dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun (or any env:// launcher) tells a process: its place among the ranks."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    host: int = 0  # torchrun's GROUP_RANK: which host (node) this is
    agent_store: bool = False  # the store is torchrun's agent's; else rank 0 hosts it


def torchrun_env() -> TorchrunEnv | None:
    """This process's place when torchrun started it, else None."""
    e = os.environ
    if not ("TORCHELASTIC_RUN_ID" in e or ("RANK" in e and "WORLD_SIZE" in e and "MASTER_ADDR" in e)):
        return None
    world = int(e["WORLD_SIZE"])
    rank, local_world = int(e.get("RANK", 0)), int(e.get("LOCAL_WORLD_SIZE", world))
    return TorchrunEnv(rank=rank, world_size=world, local_rank=int(e.get("LOCAL_RANK", rank)),
                       local_world_size=local_world, master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(e.get("MASTER_PORT", 29500)), host=int(e.get("GROUP_RANK", rank // local_world)),
                       agent_store=e.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def gloo_interface() -> str | None:
    """``GLOO_SOCKET_IFNAME`` when the user set it: the interface the ranks' sockets use."""
    return os.environ.get("GLOO_SOCKET_IFNAME") or None


def is_rank0() -> bool:
    """False in the processes torchrun started for ranks 1..N-1 (they print nothing)."""
    env = torchrun_env()
    return env is None or env.rank == 0
