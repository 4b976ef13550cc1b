#!/usr/bin/env bash
# The GPU checks of the project in one short run (a lent H100/H200 has torch and torchvision; zennit travels as a
# wheel in .whl/). Writes each benchmark's JSON to $OUT (or ./gpu-results).
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_precision_and_devices.py 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
timeout 200 python3 benchmarks/lrp_throughput.py --device cuda 2>&1 | tee "$OUT/lrp_throughput_cuda.json"
for arch in resnet18 vgg16; do
    timeout 90 python3 benchmarks/unlearn_cost.py --device cuda --arch "$arch" --size 224 --batch 32 --steps 10 \
        2>&1 | tee "$OUT/unlearn_cost_${arch}_cuda.json"
done
timeout 60 python3 benchmarks/evaluation_speed.py --arch vgg16 --size 224 --patch 16 --images 64 --device cuda \
    2>&1 | tee "$OUT/evaluation_speed_vgg16_cuda.json"
