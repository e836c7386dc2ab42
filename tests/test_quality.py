"""tpllama quality's measurement: teacher-forced greedy agreement through the decode steps."""

import torch

import tpllama
from tpllama.bench.quality import agreement, greedy_choices, reference_answers


def _prompts():
    g = torch.Generator().manual_seed(8)
    return [torch.randint(3, 140, (n,), generator=g).tolist() for n in (7, 12, 20)]


def test_float_agrees_with_itself_and_choices_match_generation(tiny_dirs):
    prompts = _prompts()
    with tpllama.load(tiny_dirs["q32"]) as engine:
        answers = reference_answers(engine, prompts, max_new_tokens=10)
        assert all(len(a) == 10 for a in answers)  # the tiny config has no reachable EOS here
        # teacher forcing with the model's own answer reproduces that answer token for token
        assert greedy_choices(engine, prompts[0], answers[0]) == answers[0]
        assert agreement(engine, prompts, answers) == (30, 30)


def test_quantized_agreement_is_counted_per_position(tiny_dirs):
    prompts = _prompts()
    with tpllama.load(tiny_dirs["q32"]) as engine:
        answers = reference_answers(engine, prompts, max_new_tokens=10)
    with tpllama.load(tiny_dirs["q32"], quant="int4") as engine:
        same, total = agreement(engine, prompts, answers)
        choices = [greedy_choices(engine, p, a) for p, a in zip(prompts, answers)]
    assert total == 30
    assert same == sum(int(c == t) for cs, ans in zip(choices, answers) for c, t in zip(cs, ans))
    assert 0 < same <= total
