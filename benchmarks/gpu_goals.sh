#!/usr/bin/env bash
# The one-GPU goals that are measured on a device machine, in one batch per call; each
# benchmark's output is kept under $OUT (or results/ when OUT is unset).
#   bash benchmarks/gpu_goals.sh decode memory     # decode engine and the memory estimate
#   bash benchmarks/gpu_goals.sh speedrun          # the speedrun recipe against the hand-written program
#   bash benchmarks/gpu_goals.sh earlyexit         # early exit / self-speculative against the decode engine
#   bash benchmarks/gpu_goals.sh tests             # the gpu-marked tests
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for what in "$@"; do
  echo "=== $what ($(date -u +%H:%M:%S))"
  case $what in
    decode)   timeout 330 python benchmarks/decode.py 2>&1 | tee "$OUT/decode-h100.txt" ;;
    memory)   timeout 150 python benchmarks/memory_estimate.py 2>&1 | tee "$OUT/memory-estimate-h100.txt" ;;
    speedrun) timeout 560 python benchmarks/speedrun_speed.py 2>&1 | tee "$OUT/speedrun-h100.txt" ;;
    earlyexit) timeout 590 python benchmarks/early_exit_engine.py --steps 2000 --thresholds 0.9 2>&1 | tee "$OUT/early-exit-engine-h100.txt" ;;
    tests)    timeout 500 python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests-h100.txt" ;;
    *) echo "unknown section $what"; exit 2 ;;
  esac
done
