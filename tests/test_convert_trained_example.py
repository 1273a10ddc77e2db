"""examples/convert_trained.py end to end on the Fashion-MNIST subset shipped in examples/data (tiny settings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "examples" / "data" / "fashion_mnist_subset"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import convert_trained

        yield convert_trained
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.mark.parametrize(
    ("init", "refit", "method"),
    [("fit", False, "reuse"), ("refit", False, "reuse (init='refit')"), ("fit", True, "reuse + reuse.refit")],
)
def test_the_example_writes_its_rows_for_a_budget(example, tmp_path: Path, init: str, refit: bool, method: str) -> None:
    argv = ["--arch", "mobilenet", "--dataset", "fashion-mnist", "--data-dir", str(SUBSET), "--out", str(tmp_path),
            "--width", "4", "--blocks", "3", "--train-images", "300", "--teacher-epochs", "1",
            "--calibration-images", "64", "--ranks", "0", "--steps", "short", "--budgets", "0.7",
            "--budget-init", init, "--epochs", "0", "--no-pruning", "--threads", "1"] + ["--refit"] * refit  # fmt: skip
    rows = example.main(argv)
    budget = [r for r in rows if r["table"] == "budget"]
    assert [r["method"] for r in budget] == [method]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == rows and saved["teacher_params"] > budget[0]["params"]
    assert budget[0]["params"] <= 0.7 * saved["teacher_params"]
    assert all(0.0 <= r["acc_converted"] <= 1.0 for r in rows)
    assert (tmp_path / "results.md").is_file() and (tmp_path / "accuracy_vs_params.png").is_file()


def test_the_example_refuses_an_unknown_init_in_one_line(example, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as err:
        example.main(["--budget-init", "median"])
    assert err.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err


def test_the_distillation_takes_its_own_batch_size(example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--distil-batch-size`` sets the distillation's batches (the teacher keeps ``--batch-size``); results.md
    states it."""
    calls = []
    train = example.cf.train

    def recording(model, data, epochs, lr, batch, seed, teacher=None):
        calls.append((batch, teacher is not None))
        return train(model, data, epochs, lr, batch, seed, teacher=teacher)

    monkeypatch.setattr(example.cf, "train", recording)
    argv = ["--arch", "mobilenet", "--dataset", "fashion-mnist", "--data-dir", str(SUBSET), "--out", str(tmp_path),
            "--width", "4", "--blocks", "3", "--train-images", "100", "--teacher-epochs", "1",
            "--calibration-images", "32", "--ranks", "none", "--budgets", "0.7", "--epochs", "1",
            "--batch-size", "50", "--distil-batch-size", "20", "--no-pruning", "--threads", "1"]  # fmt: skip
    rows = example.main(argv)
    assert calls == [(50, False), (20, True)]
    assert rows[0]["acc_distilled"] is not None
    assert "batch 20, peak lr 0.01" in (tmp_path / "results.md").read_text()


def test_the_example_refuses_a_distillation_batch_below_one(example, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as err:
        example.main(["--distil-batch-size", "0"])
    assert err.value.code == 2 and "--distil-batch-size: must be 1 or more, got 0" in capsys.readouterr().err
