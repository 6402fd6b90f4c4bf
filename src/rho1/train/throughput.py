"""Model FLOPs utilisation: the FLOPs a training step's tokens need over what the device could do.

Per token, a forward and backward take ``6 N`` FLOPs for the ``N`` parameters that multiply (the input
embedding is a lookup, so it counts only when it is also the tied head) plus ``12 L d T`` for attention
(``L`` layers of width ``d`` over windows of ``T`` tokens; PaLM, appendix B). That is the CLM cost: SLM's
head backward covers only the kept tokens, so its MFU by this count is a little pessimistic, like MFU of
any run that recomputes activations (checkpointing's recomputation is not counted either).
"""

from __future__ import annotations

import time

import torch

# dense peaks of one device in FLOP/s: bf16/fp16 tensor cores, and plain fp32 (no TF32)
PEAK_FLOPS = {"H200": {"half": 989e12, "fp32": 67e12}, "H100": {"half": 989e12, "fp32": 67e12},
              "A100": {"half": 312e12, "fp32": 19.5e12}}

_measured_cpu: dict[int, float] = {}


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward) of ``model`` on windows of ``seq_len`` tokens."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", None)
    n = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.weight.numel())
    config = model.config
    layers = _config_value(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    width = _config_value(config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(config, "num_attention_heads", "n_head", "n_heads", "attention_heads")
    attention = 12 * layers * width * seq_len if layers and width and heads else 0  # none in a state-space model
    return 6.0 * n + attention


def measured_cpu_flops() -> float:
    """What this CPU's torch reaches on float32 matrix products with the current threads: the best of ten
    bursts of 1024 x 1024 products, measured once per machine and thread count and kept in
    ``~/.cache/rho1/cpu_flops.json`` (``RHO1_CACHE`` elsewhere), so every run divides by the same number."""
    threads = torch.get_num_threads()
    if threads in _measured_cpu:
        return _measured_cpu[threads]
    import json
    import os
    import platform
    from pathlib import Path

    cache = Path(os.environ.get("RHO1_CACHE", Path.home() / ".cache" / "rho1")) / "cpu_flops.json"
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()} cores|{threads} threads|torch {torch.__version__}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known.get(key), (int, float)):
        g = torch.Generator().manual_seed(0)  # not the global generator: a run's random numbers stay its own
        a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        torch.mm(a, b)
        best = 0.0
        for _ in range(10):
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - start))
        known[key] = best
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=2))
        except OSError:  # a read-only home: measured again next time
            pass
    _measured_cpu[threads] = float(known[key])
    return _measured_cpu[threads]


def peak_memory_mib(device: torch.device) -> dict:
    """This process's peak memory so far: resident (Linux: VmHWM, which starts anew at exec) and, on CUDA,
    what torch allocated on the device."""
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


def peak_flops(device: torch.device, precision: str, given: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from); None when it is not known."""
    if given:
        return given, "--peak-flops"
    if device.type == "cpu":
        return measured_cpu_flops(), "measured float32 matmul"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, peaks in PEAK_FLOPS.items():
            if gpu in name:
                return peaks["fp32" if precision == "no" else "half"], f"{gpu} {precision} peak"
        return None, f"unknown GPU {name}: pass --peak-flops"
    return None, f"unknown device {device.type}: pass --peak-flops"


def mfu(tokens_per_second_per_device: float, per_token: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_second_per_device * per_token / peak
