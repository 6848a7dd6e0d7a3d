#!/usr/bin/env bash
# The device check of issue 20: extract, analyze and attribute a random Llama-2-7B-shaped pair on one GPU.
#
#   bash bench/device_check.sh                          # llama7b on cuda: about 6-8 minutes on one H200
#   SHAPE=tiny DEVICE=cpu bash bench/device_check.sh    # the same steps on a tiny pair, to check the script
#
# 1. tests/test_device.py (CPU/CUDA agreement on the tiny fixtures; TEST_DIR names where the test file is)
# 2. the pair is built on the device (bench/_random_pair.py: no downloads; every linear of every layer changed)
# 3. extract, analyze (probe on 24 texts x 128 tokens) and attribute (48 examples x 64 tokens) with
#    --device $DEVICE, through bench/_cli.py (no vLLM or pydantic needed); attribute once with --tf32 and once
#    in exact float32, the second only if BUDGET seconds leave time for it
# 4. each stage's wall time and peak GPU memory, and analyze + attribute against the 2-minute goal
#    (bench/_device_summary.py)
#
# Needs python3 with torch, transformers, safetensors, tokenizers, numpy, matplotlib, tqdm and tunevec importable.
# Writes into $OUT (or $WORK/out): device_check.log, report.json, attribution*.json, summary.json.
set -uo pipefail

SHAPE=${SHAPE:-llama7b}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/tunevec-device-check}
DEST=${OUT:-$WORK/out}
BUDGET=${BUDGET:-490}
PY=${PYTHON:-python3}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEST_DIR=${TEST_DIR:-$HERE/../tests}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

mkdir -p "$WORK" "$DEST"
exec > >(tee -a "$DEST/device_check.log") 2>&1
START=$(date +%s%N)
STAGES="$DEST/stages.tsv"
: >"$STAGES"

elapsed() { echo $((($(date +%s%N) - START) / 1000000000)); }

stage() {  # stage NAME COMMAND...: run it, record its wall time and exit status
    local name=$1 t0 t1 rc
    shift
    echo "=== $name (at $(elapsed) s): $*"
    t0=$(date +%s%N)
    "$@"
    rc=$?
    t1=$(date +%s%N)
    printf '%s\t%s\t%s\n' "$name" "$(((t1 - t0) / 1000000))" "$rc" >>"$STAGES"
    echo "=== $name: $(((t1 - t0) / 1000000)) ms, exit $rc"
    return $rc
}

echo "device check: shape $SHAPE on $DEVICE, work $WORK, output $DEST, budget $BUDGET s, $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -P -c "import torch, transformers, tunevec; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if \
torch.cuda.is_available() else '', 'tunevec from', tunevec.__file__)"
df -h "$WORK" /dev/shm 2>/dev/null; free -g 2>/dev/null

if [ -f "$TEST_DIR/test_device.py" ]; then
    # -P: the working folder (a checkout with its own tunevec/) must not shadow the installed package
    stage tests "$PY" -P -m pytest -q -p no:cacheprovider -rs "$TEST_DIR/test_device.py" -k "not smol_fixtures"
fi

PAIR="$WORK/pair"
rm -rf "$PAIR" "$WORK/vector"
stage build "$PY" "$HERE/_random_pair.py" --shape "$SHAPE" --out "$PAIR" --device "$DEVICE" --probe-texts 24 \
    --heldout-texts 48 || exit 1
CLI=("$PY" "$HERE/_cli.py")
stage extract "${CLI[@]}" extract --base "$PAIR/base" --tuned "$PAIR/tuned" --out "$WORK/vector" \
    --device "$DEVICE" || exit 1
stage analyze "${CLI[@]}" analyze "$WORK/vector" --base "$PAIR/base" --out "$WORK/report" --device "$DEVICE" \
    --max-probe-texts 24 --probe-max-tokens 3072
cp "$WORK/report/report.json" "$DEST/report.json" 2>/dev/null

ATTR=(attribute "$WORK/vector" --base "$PAIR/base" --domain bench --max-examples 48 --max-tokens 64 --device "$DEVICE")
if [ "$DEVICE" != cpu ]; then
    stage attribute_tf32 "${CLI[@]}" "${ATTR[@]}" --out "$WORK/attribution-tf32" --tf32
    cp "$WORK/attribution-tf32/attribution.json" "$DEST/attribution-tf32.json" 2>/dev/null
fi
LEFT=$((BUDGET - $(elapsed)))
echo "=== $LEFT s of the budget left for attribute in float32"
if [ "$LEFT" -gt 30 ]; then
    stage attribute timeout "$LEFT" "${CLI[@]}" "${ATTR[@]}" --out "$WORK/attribution"
    cp "$WORK/attribution/attribution.json" "$DEST/attribution.json" 2>/dev/null
fi
"$PY" "$HERE/_device_summary.py" "$DEST"
