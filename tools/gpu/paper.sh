#!/usr/bin/env bash
# Issue 17's GPU measurements in one device call (tools/gpu/README.md): AlphaEdit's
# paper-smollm2 CounterFact cell (2,000 edits in sequential batches of 100, full evaluation),
# then as much of the 10,000-edit stream-smollm2 AlphaEdit run as the time left allows
# (resumable: its curve lines hold time and memory every 1,000 edits). Writes runs.tgz (manifests,
# records, curves; no checkpoints) and paper.log to $OUT.
# Smoke test on a CPU: KEH_GPU_SMOKE=1 OUT=/tmp/out bash tools/gpu/paper.sh (4 + 6 edits in batches of 2).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/keh-gpu-out}; mkdir -p "$OUT"
budget=${KEH_GPU_BUDGET_S:-500}          # seconds for both runs together
c=.gpu_carry
exec > >(tee "$OUT/paper.log") 2>&1
echo "[$(date +%T)] start"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps --no-index $c/a/wheels/*.whl
gg=${TMPDIR:-/tmp}/smollm2.gguf
[ -f "$gg" ] || cat $c/a/smollm2.gguf.part0 $c/b/smollm2.gguf.part1 > "$gg"
echo "$(cat $c/a/smollm2.gguf.sha256)  $gg" | sha256sum -c - || exit 3
export KEH_SMOLLM2_GGUF=$gg KEH_DATA_DIR=$PWD/$c/a/data KEH_CACHE=${KEH_CACHE:-/tmp/keh-cache}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -n "${KEH_GPU_SMOKE:-}" ]; then n1=4; n2=6; b=2; e1=1; e2=2; else n1=2000; n2=10000; b=100; e1=5; e2=10; fi
# one AlphaEdit CounterFact cell as a one-cell grid: the benchmark skips it when complete and
# continues it when an earlier call was cut off (a warm machine keeps runs/ between calls)
cell() {  # cell OUT_DIR N_EDITS EVAL_EVERY SECONDS
  local grid=${TMPDIR:-/tmp}/keh-$1.yaml
  printf 'models: [smollm2-135m]\nmethods: [alphaedit]\nsuites: [counterfact]\nseeds: [0]\nn_edits: %s\nbatch_size: %s\nsequential: true\neval_every: %s\nout_dir: runs/%s\n' \
    "$2" "$b" "$3" "$1" > "$grid"
  timeout "$4" python3 -m harness.benchmark --grid "$grid" --jobs 1 --no-report
}
t0=$SECONDS
echo "[$(date +%T)] paper cell: alphaedit, $n1 CounterFact edits"
cell paper-smollm2 $n1 $e1 $((budget * 6 / 10)); rc=$?
echo "[$(date +%T)] paper cell exit $rc after $((SECONDS - t0)) s"
left=$((budget - (SECONDS - t0)))
if [ $left -gt 30 ]; then
  echo "[$(date +%T)] stream: alphaedit, up to $n2 edits, $left s"
  cell stream-smollm2 $n2 $e2 $left; rc=$?
  echo "[$(date +%T)] stream exit $rc (124: stopped by the time budget, resumable) after $((SECONDS - t0)) s"
fi
tar czf "$OUT/runs.tgz" --exclude=checkpoint --exclude=.lock runs/paper-smollm2 runs/stream-smollm2 2>/dev/null
ls -la "$OUT"
