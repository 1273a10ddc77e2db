"""Tests of the evidence harness ``benchmarks/reproduce.py`` on the CPU.

A two-point grid on the shipped Fashion-MNIST subset (one epoch of 64 images each): one JSON line per run with
its settings, a rerun that trains nothing, a point whose run directory holds a last.pt continued with --resume;
the table of --report-only from a hand-written JSONL, checked against means and spreads computed here; a dry
run that prints the grid and writes nothing; one-line errors.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "examples" / "data" / "fashion_mnist_subset"


rp = load_script(ROOT / "benchmarks" / "reproduce.py", "reproduce")

# Two points: N = 1 and N = 2 of a quarter-width LruNet, one seed, one epoch of 64 images.
TINY_GRID = [
    "--preset", "cpu", "--grid", "tiny", "--only", "reuse", "--reuse-values", "1,2", "--width", "0.25",
    "--seeds", "0", "--epochs", "1", "--batch-size", "16", "--subset", "64", "--test-subset", "64",
    "--data-dir", str(SUBSET), "--threads", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _args(tmp_path: Path) -> list[str]:
    return [*TINY_GRID, "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]


def _lines(tmp_path: Path) -> list[dict]:
    return [json.loads(t) for t in (tmp_path / "results" / "tiny.jsonl").read_text().splitlines()]


def test_grid_writes_a_line_per_run_and_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_main = rp.TRAINER.main
    rp.main(_args(tmp_path))
    lines = _lines(tmp_path)
    assert [line["settings"]["reuse"] for line in lines] == [1, 2]
    for line in lines:
        assert line["settings"] | {"reuse": 0} == {
            "dataset": "fashion-mnist", "reuse": 0, "width": 0.25, "share": True, "shuffle": True, "seed": 0,
            "schedule": "onecycle", "epochs": 1, "batch_size": 16, "lr": 0.1, "subset": 64, "test_subset": 64,
            "recipe": "paper",
        }  # fmt: skip
        assert line["config"]["recipe"] == "paper" and line["config"]["reuse"] == line["settings"]["reuse"]
        assert line["grid"] == "tiny" and line["group"] == "reuse" and line["threads"] == 1
        assert "cores" in line["machine"] and "torch" in line["machine"]
        assert line["result"]["epochs"] == 1 and line["result"]["train_images"] == 64
    assert [line["result"]["model"] for line in lines] == ["1-LruNet-0.25x", "2-LruNet-0.25x"]
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "| 1-LruNet-0.25x |" in table and "| 2-LruNet-0.25x |" in table
    for name in ("tiny_acc_vs_n.png", "tiny_acc_vs_params.png"):
        assert (tmp_path / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(argv: list[str]) -> dict:
        raise AssertionError(f"trained again: {argv}")

    monkeypatch.setattr(rp.TRAINER, "main", no_training)
    rp.main(_args(tmp_path))  # both points are in the JSONL: skipped
    assert _lines(tmp_path) == lines

    # The grid stopped after the second run's training, before its line was written: the rerun continues that
    # run's directory with --resume (the run is complete, so nothing is trained again) and writes the line.
    jsonl = tmp_path / "results" / "tiny.jsonl"
    jsonl.write_text(jsonl.read_text().splitlines(keepends=True)[0])
    calls = []

    def recording(argv: list[str]) -> dict:
        calls.append(argv)
        return real_main(argv)

    monkeypatch.setattr(rp.TRAINER, "main", recording)
    rp.main(_args(tmp_path))
    assert len(calls) == 1 and "--resume" in calls[0] and "--reuse" in calls[0]
    assert calls[0][calls[0].index("--reuse") + 1] == "2"
    assert Path(calls[0][calls[0].index("--out") + 1]) == Path(lines[1]["result"]["out"])
    again = _lines(tmp_path)
    assert len(again) == 2 and again[1]["resumed"] is True
    assert again[1]["result"]["last_acc"] == lines[1]["result"]["last_acc"]


def _line(reuse: int, seed: int, acc: float | None, share: bool = True, shuffle: bool = True) -> dict:
    settings = {
        "dataset": "fashion-mnist", "reuse": reuse, "width": 0.5, "share": share, "shuffle": shuffle,
        "seed": seed, "schedule": "onecycle", "epochs": 15, "batch_size": 128, "lr": 0.1, "subset": None,
        "test_subset": None,
    }  # fmt: skip
    result = None
    if acc is not None:
        result = {"last_acc": acc, "params": 1000 * reuse + (0 if share else 500), "mflops": 2.5 * reuse,
                  "train_time_s": 600.0 + seed, "train_images": 20_000}  # fmt: skip
    group = "reuse" if share and shuffle else ("no-share" if not share else "no-shuffle")
    return {"grid": "tiny", "group": group, "settings": settings, "threads": 2, "machine": "a test box",
            "result": result, "error": None if result else "diverged"}  # fmt: skip


def test_report_only_builds_the_table_from_the_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accs = {1: [0.812, 0.846, 0.83], 4: [0.871, 0.859], "no-share": [0.88, 0.9]}
    lines = [_line(1, s, a) for s, a in enumerate(accs[1])] + [_line(4, s, a) for s, a in enumerate(accs[4])]
    lines += [_line(4, s, a, share=False) for s, a in enumerate(accs["no-share"])]
    lines += [_line(4, 0, 0.5, shuffle=False), _line(4, 1, None, shuffle=False)]  # one run diverged
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr(rp.TRAINER, "main", lambda argv: pytest.fail("--report-only trained"))

    rp.main([*_args(tmp_path), "--report-only"])
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]]
            for r in (tmp_path / "results" / "tiny.md").read_text().splitlines() if r.startswith("| ")}  # fmt: skip
    for name, values in (("1-LruNet-0.5x", accs[1]), ("4-LruNet-0.5x", accs[4]),
                         ("4-LruNet-0.5x-noshare", accs["no-share"])):  # fmt: skip
        pct = [100 * a for a in values]
        row = rows[name]
        assert row[9] == f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"
        assert row[10] == f"{min(pct):.2f} / {max(pct):.2f}"
        assert row[8] == str(len(values)) and row[7] == "20,000"
    assert rows["1-LruNet-0.5x"][4:7] == ["1,000", "2.50", "15"]  # params, MFLOPs, epochs
    assert rows["1-LruNet-0.5x"][11] == "10.0 min"  # mean of 600, 601 and 602 s
    assert rows["4-LruNet-0.5x-noshuffle"][9] == "50.00 ± — (1 diverged)" and rows["4-LruNet-0.5x-noshuffle"][8] == "2"
    assert rows["4-LruNet-0.5x-noshare"][1] == "no share" and rows["4-LruNet-0.5x-noshuffle"][1] == "no shuffle"
    assert "a test box (2 threads)" in (tmp_path / "results" / "tiny.md").read_text()
    assert (tmp_path / "results" / "tiny_acc_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_prints_the_grid_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rp.main([*_args(tmp_path), "--only", "reuse,no-share", "--ablation-reuse", "2", "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    grid = [line for line in out if "seed 0" in line]
    assert len(grid) == 3 and all("est." in line for line in grid)
    assert "1-LruNet-0.25x " in grid[0] and "2-LruNet-0.25x " in grid[1] and "2-LruNet-0.25x-noshare" in grid[2]
    assert out[0].startswith("grid tiny: 3 runs on fashion-mnist (64 train, 64 test images)")
    assert out[-1].startswith("estimated total: ")
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--only", "tables"], "--only: no group tables"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--seeds", ""], "at least one value"),
        (["--report-only"], "holds no results yet"),
    ],
)
def test_bad_options_are_one_line(
    tmp_path: Path, extra: list[str], match: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["reproduce.py", *_args(tmp_path), *extra])
    with pytest.raises(SystemExit) as stop:
        rp.cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("reproduce.py: error: ") and match in err[0]


def test_a_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.jsonl").write_text(json.dumps(_line(1, 0, 0.8)) + "\n{not json\n")
    with pytest.raises(rp.ReuseError, match=r"tiny.jsonl:2: not a JSON line"):
        rp.main([*_args(tmp_path), "--report-only"])


def test_report_only_regenerates_the_docs_table(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    lines = [_line(1, 0, 0.812), _line(1, 1, 0.846)]
    (tmp_path / "results" / "tiny.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nbefore\n<!-- grid:tiny -->\nold table\n<!-- /grid:tiny -->\nafter\n")
    rp.main([*_args(tmp_path), "--report-only", "--docs", str(page)])
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Results\n\nbefore\n<!-- grid:tiny -->\n| model |")
    assert "82.90 ± 2.40" in text and text.endswith("<!-- /grid:tiny -->\nafter\n")
    page.write_text("no markers\n")
    with pytest.raises(rp.ReuseError, match="grid:tiny"):
        rp.main([*_args(tmp_path), "--report-only", "--docs", str(page)])


# ------------------------------------------------------------------------------------- fashion-gpu, --jobs

# The fashion-gpu preset cut down to two quarter-width runs of one epoch on 64 images.
TINY_GPU_GRID = [
    "--preset", "fashion-gpu", "--grid", "tinygpu", "--reuse-values", "1,2", "--width", "0.25", "--seeds", "0",
    "--epochs", "1", "--batch-size", "16", "--subset", "64", "--test-subset", "64", "--data-dir", str(SUBSET),
    "--threads", "1", "--device", "cpu",
]  # fmt: skip


def _gpu_args(tmp_path: Path) -> list[str]:
    return [*TINY_GPU_GRID, "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]


def test_fashion_gpu_preset_is_the_issue_grid() -> None:
    args = rp.parse_args(["--preset", "fashion-gpu"])
    points = rp.build_grid(args)
    assert sorted((p.reuse, p.seed) for p in points) == [(n, s) for n in (1, 4, 10) for s in (0, 1)]
    for p in points:
        assert (p.dataset, p.width, p.epochs, p.batch_size, p.recipe, p.group) == (
            "fashion-mnist", 1.0, 30, 256, "fast", "reuse",
        )  # fmt: skip
        assert (p.schedule, p.lr, p.subset) == ("cosine", 0.2, None)
        argv = p.argv()
        assert argv[argv.index("--recipe") + 1] == "fast"
    cfg = rp.TRAINER.parse_config(points[0].argv())[0]
    assert (cfg.ema, cfg.label_smoothing, cfg.warmup_epochs, cfg.nesterov, cfg.epochs) == (0.999, 0.1, 2.0, True, 30)


def test_jobs_run_in_parallel_processes_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs 2: two child processes, a log each with its epoch lines, one JSON line each (with the run's
    config); a rerun starts no process; --status says where each run stands."""
    out = rp.main([*_gpu_args(tmp_path), "--jobs", "2", "--poll", "0.2"])
    lines = [json.loads(t) for t in (tmp_path / "results" / "tinygpu.jsonl").read_text().splitlines()]
    assert sorted(line["settings"]["reuse"] for line in lines) == [1, 2] and len(out["lines"]) == 2
    for line in lines:
        assert line["settings"]["recipe"] == "fast" and line["config"]["ema"] == 0.999
        assert line["result"]["epochs"] == 1 and line["result"]["recipe"] == "fast" and line["threads"] == 1
        log = (tmp_path / "runs" / (Path(line["result"]["out"]).name + ".log")).read_text()
        assert "epoch 1/1" in log and "test loss" in log and "elapsed" in log
    assert "| 2-LruNet-0.25x |" in (tmp_path / "results" / "tinygpu.md").read_text()

    def no_process(*a: object, **k: object) -> None:
        raise AssertionError("started a run again")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    rp.main([*_gpu_args(tmp_path), "--jobs", "2"])
    assert len((tmp_path / "results" / "tinygpu.jsonl").read_text().splitlines()) == 2
    rows = rp.main([*_gpu_args(tmp_path), "--reuse-values", "1,2,4", "--status"])["status"]
    assert [r["state"] for r in rows] == ["done", "done", "not started"]
    assert rows[0]["epochs_done"] == 1 and rows[0]["last_acc"] == rows[0]["epoch_acc"]


def test_a_failing_job_is_reported_and_the_rest_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run that fails (here: its run directory is a file) leaves no line; the other run finishes and is
    recorded; the grid ends with one error naming the failure and its log."""
    args = rp.parse_args(_gpu_args(tmp_path))
    bad = next(p for p in rp.build_grid(args) if p.reuse == 2)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / bad.run_name()).write_text("in the way")
    with pytest.raises(rp.ReuseError, match=r"1 run\(s\) failed: .*2-LruNet-0.25x.*exit status 2.*cannot write"):
        rp.main([*_gpu_args(tmp_path), "--jobs", "2", "--poll", "0.2"])
    lines = (tmp_path / "results" / "tinygpu.jsonl").read_text().splitlines()
    assert [json.loads(t)["settings"]["reuse"] for t in lines] == [1]


def test_status_reads_a_stopped_run(tmp_path: Path) -> None:
    args = rp.parse_args(_gpu_args(tmp_path))
    point = rp.build_grid(args)[0]
    run = tmp_path / "runs" / point.run_name()
    run.mkdir(parents=True)
    history = [{"epoch": e, "test_acc": 0.5 + e / 100, "time_s": 10.0 * e} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (row, other) = rp.main([*_gpu_args(tmp_path), "--status"])["status"]
    assert row["state"] == "partial" and row["epochs_done"] == 3 and row["epoch_acc"] == 0.53
    assert other["state"] == "not started"


def _append_many(path: str, who: int) -> None:
    for i in range(15):
        rp.append_jsonl(Path(path), {"who": who, "i": i})


def test_concurrent_appends_lose_no_line(tmp_path: Path) -> None:
    """Four processes appending at once (each append rewrites the file and renames it): the lock keeps every
    line."""
    import multiprocessing

    path = tmp_path / "grid.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert sorted((d["who"], d["i"]) for d in lines) == [(w, i) for w in range(4) for i in range(15)]


def test_lines_older_than_the_recipe_read_as_the_papers(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    old = _line(1, 0, 0.8)
    old["settings"].pop("recipe", None)
    (tmp_path / "results" / "tiny.jsonl").write_text(json.dumps(old) + "\n")
    (line,) = rp.read_jsonl(tmp_path / "results" / "tiny.jsonl")
    assert line["settings"]["recipe"] == "paper"


# ------------------------------------------------------------------------------------------ pack_gpu_data.py

pk = load_script(ROOT / "benchmarks" / "pack_gpu_data.py", "pack_gpu_data")


def test_pack_gpu_data_copies_fashion_and_a_balanced_cifar_subset(tmp_path: Path) -> None:
    import numpy as np

    shared = tmp_path / "shared"
    rng = np.random.default_rng(0)
    for folder, shape, n in (("fashion_mnist", (28, 28), 50), ("cifar10_jpeg_q75_lossy", (32, 32, 3), 200)):
        (shared / folder).mkdir(parents=True)
        for split in ("train", "test"):
            labels = np.repeat(np.arange(10), n // 10).astype(np.int64)  # class-major, as the shared copy
            images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            np.savez_compressed(shared / folder / f"{split}.npz", images=images, labels=labels)
    dest = tmp_path / ".gpudata"
    manifest = pk.main(["--shared", str(shared), "--dest", str(dest), "--cifar-train", "60", "--cifar-test", "40"])
    assert (dest / "fashion_mnist" / "train.npz").read_bytes() == (shared / "fashion_mnist" / "train.npz").read_bytes()
    with np.load(dest / "cifar10_subset" / "train.npz") as d:
        assert d["images"].shape == (60, 32, 32, 3) and d["images"].dtype == np.uint8
        assert d["labels"].dtype == np.int64 and np.bincount(d["labels"]).tolist() == [6] * 10
        assert len(set(d["labels"][:10].tolist())) > 1  # shuffled, not class-major
    assert manifest["cifar10_subset/test.npz"]["images"] == 40
    assert json.loads((dest / "MANIFEST.json").read_text())["files"].keys() == manifest.keys()
    with pytest.raises(pk.PackError, match="more than --max-mib"):
        pk.main(["--shared", str(shared), "--dest", str(dest), "--cifar-train", "60", "--cifar-test", "40",
                 "--max-mib", "0.01"])  # fmt: skip
    assert not (dest / "cifar10_subset" / "train.npz").exists()  # an oversized pack is not left behind
    with pytest.raises(pk.PackError, match="multiple of 10"):
        pk.main(["--shared", str(shared), "--dest", str(dest), "--cifar-train", "55"])


def test_the_report_needs_no_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU machine may lack matplotlib: the table is written, the plots are left out."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.jsonl").write_text(json.dumps(_line(1, 0, 0.8)) + "\n")
    rp.main([*_args(tmp_path), "--report-only"])
    assert (tmp_path / "results" / "tiny.md").is_file() and not list((tmp_path / "results").glob("*.png"))
