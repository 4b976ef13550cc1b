#!/usr/bin/env bash
# The GPU checks of the project in one short run (a lent H100/H200 has torch, torchvision and scikit-learn; zennit
# travels as a wheel in .whl/). Writes each benchmark's JSON to $OUT (or ./gpu-results).
#   bash benchmarks/gpu_checks.sh                  # everything
#   bash benchmarks/gpu_checks.sh beyond_cnn       # one section: lrp, unlearn, evaluation, beyond_cnn, detection
# detection (not in "everything"): the cases of benchmarks/detection.py side by side on the machine's cores
# (training and un-learning on the CPU, attribution on the GPU); DETECTION_CASES lists "threads:case" entries.
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SECTIONS=${*:-lrp unlearn evaluation beyond_cnn}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for section in $SECTIONS; do
    case $section in
    lrp)
        python3 -m pytest -q -p no:cacheprovider tests/test_precision_and_devices.py 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
        timeout 200 python3 benchmarks/lrp_throughput.py --device cuda 2>&1 | tee "$OUT/lrp_throughput_cuda.json"
        ;;
    unlearn)
        for arch in resnet18 vgg16; do
            timeout 90 python3 benchmarks/unlearn_cost.py --device cuda --arch "$arch" --size 224 --batch 32 --steps 10 \
                2>&1 | tee "$OUT/unlearn_cost_${arch}_cuda.json"
        done
        ;;
    evaluation)
        timeout 60 python3 benchmarks/evaluation_speed.py --arch vgg16 --size 224 --patch 16 --images 64 --device cuda \
            2>&1 | tee "$OUT/evaluation_speed_vgg16_cuda.json"
        ;;
    beyond_cnn)
        python3 -m pytest -q -p no:cacheprovider tests/test_recurrent.py tests/test_neuralized.py 2>&1 | tail -3 \
            | tee "$OUT/beyond_cnn_tests.txt"
        for dtype in float32 float64; do
            timeout 150 python3 benchmarks/beyond_cnn.py --device cuda --dtype "$dtype" --sequences 4096 --length 64 \
                --hidden 256 --samples 262144 --features 64 --fit-samples 1200 --clusters 32 --reference-samples 2 \
                2>&1 | tee "$OUT/beyond_cnn_cuda_${dtype}.json"
        done
        ;;
    detection)
        mkdir -p /tmp/detection
        for entry in ${DETECTION_CASES:-3:resnet18/stamp 3:resnet18/frame 1:small_cnn/tint 1:small_cnn/background}; do
            threads=${entry%%:*}; case_name=${entry#*:}
            OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads timeout "${DETECTION_TIMEOUT:-470}" \
                python3 benchmarks/detection.py --work /tmp/detection --cases "$case_name" \
                >"/tmp/detection/log_${case_name//\//__}.txt" 2>&1 &
        done
        wait
        tail -n 3 /tmp/detection/log_*.txt
        (cd /tmp/detection && tar czf "$OUT/detection.tgz" log_*.txt */result.json */unlearn.json */train.json \
            */spray.json */spray/strategies.json 2>/dev/null)
        ;;
    *) echo "unknown section: $section" >&2; exit 2 ;;
    esac
done
