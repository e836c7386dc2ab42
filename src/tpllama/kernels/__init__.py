"""Optional hand-written CPU kernels (AVX2/FMA/F16C) for the quantized linear layers.

The C++ source next to this file is compiled on first use with
``torch.utils.cpp_extension.load`` into
``$TPLLAMA_CACHE/ext/<hash of source, flags and torch version>`` (default cache
``~/.cache/tpllama``), so a rebuild only happens when the source (or torch) changes.
Concurrent builds from several processes are serialized with a lock file.

``get()`` returns the compiled module, or ``None`` when the kernels cannot be used
(not x86-64 with AVX2+FMA, no C++ compiler, build failure -> one logged warning) or when
the environment variable ``TPLLAMA_NO_KERNELS=1`` is set (checked on every call, so tests
can flip it). Callers then use the pure-PyTorch fallback.

Module functions (all CPU, float32 activations, stored weight layouts of ``tpllama.quant``):
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
import time

import torch

__all__ = ["available", "get", "bench_matvec", "build_dir", "build_extension"]

log = logging.getLogger(__name__)

_SOURCES = ("matvec_avx2.cpp",)
_INCLUDES = ("attention_avx2.inc", "decode_layer.inc")  # #included by the sources: part of the build hash
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module = None
_tried = False


def _disabled_by_env() -> bool:
    v = os.environ.get("TPLLAMA_NO_KERNELS")
    return bool(v) and v.strip().lower() not in ("", "0", "false", "no")


def _cpu_supported() -> tuple[bool, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"CPU architecture {platform.machine()!r} is not x86-64"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    if cap not in ("AVX2", "AVX512"):
        return False, f"CPU lacks AVX2/FMA (torch reports capability {cap!r})"
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        missing = {"avx2", "fma", "f16c"} - flags
                        if missing:
                            return False, f"CPU lacks {sorted(missing)}"
                        break
        except OSError:
            pass
    return True, ""


def _source_paths() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(here, s) for s in _SOURCES]


def _digest() -> str:
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for p in _source_paths() + [os.path.join(here, i) for i in _INCLUDES]:
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(torch.__version__.encode())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def build_dir() -> str:
    """Directory where the extension for the current source/torch version is built."""
    root = os.path.expanduser(os.environ.get("TPLLAMA_CACHE", "~/.cache/tpllama"))
    return os.path.join(root, "ext", _digest())


@contextlib.contextmanager
def _file_lock(path: str):
    """Inter-process exclusive lock (fcntl, released automatically if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: rely on torch's own FileBaton
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build():
    from torch.utils import cpp_extension

    bdir = build_dir()
    os.makedirs(bdir, exist_ok=True)
    name = "tpllama_kernels_" + os.path.basename(bdir)
    with _file_lock(os.path.join(bdir, "tpllama.lock")):
        # Under our lock no other tpllama process is building here, so a torch baton file
        # left behind by a killed build is stale and would make torch wait forever.
        stale = os.path.join(bdir, "lock")
        if os.path.exists(stale):
            with contextlib.suppress(OSError):
                os.remove(stale)
        if not os.path.exists(os.path.join(bdir, name + ".so")):
            print("building tpllama CPU kernels (first use, ~1 min)", file=sys.stderr, flush=True)
        return cpp_extension.load(
            name=name,
            sources=_source_paths(),
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=bdir,
            verbose=False,
        )


def build_extension(prefix: str, source: str, cflags: list[str], ldflags: list[str] = (),
                    message: str | None = None):
    """Compile (or load from the cache) another C++ extension next to this file.

    Same scheme as the kernels: ``$TPLLAMA_CACHE/ext/<hash of source, flags, torch and Python
    version>``, serialized across processes with a lock file, ``message`` printed to stderr
    when an actual build is needed. ``source`` is a file name in this directory. Raises on
    failure; the caller decides on the fallback.
    """
    from torch.utils import cpp_extension

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), source)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    for part in (prefix, torch.__version__, " ".join(list(cflags) + list(ldflags)), sys.version):
        h.update(part.encode())
    root = os.path.expanduser(os.environ.get("TPLLAMA_CACHE", "~/.cache/tpllama"))
    bdir = os.path.join(root, "ext", prefix + "-" + h.hexdigest()[:16])
    os.makedirs(bdir, exist_ok=True)
    name = prefix + "_" + h.hexdigest()[:16]
    with _file_lock(os.path.join(bdir, "tpllama.lock")):
        stale = os.path.join(bdir, "lock")  # torch baton left by a killed build (see _build)
        if os.path.exists(stale):
            with contextlib.suppress(OSError):
                os.remove(stale)
        if message and not os.path.exists(os.path.join(bdir, name + ".so")):
            print(message, file=sys.stderr, flush=True)
        return cpp_extension.load(name=name, sources=[path], extra_cflags=list(cflags),
                                  extra_ldflags=list(ldflags), build_directory=bdir, verbose=False)


def get():
    """The compiled kernel module, or None (fallback to pure PyTorch)."""
    global _module, _tried
    if "TPLLAMA_NO_KERNELS" in os.environ and _disabled_by_env():
        return None
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        ok, why = _cpu_supported()
        if not ok:
            log.info("tpllama CPU kernels disabled: %s; using the PyTorch fallback", why)
        else:
            try:
                _module = _build()
            except Exception as e:  # compiler missing, build error, ...
                _module = None
                log.warning("tpllama CPU kernels unavailable (%s: %s); using the slower PyTorch fallback",
                            type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        _tried = True
    return _module


def available() -> bool:
    return get() is not None


# ----------------------------------------------------------------------------- benchmark

def _probe_bandwidth(nbytes: int = 1 << 30, reps: int = 3) -> float:
    """Read bandwidth in GB/s: best of `reps` timed sums over an `nbytes` float32 tensor."""
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    t.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    del t
    return nbytes / best / 1e9


def bench_matvec(out: int, in_: int, scheme: str = "int8", threads: int | None = None, m: int = 1,
                 min_time: float = 0.5, probe_bytes: int = 1 << 30) -> dict:
    """Time the decode kernel (M=m rows of activations) on a random [out, in_] weight.

    Several copies of the weight are cycled so that, as in a real model, every call streams
    its weight from DRAM rather than from cache. Returns GB/s of stored weight bytes
    (quants + scales [+ mins]), a bandwidth probe (timed ``sum()`` of ``probe_bytes``) run
    right before and after in the same process, and the ratio.
    """
    from .. import quant

    threads = int(threads or torch.get_num_threads())
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lin = quant.quantize_weight(torch.randn(out, in_) * 0.02, scheme)
        wbytes = sum(t.numel() * t.element_size() for t in lin.stored_tensors().values())
        copies = max(1, min(64, -(-(256 << 20) // wbytes)))  # >= 256 MiB in rotation
        mods = [lin] + [quant.QuantLinear.from_state(
            {k: v.clone() for k, v in lin.stored_tensors().items()}) for _ in range(copies - 1)]
        x = torch.randn(m, in_)
        kernel = get() is not None
        with torch.inference_mode():
            for mod in mods:
                mod(x)
            probe1 = _probe_bandwidth(probe_bytes)
            n = 0
            t0 = time.perf_counter()
            while True:
                for mod in mods:
                    mod(x)
                n += len(mods)
                dt = time.perf_counter() - t0
                if dt >= min_time:
                    break
            probe2 = _probe_bandwidth(probe_bytes)
        gbs = wbytes * n / dt / 1e9
        probe = max(probe1, probe2)
        return {
            "out": out, "in": in_, "scheme": scheme, "threads": threads, "m": m, "kernel": kernel,
            "weight_bytes": wbytes, "us_per_call": dt / n * 1e6, "gbps": gbs,
            "probe_gbps": probe, "probe_before_gbps": probe1, "probe_after_gbps": probe2,
            "pct_of_probe": 100.0 * gbs / probe,
        }
    finally:
        torch.set_num_threads(old_threads)
