"""The OpenAI wire format: request bodies, the error envelope, JSON checks, and turning a job's
tokens into text (``Output``) and logprobs, the same way for streaming and whole responses."""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sequence import SamplingParams


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# ---------------------------------------------------------------------- request bodies
class RequestBody(BaseModel):
    # strict: "1" is not an integer, true is not a number; ints are fine for floats
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[dict[str, Any]] = None
    ignore_eos: Optional[bool] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, Any]] = None


class CompletionRequest(RequestBody):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None


class ChatRequest(RequestBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None


# ---------------------------------------------------------------------- JSON checks
def reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON numbers")


def not_unicode(value) -> str | None:
    """The path (``messages.0.content``) of the first string of a parsed JSON body, key or value,
    that cannot be encoded as UTF-8 (JSON allows lone surrogate escapes; text cannot hold them);
    None when every string is fine."""
    stack = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return path
        elif isinstance(v, dict):
            for k, item in v.items():
                key_path = f"{path}.{k}" if path else str(k)
                if not_unicode(k) is not None:
                    return path or "body"
                stack.append((item, key_path))
        elif isinstance(v, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(v))
    return None


# ---------------------------------------------------------------------- output
class Detokenizer:
    """Token ids to text for responses (or ``token_id:N`` pieces without a tokenizer)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def piece(self, tok: int) -> str:
        if self.tok is None:
            return f"token_id:{tok}"
        return self.tok.decode([tok], skip_special_tokens=False)

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.tok is not None else ""


class Output:
    """Turns a job's tokens into text, incrementally (each token decodes only a short window):
    text is held back while it could still become a stop string or an incomplete UTF-8
    character, and truncated before the first stop string at the end. Streaming and
    non-streaming responses both go through it, so they agree."""

    def __init__(self, detok: Detokenizer, eos_ids, params: SamplingParams):
        self.detok = detok
        self.eos_ids = frozenset(eos_ids)
        self.params = params
        self.ids: list[int] = []
        self.lps: list[dict] = []
        self.acc = ""  # the text of ids[:read_offset]
        self.prefix_offset = 0
        self.read_offset = 0
        self.sent = ""
        self.sent_lps = 0
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.finish: str | None = None

    def add(self, tok: int, lp: dict | None) -> None:
        self.ids.append(tok)
        if lp is not None:
            self.lps.append(lp)

    def _advance(self) -> None:
        if self.detok.tok is None or self.read_offset >= len(self.ids):
            return
        prefix = self.detok.text(self.ids[self.prefix_offset : self.read_offset])
        text = self.detok.text(self.ids[self.prefix_offset :])
        if self.finish is not None or (len(text) > len(prefix) and not text.endswith("\ufffd")):
            self.acc += text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def _visible_ids(self) -> list[int]:
        ids = self.ids
        if self.finish == "stop" and ids and ids[-1] in self.eos_ids and not self.params.ignore_eos:
            ids = ids[:-1]
        return ids

    def full_text(self) -> str:
        self._advance()
        text = self.acc
        if self.finish is not None and self.params.stop:
            cut = [text.find(s) for s in self.params.stop if s in text]
            if cut:
                text = text[: min(cut)]
        return text

    def new_text(self) -> str:
        """Text that is final now and was not handed out yet."""
        text = self.full_text()
        if self.finish is None and self.holdback:
            text = text[: max(0, len(text) - self.holdback)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new = text[len(self.sent) :]
        self.sent = text
        return new

    def visible_lps(self) -> list[dict]:
        return self.lps[: len(self._visible_ids())]

    def new_lps(self) -> list[dict]:
        """Logprob entries not handed out yet (all of them once finished)."""
        lps = self.visible_lps()
        out = lps[self.sent_lps :]
        self.sent_lps = len(lps)
        return out


def completion_logprobs(detok: Detokenizer, lps: list[dict], k: int, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for e in lps:
        piece = detok.piece(e["token"])
        tokens.append(piece)
        values.append(e["logprob"])
        tops.append({detok.piece(t): v for t, v in e["top"][:k]} if k else None)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(detok: Detokenizer, lps: list[dict], k: int) -> dict:
    def one(t: int, v: float) -> dict:
        piece = detok.piece(t)
        return {"token": piece, "logprob": v, "bytes": list(piece.encode("utf-8"))}

    content = [dict(one(e["token"], e["logprob"]), top_logprobs=[one(t, v) for t, v in e["top"][:k]]) for e in lps]
    return {"content": content, "refusal": None}


def usage(prompt_len: int, completion_len: int) -> dict:
    return {"prompt_tokens": prompt_len, "completion_tokens": completion_len, "total_tokens": prompt_len + completion_len}
