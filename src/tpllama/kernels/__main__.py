"""``python -m tpllama.kernels``: build every C++ extension now, all at once (one compiler each,
instead of one after the other on first use), then say which ones this machine will use.

``make`` runs it once when it sets up the environment; built extensions are cached (see the
package docstring), so a second run only loads them. An extension that cannot be built here is
reported, not fatal: its caller falls back (PyTorch kernels, gloo) as at first use.
"""

from __future__ import annotations

import subprocess
import sys

from .. import kernels


def extensions() -> dict[str, tuple[str, tuple]]:
    """What is built -> (the function of ``tpllama.kernels`` that builds or loads it, its
    arguments): every kernel path this CPU runs (so that ``TPLLAMA_KERNEL_PATH`` can pick a
    narrower one at no cost), and the collectives."""
    paths = kernels.runnable_paths() or ["avx2"]
    return {**{f"CPU kernels ({p})": ("compute", (p,)) for p in paths},
            "shared-memory collectives": ("collectives", ()),
            "TCP collectives": ("tcp_collectives", ())}


def main() -> int:
    todo = extensions()
    builds = [subprocess.Popen([sys.executable, "-c", f"import tpllama.kernels as k; k.{fn}(*{args!r})"])
              for fn, args in todo.values()]
    for p in builds:
        p.wait()
    for what, (fn, args) in todo.items():
        module = getattr(kernels, fn)(*args)
        state = "ready" if module is not None else "not available here (the fallback is used)"
        print(f"{what}: {state}")
    print(f"kernel path: {kernels.isa()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
