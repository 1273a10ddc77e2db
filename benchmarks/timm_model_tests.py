"""Run timm's own model test suite (``tests/test_models.py`` of a timm checkout) on the ``lrunet*`` names.

timm's tests are the peer's statement of what a registered model must do; they run here, outside this repository,
on a copy of their file in a temporary folder (nothing of theirs is kept in this project):

    python benchmarks/timm_model_tests.py --timm-tests /path/to/pytorch-image-models/tests/test_models.py \\
        --checkpoints ../shared/pretrained/lrunet-official

Two things are set up around their file, and nothing in it is changed but one list:

- a ``conftest.py`` that imports ``reuse.models`` (which registers the names with timm);
- with ``--checkpoints``, a fresh ``TORCH_HOME`` whose hub cache holds the authors' release files, so that timm's
  ``pretrained=True`` tests load them instead of downloading (offline machines); without it those tests need
  the network;
- the module of our registrations (``_timm``) is added to ``FEAT_INTER_FILTERS``, the list of model modules
  that timm runs its ``forward_intermediates`` tests on (timm lists only its own there).

Prints pytest's summary and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="timm_model_tests.py", description=__doc__.splitlines()[0])
    p.add_argument("--timm-tests", required=True, type=Path, help="timm's tests/test_models.py")
    p.add_argument("--checkpoints", type=Path, help="folder holding the authors' .t7 release files")
    p.add_argument("-k", default="lrunet", help="pytest -k expression (default: %(default)s)")
    return p.parse_args(argv)


def _with_our_module(source: str) -> str:
    """Their file with ``'_timm'`` appended to ``FEAT_INTER_FILTERS``."""
    new, count = re.subn(r"(FEAT_INTER_FILTERS = \[)", r"\1'_timm', ", source, count=1)
    if count != 1:
        raise SystemExit("timm_model_tests.py: error: FEAT_INTER_FILTERS not found in the given test file")
    return new


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not args.timm_tests.is_file():
        raise SystemExit(f"timm_model_tests.py: error: no file at {args.timm_tests}")
    with tempfile.TemporaryDirectory(prefix="timm-tests-") as tmp:
        work = Path(tmp)
        (work / "test_models.py").write_text(_with_our_module(args.timm_tests.read_text()))
        (work / "conftest.py").write_text("import reuse.models  # noqa: F401  (registers lrunet* with timm)\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if args.checkpoints:
            hub = work / "torch-home" / "hub" / "checkpoints"
            hub.mkdir(parents=True)
            for f in sorted(args.checkpoints.glob("*.t7")):
                shutil.copy(f, hub / f.name)
            env["TORCH_HOME"] = str(work / "torch-home")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-rA"]
        cmd += ["test_models.py", "-k", args.k]
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        lines = done.stdout.splitlines()
        outcomes: dict[str, int] = {}
        for line in lines:
            m = re.match(r"(PASSED|FAILED|SKIPPED|ERROR) test_models\.py::(\w+)", line)
            if m:
                outcomes[f"{m.group(2)} {m.group(1)}"] = outcomes.get(f"{m.group(2)} {m.group(1)}", 0) + 1
        for key in sorted(outcomes):
            print(f"{outcomes[key]:4d}  {key}")
        print("\n".join(lines[-3:]))
        if done.returncode not in (0, 1):
            print(done.stderr[-2000:], file=sys.stderr)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
