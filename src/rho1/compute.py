"""What a stage costs: model FLOPs per token (training, and forward-only for scoring), the device's peak, MFU,
and a study's compute efficiency with the reference's break-even.

Per token, a forward and backward take ``6 N`` FLOPs for the ``N`` parameters that multiply (the input
embedding is a lookup, so it counts only when it is also the tied head; a frozen weight, as LoRA's base, needs
no weight gradient: ``4`` FLOPs each) plus ``6 L d T`` for causal attention
(``L`` layers of width ``d`` over windows of ``T`` tokens: PaLM's ``12 L d T`` counts every query against every
key, and a causal mask keeps half of them). When the loss is computed from the head's input in chunks, the
head's backward runs only for the selected tokens, so ``4 V d`` (``V`` x ``d`` head) is counted only for those.
Recomputed activations (gradient checkpointing) are not counted: MFU measures the model's work, not the device's.

The peak is the device's, never a measurement of this run's own kernels: a datasheet figure for known GPUs, and
on a CPU cores x clock x FLOPs per cycle of its widest vector unit, read from the hardware (a number a busy
machine cannot lower). ``mfu`` refuses a value above 1: it says what is wrong instead of printing it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from rho1.eval.curves import tokens_to_reach

# dense peaks of one device in FLOP/s: bf16/fp16 tensor cores, and plain fp32 (no TF32)
PEAK_FLOPS = {"H200": {"half": 989e12, "fp32": 67e12}, "H100": {"half": 989e12, "fp32": 67e12},
              "A100": {"half": 312e12, "fp32": 19.5e12}}

# FLOPs per cycle of one core (a fused multiply-add is 2 FLOPs), widest unit first: (cpuinfo flag, FLOPs, name).
# Upper bounds: two FMA units of the vector width (AVX-512 with one unit, or AMD's double-pumped one, does half).
CPU_FLOPS_PER_CYCLE = {
    "float32": (("avx512f", 64, "AVX-512 FMA"), ("fma", 32, "AVX2 FMA"), ("avx", 16, "AVX"), ("sse2", 8, "SSE2"),
                ("asimd", 32, "NEON FMA")),
    "bfloat16": (("amx_bf16", 2048, "AMX bf16"), ("avx512_bf16", 128, "AVX-512 bf16")),
    "float16": (("amx_fp16", 2048, "AMX fp16"), ("avx512_fp16", 128, "AVX-512 fp16")),
}


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _head(model):
    """(the head's weight elements, whether the head is the tied input embedding)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return (weight.numel() if weight is not None else 0), weight is not None and weight is getattr(embedding,
                                                                                                    "weight", None)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward, every token's head backward) of ``model`` on windows of
    ``seq_len`` tokens, causal attention counted as such."""
    embedding = model.get_input_embeddings()
    _, tied = _head(model)
    skip = set() if tied else {id(embedding.weight)}
    multiplying = [p for p in model.parameters() if id(p) not in skip]
    trained = sum(p.numel() for p in multiplying if p.requires_grad)
    frozen = sum(p.numel() for p in multiplying if not p.requires_grad)  # (LoRA's base: no weight gradient)
    config = model.config
    layers = _config_value(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    width = _config_value(config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(config, "num_attention_heads", "n_head", "n_heads", "attention_heads")
    attention = 6 * layers * width * seq_len if layers and width and heads else 0  # none in a state-space model
    return 6.0 * trained + 4.0 * frozen + attention


def forward_flops_per_token(model, seq_len: int) -> float:
    """FLOPs per token of a forward pass (scoring): ``2 N`` for the parameters that multiply, and a third of
    training's causal attention."""
    embedding = model.get_input_embeddings()
    _, tied = _head(model)
    skip = set() if tied else {id(embedding.weight)}
    multiplying = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    config = model.config
    layers = _config_value(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    width = _config_value(config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(config, "num_attention_heads", "n_head", "n_heads", "attention_heads")
    return 2.0 * multiplying + (2 * layers * width * seq_len if layers and width and heads else 0)


def head_backward_flops(model) -> float:
    """The FLOPs per token of the head's backward (input and weight gradients), which the chunked loss skips
    for tokens that are not selected."""
    return 4.0 * _head(model)[0]


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_clock_hz(cpuinfo: str) -> float | None:
    """The highest clock the hardware reports: cpufreq's maximum (turbo included), else /proc/cpuinfo's MHz or
    the GHz in the model name (a virtual machine often shows only its nominal clock)."""
    found = []
    try:
        found.append(int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3)
    except (OSError, ValueError):
        pass
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "cpu MHz":
            found.append(float(value) * 1e6)
        elif key == "model name" and "@" in value and value.endswith("GHz"):
            try:
                found.append(float(value.rsplit("@", 1)[1].removesuffix("GHz")) * 1e9)
            except ValueError:
                pass
    return max(found) if found else None


def _physical_cores(cpuinfo: str, cpus: set[int]) -> int:
    """Cores behind the CPUs this process may run on (two hyperthreads of one core share its vector units)."""
    cores, processor, physical = set(), None, "0"
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            processor = int(value) if value.isdigit() else None
        elif key == "physical id":
            physical = value
        elif key == "core id" and processor in cpus:
            cores.add((physical, value))
    return len(cores) or len(cpus)


def cpu_peak_flops(dtype: str = "float32", threads: int | None = None, cpuinfo: str | None = None) \
        -> tuple[float | None, str]:
    """(peak FLOP/s of this CPU for ``threads`` torch threads in ``dtype``, how it was derived): cores in use x
    the highest clock x FLOPs per cycle of the widest unit its flags name."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    clock = _cpu_clock_hz(cpuinfo)
    units = [u for u in CPU_FLOPS_PER_CYCLE.get(dtype, ()) if u[0] in flags] or \
        [u for u in CPU_FLOPS_PER_CYCLE["float32"] if u[0] in flags]
    if not clock or not units:
        return None, "this CPU's clock or vector units are not known (no /proc/cpuinfo): pass --peak-flops"
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = min(threads or torch.get_num_threads(), _physical_cores(cpuinfo, cpus))
    _, per_cycle, unit = units[0]
    return cores * clock * per_cycle, (f"{cores} core{'s' if cores > 1 else ''} x {clock / 1e9:.2f} GHz x {per_cycle} "
                                       f"{dtype} FLOPs/cycle of {unit}, from /proc/cpuinfo")


def peak_flops(device: torch.device, precision: str, given: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from); None when it is not known."""
    if given:
        return given, "--peak-flops"
    if device.type == "cpu":
        return cpu_peak_flops({"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, peaks in PEAK_FLOPS.items():
            if gpu in name:
                return peaks["fp32" if precision == "no" else "half"], f"{gpu} {precision} datasheet peak"
        return None, f"unknown GPU {name}: pass --peak-flops"
    return None, f"unknown device {device.type}: pass --peak-flops"


def format_flops(value: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e6:.3g} MFLOP/s"


def mfu(flops_per_second_per_device: float, peak: tuple[float | None, str]) -> tuple[float | None, str | None]:
    """(model FLOPs utilisation in (0, 1], None) or (None, why it is not shown): a value above 1 is impossible, so
    the peak it divides by is wrong, and it is never reported as a utilisation."""
    value, source = peak
    if not value:
        return None, f"no peak known ({source})"
    ratio = flops_per_second_per_device / value
    if ratio > 1:
        return None, (f"the model's FLOPs ran at {format_flops(flops_per_second_per_device)}, above the peak of "
                      f"{format_flops(value)} ({source}), so that peak is too low; pass the device's real peak with "
                      "--peak-flops")
    return ratio, None


def reset_peak_memory(device: torch.device) -> dict:
    """The peaks so far (``load_``: while the models were loaded, a GGUF file's dequantisation included), then the
    high-water marks set anew (Linux: /proc/self/clear_refs; CUDA: torch's), so the summary's peaks are training's."""
    before = {f"load_{k}": v for k, v in peak_memory_mib(device).items()}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's
        before.pop("load_peak_rss_mib", None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return before


def peak_memory_mib(device: torch.device) -> dict:
    """This process's peak memory since it started or since ``reset_peak_memory``: resident (Linux: VmHWM) and, on
    CUDA, what torch allocated on the device."""
    found = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                found["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if device.type == "cuda":
        found["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return found


def compute_efficiency(baseline: list[tuple[float, float]], slm: list[tuple[float, float]],
                       scoring_flops: float) -> tuple[float, bool, float, float]:
    """(ratio, reached, the baseline's FLOPs, SLM's FLOPs with its scoring): the baseline's training FLOPs to reach
    its own final loss over SLM's training FLOPs to reach that loss plus the scoring pass it paid for. Curves are
    (cumulative training FLOPs, target loss) at each evaluation. Not reached: an upper bound with SLM's whole run."""
    nan = float("nan")
    if not baseline or not slm:
        return nan, False, nan, nan
    needed = tokens_to_reach(baseline, baseline[-1][1])
    if not needed:
        return nan, False, nan, nan
    got = tokens_to_reach(slm, baseline[-1][1])
    paid = (slm[-1][0] if got is None else got) + scoring_flops
    return needed / max(paid, 1e-9), got is not None, needed, paid


def break_even(reference_flops: float, baseline_flops: float, slm_flops: float) -> int | None:
    """Runs like this one after which SLM's saving (baseline - SLM with scoring) has paid for training the
    reference once; None (never) when SLM saves nothing."""
    saving = baseline_flops - slm_flops
    if not saving > 0:
        return None
    return max(1, math.ceil(reference_flops / saving))


def format_count(flops: float) -> str:
    """1.23e15 FLOPs as ``1.23 PFLOP``."""
    if flops != flops:
        return "n/a"
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops / 1e6:.3g} MFLOP"
