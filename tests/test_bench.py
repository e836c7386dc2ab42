"""``tpllama bench``: end to end on tiny models, its JSON, synthetic models and refusals.

No timing thresholds: only that every figure is there, positive and consistent."""

from __future__ import annotations

import json
import math

import pytest

from helpers import make_tiny_hf
from tpllama.cli import main

TABLE_HEADER = "| hardware | input length | output length | decode speed |"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_row(row: dict, repeat: int, ranks: int) -> None:
    for key in ("decode_tok_s", "decode_s", "prefill_s", "prefill_tok_s", "ttft_s", "latency_p50_s", "latency_p90_s",
                "latency_max_s", "achieved_gbps", "roofline_gbps", "roofline_pct", "steps_per_s"):
        assert _positive(row[key]), (key, row[key])
    assert row["latency_p50_s"] <= row["latency_p90_s"] <= row["latency_max_s"]
    assert row["ttft_s"] <= row["prefill_s"] + 1e-9
    assert row["repetitions"] == repeat and len(row["runs"]) == repeat
    for run in row["runs"]:
        assert run["latency_p50_s"] <= run["latency_p90_s"] <= run["latency_max_s"]
        assert _positive(run["decode_tok_s"])
    assert row["decode_steps"] == row["output_len"] - 1
    assert row["prefill_tok_s"] == pytest.approx(row["batch"] * row["input_len"] / row["prefill_s"])
    # bytes per step x steps per second = achieved; achieved / probe = % of roofline
    bps = row["bytes_per_step"]
    assert bps["total_bytes"] == bps["weight_bytes"] + bps["kv_bytes"]
    assert _positive(bps["weight_bytes"]) and _positive(bps["kv_bytes"])
    assert len(bps["per_rank"]) == ranks
    assert sum(r["weight_bytes"] for r in bps["per_rank"]) == bps["weight_bytes"]
    assert row["steps_per_s"] == pytest.approx(row["decode_tok_s"] / row["batch"])
    assert row["achieved_gbps"] == pytest.approx(bps["total_bytes"] * row["steps_per_s"] / 1e9)
    assert row["roofline_pct"] == pytest.approx(100 * row["achieved_gbps"] / row["roofline_gbps"])
    assert _positive(row["probe"]["gbps"]) and row["probe"]["gbps"] == max(row["probe"]["runs_gbps"])
    mem = row["memory"]
    assert [m["rank"] for m in mem] == list(range(len(mem)))
    for m in mem:
        assert _positive(m["peak_rss_bytes"]) and m["peak_rss_bytes"] > 10 << 20  # at least torch itself
        # VmHWM (kernel's peak) vs sampled RSS: the kernel's counters lag a little, so not exact
        assert m["vm_hwm_bytes"] is None or m["vm_hwm_bytes"] >= 0.9 * m["peak_rss_bytes"]


def test_bench_compare_hf_end_to_end(tmp_path, capsys):
    model_dir = make_tiny_hf(tmp_path / "tiny", "gqa6", tie_word_embeddings=False)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(model_dir), "--world-size", "1", "--input-len", "12", "--output-len", "6",
               "--repeat", "3", "--compare", "hf", "--probe-mib", "16", "--no-progress", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert TABLE_HEADER in captured.out
    assert "tpllama / transformers" in captured.out
    assert "rank 0/1" in captured.out and "thread(s)" in captured.out
    data = json.loads(out.read_text())
    assert not list(tmp_path.glob(".bench.json*"))  # the temp file was renamed
    assert data["config"]["input_len"] == 12 and data["config"]["output_len"] == 6 and data["config"]["batch"] == 1
    assert data["layout"]["world_size"] == 1 and data["layout"]["threads_total"] >= 1
    tp, hf = data["rows"]
    assert (tp["engine"], hf["engine"]) == ("tpllama", "transformers")
    _check_row(tp, 3, 1)
    _check_row(hf, 3, 1)
    assert hf["threads_total"] == tp["threads_total"]
    ratio = data["ratio"]
    assert ratio["decode_speed"] == pytest.approx(tp["decode_tok_s"] / hf["decode_tok_s"])
    assert ratio["prefill_speed"] == pytest.approx(tp["prefill_tok_s"] / hf["prefill_tok_s"])
    assert ratio["ttft"] == pytest.approx(tp["ttft_s"] / hf["ttft_s"])
    # weights read per decode step: every linear layer + norms + lm_head, one embedding row (float32)
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(str(model_dir))
    n = sum(p.numel() for name, p in ref.named_parameters() if "embed_tokens" not in name)
    expected = 4 * (n + ref.config.hidden_size)
    assert tp["bytes_per_step"]["weight_bytes"] == expected
    assert hf["bytes_per_step"]["weight_bytes"] == expected
    kv = 2 * ref.config.num_hidden_layers * ref.config.num_key_value_heads * 16 * 4 * tp["bytes_per_step"]["mean_context"]
    assert tp["bytes_per_step"]["kv_bytes"] == int(kv)


def test_bench_synthetic_world_size_2(tmp_path, capsys):
    # the shared cache (as other tests' cuts): the synthetic parts and compiled extensions are reused
    from tpllama.env import cache_dir

    out = tmp_path / "synthetic.json"
    rc = main(["bench", "--synthetic", "smollm2-135m", "--world-size", "2", "--dtype", "bfloat16", "--input-len", "8",
               "--output-len", "3", "--repeat", "1", "--warmup", "0", "--probe-mib", "16", "--no-progress",
               "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert TABLE_HEADER in captured.out
    data = json.loads(out.read_text())
    assert data["config"]["synthetic"] == "smollm2-135m"
    assert data["config"]["model_args"]["dim"] == 576 and data["config"]["model_args"]["n_layers"] == 30
    assert data["config"]["prompts"] == "random token ids"
    assert len(data["layout"]["shares"]) == 2
    (row,) = data["rows"]
    _check_row(row, 1, 2)
    assert len(row["memory"]) == 2 and row["memory"][1]["pid"] != row["memory"][0]["pid"]
    assert data["ratio"] is None
    # the synthetic model was written as a cut directory into the cache, one part per rank
    parts = list((cache_dir() / "synthetic").glob("smollm2-135m-tp2-bfloat16-none-*"))
    assert len(parts) == 1 and (parts[0] / "manifest.json").is_file()
    manifest = json.loads((parts[0] / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["hidden_size"] == 576


def test_bench_refuses_13b_float32_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPLLAMA_CACHE", str(tmp_path / "cache"))
    rc = main(["bench", "--synthetic", "llama-13b", "--dtype", "float32", "--world-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not fit" in err and "available" in err and "GB" in err
    assert "13.02 B parameters" in err and "52.06 GB in float32" in err
    assert not (tmp_path / "cache" / "synthetic").exists()  # nothing written


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--compare", "vllm"], "--compare"),
        (["--output-len", "1"], "--output-len"),
        (["--input-len", "0"], "--input-len"),
        (["--repeat", "0"], "--repeat"),
        (["--batch", "0"], "--batch"),
        (["--synthetic", "llama-70b"], "--synthetic"),
        (["--synthetic", "smollm2-135m", "--model", "x"], "either --model or --synthetic"),
        (["--synthetic", "smollm2-135m", "--world-size", "10"], "query heads"),
        (["--synthetic", "llama-7b", "--input-len", "2000", "--output-len", "100"], "context length 2048"),
        (["--synthetic", "smollm2-135m", "--dtype", "float64"], "float64"),
        (["--synthetic", "smollm2-135m", "--json", "/nonexistent-dir/x.json"], "does not exist"),
    ],
)
def test_bench_bad_flags(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPLLAMA_CACHE", str(tmp_path / "cache"))
    rc = main(["bench", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert not (tmp_path / "cache" / "synthetic").exists()
