#!/usr/bin/env bash
# Issue #18's second architecture(s) on a GPU: examples/convert_trained.py on the CIFAR-10 copy with the teachers
# benchmarks/teachers_gpu.sh trained (wide ResNet-32 w32, MobileNetV2-style w16; 30 epochs on the 20,000 training
# images), everything on cuda. Data: .gpudata/cifar9k = a class-balanced 9,000 of the training images
# (convert_finetune.load_data(..., 9000, seed 0): calibration images and the distillation epoch come from them) and
# all 10,000 test images. Torch-Pruning travels as a wheel in .whl/. Output under $OUT.
set -uo pipefail
OUT=${OUT:-runs/convert-trained-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
nvidia-smi -L >"$OUT/machine.txt"
common=(--dataset cifar10 --data-dir .gpudata/cifar9k --device cuda --threads 8 --budgets 0.5,0.45,0.4)
OMP_NUM_THREADS=8 python3 examples/convert_trained.py --arch resnet --width 32 "${common[@]}" --out "$OUT/wrn" \
  --teacher runs/ct-wrn/teacher-resnet-w32-b5-cifar10-n20000-e30.pt >"$OUT/wrn.log" 2>&1 &
OMP_NUM_THREADS=8 python3 examples/convert_trained.py --arch mobilenet --width 16 "${common[@]}" --out "$OUT/mbv2" \
  --teacher runs/ct-mbv2-gpu/teacher-mobilenet-w16-b5-cifar10-n20000-e30.pt >"$OUT/mbv2.log" 2>&1 &
wait
grep -v "^|" "$OUT/wrn.log" "$OUT/mbv2.log" | grep -v Warning
