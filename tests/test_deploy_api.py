"""reuse.deploy's public surface: the names it exports resolve, and importing it imports no optional package.

Needs neither onnx nor onnxruntime: these hold whether or not the deployment extra is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import reuse
import reuse.deploy

PUBLIC = {"CalibrationCoverage", "DeployReport", "export_onnx", "export_pte", "quantize_onnx", "stored_tensors"}
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "executorch")


def test_every_public_name_resolves_from_reuse_deploy() -> None:
    assert set(reuse.deploy.__all__) == PUBLIC
    for name in reuse.deploy.__all__:
        assert getattr(reuse.deploy, name).__name__ == name
    namespace: dict = {}
    exec("from reuse.deploy import *", namespace)
    assert PUBLIC <= namespace.keys()


def test_import_reuse_deploy_imports_no_optional_package() -> None:
    code = f"import sys, reuse, reuse.deploy; print([m for m in {OPTIONAL!r} if m in sys.modules])"
    root = str(Path(reuse.__file__).resolve().parents[1])  # this checkout's reuse, not another install's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
