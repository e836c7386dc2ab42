"""Driving the model on every rank: rank 0 broadcasts each step, the other ranks follow.

``ModelRunner.forward`` is what the engine calls. Rank 0 first broadcasts a fixed-size header
and the step's tokens/positions (through the communicator: nothing on one rank), then every rank
runs the same step (their all-reduces meet inside it). ``follow`` is the loop of ranks 1..N-1.
``run_model`` chooses, on every rank alike, how a step runs: a decode step of a quantized model on
the CPU through the fused C++ blocks, everything else through the model's modules.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..model.fused import fused_layers
from ..model.llama import Transformer
from ..model.quant import DECODE_MAX_ROWS

CMD_FORWARD, CMD_CACHE, CMD_STOP, CMD_STATS = 1, 2, 3, 4
HEADER = 6  # cmd, B, T, rows kind (0 slice / 1 index) or KV dtype code, rows start, cache columns
KV_CODES = {None: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}  # CMD_CACHE's "kind"
KV_DTYPES = {code: dtype for dtype, code in KV_CODES.items()}
INLINE = 58  # payload words carried inside the header message (a decode step of up to 19 rows)
MESSAGE = HEADER + INLINE


@dataclasses.dataclass
class StepTimes:
    """What one rank spent on the steps of one kind (prefill or decode): wall seconds inside the
    steps, and of those the seconds inside collectives (waiting for the others included), their
    count and payload bytes."""

    steps: int = 0
    seconds: float = 0.0
    comm_seconds: float = 0.0
    comm_calls: int = 0
    comm_bytes: int = 0


class RankTimes:
    """A rank's StepTimes for prefill and decode steps, counted around each step."""

    def __init__(self, comm):
        self.comm = comm
        self.kinds = {"prefill": StepTimes(), "decode": StepTimes()}
        self._t0 = 0.0
        self._c0 = (0, 0.0, 0)

    def begin(self) -> None:
        self._t0 = time.perf_counter()
        self._c0 = (self.comm.calls, self.comm.seconds, self.comm.bytes)

    def end(self, tokens_per_row: int) -> None:
        k = self.kinds["decode" if tokens_per_row == 1 else "prefill"]
        k.steps += 1
        k.seconds += time.perf_counter() - self._t0
        calls, seconds, nbytes = self.comm.calls, self.comm.seconds, self.comm.bytes
        k.comm_calls += calls - self._c0[0]
        k.comm_seconds += seconds - self._c0[1]
        k.comm_bytes += nbytes - self._c0[2]

    def report(self, reset: bool) -> dict:
        out = {kind: dataclasses.asdict(t) for kind, t in self.kinds.items()}
        if reset:
            self.kinds = {"prefill": StepTimes(), "decode": StepTimes()}
        return out


def run_model(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, rows) -> torch.Tensor:
    """One step of ``model`` (see ``Transformer.forward`` for the shapes) -> logits [B, 1, vocab]."""
    B, T = tokens.shape
    if T == 1 and tokens.device.type == "cpu" and B <= DECODE_MAX_ROWS:
        fused = fused_layers(model)
        if fused is not None:
            return fused.decode_step(model, tokens, positions, rows)
    return model(tokens, positions, rows)


class ModelRunner:
    """Runs the model for rank 0 and, through the communicator, for the other ranks."""

    def __init__(self, model: Transformer, comm, kv_dtype: torch.dtype | None = None):
        self.model = model
        self.comm = comm
        self.times = RankTimes(comm)
        self.device = model.norm.weight.device
        self.kv_dtype = kv_dtype  # KV cache element type on every rank (None: the model's dtype)

    @property
    def distributed(self) -> bool:
        return self.comm.world_size > 1

    def _send(self, cmd: int, b: int = 0, t: int = 0, kind: int = 0, start: int = 0, cols: int = 0, payload=None):
        """One broadcast when the payload fits inline (every decode step), two otherwise."""
        message = torch.zeros(MESSAGE, dtype=torch.int64)
        message[:HEADER] = torch.tensor([cmd, b, t, kind, start, cols])
        inline = payload is not None and payload.numel() <= INLINE
        if inline:
            message[HEADER : HEADER + payload.numel()] = payload
        self.comm.broadcast(message)
        if payload is not None and not inline:
            self.comm.broadcast(payload)

    def ensure_cache(self, slots: int, max_len: int) -> None:
        if self.distributed:
            self._send(CMD_CACHE, b=slots, kind=KV_CODES[self.kv_dtype], cols=max_len)
        self.model.kv_dtype = self.kv_dtype
        self.model.ensure_cache(slots, max_len)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows) -> torch.Tensor:
        """tokens, positions int64 [B, T] (CPU); rows: slice or int64 [B]. -> logits [B, 1, V] (CPU)."""
        B, T = tokens.shape
        self.times.begin()
        if self.distributed:
            if isinstance(rows, slice):
                payload = torch.cat([tokens.reshape(-1), positions.reshape(-1)])
                self._send(CMD_FORWARD, B, T, 0, rows.start, payload=payload)
            else:
                payload = torch.cat([tokens.reshape(-1), positions.reshape(-1), rows])
                self._send(CMD_FORWARD, B, T, 1, 0, payload=payload)
        dev = self.device
        if not isinstance(rows, slice):
            rows = rows.to(dev)
        logits = run_model(self.model, tokens.to(dev), positions, rows).cpu()  # positions stay on the host
        self.times.end(T)
        return logits

    def rank_times(self, reset: bool = False) -> list[dict]:
        """Every rank's step times (``RankTimes.report``), in rank order; ``reset`` starts them over."""
        if self.distributed:
            self._send(CMD_STATS, kind=int(reset))
        return self.comm.all_gather_object(self.times.report(reset))

    def stop(self) -> None:
        if self.distributed:
            self._send(CMD_STOP)


@torch.inference_mode()
def follow(model: Transformer, comm) -> None:
    """Ranks 1..N-1: execute rank 0's commands until told to stop."""
    dev = model.norm.weight.device
    message = torch.empty(MESSAGE, dtype=torch.int64)
    times = RankTimes(comm)
    while True:
        comm.broadcast(message, idle=True)
        cmd, b, t, kind, start, cols = message[:HEADER].tolist()
        if cmd == CMD_STOP:
            return
        if cmd == CMD_CACHE:
            model.kv_dtype = KV_DTYPES[kind]
            model.ensure_cache(b, cols)
            continue
        if cmd == CMD_STATS:
            comm.all_gather_object(times.report(bool(kind)))
            continue
        if cmd != CMD_FORWARD:
            raise RuntimeError(f"unknown command {cmd} from rank 0")
        times.begin()
        n = b * t
        size = 2 * n + (b if kind == 1 else 0)
        if size <= INLINE:
            payload = message[HEADER : HEADER + size].clone()
        else:
            payload = torch.empty(size, dtype=torch.int64)
            comm.broadcast(payload)
        tokens = payload[:n].view(b, t).to(dev)
        positions = payload[n : 2 * n].view(b, t)
        rows = slice(start, start + b) if kind == 0 else payload[2 * n :].to(dev)
        run_model(model, tokens, positions, rows)
        times.end(t)
