"""The generate contract: padding, masks, EOS handling, sampling."""

import pytest
import torch

import tpllama


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    with tpllama.load(tiny_dirs["mqa5"]) as e:
        yield e


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (n,), generator=g).tolist() for n in (7, 12, 3)]


def left_pad(prompts, pad=0):
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad, dtype=torch.int64)
    mask = torch.zeros(len(prompts), S, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        mask[b, S - len(p):] = 1
    return ids, mask


def hf_4d_mask(mask2d: torch.Tensor) -> torch.Tensor:
    """The additive [B, 1, S, S] float32 mask transformers' LLaMA builds from a padding mask."""
    B, S = mask2d.shape
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None] & mask2d.bool()[:, None, :]
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None].float()


def test_left_padded_batch_equals_rows_alone(engine):
    prompts = rows()
    ids, mask = left_pad(prompts)
    batched = engine.generate(ids, attention_mask=mask, max_new_tokens=24, ignore_eos=True)
    for b, p in enumerate(prompts):
        alone = engine.generate(torch.tensor([p]), max_new_tokens=24, ignore_eos=True)
        assert batched[b, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()
        assert torch.equal(batched[b, : ids.shape[1]], ids[b])


def test_4d_additive_mask_equals_2d_mask(engine):
    ids, mask = left_pad(rows(1))
    two_d = engine.generate(ids, attention_mask=mask, max_new_tokens=16)
    four_d = engine.generate(ids, attention_mask=hf_4d_mask(mask), max_new_tokens=16)
    minus_inf = hf_4d_mask(mask).masked_fill(hf_4d_mask(mask) < 0, float("-inf"))
    assert torch.equal(two_d, four_d)
    assert torch.equal(two_d, engine.generate(ids, attention_mask=minus_inf, max_new_tokens=16))


def test_output_shape_and_padding_after_eos(engine):
    prompts = rows(2)
    ids, mask = left_pad(prompts)
    free = engine.generate(ids, attention_mask=mask, max_new_tokens=20, ignore_eos=True)
    # make a token row 0 generates (first seen at index k >= 1) the EOS: it must stop there, padded after
    gen = free[0, ids.shape[1]:].tolist()
    k = next(i for i in range(1, len(gen)) if gen[i] not in gen[:i])
    eos = gen[k]
    engine.eos_ids = (eos,)
    try:
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=20)
    finally:
        engine.eos_ids = (2,)
    assert out.dtype == torch.int64 and out.shape[0] == 3
    gen0 = out[0, ids.shape[1]:].tolist()
    assert gen0[: k + 1] == gen[: k + 1] and all(t == engine.pad_id for t in gen0[k + 1:])
    assert out.shape[1] >= ids.shape[1] + k + 1


def test_seeded_sampling_is_reproducible(engine):
    ids = torch.tensor([rows()[0]])
    kw = dict(max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.1, ignore_eos=True)
    a = engine.generate(ids, seed=7, **kw)
    b = engine.generate(ids, seed=7, **kw)
    c = engine.generate(ids, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = engine.generate(ids, max_new_tokens=20, ignore_eos=True)
    assert torch.equal(engine.generate(ids, temperature=1.0, top_k=1, max_new_tokens=20, ignore_eos=True), greedy)


def test_top_p_tiny_keeps_only_the_best_token(engine):
    ids = torch.tensor([rows()[1]])
    greedy = engine.generate(ids, max_new_tokens=10, ignore_eos=True)
    assert torch.equal(engine.generate(ids, temperature=1.0, top_p=1e-6, seed=3, max_new_tokens=10, ignore_eos=True), greedy)


def test_repetition_penalty_changes_greedy_output(engine):
    ids = torch.tensor([rows()[0]])
    plain = engine.generate(ids, max_new_tokens=30, ignore_eos=True)
    penalized = engine.generate(ids, max_new_tokens=30, repetition_penalty=5.0, ignore_eos=True)
    assert not torch.equal(plain, penalized)
    gen = penalized[0, ids.shape[1]:].tolist()
    assert len(set(gen)) > len(set(plain[0, ids.shape[1]:].tolist())) or gen != plain[0, ids.shape[1]:].tolist()


def test_stop_strings_on_default_model(smol_gguf):
    with tpllama.load(smol_gguf) as e:
        ids = e.encode_chat([{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
        full = e.tokenizer.decode(e.generate(torch.tensor([ids]), max_new_tokens=40)[0, len(ids):])
        assert "5" in full
        out = e.generate(torch.tensor([ids]), max_new_tokens=40, stop=["5"])
        text = e.tokenizer.decode(out[0, len(ids):])
        assert text.rstrip().endswith("5") and len(text) < len(full)


# ---------------------------------------------------------------------- the one loop
def _counting_forward(engine):
    """Wrap the runner's forward; returns the list of (B, T) shapes it is called with."""
    calls = []
    real = engine.runner.forward

    def forward(tokens, positions, rows):
        calls.append(tuple(tokens.shape))
        return real(tokens, positions, rows)

    engine.runner.forward = forward
    return calls, real


def test_equal_length_prompts_prefill_in_one_forward(engine):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 120, (9,), generator=g).tolist() for _ in range(3)]
    alone = [engine.generate(torch.tensor([p]), max_new_tokens=12, ignore_eos=True)[0, 9:].tolist() for p in prompts]
    calls, real = _counting_forward(engine)
    try:
        together = engine.generate(torch.tensor(prompts), max_new_tokens=12, ignore_eos=True)
    finally:
        engine.runner.forward = real
    assert [c for c in calls if c[1] > 1] == [(3, 9)]  # one prefill forward for the three prompts
    assert [together[b, 9:].tolist() for b in range(3)] == alone


def test_add_step_abort(engine):
    params = engine.sampling_params(6, ignore_eos=True)
    a = engine.add([5, 6, 7], params)
    b = engine.add([8, 9], params)
    made = engine.step()  # both prefilled (each its first token) and one decode step for both
    assert [s for s, _ in made].count(a) == 2 and [s for s, _ in made].count(b) == 2
    engine.abort(a)
    assert a.finish_reason == "abort" and engine.scheduler.running == [b]
    while engine.has_work():
        engine.step()
    assert b.finish_reason == "length" and len(b.generated) == 6 and len(a.generated) == 2
    alone = engine.generate(torch.tensor([[8, 9]]), max_new_tokens=6, ignore_eos=True)[0, 2:].tolist()
    assert b.generated == alone


def test_max_batch_makes_sequences_wait_for_a_slot(tiny_dirs):
    prompts = rows(3)
    ids, mask = left_pad(prompts)
    with tpllama.load(tiny_dirs["mqa5"]) as free:
        want = free.generate(ids, attention_mask=mask, max_new_tokens=10, ignore_eos=True)
    with tpllama.load(tiny_dirs["mqa5"], max_batch=1) as one:
        seen = []
        real = one.step

        def step():
            out = real()
            seen.append(len(one.scheduler.running) + sum(1 for s, _ in out if s.done))
            return out

        one.step = step
        got = one.generate(ids, attention_mask=mask, max_new_tokens=10, ignore_eos=True)
        assert one.runner.model.cache.slots == 1 and max(seen) == 1
    assert torch.equal(got, want)
