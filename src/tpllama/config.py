"""The two configuration objects.

``ModelArgs``: the architecture of a LLaMA-family model, and nothing else. Built from a Hugging
Face ``config.json`` (LLaMA-1/2/3 spellings, old ``rope_theta`` + ``rope_scaling`` and new
``rope_parameters``) or from GGUF metadata (``llama.*`` keys).

``EngineConfig``: every setting of an engine (model path, ranks, dtype, quantization, KV cache,
device, threads, timeout, batch and cache limits), validated once where it is made (flags or
``tpllama.load`` keywords) and sent whole to every rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
QUANT_SCHEMES = ("int8", "int4")  # stored forms of quantized linear layers (GGUF Q8_0 / Q4_1 layouts)
AUTO = "auto"  # quantization: keep a GGUF file's own Q8_0/Q4_0/Q4_1 blocks as they are; everything else float
KV_CACHE_CHOICES = ("auto", "float32", "float16")
COLLECTIVES = ("auto", "gloo")
DEFAULT_TIMEOUT_S = 60.0

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM")  # the second: LLaMA-1 conversions (decapoda)
LLAMA_MODEL_TYPES = ("llama",)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(ValueError):
    """A checkpoint's configuration is missing something or describes an unsupported model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled. ``rope_type`` is one of ROPE_TYPES."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Architecture of a LLaMA-family decoder."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope scaling type {self.rope_scaling.rope_type!r} is not supported; allowed: {ROPE_TYPES}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Build from the parsed ``config.json`` of an HF LLaMA checkpoint."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type not in LLAMA_MODEL_TYPES and not any(a in LLAMA_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"not a LLaMA-family checkpoint: model_type={model_type!r}, architectures={archs!r}; "
                f"supported: model_type in {LLAMA_MODEL_TYPES} or architectures in {LLAMA_ARCHITECTURES}"
            )
        for bias_key in ("attention_bias", "mlp_bias"):
            if cfg.get(bias_key):
                raise ConfigError(f"{bias_key}=true is not supported (LLaMA layers have no biases)")
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            ffn_dim = int(cfg["intermediate_size"])
            vocab_size = int(cfg["vocab_size"])
        except KeyError as missing:
            raise ConfigError(f"config.json lacks required key {missing}") from None
        n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        rope_theta, scaling = _rope_from_hf(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []) if int(e) >= 0)
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=vocab_size,
            ffn_dim=ffn_dim,
            head_dim=head_dim,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            # LLaMA-1 conversions (decapoda-research/llama-*-hf) spell it max_sequence_length
            max_seq_len=int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=_opt_int(cfg.get("bos_token_id")),
            eos_token_ids=eos_ids,
            pad_token_id=_opt_int(cfg.get("pad_token_id")),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_hf_config(cfg)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` describing this architecture (new-style rope_parameters)."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope.update(factor=self.rope_scaling.factor)
        if self.rope_scaling.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
            )
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
            "rope_parameters": rope,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> "ModelArgs":
        """Build from decoded GGUF key/values (``llama.*``, ``tokenizer.ggml.*``)."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"GGUF architecture {arch!r} is not supported; allowed: 'llama'")

        def need(key: str) -> Any:
            if key not in fields:
                raise ConfigError(f"GGUF metadata lacks required key {key!r}")
            return fields[key]

        dim = int(need("llama.embedding_length"))
        n_heads = int(need("llama.attention.head_count"))
        n_kv = int(fields.get("llama.attention.head_count_kv", n_heads))
        head_dim = int(fields.get("llama.attention.key_length", fields.get("llama.rope.dimension_count", dim // n_heads)))
        vocab = fields.get("llama.vocab_size")
        if vocab is None:
            vocab = need("tokenizer.ggml.tokens")  # the length of the token array
        scaling = RopeScaling()
        stype = fields.get("llama.rope.scaling.type")
        if stype in ("linear", "yarn"):
            if stype == "yarn":
                raise ConfigError("GGUF rope scaling 'yarn' is not supported; allowed: none, linear")
            scaling = RopeScaling("linear", factor=float(fields["llama.rope.scaling.factor"]))
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return cls(
            dim=dim,
            n_layers=int(need("llama.block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=int(vocab),
            ffn_dim=int(need("llama.feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(fields.get("llama.context_length", 2048)),
            tie_word_embeddings=bool(fields.get("_tied", False)),
            bos_token_id=_opt_int(fields.get("tokenizer.ggml.bos_token_id")),
            eos_token_ids=(int(eos),) if eos is not None else (),
            pad_token_id=_opt_int(fields.get("tokenizer.ggml.padding_token_id")),
        )


# ---------------------------------------------------------------------- engine settings
@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Every setting of an engine. ``validate()`` (called by every maker) checks each field and
    returns the normal form; the result is what every rank receives.

    model: an HF directory, a .gguf file or a cut directory; None = the default model.
    parts: the cut directory the ranks load (filled in on rank 0 before the ranks start; None
        for one rank reading the checkpoint directly).
    quant: None (float), "auto", "int8" or "int4". kv_cache: "auto", "float32" or "float16".
    threads: per rank (None: cores on this host / ranks on this host).
    max_batch: KV-cache slots, i.e. sequences decoded together (more wait for a slot); None: as
        many as are queued when the engine is idle.
    max_seq_len: tokens per sequence the KV cache holds (None: as needed, up to the model's context).
    collectives: "auto" (shared memory among the ranks of a host, TCP between hosts, both in C++)
        or "gloo" (torch.distributed's own, for comparison).
    iface: the network interface of this host's ranks (None: the one that routes to MASTER_ADDR;
        GLOO_SOCKET_IFNAME, when set, wins).
    shares: the ranks' relative speeds, one per rank (the split gives each rank that proportion of
        the weights; None: equal), or "auto": measured by every host at start (``tpllama probe``).
    """

    model: str | None = None
    world_size: int = 1
    dtype: str = "float32"
    quant: str | None = None
    kv_cache: str = "auto"
    device: str | None = None
    threads: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_batch: int | None = None
    max_seq_len: int | None = None
    collectives: str = "auto"
    iface: str | None = None
    shares: tuple[float, ...] | str | None = None
    progress: bool = False
    parts: str | None = None

    def validate(self) -> "EngineConfig":
        """The normal form of this config; ValueError naming the field and what is allowed."""
        dtype = str(self.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        quant = None if self.quant in (None, "", "none") else self.quant
        if quant is not None and quant != AUTO and quant not in QUANT_SCHEMES:
            raise ValueError(f"quantization {self.quant!r} is not supported; allowed: none, {AUTO}, {', '.join(QUANT_SCHEMES)}")
        kv = "auto" if self.kv_cache is None else self.kv_cache
        if kv not in KV_CACHE_CHOICES:
            raise ValueError(f"kv_cache {self.kv_cache!r} is not supported; allowed: {', '.join(KV_CACHE_CHOICES)}")
        for name, value in (("world_size", self.world_size), ("max_batch", 1 if self.max_batch is None else self.max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int)
                                             or self.max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        if self.collectives not in COLLECTIVES:
            raise ValueError(f"collectives {self.collectives!r} is not supported; allowed: {', '.join(COLLECTIVES)}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {t!r}")
        model = None if self.model is None else str(Path(self.model).expanduser())
        shares = parse_shares(self.shares, self.world_size)
        return dataclasses.replace(self, model=model, dtype=dtype, quant=quant, kv_cache=kv, timeout_s=float(t),
                                   shares=shares)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        fields = json.loads(text)
        if isinstance(fields.get("shares"), list):
            fields["shares"] = tuple(fields["shares"])
        return cls(**fields)


def parse_shares(value, world_size: int) -> tuple[float, ...] | str | None:
    """"3,1" / [3, 1] / "auto" / None -> the normal form (ValueError naming what is wrong)."""
    if value is None or value == "auto":
        return value
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        shares = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        raise ValueError(f"shares {value!r}: give one positive number per rank, e.g. 3,1, or auto") from None
    if len(shares) != world_size:
        raise ValueError(f"shares {value!r}: {len(shares)} number(s) for {world_size} rank(s); give one per rank")
    if any(not (s > 0 and math.isfinite(s)) for s in shares):
        raise ValueError(f"shares {value!r}: every share must be a positive number")
    return shares


def torch_dtype(name: str):
    """"float32" | "bfloat16" | "float16" (or a torch dtype) -> the torch dtype."""
    import torch

    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {', '.join(DTYPES)}")
    return getattr(torch, name)


def _opt_int(value: Any) -> int | None:
    """A token id, or None where there is none (LLaMA-1 configs write ``pad_token_id: -1``)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None or int(value) < 0 else int(value)


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Read rope theta and scaling from either spelling of an HF config."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if scaling is None:
        return float(theta if theta is not None else 10000.0), RopeScaling()
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope scaling type {rope_type!r} is not supported; allowed: {ROPE_TYPES}")
    if rope_type == "dynamic":
        raise ConfigError("rope scaling type 'dynamic' is not supported; allowed: default, linear, llama3")
    return float(theta if theta is not None else 10000.0), RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def rope_inv_freq(args: ModelArgs):
    """Inverse frequencies ``[head_dim // 2]`` float32, with the configured scaling applied.

    Computed in float32 exactly as transformers does, so positions rotate bit-identically.
    """
    import torch

    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim
    inv = 1.0 / (args.rope_theta**exponents)
    s = args.rope_scaling
    if s.rope_type == "linear":
        inv = inv / s.factor
    elif s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        mid = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(is_mid, mid, scaled)
    return inv
