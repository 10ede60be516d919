#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2_generation_reference.json: an independent reference for
the worker's SmolLM2 decoder, computed here with nothing the worker uses.

- Weights: the `gguf` PyPI package (llama.cpp's own reader) dequantizes the GGUF; the
  attention Q/K rows are put back in Hugging Face order (undoing the permutation that
  llama.cpp's converter applies), so the forward below uses HF's rotate-half RoPE while
  the worker applies llama.cpp's interleaved RoPE to the file's order.
- Forward: a plain float64 numpy LLaMA forward (RMSNorm, RoPE, grouped-query attention,
  SwiGLU, tied output embedding), every number read from the GGUF metadata.
- Tokenizer: a byte-level BPE written out below from the GGUF's vocab and merges (the
  worker builds one with the `tokenizers` crate); prompts are rendered with jinja2 from
  the GGUF's own chat template.

For each chat prompt it records the rendered prompt, its token ids, the greedy
continuation of 24 tokens, the first step's 16 highest logits, and the smallest gap
between the best and second-best logit over the 24 steps (how close greedy came to a tie).

Usage (any venv with `pip install gguf numpy jinja2 regex`):
  python scripts/make_smollm2_reference.py models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import json
import sys
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np
import regex
from gguf import GGUFReader
from gguf.quants import dequantize

STEPS = 24
TOP = 16
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "List three prime numbers greater than 100."}],
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."},
     {"role": "assistant", "content": "Buenos días."},
     {"role": "user", "content": "And into German?"}],
    [{"role": "user", "content": "Explain tensor parallelism to a ten-year-old, briefly."}],
    [{"role": "user", "content": "def add(a, b):\n    return a + b\n\nWhat does this Python function do?"}],
    [{"role": "user", "content": "Name a famous painting by Leonardo da Vinci. Numbers: 1234, 56."}],
]


def field(r, key):
    return r.fields[key].contents()


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's pattern.
DIGIT = regex.compile(r"\p{N}")
GPT2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class Tokenizer:
    def __init__(self, r):
        self.tokens = field(r, "tokenizer.ggml.tokens")
        types = field(r, "tokenizer.ggml.token_type")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(field(r, "tokenizer.ggml.merges"))}
        self.special = [t for t, ty in zip(self.tokens, types) if ty == 3]
        self.byte_map = bytes_to_unicode()

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            pairs = [p for p in pairs if p[0] is not None]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ids[p] for p in parts]

    def encode_plain(self, text):
        ids = []
        pieces = []
        last = 0
        for m in DIGIT.finditer(text):
            pieces.append(text[last:m.start()])
            pieces.append(m.group())
            last = m.end()
        pieces.append(text[last:])
        for piece in pieces:
            for word in GPT2.findall(piece):
                ids += self.bpe("".join(self.byte_map[b] for b in word.encode("utf-8")))
        return ids

    def encode(self, text):
        pattern = "(" + "|".join(regex.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")"
        ids = []
        for i, part in enumerate(regex.split(pattern, text)):
            if i % 2:
                ids.append(self.ids[part])
            elif part:
                ids += self.encode_plain(part)
        return ids

    def decode(self, ids):
        inverse = {c: b for b, c in self.byte_map.items()}
        text = "".join(self.tokens[i] for i in ids)
        return bytes(inverse[c] for c in text).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- model


class Model:
    def __init__(self, r):
        arch = field(r, "general.architecture")
        self.layers = int(field(r, f"{arch}.block_count"))
        self.heads = int(field(r, f"{arch}.attention.head_count"))
        self.kv_heads = int(field(r, f"{arch}.attention.head_count_kv"))
        self.hidden = int(field(r, f"{arch}.embedding_length"))
        self.head_dim = self.hidden // self.heads
        self.theta = float(field(r, f"{arch}.rope.freq_base"))
        self.eps = float(field(r, f"{arch}.attention.layer_norm_rms_epsilon"))
        self.w = {}
        for t in r.tensors:
            x = dequantize(t.data, t.tensor_type).astype(np.float64)
            self.w[t.name] = x.reshape([int(d) for d in reversed(t.shape)])
        for i in range(self.layers):
            self.w[f"blk.{i}.attn_q.weight"] = self.unpermute(self.w[f"blk.{i}.attn_q.weight"], self.heads)
            self.w[f"blk.{i}.attn_k.weight"] = self.unpermute(self.w[f"blk.{i}.attn_k.weight"], self.kv_heads)
        self.output = self.w.get("output.weight", self.w["token_embd.weight"])

    @staticmethod
    def unpermute(w, heads):
        # The converter did reshape(heads, 2, d/2, in).swapaxes(1, 2); this undoes it.
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def norm(self, x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions):
        # x: [heads, tokens, head_dim], rotate-half (HF) form.
        half = self.head_dim // 2
        inv = 1.0 / self.theta ** (np.arange(half) / half)
        ang = positions[:, None] * inv[None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def forward(self, ids, cache, start):
        """Logits of the last position; cache is a list of (k, v) per layer, extended."""
        w, d = self.w, self.head_dim
        x = w["token_embd.weight"][ids]
        n = len(ids)
        positions = np.arange(start, start + n, dtype=np.float64)
        for i in range(self.layers):
            p = f"blk.{i}."
            h = self.norm(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(n, self.heads, d).transpose(1, 0, 2)
            k = (h @ w[p + "attn_k.weight"].T).reshape(n, self.kv_heads, d).transpose(1, 0, 2)
            v = (h @ w[p + "attn_v.weight"].T).reshape(n, self.kv_heads, d).transpose(1, 0, 2)
            q, k = self.rope(q, positions), self.rope(k, positions)
            if len(cache) <= i:
                cache.append((k, v))
            else:
                cache[i] = (np.concatenate([cache[i][0], k], 1), np.concatenate([cache[i][1], v], 1))
            k_all, v_all = cache[i]
            rep = self.heads // self.kv_heads
            k_all, v_all = np.repeat(k_all, rep, 0), np.repeat(v_all, rep, 0)
            scores = q @ k_all.transpose(0, 2, 1) / np.sqrt(d)
            total = k_all.shape[1]
            mask = np.arange(total)[None, :] > (start + np.arange(n))[:, None]
            scores = np.where(mask[None], -np.inf, scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ v_all
            x = x + att.transpose(1, 0, 2).reshape(n, -1) @ w[p + "attn_output.weight"].T
            h = self.norm(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            up = h @ w[p + "ffn_up.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
        x = self.norm(x[-1], w["output_norm.weight"])
        return self.output @ x


def main():
    path = Path(sys.argv[1])
    r = GGUFReader(path)
    tok = Tokenizer(r)
    model = Model(r)
    # As transformers renders chat templates.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(field(r, "tokenizer.chat_template"))
    eos = int(field(r, "tokenizer.ggml.eos_token_id"))
    cases = []
    for chat in CHATS:
        prompt = template.render(messages=chat, add_generation_prompt=True)
        ids = tok.encode(prompt)
        cache, out, margin = [], [], float("inf")
        logits = model.forward(ids, cache, 0)
        top = np.argsort(-logits)[:TOP]
        first = {"ids": [int(i) for i in top], "logits": [float(logits[i]) for i in top]}
        for _ in range(STEPS):
            best2 = np.sort(logits)[-2:]
            margin = min(margin, float(best2[1] - best2[0]))
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if nxt == eos:
                break
            logits = model.forward([nxt], cache, len(ids) + len(out) - 1)
        cases.append({"messages": chat, "prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                      "greedy_text": tok.decode(out), "first_step_top": first, "min_margin": margin})
        print(f"{len(ids):4d} prompt tokens, margin {margin:.3f}: {tok.decode(out)!r}", file=sys.stderr)
    dest = Path(__file__).resolve().parent.parent / "tests/fixtures/smollm2_generation_reference.json"
    dest.write_text(json.dumps({"file": path.name, "steps": STEPS, "eos_token_id": eos, "cases": cases}, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
