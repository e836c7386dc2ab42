"""Parts where they are needed: a host without the cut gets its ranks' parts from rank 0.

Under torchrun, rank 0 resolves the cut (made into its cache if needed); every other rank then
looks for the same cut on its own host (the path rank 0 uses, as on a shared filesystem, or its
own cache's ``parts/<name>``, where an earlier run left it) with the same manifest. A rank that
has no such copy, or lacks its own part, gets the manifest and its part from rank 0 once,
streamed in chunks over the control group, each file checked against the manifest's sha256,
written into its cache through ``StagedWrite``; later runs reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from ..config import EngineConfig
from ..env import cache_dir
from .checkpoint import CheckpointError
from .parts import MANIFEST, is_cut_dir
from .staging import StagedWrite

CHUNK = 16 << 20  # bytes per message


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_copy(candidates: list[Path], manifest_digest: str, rank: int) -> Path | None:
    """The first candidate holding the very same manifest and this rank's part files (sizes are
    checked here; the load checks their sha256)."""
    for path in candidates:
        if not is_cut_dir(path):
            continue
        text = (path / MANIFEST).read_bytes()
        if _digest(text) != manifest_digest:
            continue
        entry = json.loads(text)["ranks"][rank]
        part = path / "part_model" / str(rank)
        if all((part / name).is_file() for name in entry["files"]):
            return path
    return None


def ship_parts(cfg: EngineConfig, comm, progress: bool) -> EngineConfig:
    """``cfg`` with ``parts`` a local copy holding this rank's part (see the module docstring).
    Every rank calls it, after rank 0's ``cfg`` was broadcast."""
    if cfg.parts is None or comm.world_size == 1:
        return cfg
    rank0_path = Path(cfg.parts)
    manifest = (rank0_path / MANIFEST).read_bytes() if comm.rank == 0 else None
    manifest = comm.broadcast_object(manifest)
    digest = _digest(manifest)
    name = rank0_path.name
    local = rank0_path if comm.rank == 0 else _local_copy([rank0_path, cache_dir() / "parts" / name], digest, comm.rank)
    needs = comm.all_gather_object(local is None)
    if not any(needs):
        return dataclasses.replace(cfg, parts=str(local))
    entries = json.loads(manifest)["ranks"]
    if comm.rank == 0:
        for r, need in enumerate(needs):
            if need:
                for fname in entries[r]["files"]:
                    _send_file(comm, rank0_path / "part_model" / str(r) / fname, r)
    elif local is None:
        target = cache_dir() / "parts" / name
        with StagedWrite(target, progress=progress) as staged:
            tmp = staged.temp_dir()
            (tmp / MANIFEST).write_bytes(manifest)
            part = tmp / "part_model" / str(comm.rank)
            part.mkdir(parents=True)
            files = entries[comm.rank]["files"]
            total = sum(1 for _ in files)
            for i, (fname, want) in enumerate(files.items(), 1):
                got = _recv_file(comm, part / fname, progress, f"part {comm.rank} from rank 0 ({i}/{total}: {fname})")
                if got != want:
                    raise CheckpointError(f"rank {comm.rank}: {fname} of part {comm.rank} arrived with sha256 {got}, "
                                          f"the manifest says {want}; the transfer from rank 0 was damaged")
            staged.publish(tmp)
        local = target
    return dataclasses.replace(cfg, parts=str(local))


def _send_file(comm, path: Path, dst: int) -> None:
    size = path.stat().st_size
    comm.send_bytes(size.to_bytes(8, "little"), dst)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            comm.send_bytes(chunk, dst)


def _recv_file(comm, path: Path, progress: bool, what: str) -> str:
    """Receive one file into ``path``; returns its sha256."""
    from tqdm import tqdm

    size = int.from_bytes(comm.recv_bytes(8, 0), "little")
    h = hashlib.sha256()
    with open(path, "wb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"receiving {what}",
                                      disable=not progress, file=sys.stderr, leave=False) as bar:
        left = size
        while left:
            chunk = comm.recv_bytes(min(CHUNK, left), 0)
            fh.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            bar.update(len(chunk))
    return h.hexdigest()
