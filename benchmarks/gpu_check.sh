#!/usr/bin/env bash
# The prepared GPU check of issue 20 (CUDA path), for a machine with one NVIDIA GPU (H100/H200), in one go,
# sized to finish in < 8 minutes (not yet run on a GPU): doctor, the CUDA and Triton tests, then
# `gracevlm bench --device cuda` on a synthesized llava-1.5-7b (INT4 vs its exact fp16 dense conversion,
# same run). Run from the repository root:
#     bash benchmarks/gpu_check.sh            # results under $OUT (default ./gpu-check-out)
# Needs python3 with a CUDA torch, triton, safetensors, sentencepiece, tokenizers, pillow, pytest (PYTHON= to
# pick another interpreter). Writes at most 7 files: nvidia-smi.txt doctor.json pytest.log synth.log
# bench_cuda.json bench.log summary.txt.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GRACEVLM_BENCH_DIR=${GRACEVLM_BENCH_DIR:-/tmp/gracevlm-bench}
unset TRITON_INTERPRET GRACEVLM_BACKEND
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/summary.txt"; }

"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/summary.txt" || { echo "gpu_check: needs a CUDA GPU and triton" | tee -a "$OUT/summary.txt"; exit 2; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

stamp "doctor"
"$PY" -m gracevlm.cli doctor --json > "$OUT/doctor.json" 2>> "$OUT/summary.txt" || stamp "doctor FAILED"

# The 7B checkpoint is written on the CPU while the tests run on the GPU (bench then finds it in place).
CKPT="$GRACEVLM_BENCH_DIR/llava-1.5-7b-32l"
if [ ! -f "$CKPT/config.json" ]; then
  ( "$PY" -m gracevlm.cli synth --preset llava-1.5-7b --format awq --seed 0 --force --out "$CKPT" > "$OUT/synth.log" 2>&1 ) &
  SYNTH=$!
else
  SYNTH=
fi

stamp "pytest tests/test_cuda.py tests/test_triton_kernels.py"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py tests/test_triton_kernels.py > "$OUT/pytest.log" 2>&1
stamp "pytest exit $? : $(tail -n 1 "$OUT/pytest.log")"

if [ -n "$SYNTH" ]; then wait "$SYNTH"; stamp "synth exit $?"; fi

stamp "bench --device cuda"
timeout 200 "$PY" -m gracevlm.cli bench --device cuda --out "$OUT/bench_cuda.json" > "$OUT/bench.log" 2>&1
stamp "bench exit $?"
cat "$OUT/bench.log" >> "$OUT/summary.txt"
stamp "done"
