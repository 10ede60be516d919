#!/usr/bin/env bash
# Regenerates tests/fixtures/minilm_reference.json with sentence-transformers, in its own
# venv (.venv-ref). `import torch` in Python needs the full CUDA wheel set (about 2.7 GB,
# cuDNN and friends), unlike the Rust build, so this is not part of setup or CI: the
# fixture is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
REF=.venv-ref
if [ ! -x "$REF/bin/python" ]; then
  python3 -m venv "$REF"
fi
"$REF/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 sentence-transformers==5.1.2
"$REF/bin/python" scripts/make_reference.py
