"""Cutting a checkpoint into N tensor-parallel parts, and reading a part back.

Layout written by ``cut``::

    DIR/manifest.json                 world size, dtype, quantization, what each rank holds,
                                      sha256 of every file, source, tool version
    DIR/part_model/<rank>/model.safetensors   this rank's stored tensors (HF names)
    DIR/part_model/<rank>/config.json          the whole model's HF config
    DIR/part_model/<rank>/part.json            rank, world size, share
    DIR/part_model/<rank>/tokenizer files      when the source has a tokenizer

The source is read once, tensor by tensor; every rank's slice of a tensor is appended to that
rank's data file at once, so peak memory stays near one (dequantized) tensor. Everything is
written under ``.DIR.tmp-*`` and renamed to DIR at the end (``staging.StagedWrite``): an
interrupted cut leaves nothing that loads, and the next cut of DIR removes what it left.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import torch

from ..config import ModelArgs
from ..env import cache_dir
from ..parallel.plan import RankShare, plan, slice_for_rank
from ..version import __version__
from .checkpoint import Checkpoint, CheckpointError, expected_shapes, open_checkpoint
from .default_model import sha256_file
from .staging import StagedWrite
from .stored import stored_tensors
from .tokenizer import copy_tokenizer_files, gguf_tokenizer_dir, has_tokenizer_files

MANIFEST = "manifest.json"
FORMAT = "tpllama-parts/1"

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
}


class SafetensorsStreamWriter:
    """Writes a safetensors file one tensor at a time: data goes to a side file as it comes,
    the header is written at ``close`` and the data copied behind it."""

    def __init__(self, path: Path):
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store dtype {t.dtype} in safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(memoryview(raw))
        size = t.numel() * t.element_size()
        self._header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, self._offset + size]}
        self._offset += size

    def close(self, metadata: dict[str, str] | None = None) -> None:
        self._data.close()
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            shutil.copyfileobj(data, out, 1 << 22)
        self._data_path.unlink()


def cut(
    source: str | Path | Checkpoint,
    output: str | Path,
    world_size: int,
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    progress: bool = True,
    reuse: bool = False,
    proportions=None,
) -> Path:
    """Cut ``source`` into ``world_size`` parts under ``output``; returns ``output``.

    ``reuse``: keep a finished cut already at ``output`` (for the cache, where another process may
    have made it while this one waited for the writer lock). ``proportions``: the ranks' relative
    speeds (``parallel.plan``; default equal)."""
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    args = ckpt.args
    shares = plan(args, world_size, proportions)  # refuses an impossible world size before any work
    ckpt.validate()
    output = Path(output)
    with StagedWrite(output, progress=progress) as staged:
        if reuse and is_cut_dir(output):
            return output
        writer = PartsWriter(staged.temp_dir(), args, shares)
        tensors = stored_tensors(ckpt, dtype, quant)
        bar = _progress(len(expected_shapes(args)), f"cutting into {world_size}", progress)
        last_module = None
        for name, t, in_features in tensors:
            for share in shares:
                writer.write(share.rank, name, slice_for_rank(name, t, share, args, in_features))
            module = name.rsplit(".", 1)[0]
            if module != last_module:
                bar.update(1)
                last_module = module
            del t
        bar.close()
        writer.finish(dtype, quant, {"path": str(ckpt.path), "kind": ckpt.kind}, _tokenizer_source(ckpt), proportions)
        staged.publish(writer.directory)
    return output


class PartsWriter:
    """Writes a cut directory (see the module docstring) into ``directory``: each rank's tensors
    appended to its own safetensors stream as they come, then each part's files and the manifest.
    ``cut`` and the synthetic models both write through it."""

    def __init__(self, directory: Path, args: ModelArgs, shares: list[RankShare]):
        self.directory = directory
        self.args = args
        self.shares = shares
        self.parts = [directory / "part_model" / str(s.rank) for s in shares]
        for p in self.parts:
            p.mkdir(parents=True)
        self.writers = [SafetensorsStreamWriter(p / "model.safetensors") for p in self.parts]

    def write(self, rank: int, name: str, tensor: torch.Tensor) -> None:
        self.writers[rank].write(name, tensor)

    def finish(self, dtype: torch.dtype, quant: str | None, source: dict, tokenizer_source: Path | None,
               proportions=None) -> None:
        world_size = len(self.shares)
        meta = {"format": FORMAT, "world_size": str(world_size)}
        ranks = []
        for share, w, p in zip(self.shares, self.writers, self.parts):
            w.close(dict(meta, rank=str(share.rank)))
            write_part_files(p, self.args, share, tokenizer_source)
            ranks.append({"share": share.to_json(), "files": file_digests(p)})
        write_manifest(self.directory, world_size, dtype, quant, source, self.args, ranks, proportions)


def write_part_files(part: Path, args: ModelArgs, share: RankShare, tokenizer_source: Path | None) -> None:
    """The files of a part beside its ``model.safetensors``: config, part.json, tokenizer."""
    (part / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
    (part / "part.json").write_text(json.dumps({"rank": share.rank, "world_size": share.world_size,
                                                 "share": share.to_json()}))
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, part)


def file_digests(part: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(part.iterdir()) if f.is_file()}


def write_manifest(directory: Path, world_size: int, dtype: torch.dtype, quant: str | None, source: dict,
                   args: ModelArgs, ranks: list[dict], proportions=None) -> None:
    """DIR/manifest.json: what each rank holds and the sha256 of its files (``ranks``)."""
    manifest = {
        "format": FORMAT,
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "world_size": world_size,
        "dtype": str(dtype).removeprefix("torch."),
        "quant": quant or "none",
        "shares": None if proportions is None else [float(x) for x in proportions],
        "source": source,
        "split": {
            "heads": "whole KV groups for world size <= KV heads; else each rank a copy of one KV head and part "
                     "of its group's query heads (see each rank's share)",
            "q,k,v,gate,up": "output features (dim 0)",
            "o,down": "input features (dim 1)",
            "lm_head": "vocabulary rows (dim 0); logits gathered",
            "embedding, norms": "replicated",
        },
        "config": args.to_hf_config(),
        "ranks": ranks,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _tokenizer_source(ckpt: Checkpoint) -> Path | None:
    if ckpt.kind == "gguf":
        return gguf_tokenizer_dir(ckpt.path, cache_dir())
    return ckpt.path if has_tokenizer_files(ckpt.path) else None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


# ---------------------------------------------------------------------- reading parts back
def is_cut_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(directory: Path, needed: list[int] | None = None) -> dict:
    """The cut's manifest, checked (``check_manifest``); ``needed``: the ranks whose parts must be
    on disk here (None: every rank's; a host that was shipped its own part holds only that)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory / MANIFEST} cannot be read: {err}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory} was not written by this tpllama (format {manifest.get('format')!r}, expected {FORMAT!r})")
    check_manifest(directory, manifest, needed)
    return manifest


def check_manifest(directory: Path, manifest: dict, needed: list[int] | None = None) -> None:
    """The manifest agrees with itself and with the part directories on disk (cheap: no hashing).
    Run before any rank starts, so an edited or damaged cut is bad input, not a rank failure."""
    where = directory / MANIFEST
    on_disk = sorted(int(p.name) for p in (directory / "part_model").glob("*") if p.is_dir() and p.name.isdigit())
    holds = f"{directory / 'part_model'} holds part(s) {', '.join(map(str, on_disk)) or 'none'}"
    n = manifest.get("world_size")
    ranks = manifest.get("ranks")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(ranks, list):
        raise CheckpointError(f"{where} is damaged: world_size {n!r} and a list of ranks are required; cut the checkpoint again")
    if len(ranks) != n:
        raise CheckpointError(f"{where} says world size {n} but lists {len(ranks)} rank(s); {holds}. The manifest was "
                              f"edited or damaged: cut the checkpoint again")
    try:
        shares = [share_from_json(entry) for entry in ranks]
        args = ModelArgs.from_hf_config(manifest["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where} is damaged ({type(err).__name__}: {err}); cut the checkpoint again") from None
    for i, (share, entry) in enumerate(zip(shares, ranks)):
        if share.rank != i or share.world_size != n:
            raise CheckpointError(f"{where}: entry {i} of its ranks is rank {share.rank} of {share.world_size}, expected "
                                  f"rank {i} of {n}; cut the checkpoint again")
        if not isinstance(entry.get("files"), dict) or not entry["files"]:
            raise CheckpointError(f"{where}: rank {i} lists no files; cut the checkpoint again")
    for what, total in (("heads", args.n_heads), ("ffn", args.ffn_dim), ("vocab", args.vocab_size)):
        ranges = [getattr(s, what) for s in shares]
        if ranges[0][0] != 0 or ranges[-1][1] != total or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
            raise CheckpointError(f"{where}: the ranks' {what} ranges {ranges} do not cover 0..{total} of the model; "
                                  f"cut the checkpoint again")
    g = args.group_size
    for s in shares:  # each rank holds (a copy of) exactly the KV heads its query heads use
        if s.kv_heads != (s.heads[0] // g, (s.heads[1] - 1) // g + 1):
            raise CheckpointError(f"{where}: rank {s.rank} holds query heads {s.heads} but KV heads {s.kv_heads}; "
                                  f"cut the checkpoint again")
    missing = [r for r in (range(n) if needed is None else needed) if r not in on_disk]
    if missing or any(r >= n for r in on_disk):
        raise CheckpointError(f"{where} says world size {n} (parts 0..{n - 1}) but {holds}; cut the checkpoint again")


def check_world_size(directory: Path, manifest: dict, world_size: int) -> None:
    if manifest["world_size"] != world_size:
        raise CheckpointError(
            f"{directory} was cut for world size {manifest['world_size']}, but world size {world_size} was asked for; "
            f"cut it again with --world-size {world_size}, or run with --world-size {manifest['world_size']}"
        )


def manifest_shares(directory: Path) -> list[RankShare]:
    """What every rank of a cut holds, as recorded when it was cut."""
    return [share_from_json(entry) for entry in read_manifest(directory, needed=[])["ranks"]]


def share_from_json(entry: dict) -> RankShare:
    return RankShare(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry["share"].items()})


def load_part(directory: Path, rank: int, world_size: int, verify: bool = True):
    """(ModelArgs, RankShare, stored tensors, quant) of one rank, checked against the manifest."""
    from safetensors import safe_open

    manifest = read_manifest(directory, needed=[rank])
    check_world_size(directory, manifest, world_size)
    entry = manifest["ranks"][rank]
    part = directory / "part_model" / str(rank)
    if verify:
        for name, digest in entry["files"].items():
            f = part / name
            if not f.is_file():
                raise CheckpointError(f"{f} is missing (listed in {directory / MANIFEST})")
            got = sha256_file(f)
            if got != digest:
                raise CheckpointError(f"{f} is corrupt: sha256 {got} does not match the manifest's {digest}")
    args = ModelArgs.from_hf_config(manifest["config"])
    share = share_from_json(entry)
    tensors = {}
    try:
        with safe_open(str(part / "model.safetensors"), framework="pt") as fh:
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    except Exception as err:
        raise CheckpointError(f"{part / 'model.safetensors'} cannot be read: {err}") from None
    quant = manifest.get("quant", "none")
    return args, share, tensors, (None if quant == "none" else quant)
