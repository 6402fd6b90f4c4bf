"""MFU is a fraction: the FLOPs a token needs (causal attention counted as such) and the peak a CPU can reach,
derived from the hardware rather than measured on a machine that may be busy."""

import pytest
import torch

from rho1.compute import (
    break_even,
    compute_efficiency,
    cpu_peak_flops,
    flops_per_token,
    format_count,
    format_flops,
    forward_flops_per_token,
    head_backward_flops,
    mfu,
)
from rho1.model import build_model

CPUINFO = """processor\t: {n}
model name\t: Intel(R) Xeon(R) Processor
physical id\t: 0
core id\t\t: {core}
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512_bf16 amx_bf16
"""


def cpuinfo(cores: list[int]) -> str:
    return "\n".join(CPUINFO.format(n=n, core=core) for n, core in enumerate(cores))


def test_cpu_peak_is_cores_times_clock_times_the_widest_fma():
    two = cpuinfo([0, 1])
    assert cpu_peak_flops("float32", threads=2, cpuinfo=two)[0] == pytest.approx(2 * 2.6e9 * 64)
    assert cpu_peak_flops("float32", threads=1, cpuinfo=two)[0] == pytest.approx(2.6e9 * 64)
    peak, source = cpu_peak_flops("bfloat16", threads=2, cpuinfo=two)
    assert peak == pytest.approx(2 * 2.6e9 * 2048) and "AMX bf16" in source
    # a CPU without bf16 units does bf16 at its float32 rate
    assert cpu_peak_flops("bfloat16", 2, two.replace(" avx512_bf16 amx_bf16", ""))[0] == pytest.approx(2 * 2.6e9 * 64)
    avx2 = two.replace(" avx512f", "")
    assert cpu_peak_flops("float32", 2, avx2) == (pytest.approx(2 * 2.6e9 * 32), pytest.approx(
        "2 cores x 2.60 GHz x 32 float32 FLOPs/cycle of AVX2 FMA, from /proc/cpuinfo"))


def test_two_hyperthreads_of_one_core_count_once_and_an_unknown_cpu_asks_for_the_peak():
    threads_of_one_core = cpuinfo([0, 0])
    assert cpu_peak_flops("float32", threads=2, cpuinfo=threads_of_one_core)[0] == pytest.approx(2.6e9 * 64)
    assert cpu_peak_flops("float32", threads=2, cpuinfo="") == (None, pytest.approx(
        "this CPU's clock or vector units are not known (no /proc/cpuinfo): pass --peak-flops"))


def test_flops_per_token_count_causal_attention_and_the_tied_head_once():
    model = build_model("nano", vocab_size=512, max_positions=64, eos_token_id=0)
    c = model.config
    head = 512 * c.hidden_size  # tied: the embedding counts once, as the head
    layers = c.num_hidden_layers * (4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    n = head + layers + c.hidden_size  # the final norm
    assert sum(p.numel() for p in model.parameters()) == n
    assert flops_per_token(model, 64) == 6 * n + 6 * c.num_hidden_layers * c.hidden_size * 64
    assert head_backward_flops(model) == 4 * head
    assert forward_flops_per_token(model, 64) == 2 * n + 2 * c.num_hidden_layers * c.hidden_size * 64  # a third


def test_compute_efficiency_counts_the_scoring_pass_and_the_break_even_the_reference():
    # CLM reaches its final loss 2.0 at 100 FLOPs; SLM reaches 2.0 at 40 (interpolated between 30 and 50)
    clm = [(0.0, 4.0), (50.0, 3.0), (100.0, 2.0)]
    slm = [(0.0, 4.0), (30.0, 2.5), (50.0, 1.5)]
    ratio, reached, needed, paid = compute_efficiency(clm, slm, scoring_flops=10.0)
    assert reached and needed == 100.0 and paid == pytest.approx(50.0) and ratio == pytest.approx(2.0)
    assert break_even(120.0, needed, paid) == 3  # saves 50 a run: 120 paid back after 3 runs
    assert break_even(120.0, needed, 100.0) is None  # saves nothing: never
    # a scoring pass as large as the saving leaves SLM no cheaper, however many fewer tokens it needed
    ratio, reached, _, paid = compute_efficiency(clm, slm, scoring_flops=60.0)
    assert reached and ratio == pytest.approx(1.0)
    # never reached: an upper bound with SLM's whole run and its scoring
    ratio, reached, _, paid = compute_efficiency(clm, [(0.0, 4.0), (80.0, 3.0)], scoring_flops=20.0)
    assert not reached and paid == 100.0 and ratio == pytest.approx(1.0)
    assert compute_efficiency([], slm, 1.0)[0] != compute_efficiency([], slm, 1.0)[0]  # NaN: nothing to compare
    assert format_count(1.5e15) == "1.5 PFLOP" and format_count(2e9) == "2 GFLOP"


def test_an_mfu_above_one_is_never_a_value():
    assert mfu(50e9, (100e9, "x")) == (0.5, None)
    value, why = mfu(150e9, (100e9, "--peak-flops"))
    assert value is None and why.startswith("the model's FLOPs ran at 150 GFLOP/s, above the peak of 100 GFLOP/s")
    assert mfu(1e9, (None, "unknown GPU X: pass --peak-flops")) == (None, "no peak known (unknown GPU X: pass "
                                                                     "--peak-flops)")
    assert format_flops(989e12) == "989 TFLOP/s" and format_flops(torch.tensor(3.3e11).item()) == "330 GFLOP/s"
