#!/usr/bin/env bash
# Every GPU check of issue 6 as one prepared script, for a session lent a GPU machine (docs/performance.md).
# Here first: scripts/device_wheels.sh (the packages the GPU image lacks, into .whl/). Then, through the
# device tool, with `carry: [".whl"]`, from the repository root:
#
#   bash scripts/device_check.sh bench   # CUDA tests, ViT-B/16 bench of InfLoRA and of plain LoRA (~5 min)
#   bash scripts/device_check.sh run     # the 10-task ImageNet-R-sized InfLoRA run end to end (target < 6 min)
#
# Everything it prints also lands in $OUT (at most 8 files come back; each stage writes fewer).
# Knobs (environment): BACKBONE, IMG, BATCH, IMAGES; stage run: EPOCHS, TRAIN, TEST (per task); DEVICE=cpu and
# small values make a dry run of the script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loracl-device-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-vit_base_patch16_224}
IMG=${IMG:-224}
BATCH=${BATCH:-256}
IMAGES=${IMAGES:-8192}
bench=(-m loracl bench --backbone "$BACKBONE" --img-size "$IMG" --batch-size "$BATCH" --device "$DEVICE"
       --images "$IMAGES")

case "${1:-bench}" in
  bench)
    { nvidia-smi 2>&1 || true; $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } \
      > "$OUT/machine.txt"
    LORACL_TEST_DEVICE=$DEVICE $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.txt"
    # InfLoRA: throughput against the naive reference, step cost at task 1 and 10, statistics share
    $PY "${bench[@]}" --repeats 2 --json "$OUT/bench-inflora.json" 2>&1 | tee "$OUT/bench-inflora.txt"
    # plain LoRA on the frozen backbone: the peak-memory baseline (target: InfLoRA within 1.2x of it)
    $PY "${bench[@]}" --method seq-lora --sections throughput --tasks 1 --json "$OUT/bench-seq-lora.json" 2>&1 \
      | tee "$OUT/bench-seq-lora.txt"
    $PY "${bench[@]}" --sections throughput --set train.compile=true --json "$OUT/bench-inflora-compiled.json" \
      > "$OUT/bench-inflora-compiled.txt" 2>&1
    ;;
  run)
    # ImageNet-R's size: 24,000 training and 6,000 test images in 10 tasks of 20 classes, 50 epochs per task
    $PY docs/scripts/synthetic_run.py --preset inflora-imagenet-r-10 --train-per-task "${TRAIN:-2400}" \
      --test-per-task "${TEST:-600}" --classes-per-task 20 --size "$IMG" --out /tmp/imr10-synthetic \
      --set backbone.pretrained=false --set backbone.name="$BACKBONE" --set "backbone.kwargs={img_size: $IMG}" \
      --set "backbone.cfg_overlay.input_size=[3, $IMG, $IMG]" \
      --set device="$DEVICE" --set train.epochs="${EPOCHS:-50}" --set data.eval_batch_size=1024 2>&1 \
      | tee "$OUT/synthetic-run.txt"
    cp /tmp/imr10-synthetic/results.json "$OUT/synthetic-results.json" 2>/dev/null
    ;;
  *) echo "usage: $0 bench|run" >&2; exit 2 ;;
esac
