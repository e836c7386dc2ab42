"""The C++ extensions and their one builder.

Three extensions are built from the sources next to this file with
``torch.utils.cpp_extension.load``, on first use or all at once by ``python -m tpllama.kernels``:

- the compute kernels (``matvec_avx2.cpp`` with ``attention_avx2.inc`` and ``decode_layer.inc``):
  matrix-vector products and int8 GEMMs on the quantized layouts of ``tpllama.model.quant``,
  one-query attention and the fused decode blocks (``get()``). The same sources are built once per
  *kernel path* (``KERNEL_PATHS``): ``avx2`` (AVX2/FMA/F16C, every x86-64 CPU of the last decade)
  and ``avx512`` (adds AVX-512 F/BW/VL/DQ and VNNI: the int8 dot products become ``vpdpbusd`` on
  512-bit registers). At run time ``get()`` takes the widest path the CPU has (``cpu_features``);
  ``TPLLAMA_KERNEL_PATH=avx2`` forces a narrower one (tests, A/B runs). Decode (up to 16 rows)
  gives bit-identical results on both paths: every lane does the same integer and float
  operations in the same order, the wider path only does more lanes per instruction; the
  avx512 path's prefill GEMM (``matvec_avx512.inc``) and attention scores sum in another order;
- the shared-memory collectives of the ranks of one host (``shm_collectives.cpp``, used by
  ``tpllama.parallel.shm``; ``collectives()``);
- the TCP collectives of ranks on different hosts (``tcp_collectives.cpp``, used by
  ``tpllama.parallel.tcp``; ``tcp_collectives()``).

Each goes to ``$TPLLAMA_CACHE/ext/<name>-<hash of sources, flags, torch and Python version, source
directory>``, so it is rebuilt only when one of those changes; concurrent builds from several processes are
serialized with a lock file. ``get()``/``collectives()`` return the module, or None when it cannot
be used (wrong CPU or OS, no compiler, a build failure: one logged warning) or is switched off
(``TPLLAMA_NO_KERNELS=1`` / ``TPLLAMA_NO_SHM=1``, read at every call); callers then use the
PyTorch (or gloo) fallbacks. An ``avx512`` build that fails falls back to the ``avx2`` one.

Compute kernel functions (CPU, float32 activations; any M: one row for a decode step, many for
a prefill, where they are an int8 GEMM):
  q8_matvec(x[M,K], qweight int8[N,K], scales f16|f32[N,K/32]) -> y[M,N]
  q4_matvec(x[M,K], qweight uint8[N,K/2], scales, mins) -> y[M,N]
  q8_dequant(qweight, scales) -> float32[N,K];  q4_dequant(qweight, scales, mins) -> float32[N,K]
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import threading
from typing import Callable

import torch

from .. import env

__all__ = ["available", "get", "compute", "collectives", "tcp_collectives", "build", "cpu_supported", "cpu_features",
           "isa", "KERNEL_PATHS", "runnable_paths", "kernel_path", "build_compute"]

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]

# kernel path -> (the /proc/cpuinfo flags it needs, the compiler flags it is built with); narrowest first
KERNEL_PATHS = {
    "avx2": (("avx2", "fma", "f16c"), AVX2_FLAGS),
    "avx512": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"), AVX512_FLAGS),
}
KERNEL_FEATURES = KERNEL_PATHS["avx2"][0]
# features no path uses yet (reported by isa() when the CPU has them)
UNUSED_FEATURES = ("avx512_bf16", "amx_int8", "amx_bf16")
WIDER_FEATURES = tuple(f for f in KERNEL_PATHS["avx512"][0] if f not in KERNEL_FEATURES) + UNUSED_FEATURES


# The CPU's features are read once per process: get() runs on every quantized layer's forward
# and every decode step, where reading /proc/cpuinfo cost ~85 us a call.
@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """The flags of /proc/cpuinfo among KERNEL_FEATURES and WIDER_FEATURES (empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split()) & frozenset(KERNEL_FEATURES + WIDER_FEATURES)
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def runnable_paths() -> tuple[str, ...]:
    """The kernel paths this CPU can run, narrowest first (empty where the kernels cannot run)."""
    if not cpu_supported()[0]:
        return ()
    have = cpu_features()
    return tuple(p for p, (needs, _) in KERNEL_PATHS.items() if set(needs) <= have)


def kernel_path() -> str | None:
    """The path ``get()`` uses now: the widest the CPU runs, or the one ``TPLLAMA_KERNEL_PATH``
    forces (when the CPU runs it); None when the kernels are off or cannot run here."""
    if env.kernels_disabled():
        return None
    paths = runnable_paths()
    if not paths:
        return None
    forced = env.forced_kernel_path()
    if forced is None:
        return paths[-1]
    if forced not in KERNEL_PATHS:
        raise ValueError(f"TPLLAMA_KERNEL_PATH={forced!r} is not a kernel path; expected one of {list(KERNEL_PATHS)}")
    if forced not in paths:
        raise ValueError(f"TPLLAMA_KERNEL_PATH={forced!r}: this CPU lacks "
                         f"{sorted(set(KERNEL_PATHS[forced][0]) - cpu_features())}; it runs {list(paths)}")
    return forced


def isa() -> str:
    """Which compute kernel path runs in this process, for benchmark reports: e.g. ``avx512 (avx2 fma
    f16c avx512f avx512bw avx512vl avx512dq avx512_vnni; CPU also has avx512_bf16: not used)`` or
    ``none (PyTorch fallback)``."""
    if get() is None:
        return "none (PyTorch fallback)"
    path = _loaded_path()
    unused = [f for f in WIDER_FEATURES if f in cpu_features() and f not in KERNEL_PATHS[path][0]]
    forced = " forced" if env.forced_kernel_path() else ""
    return (f"{path}{forced} ({' '.join(KERNEL_PATHS[path][0])}"
            + (f"; CPU also has {' '.join(unused)}: not used" if unused else "") + ")")


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
          message: str, load: bool = True):
    """Compile (or load from the cache) the extension ``name`` from ``sources`` in this directory
    (``includes``: files they #include, part of the hash). ``message`` is printed to stderr when an
    actual build is needed. Returns the module, or with ``load=False`` the path of the built
    library without importing it. Raises on failure; the caller decides on the fallback."""
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
        library = os.path.join(bdir, module_name + ".so")
        if not os.path.exists(library):
            print(message, file=sys.stderr, flush=True)
        paths = [os.path.join(HERE, s) for s in sources]
        if not load:
            # torch's own build step (a private function of the pinned torch), without the import,
            # which could run an instruction the CPU lacks
            if not os.path.exists(library):
                cpp_extension._write_ninja_file_and_build_library(
                    name=module_name, sources=paths, extra_cflags=list(cflags), extra_cuda_cflags=None,
                    extra_sycl_cflags=None, extra_ldflags=list(ldflags), extra_include_paths=None,
                    build_directory=bdir, verbose=False, with_cuda=False, with_sycl=False, is_standalone=False)
            return library
        return cpp_extension.load(name=module_name, sources=paths, extra_cflags=list(cflags),
                                  extra_ldflags=list(ldflags), build_directory=bdir, verbose=False)


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


def build_compute(path: str, load: bool = True):
    """Compile the compute kernels of ``path`` (or find them in the cache) and, with ``load``,
    import them. ``load=False`` only compiles: any x86-64 machine can check that every path builds,
    even one whose CPU cannot run it. Raises on a build failure."""
    needs, flags = KERNEL_PATHS[path]
    name = "tpllama_kernels" if path == "avx2" else f"tpllama_kernels_{path}"
    return build(name, ["matvec_avx2.cpp"], ["attention_avx2.inc", "decode_layer.inc", "matvec_avx512.inc"],
                 ["-O3", *flags, "-fopenmp", "-ffp-contract=off", "-DNDEBUG"], ["-fopenmp"],
                 f"building tpllama CPU kernels, {path} path (first use, ~1 min)", load=load)


def _compute_extension(path: str) -> Extension:
    needs = KERNEL_PATHS[path][0]
    return Extension(
        f"CPU kernels ({path})", "the slower PyTorch fallback" if path == "avx2" else "the avx2 path",
        lambda: build_compute(path),
        lambda: (True, "") if path in runnable_paths() else (False, f"the CPU lacks {' '.join(needs)}"),
        env.kernels_disabled)


_COMPUTE = {path: _compute_extension(path) for path in KERNEL_PATHS}

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
    """The compute kernels' module of ``kernel_path()`` (a narrower one if its build failed), or
    None (use the PyTorch fallback)."""
    path = kernel_path()
    if path is None:
        return _COMPUTE["avx2"].get()  # None, and logs why once
    paths = list(KERNEL_PATHS)
    for p in reversed(paths[:paths.index(path) + 1]):
        module = _COMPUTE[p].get()
        if module is not None:
            return module
    return None


def compute(path: str):
    """The compute kernels' module of one path, or None where this CPU cannot run it (or its
    build failed); for ``python -m tpllama.kernels``, tests and A/B benchmarks."""
    return _COMPUTE[path].get()


def _loaded_path() -> str:
    """The path of the module ``get()`` returns (the module reports what it was built for)."""
    return get().kernel_path()


def available() -> bool:
    return get() is not None


def collectives():
    """The shared-memory collectives' module, or None (use gloo)."""
    return _COLLECTIVES.get()


def tcp_collectives():
    """The TCP collectives' module, or None (use gloo)."""
    return _TCP.get()
