#!/usr/bin/env bash
# Train the second-architecture teachers of examples/convert_trained.py on a GPU (issue #18), and probe
# reuse.fx.convert(data=...) on a CUDA model. Conversion itself runs later on the CPU, from the cached teachers:
#   python examples/convert_trained.py --arch resnet --dataset cifar10 --width 32 --teacher-epochs 30 --out runs/ct-wrn
# Data: .gpudata/cifar_full (the CIFAR-10 copy's 20,000 training images, and 1,000 of its test images: the teacher's
# accuracy printed here is on those 1,000 only). Output under $OUT (default: runs/gpu-teachers).
set -uo pipefail
OUT=${OUT:-runs/gpu-teachers}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
DATA=.gpudata/cifar_full
{ nvidia-smi -L; python3 -c "import torch, timm, scipy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  >"$OUT/machine.txt" 2>&1
common=(--dataset cifar10 --data-dir "$DATA" --teacher-epochs 30 --device cuda --teacher-only --threads 4)
(OMP_NUM_THREADS=4 python3 examples/convert_trained.py --arch resnet --width 32 "${common[@]}" --out "$OUT/ct-wrn" \
  >"$OUT/wrn.log" 2>&1; echo "exit $?" >>"$OUT/wrn.log") &
(OMP_NUM_THREADS=4 python3 examples/convert_trained.py --arch mobilenet --width 16 "${common[@]}" --out "$OUT/ct-mbv2" \
  >"$OUT/mbv2.log" 2>&1; echo "exit $?" >>"$OUT/mbv2.log") &
OMP_NUM_THREADS=4 python3 - >"$OUT/cuda_probe.log" 2>&1 <<'PY'
# Does convert(data=...) run on a CUDA model and agree with the same conversion on the CPU?
import copy, sys, torch
sys.path.insert(0, "tests")
from _helpers import Residual, randomize
import reuse
torch.manual_seed(0)
net = randomize(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    *[Residual(8) for _ in range(4)], torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(8, 5))).eval()
x = torch.randn(64, 3, 8, 8)
cpu = reuse.fx.convert(net, data=x, delta_rank=2)
for name, kw in [("convert(data=) on cuda", {}), ("budget on cuda", {"budget": 0.6})]:
    try:
        cuda = reuse.fx.convert(copy.deepcopy(net).cuda(), data=x.cuda(), **({"delta_rank": 2} | kw if not kw else kw))
        dev = {p.device.type for p in cuda.parameters()}
        with torch.no_grad():
            diff = (cuda(x.cuda()).cpu() - cpu(x)).abs().max().item() if not kw else float("nan")
        print(name, "ok; parameters on", dev, "max |cuda - cpu|", diff)
    except Exception as e:  # the probe reports, it does not stop the teachers
        print(name, "FAILED:", type(e).__name__, e)
PY
wait
cat "$OUT"/*.log
