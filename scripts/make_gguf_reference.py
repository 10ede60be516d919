#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2_gguf_reference.json: what the `gguf` PyPI package (the
llama.cpp project's own reader, numpy only) reads from SmolLM2-135M-Instruct.Q4_1.gguf:
metadata, tensor count, and for a few tensors of each type their shape, first values
and sum after dequantization. The worker's GGUF reader is tested against it.

Usage (any venv with `pip install gguf numpy`):
  python scripts/make_gguf_reference.py models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
           "blk.0.attn_norm.weight", "output_norm.weight"]
KEYS = ["general.architecture", "llama.block_count", "llama.embedding_length",
        "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.feed_forward_length", "llama.context_length", "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]


def value(field):
    v = field.contents()
    return v.item() if hasattr(v, "item") else v


def main():
    path = Path(sys.argv[1])
    r = GGUFReader(path)
    meta = {k: value(r.fields[k]) for k in KEYS}
    meta["tokenizer.ggml.tokens.len"] = len(r.fields["tokenizer.ggml.tokens"].contents())
    tensors = {}
    for t in r.tensors:
        if t.name not in TENSORS:
            continue
        x = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        tensors[t.name] = {
            "type": t.tensor_type.name,
            "ne": [int(d) for d in t.shape],
            "first": [float(v) for v in x[:8]],
            "sum": float(x.sum()),
            "abs_sum": float(np.abs(x).sum()),
        }
    out = {"file": path.name, "tensor_count": len(r.tensors), "metadata": meta, "tensors": tensors}
    dest = Path(__file__).resolve().parent.parent / "tests/fixtures/smollm2_gguf_reference.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
