"""Issue #18 diagnosis on the CIFAR-10-copy teachers: does the closed-form fit lose to the weight-aligned mean at
rank 0 because the blocks with the largest inputs dominate its least squares? Variants, each + calibrate:
the mean after weight matching; the fit as it is; the fit with each block's input moments scaled to one trace
(every block weighs the same, as in the mean). Prints test accuracy on all 10,000 test images."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "examples")
import convert_finetune as cf  # noqa: E402
import convert_trained as ct  # noqa: E402

import reuse  # noqa: E402
import reuse.fx.fit as fit  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
original = fit.fit_shared


def equal_weight(shared, deltas, targets, covs, norms=None):
    traces = [torch.diagonal(c, dim1=-2, dim2=-1).sum() for c in covs]
    mean = sum(traces) / len(traces)
    return original(shared, deltas, targets, [c * (mean / t) for c, t in zip(covs, traces)], norms)


data = cf.load_data(Path(sys.argv[1]), None, 0)
g = torch.Generator().manual_seed(7)
calib = cf.to_float(data.train_x[torch.randperm(len(data.train_y), generator=g)[:2000]])
teachers = {
    "wrn": (cf.resnet(32, 5, in_chans=3), "runs/ct-wrn/teacher-resnet-w32-b5-cifar10-n20000-e30.pt"),
    "mbv2": (ct.mobilenet(16, 5, in_chans=3), "runs/ct-mbv2-gpu/teacher-mobilenet-w16-b5-cifar10-n20000-e30.pt"),
}
for name, (teacher, path) in teachers.items():
    teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    teacher = teacher.to(device).eval()
    print(name, "teacher", round(100 * cf.evaluate(teacher, data.test_x, data.test_y), 2), flush=True)
    for rank in (0, 4):
        for variant in ("aligned mean", "fit", "fit, blocks weighed equally"):
            fit.fit_shared = equal_weight if variant.endswith("equally") else original
            t0 = time.perf_counter()
            opts = dict(init="mean", align="weights", shuffle=False) if variant == "aligned mean" else dict(data=calib)
            student = reuse.fx.convert(teacher, delta_rank=rank, calibrate=False, **opts)
            student = reuse.calibrate(student, calib)
            acc = cf.evaluate(student, data.test_x, data.test_y)
            print(f"{name} rank {rank} {variant}: {100 * acc:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
fit.fit_shared = original
