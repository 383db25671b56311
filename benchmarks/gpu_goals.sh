#!/usr/bin/env bash
# The one-GPU goals that are measured on a device machine, in one batch per call; each
# benchmark's output is kept under $OUT (or results/ when OUT is unset).
#   bash benchmarks/gpu_goals.sh decode memory     # decode engine and the memory estimate
#   bash benchmarks/gpu_goals.sh speedrun          # the speedrun recipe against the hand-written program
#   DATA=input.txt bash benchmarks/gpu_goals.sh earlyexit   # early exit and self-speculation on the decode engine
#   bash benchmarks/gpu_goals.sh tests             # the gpu-marked tests
#   bash benchmarks/gpu_goals.sh settings          # the decode engine's attention paths and compile options
#   bash benchmarks/gpu_goals.sh profiles          # where decode and the speedrun step spend their time
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]*' | head -1 | tr A-Z a-z)
CARD=${CARD:-gpu}
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for what in "$@"; do
  echo "=== $what ($(date -u +%H:%M:%S))"
  case $what in
    decode)   timeout 330 python benchmarks/decode.py 2>&1 | tee "$OUT/decode-$CARD.txt" ;;
    memory)   timeout 150 python benchmarks/memory_estimate.py 2>&1 | tee "$OUT/memory-estimate-$CARD.txt" ;;
    speedrun) timeout 560 python benchmarks/speedrun_speed.py 2>&1 | tee "$OUT/speedrun-$CARD.txt" ;;
    earlyexit) timeout 590 python benchmarks/early_exit_engine.py --data "${DATA:-../shared/data/tinyshakespeare/input.txt}" --steps 1500 --thresholds 0.9 --speculate 2:4,2:6 2>&1 | tee "$OUT/early-exit-engine-$CARD.txt" ;;
    settings) timeout 590 python benchmarks/decode_settings.py 2>&1 | tee "$OUT/decode-settings-$CARD.txt" ;;
    profiles) timeout 150 python benchmarks/decode.py --model gpt2 --profile 2>&1 | tee "$OUT/decode-profile-$CARD.txt"
              timeout 400 python benchmarks/speedrun_speed.py --steps 30 --profile 2 2>&1 | tee "$OUT/speedrun-profile-$CARD.txt" ;;
    tests)    timeout 500 python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests-$CARD.txt" ;;
    *) echo "unknown section $what"; exit 2 ;;
  esac
done
