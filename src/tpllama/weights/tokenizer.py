"""Tokenizers: ids in, text out, chat template.

Two kinds, behind one interface (``Tokenizer``):

- ``FastTokenizer``: a ``tokenizer.json`` read by the ``tokenizers`` library itself, with the
  special tokens and chat template of ``tokenizer_config.json`` (what transformers' fast
  tokenizers do, without importing transformers: start-up pays tens of milliseconds, not a
  second and a half). A GGUF file's own vocabulary is converted once by transformers and cached
  as ``tokenizer.json``;
- ``SentencePieceTokenizer``: a sentencepiece ``tokenizer.model`` with no ``tokenizer.json``
  beside it (LLaMA-1 and -2 checkpoints such as decapoda-research/llama-13b-hf), read by
  sentencepiece itself: transformers would have to convert it (protobuf, a known class name), and
  LLaMA-1 checkpoints name a class it does not know (``LLaMATokenizer``).

Special token ids come from the tokenizer, not from ``config.json``: LLaMA-1 conversions carry
wrong ones there (bos 0 / eos 1, where the tokenizer's are 1 and 2). ``special_ids`` decides.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

from .staging import StagedWrite

log = logging.getLogger("tpllama")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class Tokenizer:
    """The interface every tokenizer offers. ``*_id`` are None where the tokenizer has none."""

    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return () if self.eos_id is None else (self.eos_id,)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def max_token_chars(self) -> int:
        """An upper bound on the characters of text one token stands for (for cheap length checks)."""
        raise NotImplementedError

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` under the model's chat template (plain concatenation without one)."""
        if not self.has_chat_template:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return self.encode(text)
        return self._render_chat(messages, add_generation_prompt)

    def special_strings(self) -> dict[str, str]:
        """The template's special-token variables (``bos_token``, ``eos_token``, ...)."""
        return {}

    def _encode_rendered(self, text: str) -> list[int]:
        """The ids of a rendered chat (its special tokens are in the text already)."""
        return self.encode(text, add_special_tokens=False)

    def _render_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return self._encode_rendered(render_chat_template(self.chat_template, messages, add_generation_prompt,
                                                          self.special_strings()))


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, specials: dict) -> str:
    """A chat template rendered as transformers renders it (see ``compile_chat_template``)."""
    return compile_chat_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  tools=None, documents=None, **specials)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str):
    """The jinja2 template, compiled once per template text (every chat request renders it): a
    sandboxed environment with trim_blocks, lstrip_blocks, loop controls, ``tojson``,
    ``raise_exception`` and ``strftime_now``, as transformers sets it up."""
    import datetime
    import json as _json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class FastTokenizer(Tokenizer):
    """A ``tokenizer.json`` read by the ``tokenizers`` library (see the module docstring)."""

    def __init__(self, tokenizer_file: Path, config: dict, chat_template: str | None):
        import tokenizers

        self.tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self.specials: dict[str, str] = {}
        for name in ("bos", "eos", "unk", "pad"):
            text = _token_string(config.get(f"{name}_token"))
            tid = self.tok.token_to_id(text) if text is not None else None
            setattr(self, f"{name}_id", tid)
            if text is not None:
                self.specials[f"{name}_token"] = text
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template = chat_template or (template if isinstance(template, str) else None)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._max_chars: int | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: 0.12 s per 300 000
        # characters during which a server's event loop could not run); same ids
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def max_token_chars(self) -> int:
        # vocabulary strings spell byte-level BPE one character per byte, and sentencepiece
        # pieces one character per character: either way no shorter than the text they stand for
        if self._max_chars is None:
            self._max_chars = max(len(t) for t in self.tok.get_vocab(with_added_tokens=True))
        return self._max_chars

    def special_strings(self) -> dict[str, str]:
        return dict(self.specials)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` read by sentencepiece: ids exactly as
    ``SentencePieceProcessor.encode``/``decode`` give them, BOS prepended as LLaMA did
    (``add_bos_token`` / ``add_eos_token`` of ``tokenizer_config.json``, default BOS only)."""

    def __init__(self, model_file: Path, tokenizer_config: dict | None = None, chat_template: str | None = None):
        import sentencepiece

        cfg = tokenizer_config or {}
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        for name, value in (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()), ("unk", self.sp.unk_id()),
                            ("pad", self.sp.pad_id())):
            setattr(self, f"{name}_id", value if value >= 0 else None)
        self.add_bos = bool(cfg.get("add_bos_token", True)) and self.bos_id is not None
        self.add_eos = bool(cfg.get("add_eos_token", False)) and self.eos_id is not None
        self.chat_template = chat_template or (cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None)
        self._max_chars: int | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self.sp.encode(text))
        if add_special_tokens:
            ids = ([self.bos_id] if self.add_bos else []) + ids + ([self.eos_id] if self.add_eos else [])
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            # control tokens (<s>, </s>) decode to nothing in sentencepiece: spell them out
            out, run = [], []
            for i in ids:
                if self.sp.is_control(i):
                    out.append(self.sp.decode(run))
                    out.append(self.sp.id_to_piece(i))
                    run = []
                else:
                    run.append(i)
            return "".join(out) + self.sp.decode(run)
        return self.sp.decode(ids)

    def max_token_chars(self) -> int:
        if self._max_chars is None:
            self._max_chars = max(len(self.sp.id_to_piece(i)) for i in range(self.sp.get_piece_size()))
        return self._max_chars

    def special_strings(self) -> dict[str, str]:
        piece = self.sp.id_to_piece
        return {"bos_token": piece(self.bos_id) if self.bos_id is not None else "",
                "eos_token": piece(self.eos_id) if self.eos_id is not None else ""}

    def _encode_rendered(self, text: str) -> list[int]:
        # the template writes <s>/</s> as text; sentencepiece would spell them out letter by letter
        piece = self.sp.id_to_piece
        specials = {piece(i): i for i in (self.bos_id, self.eos_id) if i is not None}
        ids: list[int] = []
        for chunk in _split_keep(text, list(specials)):
            ids.extend([specials[chunk]] if chunk in specials else self.sp.encode(chunk) if chunk else [])
        return ids


def _split_keep(text: str, separators: list[str]) -> list[str]:
    """``text`` cut around every occurrence of any separator, separators kept as their own pieces."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        hit = next((s for s in separators if s and text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        pieces.extend([text[start:i], hit])
        i += len(hit)
        start = i
    pieces.append(text[start:])
    return pieces


# ---------------------------------------------------------------------- special ids
def special_ids(config_eos: tuple[int, ...], config_pad: int | None, tokenizer: Tokenizer | None,
                vocab_size: int) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a model. The tokenizer's own EOS always counts; an id from
    ``config.json`` is kept only where it is inside the vocabulary and the tokenizer does not give
    it another role (LLaMA-1 conversions say eos 1, which is the tokenizer's BOS). The pad id:
    the config's (unless it is the BOS), else the tokenizer's, else the first EOS, else 0."""
    bos = {tokenizer.bos_id} - {None} if tokenizer is not None else set()
    not_eos = bos | ({tokenizer.unk_id} - {None} if tokenizer is not None else set())
    eos = set(tokenizer.eos_ids) if tokenizer is not None else set()
    for e in config_eos:
        if e in not_eos or not 0 <= e < vocab_size:
            log.info("ignoring config.json's eos_token_id %d (the tokenizer's BOS/UNK, or outside the vocabulary "
                        "of %d); EOS ids: %s", e, vocab_size, sorted(eos) or "none")
            continue
        eos.add(e)
    eos_ids = tuple(sorted(eos))
    pad = config_pad if config_pad is not None and 0 <= config_pad < vocab_size and config_pad not in bos else None
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


# ---------------------------------------------------------------------- loading
def _quiet_transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring %s: %s", path, err)
        return {}
    return value if isinstance(value, dict) else {}


def load_tokenizer(directory: Path) -> Tokenizer | None:
    """The tokenizer saved in ``directory``, or None when it holds no tokenizer files."""
    template_file = directory / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else None
    config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
    if (directory / "tokenizer.json").is_file():
        return FastTokenizer(directory / "tokenizer.json", config, template)
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer(directory / "tokenizer.model", config, template)
    return None


def gguf_tokenizer_dir(gguf_path: Path, cache_dir: Path) -> Path | None:
    """A directory with tokenizer files converted from the GGUF's vocabulary (cached by file
    identity). None if the GGUF carries no vocabulary."""
    import hashlib

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "tokenizers" / key
    if has_tokenizer_files(target):
        return target
    with StagedWrite(target) as staged:
        if has_tokenizer_files(target):  # another process converted it while we waited
            return target
        _quiet_transformers()
        from transformers import AutoTokenizer

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
        except Exception as err:  # no vocabulary, or one transformers cannot convert
            log.warning("no tokenizer from %s: %s", gguf_path, err)
            return None
        tmp = staged.temp_dir()
        tok.save_pretrained(str(tmp))
        staged.publish(tmp)
    return target


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy whatever tokenizer files ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
