"""The front: ``tpllama.load`` and the ``Engine`` it returns.

Rank 0 (the calling process) owns tokenization, validation and sampling. It checks a request
completely before any rank does work, then drives all ranks step by step through ``Runner``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from . import __version__
from . import cut as cutmod
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint
from .config import ModelArgs
from .default_model import cache_dir, default_model_path
from .dist import (DEFAULT_TIMEOUT_S, DistContext, RankFailure, Workers, check_device, init_ranks, launched_by_torchrun,
                   local_world_size, pick_device)
from .generate import Decoder, SamplingParams, Sequence, generate_batch
from .loading import assemble, kv_dtype_for, parse_dtype, parse_kv_cache, parse_quant, rank_slice
from .runner import Runner, follow
from .shard import RankShare, plan
from .tokenizer import Tokenizer, gguf_tokenizer_dir, load_tokenizer, special_ids

log = logging.getLogger("tpllama")

MASKED_BELOW = -1e4  # additive mask values <= this count as "masked"


class Engine:
    """A loaded model on ``world_size`` ranks. Use as a context manager, or call ``close()``."""

    def __init__(self, args: ModelArgs, runner: Runner, tokenizer: Tokenizer | None, shares: list[RankShare],
                 workers: Workers | None, ctx: DistContext | None, info: dict):
        self.args = args
        self.runner = runner
        self.tokenizer = tokenizer
        self.shares = shares
        self.workers = workers
        self.ctx = ctx
        self.info = info
        self.world_size = len(shares)
        self.eos_ids, self.pad_id = special_ids(args.eos_token_ids, args.pad_token_id, tokenizer, args.vocab_size)
        self._broken: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._broken is None:
                self.runner.stop()
        except Exception:  # the other ranks may already be gone
            pass
        if self.workers is not None:
            self.workers.close()
        if self.ctx is not None:
            self.ctx.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ validation
    def check_ids(self, rows: Seq[Seq[int]]) -> None:
        v = self.args.vocab_size
        for b, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"row {b} of input_ids has no tokens (after removing padding)")
            lo, hi = min(row), max(row)
            if lo < 0 or hi >= v:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids row {b} holds token id {bad}; allowed: 0 <= id < vocab_size ({v})")

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.args.max_seq_len
        if prompt_len + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
                f"exceeds the model's context length {limit}"
            )

    def _rows_from_inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, list[list[int]]]:
        """Validate the seed's I/O contract; returns (input_ids [B, S] int64, each row's real tokens)."""
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids
        else:
            try:
                ids = torch.tensor(input_ids)
            except (TypeError, ValueError, OverflowError, RuntimeError) as err:
                raise ValueError(f"input_ids must be a rectangular [batch, seq] array of integers: {err}") from None
        if ids.numel() == 0:
            raise ValueError(f"input_ids must have shape [batch, seq] with batch, seq >= 1, got {tuple(ids.shape)}")
        if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"input_ids must hold integers (int64), got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None, :]
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, seq] with batch, seq >= 1, got {tuple(ids.shape)}")
        ids = ids.to(torch.int64).cpu()
        B, S = ids.shape
        keep = torch.ones(B, S, dtype=torch.bool)
        if attention_mask is not None:
            keep = self._mask_to_keep(attention_mask, B, S)
        rows = [ids[b][keep[b]].tolist() for b in range(B)]
        self.check_ids(rows)
        return ids, rows

    @staticmethod
    def _mask_to_keep(mask, B: int, S: int) -> torch.Tensor:
        """bool [B, S]: which tokens are real, from a 2-D 0/1 mask or the seed's 4-D additive mask."""
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if mask.dim() == 2:
            if tuple(mask.shape) != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected [batch, seq] = [{B}, {S}] or [{B}, 1, {S}, {S}]")
            values = mask.float()
            if not bool(((values == 0) | (values == 1)).all()):
                raise ValueError("a 2-D attention_mask must hold only 0 (padding) and 1 (token)")
            return values.bool()
        if mask.dim() == 4:
            if tuple(mask.shape) != (B, 1, S, S):
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected [{B}, 1, {S}, {S}] (or 2-D [{B}, {S}])")
            if mask.dtype != torch.float32:
                raise ValueError(f"a 4-D attention_mask must be float32 (additive: 0 = attend, large negative = masked), got {mask.dtype}")
            m = mask[:, 0]
            attend = m == 0
            masked = m <= MASKED_BELOW
            if not bool((attend | masked).all()) or bool(torch.isnan(m).any()):
                raise ValueError(
                    f"a 4-D attention_mask must hold 0.0 (attend) or a large negative number <= {MASKED_BELOW:g} / -inf (masked)"
                )
            keep = attend[:, -1, :]  # the last query sees every real token
            causal = torch.ones(S, S, dtype=torch.bool).tril()
            expected = causal[None] & keep[:, None, :]
            real_queries = keep[:, :, None].expand(B, S, S)
            if not bool((attend[real_queries] == expected[real_queries]).all()):
                raise ValueError(
                    "the 4-D attention_mask is not a causal mask with padding (as transformers' LLaMA builds); "
                    "other attention patterns are not supported"
                )
            return keep
        raise ValueError(f"attention_mask must be 2-D [batch, seq] or 4-D [batch, 1, seq, seq], got {mask.dim()}-D")

    def _params(self, max_new_tokens: int, **sampling) -> SamplingParams:
        try:
            params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        except TypeError as err:
            raise ValueError(f"unknown sampling parameter: {err}") from None
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint has none")
        return params

    def _stop_checker(self, stops: tuple[str, ...]):
        if not stops:
            return None
        tok = self.tokenizer

        def check(generated: list[int]) -> bool:
            text = tok.decode(generated[-64:])
            return any(s in text for s in stops)

        return check

    # ------------------------------------------------------------------ generation
    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed")
        if self._broken:
            raise RankFailure(self._broken)

    def _run(self, seqs: list[Sequence]):
        """Yield (sequence, token) while running ``seqs`` together; turns rank failures into RankFailure."""
        self._check_alive()
        longest = max(len(s.prompt) + s.params.max_new_tokens for s in seqs)
        try:
            self.runner.ensure_cache(len(seqs), _round_up(longest, 256, self.args.max_seq_len))
            decoder = Decoder(self.runner.forward, len(seqs), self.eos_ids, self.pad_id)
            yield from generate_batch(decoder, seqs)
        except (RuntimeError, OSError) as err:
            if self.world_size == 1 or isinstance(err, RankFailure):
                raise
            self._fail(err)

    def _fail(self, err: BaseException):
        why = self.workers.failure if self.workers is not None and self.workers.failure else None
        self._broken = f"{why or 'a rank failed'} ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        if self.workers is not None:
            self.workers.kill()
        raise RankFailure(self._broken) from err

    def iterate(self, prompts: Seq[Seq[int]], max_new_tokens: int = 32, **sampling) -> Iterator[tuple[int, int]]:
        """Run prompts (lists of token ids, no padding) together; yield (row, new token) as made."""
        params = self._params(max_new_tokens, **sampling)
        rows = [[int(t) for t in p] for p in prompts]
        self.check_ids(rows)
        for row in rows:
            self.check_length(len(row), params.max_new_tokens)
        seqs = [Sequence(prompt=row, params=params, stop_check=self._stop_checker(params.stop)) for row in rows]
        index = {id(s): i for i, s in enumerate(seqs)}
        for s, tok in self._run(seqs):
            yield index[id(s)], tok

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, **sampling) -> torch.Tensor:
        """The seed's contract: input_ids int64 [B, S] (+ optional mask) -> output_ids int64 [B, S + new].

        Greedy by default; sampling keywords are those of ``SamplingParams`` (temperature,
        top_k, top_p, repetition_penalty, seed, stop, ...). Each row stops at EOS and is padded
        after it with the pad id. Padding (2-D 0/1 mask or 4-D additive mask) is removed per row,
        so a padded batch gives, row by row, the tokens of each row alone."""
        params = self._params(max_new_tokens, **sampling)
        ids, rows = self._rows_from_inputs(input_ids, attention_mask)
        for row in rows:
            self.check_length(len(row), params.max_new_tokens)
        seqs = [Sequence(prompt=row, params=params, stop_check=self._stop_checker(params.stop)) for row in rows]
        for _ in self._run(seqs):
            pass
        new = max(len(s.generated) for s in seqs)
        out = torch.full((ids.shape[0], ids.shape[1] + new), self.pad_id, dtype=torch.int64)
        out[:, : ids.shape[1]] = ids
        for b, s in enumerate(seqs):
            g = s.generated
            out[b, ids.shape[1] : ids.shape[1] + len(g)] = torch.tensor(g, dtype=torch.int64)
        return out

    def stream(self, prompt_ids: Seq[int], max_new_tokens: int = 256, **sampling) -> Iterator[int]:
        """Yield the new token ids of one prompt as they are made."""
        for _, tok in self.iterate([prompt_ids], max_new_tokens, **sampling):
            yield tok

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids instead of text")
        return self.tokenizer.chat(messages)


def _round_up(n: int, step: int, cap: int) -> int:
    return min(cap, -(-n // step) * step)


# ---------------------------------------------------------------------- loading
def _cache_key(path: Path, world_size: int, dtype: torch.dtype, quant: str | None) -> str:
    """Identity of a cut in the cache: the source file's path, size and mtime, and the cut's settings."""
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    # the tool version and the parts' format: a cut made by an older tpllama is not reused
    ident = [str(path.resolve()), str(world_size), str(dtype), str(quant), __version__, cutmod.FORMAT, "stored-form-2", "plan-2"]
    ident += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


def _tokenizer_for(path: Path, ckpt: Checkpoint | None) -> Tokenizer | None:
    if cutmod.is_cut_dir(path):
        return load_tokenizer(path / "part_model" / "0")
    if ckpt is not None and ckpt.kind == "gguf":
        tdir = gguf_tokenizer_dir(ckpt.path, cache_dir())
        return load_tokenizer(tdir) if tdir else None
    return load_tokenizer(path)


def resolve_parts(path: Path, world_size: int, dtype: torch.dtype, quant: str | None, progress: bool) -> tuple[Path, Checkpoint | None]:
    """A cut directory for ``world_size`` ranks: ``path`` itself, or the cache's cut of it
    (made now if missing). Refuses a mismatched world size naming both numbers."""
    if cutmod.is_cut_dir(path):
        manifest = cutmod.read_manifest(path)
        cutmod.check_world_size(path, manifest, world_size)
        return path, None
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    target = cache_dir() / "parts" / f"{path.stem}-tp{world_size}-{_cache_key(path, world_size, dtype, quant)}"
    if cutmod.is_cut_dir(target):
        return target, None
    ckpt = open_checkpoint(path)
    plan(ckpt.args, world_size)
    if progress:
        print(f"tpllama: cutting {ckpt.path} into {world_size} parts at {target} (first time only)", file=sys.stderr)
    cutmod.cut(ckpt, target, world_size, dtype=dtype, quant=quant, progress=progress, reuse=True)
    return target, ckpt


def load(
    path: str | os.PathLike | None = None,
    world_size: int = 1,
    dtype: str | torch.dtype = "float32",
    quant: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    kv_cache: str = "auto",
) -> Engine:
    """Load a model on ``world_size`` ranks and return the engine (on rank 0).

    ``path``: an HF directory, a .gguf file, a directory written by ``tpllama cut``, or None for
    the default model. With world_size > 1 and an uncut checkpoint, it is cut into the cache
    first (once). Ranks 1..N-1 are started as child processes, unless this process was
    started by torchrun: then every process calls ``load``, ranks 1..N-1 serve rank 0 inside
    it and exit when rank 0 closes its engine. ``kv_cache``: auto | float32 | float16, the KV
    cache's element type (auto: float16 for quantized float32 models on the CPU, else ``dtype``).
    """
    torch_dtype = parse_dtype(dtype)
    quant = parse_quant(quant)
    kv_cache = parse_kv_cache(kv_cache)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torchrun = launched_by_torchrun()
    if torchrun and int(os.environ["WORLD_SIZE"]) != world_size:
        raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but world_size={world_size} was asked for")
    check_device(device, world_size)
    src = Path(path).expanduser() if path is not None else default_model_path(quiet=not progress)

    if world_size == 1 and not torchrun and not cutmod.is_cut_dir(src):
        return _load_single(src, torch_dtype, quant, device, threads, kv_cache)

    rank = int(os.environ["RANK"]) if torchrun else 0
    threads = threads or max(1, (os.cpu_count() or 1) // local_world_size(world_size))
    torch.set_num_threads(threads)
    torch.manual_seed(0)  # the same seed in every process
    parts, ckpt = (None, None)
    if not torchrun:
        parts, ckpt = resolve_parts(src, world_size, torch_dtype, quant, progress)
    workers = None
    if not torchrun:
        worker_args = ["--parts", str(parts), "--world-size", str(world_size), "--dtype", str(torch_dtype).removeprefix("torch."),
                       "--timeout", str(timeout_s), "--threads", str(threads)]
        if device:
            worker_args += ["--device", device]
        workers = Workers(world_size, worker_args, threads, timeout_s)
    try:
        ctx = init_ranks(rank, world_size, device, timeout_s, local_store=workers.store if workers else None,
                         loopback_only=workers is not None)
    except Exception as err:
        if workers is not None:
            workers.kill()
        raise RankFailure(f"could not start {world_size} ranks: {err}") from err
    if torchrun:
        # rank 0 cuts (once, into the cache); the others wait for it on the control group
        holder = [None]
        if rank == 0:
            holder = [str(resolve_parts(src, world_size, torch_dtype, quant, progress)[0])]
        torch.distributed.broadcast_object_list(holder, src=0, group=ctx.control)
        parts = Path(holder[0])
    if workers is not None:
        workers.on_failure = ctx.poison
    model, share, args, err = _load_rank(parts, rank, world_size, torch_dtype, ctx)
    _agree_loaded(ctx, err, workers)
    if rank != 0:
        follow(model, ctx)
        ctx.close()
        raise SystemExit(0)
    shares = cutmod.manifest_shares(parts)
    tokenizer = _tokenizer_for(parts, None)
    info = {"path": str(src), "parts": str(parts), "dtype": str(torch_dtype).removeprefix("torch."), "quant": quant or "none",
            "threads_per_rank": threads, "device": str(ctx.device), "backend": "shared memory" if ctx.shm is not None else torch.distributed.get_backend(ctx.compute),
            "launcher": "torchrun" if torchrun else "tpllama"}
    kv_dtype = kv_dtype_for(model, kv_cache)
    info["kv_cache"] = str(kv_dtype).removeprefix("torch.")
    for s in shares:
        log.info(s.describe())
    return Engine(args, Runner(model, ctx, kv_dtype), tokenizer, shares, workers, ctx, info)


def _load_rank(parts: Path, rank: int, world_size: int, dtype: torch.dtype, ctx: DistContext):
    """Load this rank's part; returns (model, share, args, error message or None)."""
    try:
        args, share, tensors, _quant = cutmod.load_part(parts, rank, world_size)
        model = assemble(args, share, tensors, dtype, ctx.device, ctx.all_reduce,
                         ctx.gather_vocab([s.vocab_rows for s in cutmod.manifest_shares(parts)]))
        _prepare_kernels(model)
        return model, share, args, None
    except Exception as err:  # reported to every rank below
        return None, None, None, f"rank {rank}: {type(err).__name__}: {err}"


def _prepare_kernels(model) -> None:
    """Build (first use, about a minute) or load the CPU kernels now, while loading, rather than in
    the first decode step: there, one rank building while the other waits in an all-reduce would
    run into the compute timeout."""
    if model.norm.weight.is_cpu:
        from . import kernels

        kernels.get()


def _agree_loaded(ctx: DistContext, err: str | None, workers: Workers | None) -> None:
    """Every rank says whether it loaded; all raise if any failed (on the long-timeout group)."""
    errors = [None] * ctx.world_size
    torch.distributed.all_gather_object(errors, err, group=ctx.control)
    failed = [e for e in errors if e]
    if failed:
        if ctx.rank != 0:
            ctx.close()
            raise SystemExit(1)
        if workers is not None:
            workers.kill()
        ctx.close()
        first = failed[0]
        raise (cutmod.CheckpointError(first) if "CheckpointError" in first else RankFailure(first))


def _load_single(src: Path, dtype: torch.dtype, quant: str | None, device: str | None, threads: int | None,
                 kv_cache: str) -> Engine:
    """One rank in this process, straight from the checkpoint (no cut)."""
    if threads:
        torch.set_num_threads(threads)
    ckpt = open_checkpoint(src)
    ckpt.validate()
    args = ckpt.args
    share = plan(args, 1)[0]
    dev = pick_device(device, 0)
    model = assemble(args, share, rank_slice(ckpt, share, dtype, quant), dtype, dev)
    _prepare_kernels(model)
    tokenizer = _tokenizer_for(src, ckpt)
    info = {"path": str(src), "parts": None, "dtype": str(dtype).removeprefix("torch."), "quant": quant or "none",
            "threads_per_rank": torch.get_num_threads(), "device": str(dev), "backend": None, "launcher": "in-process"}
    kv_dtype = kv_dtype_for(model, kv_cache)
    info["kv_cache"] = str(kv_dtype).removeprefix("torch.")
    return Engine(args, Runner(model, None, kv_dtype), tokenizer, [share], None, None, info)
