"""Roofline analysis: textbook figures, analytic vs XLA cost analysis, CLI table and plot."""

from __future__ import annotations

import argparse
import json

import pytest

from jaxllm.cli import add_roofline_parser
from jaxllm.config import ModelConfig
from jaxllm.hardware import HARDWARE, get_hardware, measure_cpu, textbook_a100_ridge
from jaxllm.named_configs import NAMED_CONFIGS
from jaxllm.roofline import (LINEAR_OPS, analyze, compare_with_xla, format_xla_comparison,
                             phase_ops, resolve_model_config, textbook_figures)

TINY = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=32)


def _close(x, want, rel=0.01):
    assert abs(x - want) <= rel * abs(want), (x, want)


def test_textbook_figures_within_1_percent():
    f = textbook_figures()  # B=8, T=1024, H=4096, D=128, H'=11008, fp16
    _close(f["prefill_linear"], 2730)
    _close(f["prefill_attention"], 114.7)
    _close(f["decode_linear"], 8.0)
    _close(f["decode_attention"], 1.0)
    _close(f["a100_ridge"], 142.5)
    _close(textbook_a100_ridge(), 142.5)
    # the SI ridge of the same part, which the hardware table uses
    _close(HARDWARE["A100-80G"].ridge("bf16"), 153.0)
    _close(f["a100_ridge_si"], 153.0)


def test_hardware_table():
    assert get_hardware("h100").name == "H100-SXM"
    _close(get_hardware("H100-SXM").ridge("bf16"), 989.4 / 3.35)
    assert get_hardware("TPU-v5e").peak("int8") == 2 * get_hardware("TPU-v5e").peak("bf16")
    with pytest.raises(ValueError):
        get_hardware("no-such-gpu")


def test_cpu_measurement_is_positive():
    spec = measure_cpu(matmul_n=256, copy_mib=16, repeat=3)
    assert spec.measured and spec.peak("f32") > 1e8 and spec.mem_bw > 1e8
    assert "cpu" in spec.name


def test_linear_op_intensity_matches_closed_form():
    """Linear layers read x, W and write y: I = 2NKM / (b_a(NK + NM) + b_w KM)."""
    cfg = NAMED_CONFIGS["llama2-7b"]
    ops = {o.name: o for o in phase_ops(cfg, batch=8, q_len=1024, kv_len=1024,
                                        weight_dtype="bf16", kv_dtype="bf16")}
    n, d = 8 * 1024, 4096
    k = 3 * d
    want = 2 * n * d * k / (2 * (n * d + n * k) + 2 * d * k)
    _close(ops["qkv_proj"].intensity, want, 1e-9)
    # flash attention computes only the causal triangle
    _close(ops["attn_scores"].flops, 32 * 2 * 8 * 32 * (1024 * 1025 / 2) * 128, 1e-9)


def test_analyze_bounds_and_crossover():
    rep = analyze("llama2-7b", "A100-80G", batch=8, prompt_len=1024, gen_len=128)
    assert rep.prefill.op("gate_up").bound == "compute"
    assert all(rep.decode.op(n).bound == "memory" for n in LINEAR_OPS)
    assert rep.decode.op("attn_scores").bound == "memory"
    assert rep.decode.kv_len == 1024 + 64
    # bf16 weights: linear-layer decode intensity ~ batch, so the crossover sits near the ridge
    assert 0.9 * rep.ridge < rep.crossover["linear"] < 1.3 * rep.ridge
    assert rep.crossover["step"] is None  # MHA KV reads keep the whole step memory-bound
    assert rep.prefill.time_s > rep.decode.time_s > 0
    text = rep.table()
    assert "PREFILL" in text and "DECODE" in text and "compute-bound" in text
    json.dumps(rep.to_dict())
    # int4 weights read 4x fewer weight bytes than bf16 in decode
    q = analyze("llama2-7b", "A100-80G", batch=1, prompt_len=128, gen_len=2, weight_dtype="int4")
    b = analyze("llama2-7b", "A100-80G", batch=1, prompt_len=128, gen_len=2)
    assert q.decode.time_s < 0.4 * b.decode.time_s


@pytest.mark.parametrize("batch,prompt_len", [(2, 32), (1, 48)])
def test_analytic_flops_match_xla_cost_analysis(batch, prompt_len):
    rows = compare_with_xla(TINY, batch=batch, prompt_len=prompt_len, cache_len=128,
                            dtype="float32")
    print()
    print(format_xla_comparison(rows))
    for r in rows:
        print(r["phase"], "analytic", r["analytic_flops"], "xla", r["xla_flops"])
        assert r["xla_flops"] > 0
        assert abs(r["analytic_flops"] / r["xla_flops"] - 1) < 0.10, r
    assert {r["phase"] for r in rows} == {"prefill", "decode"}


def test_xla_extrapolation_matches_exact():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    from jaxllm.roofline import xla_costs

    exact = xla_costs(cfg, batch=1, prompt_len=16, cache_len=128)
    extra = xla_costs(cfg, batch=1, prompt_len=16, cache_len=128, max_exact_layers=1)
    assert extra["extrapolated"] and not exact["extrapolated"]
    for ph in ("prefill", "decode"):
        _close(extra[ph]["flops"], exact[ph]["flops"], 0.01)


def test_resolve_model_config(tmp_path):
    assert resolve_model_config("SmolLM2-135M")[1] == NAMED_CONFIGS["smollm2-135m"]
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    name, cfg = resolve_model_config(str(tmp_path))
    assert cfg.hidden_size == TINY.hidden_size and cfg.num_kv_heads == TINY.num_kv_heads
    with pytest.raises(ValueError):
        resolve_model_config(str(tmp_path / "missing.bin"))


def _cli(argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    add_roofline_parser(sub)
    args = ap.parse_args(["roofline", *argv])
    return args.func(args)


def test_cli_table_and_textbook(capsys):
    assert _cli(["--textbook"]) == 0
    assert "142.5" in capsys.readouterr().out
    assert _cli(["--model", "smollm2-135m", "--hardware", "H100-SXM", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m on H100-SXM" in out and "predicted decode" in out


def test_cli_plot_writes_png(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    measured = tmp_path / "results.jsonl"
    measured.write_text(json.dumps({"benchmark": "kernels", "workload": {"case": "matmul"},
                                    "metrics": {"flops": 2e9, "bytes": 1e7, "median_s": 0.01}})
                        + "\n")
    png = tmp_path / "roof.png"
    assert _cli(["--model", "llama3-8b", "--hardware", "A100-80G", "--plot", str(png),
                 "--measured", str(measured)]) == 0
    assert png.stat().st_size > 10_000
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
