"""Tokenizers: from an HF directory (tokenizer.json or sentencepiece tokenizer.model) or built
from a GGUF file's own vocabulary (converted once by transformers, then cached as tokenizer.json).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

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
    """A thin wrapper over a transformers tokenizer: ids in, text out, chat template."""

    def __init__(self, hf_tokenizer, eos_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        ids = set(eos_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        self.eos_ids = tuple(sorted(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` under the model's chat template (plain concatenation without one)."""
        if not self.has_chat_template:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return self.encode(text)
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def save(self, directory: Path) -> None:
        self.hf.save_pretrained(str(directory))


def _quiet_transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file()


def load_hf_tokenizer(directory: Path, eos_ids: tuple[int, ...] = ()) -> Tokenizer | None:
    """The tokenizer saved in ``directory``, or None when it holds no tokenizer files."""
    if not has_tokenizer_files(directory):
        return None
    _quiet_transformers()
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return Tokenizer(tok, eos_ids)


def gguf_tokenizer_dir(gguf_path: Path, cache_dir: Path) -> Path | None:
    """A directory with tokenizer files converted from the GGUF's vocabulary (cached by file
    identity). None if the GGUF carries no vocabulary."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "tokenizers" / key
    if has_tokenizer_files(target):
        return target
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    except Exception as err:  # no vocabulary, or one transformers cannot convert
        logging.getLogger("tpllama").warning("no tokenizer from %s: %s", gguf_path, err)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process got there first
    return target


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy whatever tokenizer files ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
