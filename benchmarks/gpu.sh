#!/usr/bin/env bash
# The speed benchmarks (and the loss-memory benchmark) on a CUDA machine, in about 5 minutes; prints their tables (and writes JSON + a summary).
#
#   benchmarks/gpu.sh            # on a machine with a CUDA GPU
#   benchmarks/gpu.sh --dry      # tiny sizes on the CPU: checks the scripts run, gives no figure
#
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3); OUT_DIR where the JSON and
# summary.md go (default benchmarks/results/gpu). Every figure is a ratio measured in the same run; the card's name
# heads each table.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
OUT=${OUT_DIR:-benchmarks/results/gpu}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--dry" ]]; then
    COMMON=(--device cpu --threads 1 --dry)
    INFER=(--students mit_b0 --classes 20,171)
    TRAIN=(--students mit_b0)
    EVAL=()
    OUT=${OUT_DIR:-$(mktemp -d)}
else
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with --dry on a CPU machine")'
    COMMON=(--device cuda)
    INFER=(--students mit_b0,mit_b2 --classes 20,171,847 --reps 10)
    TRAIN=(--students mit_b0,mit_b2 --batch 8 --crop 512 --reps 10)
    EVAL=(--images 50 --workers 8 --reps 3)
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"

{
    echo "# clipzss speed benchmarks"
    echo
    "$PY" - <<'EOF'
import os, platform, torch
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (dry run)"
print(f"card: {card}; torch {torch.__version__}; CUDA {torch.version.cuda}; {os.cpu_count()} CPU cores; {platform.node()}")
EOF
    echo "uptime: $(uptime)"
    start=$SECONDS
    "$PY" benchmarks/bench_pseudo_labels.py "${COMMON[@]}" --json "$OUT/pseudo_labels.json"
    "$PY" benchmarks/bench_inference.py "${COMMON[@]}" "${INFER[@]}" --json "$OUT/inference.json"
    "$PY" benchmarks/bench_train_step.py "${COMMON[@]}" "${TRAIN[@]}" --json "$OUT/train_step.json"
    "$PY" benchmarks/bench_eval.py "${COMMON[@]}" "${EVAL[@]}" --json "$OUT/eval.json"
    "$PY" benchmarks/bench_losses.py "${COMMON[@]}" --json "$OUT/losses.json"
    "$PY" benchmarks/bench_labels.py "${COMMON[@]}" --json "$OUT/labels.json"
    echo "total: $((SECONDS - start)) s; uptime: $(uptime)"
} 2>&1 | grep -v -e "RANDOM weights" -e "No pretrained weights" | tee "$SUMMARY"
echo "tables and JSON in $OUT"
