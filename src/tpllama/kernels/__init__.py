"""The C++ extensions and their one builder.

Three extensions are built from the sources next to this file with
``torch.utils.cpp_extension.load``, on first use or all at once by ``python -m tpllama.kernels``:

- the compute kernels (``matvec_avx2.cpp`` with ``attention_avx2.inc`` and ``decode_layer.inc``):
  AVX2/FMA/F16C matrix-vector products on the quantized layouts of ``tpllama.model.quant``,
  one-query attention and the fused decode blocks (``get()``);
- the shared-memory collectives of the ranks of one host (``shm_collectives.cpp``, used by
  ``tpllama.parallel.shm``; ``collectives()``);
- the TCP collectives of ranks on different hosts (``tcp_collectives.cpp``, used by
  ``tpllama.parallel.tcp``; ``tcp_collectives()``).

Each goes to ``$TPLLAMA_CACHE/ext/<name>-<hash of sources, flags, torch and Python version, source
directory>``, so it is rebuilt only when one of those changes; concurrent builds from several processes are
serialized with a lock file. ``get()``/``collectives()`` return the module, or None when it cannot
be used (wrong CPU or OS, no compiler, a build failure: one logged warning) or is switched off
(``TPLLAMA_NO_KERNELS=1`` / ``TPLLAMA_NO_SHM=1``, read at every call); callers then use the
PyTorch (or gloo) fallbacks.

Compute kernel functions (CPU, float32 activations; any M: one row for a decode step, many for
a prefill, where they are an int8 GEMM):
  q8_matvec(x[M,K], qweight int8[N,K], scales f16|f32[N,K/32]) -> y[M,N]
  q4_matvec(x[M,K], qweight uint8[N,K/2], scales, mins) -> y[M,N]
  q8_dequant(qweight, scales) -> float32[N,K];  q4_dequant(qweight, scales, mins) -> float32[N,K]
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from typing import Callable

import torch

from .. import env

__all__ = ["available", "get", "collectives", "tcp_collectives", "build", "cpu_supported", "cpu_features", "isa"]

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


# CPU features the kernels use, and those a faster path could use (reported, not used yet)
KERNEL_FEATURES = ("avx2", "fma", "f16c")
WIDER_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni")


def cpu_features() -> set[str]:
    """The flags of /proc/cpuinfo among KERNEL_FEATURES and WIDER_FEATURES (empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split()) & set(KERNEL_FEATURES + WIDER_FEATURES)
    except OSError:
        pass
    return set()


def cpu_supported() -> tuple[bool, str]:
    """(True, "") on an x86-64 CPU with AVX2, FMA and F16C; else (False, why)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"CPU architecture {platform.machine()!r} is not x86-64"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    if cap not in ("AVX2", "AVX512"):
        return False, f"CPU lacks AVX2/FMA (torch reports capability {cap!r})"
    if sys.platform.startswith("linux"):
        missing = set(KERNEL_FEATURES) - cpu_features()
        if missing:
            return False, f"CPU lacks {sorted(missing)}"
    return True, ""


def isa() -> str:
    """Which compute kernel path runs in this process, for benchmark reports: e.g. ``avx2+fma+f16c
    (CPU also has avx512f, avx512_vnni: no kernels for them yet)`` or ``none (PyTorch fallback)``."""
    if get() is None:
        return "none (PyTorch fallback)"
    wider = [f for f in WIDER_FEATURES if f in cpu_features()]
    return "+".join(KERNEL_FEATURES) + (f" (CPU also has {', '.join(wider)}: no kernels for them yet)" if wider else "")


@contextlib.contextmanager
def _file_lock(path: str):
    """Inter-process exclusive lock (fcntl, released automatically if the holder dies)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build(name: str, sources: list[str], includes: list[str], cflags: list[str], ldflags: list[str],
          message: str):
    """Compile (or load from the cache) the extension ``name`` from ``sources`` in this directory
    (``includes``: files they #include, part of the hash). ``message`` is printed to stderr when an
    actual build is needed. Raises on failure; the caller decides on the fallback."""
    from torch.utils import cpp_extension

    h = hashlib.sha256()
    for f in list(sources) + list(includes):
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(fh.read())
    # HERE too: torch's build files name the sources by absolute path, so two checkouts sharing a
    # cache would otherwise rebuild each other's extension at every switch
    for part in (name, torch.__version__, " ".join(list(cflags) + list(ldflags)), sys.version, HERE):
        h.update(part.encode())
    digest = h.hexdigest()[:16]
    bdir = os.path.join(str(env.cache_dir()), "ext", f"{name}-{digest}")
    os.makedirs(bdir, exist_ok=True)
    module_name = f"{name}_{digest}"
    with _file_lock(os.path.join(bdir, "tpllama.lock")):
        # Under our lock no other tpllama process is building here, so a torch baton file left
        # behind by a killed build is stale and would make torch wait forever.
        with contextlib.suppress(OSError):
            os.remove(os.path.join(bdir, "lock"))
        if not os.path.exists(os.path.join(bdir, module_name + ".so")):
            print(message, file=sys.stderr, flush=True)
        return cpp_extension.load(name=module_name, sources=[os.path.join(HERE, s) for s in sources],
                                  extra_cflags=list(cflags), extra_ldflags=list(ldflags), build_directory=bdir,
                                  verbose=False)


class Extension:
    """One extension, built at most once per process on first use (see the module docstring)."""

    def __init__(self, what: str, fallback: str, make: Callable[[], object], supported: Callable[[], tuple[bool, str]],
                 disabled: Callable[[], bool]):
        self.what, self.fallback = what, fallback
        self._make, self._supported, self._disabled = make, supported, disabled
        self._lock = threading.Lock()
        self._module = None
        self._tried = False

    def get(self):
        if self._disabled():
            return None
        if self._tried:
            return self._module
        with self._lock:
            if not self._tried:
                ok, why = self._supported()
                if not ok:
                    log.info("tpllama %s disabled: %s; using %s", self.what, why, self.fallback)
                else:
                    try:
                        self._module = self._make()
                    except Exception as e:  # compiler missing, build error, ...
                        msg = str(e).strip().splitlines()
                        log.warning("tpllama %s unavailable (%s: %s); using %s", self.what, type(e).__name__,
                                    msg[-1] if msg else "", self.fallback)
                self._tried = True
        return self._module


_COMPUTE = Extension(
    "CPU kernels", "the slower PyTorch fallback",
    lambda: build("tpllama_kernels", ["matvec_avx2.cpp"], ["attention_avx2.inc", "decode_layer.inc"],
                  ["-O3", *AVX2_FLAGS, "-fopenmp", "-ffp-contract=off", "-DNDEBUG"], ["-fopenmp"],
                  "building tpllama CPU kernels (first use, ~1 min)"),
    cpu_supported, env.kernels_disabled)

_COLLECTIVES = Extension(
    "shared-memory collectives", "gloo",
    lambda: build("tpllama_shm", ["shm_collectives.cpp"], [],
                  ["-O3", "-DNDEBUG", "-ffp-contract=off"] + (AVX2_FLAGS if cpu_supported()[0] else []), ["-lrt"],
                  "building tpllama shared-memory collectives (first use, ~1 min)"),
    lambda: (True, "") if sys.platform.startswith("linux") else (False, "they need Linux"),
    env.shared_memory_disabled)


_TCP = Extension(
    "TCP collectives", "gloo",
    lambda: build("tpllama_tcp", ["tcp_collectives.cpp"], [], ["-O3", "-DNDEBUG", "-ffp-contract=off"], [],
                  "building tpllama TCP collectives (first use, ~1 min)"),
    lambda: (True, "") if sys.platform.startswith("linux") else (False, "they need Linux"),
    lambda: False)


def get():
    """The compute kernels' module, or None (use the PyTorch fallback)."""
    return _COMPUTE.get()


def available() -> bool:
    return get() is not None


def collectives():
    """The shared-memory collectives' module, or None (use gloo)."""
    return _COLLECTIVES.get()


def tcp_collectives():
    """The TCP collectives' module, or None (use gloo)."""
    return _TCP.get()
