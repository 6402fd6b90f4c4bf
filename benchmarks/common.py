"""Set-up shared by the benchmark scripts: a TokenStore of generated demo web pages, and model shapes."""

from __future__ import annotations

import shutil
from pathlib import Path

import transformers

from rho1.data import demo
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import TokenStore

# the demo's tiny Llama (the head is small), and one with a 32k vocabulary (the head holds most parameters)
SHAPES = {
    "tiny (vocab 2048)": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384,
                              vocab_size=2048),
    "vocab 32k": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704,
                      vocab_size=32768),
}


def web_store(out: Path, n_web: int) -> TokenStore:
    """A fresh ``out`` holding a TokenStore of ``n_web`` demo web pages (BPE 2048) in ``out/web``."""
    transformers.utils.logging.disable_progress_bar()
    shutil.rmtree(out, ignore_errors=True)
    files = demo.generate(out / "data", n_reference=10, n_web=n_web, n_heldout=1, n_offtarget=1)
    return prepare(PrepareConfig([str(files["web"])], str(out / "web"), train_tokenizer=2048, text_field="text"),
                   progress=False)
