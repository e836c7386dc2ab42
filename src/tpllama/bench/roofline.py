"""What a decode step must read, what this machine can read, and what each rank holds.

* ``step_bytes``: bytes read from memory per decode step, summed over ranks, computed from
  ``ModelArgs`` + each rank's share + bytes per weight: every linear layer of the rank's share
  (fused q/k/v, o, fused gate/up, down), the norms, the rank's lm_head rows and one embedding row
  per batch row (not the whole table); plus the KV cache read at a given context length.
* ``stream_probe``: the machine's memory-read bandwidth, measured by summing a large float32
  tensor (best of a few), with a given thread count.
* ``RssSampler`` / ``vm_hwm``: peak resident memory of rank 0 and the worker processes.
* ``resident_bytes`` / ``check_fits``: what a configuration needs in RAM, refused up front when it
  does not fit.
"""

from __future__ import annotations

import threading
import time

import torch

from ..config import ModelArgs
from ..parallel.plan import RankShare
from ..parallel.probe import stream_probe  # noqa: F401  (the bench's roofline probe)

GB = 1e9
GiB = 1 << 30
# python + torch + tokenizer per process, besides weights and KV cache (a measured ~0.3-0.5 GB, rounded up)
PROCESS_OVERHEAD_BYTES = 600 << 20
QUANT_BLOCK = 32
LINEARS = ("wqkv", "wo", "w_gate_up", "w_down", "output")


# ---------------------------------------------------------------------- bytes per weight
def analytic_bytes_per_weight(args: ModelArgs, dtype: torch.dtype, quant: str | None,
                              auto_bpw: float | None = None) -> dict[str, float]:
    """Bytes per weight of each linear kind: the float dtype's size, or the quantized form's
    (int8: 1 byte + a float16 scale per 32; int4: half a byte + float16 scale and min per 32).
    A layer whose input width is not a multiple of 32 stays in the float dtype. ``auto`` (a GGUF
    file's own blocks kept) is estimated by ``auto_bpw``, the file's mean bytes per weight
    (float when not given: no GGUF blocks)."""
    elem = torch.empty((), dtype=dtype).element_size()
    if quant == "auto":
        per = float(auto_bpw) if auto_bpw else float(elem)
        return {k: per for k in LINEARS}
    per = {None: float(elem), "int8": 1.0 + 2.0 / QUANT_BLOCK, "int4": 0.5 + 4.0 / QUANT_BLOCK}[quant]
    ins = {"wqkv": args.dim, "wo": args.n_heads * args.head_dim, "w_gate_up": args.dim, "w_down": args.ffn_dim,
           "output": args.dim}
    out = {k: (per if quant and n % QUANT_BLOCK == 0 else float(elem)) for k, n in ins.items()}
    if quant == "int4" and args.dim % QUANT_BLOCK == 0:
        out["output"] = 1.0 + 2.0 / QUANT_BLOCK  # the cutter keeps lm_head in int8 under int4
    return out


def _module_bytes_per_weight(module) -> float:
    """Bytes this module keeps per logical weight: float weight or a QuantLinear's buffers."""
    if isinstance(module, torch.nn.Linear):
        w = module.weight
        return float(w.element_size())
    out, kin = int(module.out_features), int(module.in_features)
    held = sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return held / (out * kin)


def _module_weights(module) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.weight.numel()
    return int(module.out_features) * int(module.in_features)


def model_bytes_per_weight(model) -> dict[str, float]:
    """Bytes per weight of each linear kind as rank 0's model actually holds them (averaged over
    the layers, which may differ: a GGUF file's own blocks are kept as they are)."""
    held = {k: 0.0 for k in LINEARS}
    weights = {k: 0 for k in LINEARS}
    for block in model.layers:
        mods = {"wqkv": block.attention.wqkv, "wo": block.attention.wo, "w_gate_up": block.feed_forward.w_gate_up,
                "w_down": block.feed_forward.w_down}
        for k, m in mods.items():
            n = _module_weights(m)
            held[k] += _module_bytes_per_weight(m) * n
            weights[k] += n
    held["output"] = _module_bytes_per_weight(model.output) * _module_weights(model.output)
    weights["output"] = _module_weights(model.output)
    return {k: held[k] / weights[k] for k in LINEARS}


def linear_shapes(args: ModelArgs, share: RankShare) -> dict[str, tuple[int, int]]:
    """[out, in] of each linear layer of one rank (per transformer block; ``output`` once)."""
    hd = args.head_dim
    return {
        "wqkv": ((share.n_heads + 2 * share.n_kv_heads) * hd, args.dim),
        "wo": (args.dim, share.n_heads * hd),
        "w_gate_up": (2 * share.ffn_dim, args.dim),
        "w_down": (args.dim, share.ffn_dim),
        "output": (share.vocab_rows, args.dim),
    }


# ---------------------------------------------------------------------- per decode step
def step_bytes(args: ModelArgs, shares: list[RankShare], dtype: torch.dtype, bpw: dict[str, float],
               batch: int, context: float, kv_dtype: torch.dtype | None = None) -> dict:
    """Bytes one decode step reads (all ranks together and per rank) at ``context`` cached tokens;
    the KV cache holds ``kv_dtype`` elements (default ``dtype``)."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_elem = torch.empty((), dtype=kv_dtype or dtype).element_size()
    ranks = []
    for s in shares:
        shapes = linear_shapes(args, s)
        layers = sum(bpw[k] * o * i for k, (o, i) in shapes.items() if k != "output") * args.n_layers
        lm_head = bpw["output"] * shapes["output"][0] * shapes["output"][1]
        norms = (2 * args.n_layers + 1) * args.dim * elem
        embed_rows = batch * args.dim * elem
        kv = 2 * args.n_layers * s.n_kv_heads * args.head_dim * context * kv_elem * batch
        weights = layers + lm_head + norms + embed_rows
        ranks.append({"rank": s.rank, "weight_bytes": int(weights), "kv_bytes": int(kv),
                      "linear_bytes": int(layers), "lm_head_bytes": int(lm_head)})
    weights = sum(r["weight_bytes"] for r in ranks)
    kv = sum(r["kv_bytes"] for r in ranks)
    return {"weight_bytes": weights, "kv_bytes": kv, "total_bytes": weights + kv, "mean_context": context,
            "bytes_per_weight": bpw, "per_rank": ranks}


def mean_decode_context(input_len: int, output_len: int) -> float:
    """Mean number of cached tokens a decode step attends to: steps 1..output_len-1 each attend
    to input_len + step tokens."""
    steps = output_len - 1
    return input_len + (steps + 1) / 2 if steps > 0 else float(input_len)


# ---------------------------------------------------------------------- resident memory
def resident_bytes(args: ModelArgs, shares: list[RankShare], dtype: torch.dtype, quant: str | None,
                   batch: int, cache_len: int, auto_bpw: float | None = None) -> list[int]:
    """Bytes each rank keeps resident: its weights (the whole embedding table, replicated), a
    quantized lm_head copy when the embedding is tied, the KV cache and the process overhead."""
    elem = torch.empty((), dtype=dtype).element_size()
    bpw = analytic_bytes_per_weight(args, dtype, quant, auto_bpw)
    out = []
    for s in shares:
        shapes = linear_shapes(args, s)
        b = sum(bpw[k] * o * i for k, (o, i) in shapes.items() if k != "output") * args.n_layers
        b += args.vocab_size * args.dim * elem + (2 * args.n_layers + 1) * args.dim * elem
        if not args.tie_word_embeddings or bpw["output"] != elem:
            b += bpw["output"] * shapes["output"][0] * shapes["output"][1]
        b += 2 * args.n_layers * s.n_kv_heads * args.head_dim * cache_len * batch * elem
        out.append(int(b) + PROCESS_OVERHEAD_BYTES)
    return out


def hf_resident_bytes(args: ModelArgs, dtype: torch.dtype, batch: int, cache_len: int) -> int:
    """transformers' model in ``dtype`` (float: no quantization) plus its KV cache and overhead."""
    from ..parallel.plan import plan

    return resident_bytes(args, plan(args, 1), dtype, None, batch, cache_len)[0]


def check_fits(what: str, args: ModelArgs, shares: list[RankShare], dtype: torch.dtype, quant: str | None,
               batch: int, cache_len: int, hf: bool = False, probe_bytes: int = 0, auto_bpw: float | None = None) -> dict:
    """Refuse (ValueError with the arithmetic) a configuration that cannot fit in available RAM."""
    import psutil

    per_rank = resident_bytes(args, shares, dtype, quant, batch, cache_len, auto_bpw)
    need_tp = sum(per_rank) + probe_bytes
    need_hf = hf_resident_bytes(args, dtype, batch, cache_len) + probe_bytes if hf else 0
    need = max(need_tp, need_hf)
    avail = psutil.virtual_memory().available
    info = {"need_bytes": need, "available_bytes": avail, "per_rank_bytes": per_rank, "hf_bytes": need_hf}
    if need > avail:
        ranks = " + ".join(f"{b / GB:.2f}" for b in per_rank)
        dtype_name = str(dtype).removeprefix("torch.")
        lines = [
            f"{what} does not fit in this machine's memory: refusing before allocating anything.",
            f"  {len(shares)} rank(s) x (weights + KV cache of {batch} x {cache_len} tokens + "
            f"{PROCESS_OVERHEAD_BYTES / GB:.1f} GB process overhead), {dtype_name}"
            f"{', ' + quant if quant else ''}: {ranks} GB = {sum(per_rank) / GB:.2f} GB",
        ]
        params = n_params(args)
        lines.append(f"  ({params / 1e9:.2f} B parameters; the weights alone are "
                     f"{weight_bytes(args, dtype, quant, auto_bpw) / GB:.2f} GB in {dtype_name}{', ' + quant if quant else ''})")
        if probe_bytes:
            lines.append(f"  + bandwidth probe {probe_bytes / GB:.2f} GB")
        if hf:
            lines.append(f"  transformers comparison (float, one process): {need_hf / GB:.2f} GB")
        lines.append(f"  needed {need / GB:.2f} GB > available {avail / GB:.2f} GB "
                     f"(psutil.virtual_memory().available; total {psutil.virtual_memory().total / GB:.2f} GB)")
        hint = "try --dtype bfloat16, --quant int8/int4, shorter --input-len/--output-len or a smaller model"
        lines.append(f"  {hint}")
        raise ValueError("\n".join(lines))
    return info


def n_params(args: ModelArgs) -> int:
    hd = args.head_dim
    per_layer = (args.n_heads + 2 * args.n_kv_heads) * hd * args.dim + args.n_heads * hd * args.dim
    per_layer += 3 * args.ffn_dim * args.dim + 2 * args.dim
    head = 0 if args.tie_word_embeddings else args.vocab_size * args.dim
    return per_layer * args.n_layers + args.vocab_size * args.dim + head + args.dim


def weight_bytes(args: ModelArgs, dtype: torch.dtype, quant: str | None, auto_bpw: float | None = None) -> float:
    from ..parallel.plan import plan

    elem = torch.empty((), dtype=dtype).element_size()
    bpw = analytic_bytes_per_weight(args, dtype, quant, auto_bpw)
    shapes = linear_shapes(args, plan(args, 1)[0])
    b = sum(bpw[k] * o * i for k, (o, i) in shapes.items() if k != "output") * args.n_layers
    b += args.vocab_size * args.dim * elem
    if not args.tie_word_embeddings:
        b += bpw["output"] * args.vocab_size * args.dim
    return b


# ---------------------------------------------------------------------- resident memory of processes
def vm_hwm(pid: int) -> int | None:
    """Peak resident set size since the process started (VmHWM), bytes; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class RssSampler:
    """Samples the RSS of some processes in a thread; ``peaks`` maps rank -> max bytes seen."""

    def __init__(self, pids: dict[int, int], interval_s: float = 0.05):
        import psutil

        self.pids = dict(pids)
        self._procs = {}
        for rank, pid in self.pids.items():
            try:
                self._procs[rank] = psutil.Process(pid)
            except psutil.Error:
                pass
        self.peaks = {rank: 0 for rank in self.pids}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tpllama-rss", daemon=True)

    def _sample(self) -> None:
        for rank, p in self._procs.items():
            try:
                rss = p.memory_info().rss
            except Exception:  # a process gone (psutil.Error) or being torn down
                continue
            if rss > self.peaks[rank]:
                self.peaks[rank] = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> list[dict]:
        return [{"rank": r, "pid": self.pids[r], "peak_rss_bytes": int(self.peaks[r]), "vm_hwm_bytes": vm_hwm(self.pids[r])}
                for r in sorted(self.pids)]
