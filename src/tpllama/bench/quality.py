"""``tpllama quality``: how often a quantized model picks float32's greedy token.

Teacher-forced: float32 greedily answers each question; the quantized model then reads the same
tokens, one decode step at a time as in generation, and we count the positions where its own
greedy choice equals float32's next token. Every position is measured independently (one early
disagreement does not derail the rest).
"""

from __future__ import annotations

import json


def reference_answers(engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Float32's greedy continuation of each prompt (stops at EOS)."""
    out = []
    for ids in prompts:
        gen = list(engine.stream(ids, max_new_tokens=max_new_tokens))
        out.append(gen)
    return out


def greedy_choices(engine, ids: list[int], answer: list[int]) -> list[int]:
    """The engine's argmax after each prefix prompt + answer[:i], i = 0..len(answer)-1 (one
    rank), computed exactly as generation does: the prompt prefilled, then one decode step per
    answer token (the fused quantized blocks, with int8-quantized activations)."""
    import torch

    runner = engine.runner
    runner.ensure_cache(1, len(ids) + len(answer) + 1)
    with torch.inference_mode():
        choices = [int(runner.forward(torch.tensor([ids]), torch.arange(len(ids))[None], slice(0, 1))[0, -1].argmax())]
        for i, tok in enumerate(answer[:-1]):
            pos = torch.tensor([[len(ids) + i]])
            choices.append(int(runner.forward(torch.tensor([[tok]]), pos, slice(0, 1))[0, -1].argmax()))
    return choices


def agreement(engine, prompts: list[list[int]], answers: list[list[int]]) -> tuple[int, int]:
    same = total = 0
    for ids, ans in zip(prompts, answers):
        if not ans:
            continue
        choices = greedy_choices(engine, ids, ans)
        same += sum(int(a == b) for a, b in zip(choices, ans))
        total += len(ans)
    return same, total


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--quant", nargs="+", default=["int8", "int4", "auto"], help="schemes to compare with float32")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", default=None, help="questions file (default: the 16 packaged ones)")
    p.add_argument("--json", default=None, help="also write the figures here")


def main(a) -> int:
    from ..cli import read_prompts
    from ..engine.load import load

    questions = read_prompts(a.prompts)
    with load(a.model) as ref:
        if ref.tokenizer is None:
            raise ValueError("quality needs a tokenizer to build the chat prompts")
        prompts = [ref.encode_chat([{"role": "user", "content": q}]) for q in questions]
        answers = reference_answers(ref, prompts, a.max_new_tokens)
    rows = []
    for scheme in a.quant:
        with load(a.model, quant=scheme) as engine:
            same, total = agreement(engine, prompts, answers)
            kv = engine.info["kv_cache"]
        rows.append({"quant": scheme, "kv_cache": kv, "agree": same, "tokens": total,
                     "agreement": same / max(1, total)})
    print("| quant | KV cache | tokens compared | same greedy token as float32 |")
    print("|:--|:--|--:|--:|")
    for r in rows:
        print(f"| {r['quant']} | {r['kv_cache']} | {r['tokens']} | {100 * r['agreement']:.1f}% |")
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(json.dumps({"prompts": len(prompts), "rows": rows}, indent=2))
    return 0
