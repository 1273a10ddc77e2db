"""The report of a ``benchmarks/reproduce.py`` grid, from its JSONL lines: one row per configuration (its seeds'
accuracies, mean ± sample std, min / max), the markdown table, the two plots (accuracy against N and against
parameters) and, with ``--docs``, the table put into a markdown page. It reads results; it runs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _reproduce_grid import GROUPS, TRAINER, Point, ReuseError, duration


@dataclass
class Row:
    """The runs of one configuration over its seeds."""

    group: str
    model: str
    dataset: str
    reuse: int
    width: float
    share: bool
    shuffle: bool
    schedule: str
    epochs: int
    batch_size: int
    recipe: str = "paper"
    params: int | None = None
    mflops: float | None = None
    train_images: int | None = None  # images per epoch (all of the training set, or --subset of them)
    seeds: list[int] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)  # last test accuracy of each finished run, in [0, 1]
    times: list[float] = field(default_factory=list)  # training seconds of each run
    diverged: list[int] = field(default_factory=list)  # seeds whose run diverged
    machines: list[str] = field(default_factory=list)

    @property
    def variant(self) -> str:
        return "no share" if not self.share else ("no shuffle" if not self.shuffle else "shared, shuffle")

    def stats(self) -> tuple[float, float | None, float, float] | None:
        """Mean, sample standard deviation (None for one run), min and max of the accuracies, in percent."""
        if not self.accs:
            return None
        pct = [100 * a for a in self.accs]
        return statistics.fmean(pct), statistics.stdev(pct) if len(pct) > 1 else None, min(pct), max(pct)


def summarize(lines: list[dict[str, Any]]) -> list[Row]:
    """One row per configuration (every setting but the seed), in the order of GROUPS, width and N."""
    rows: dict[str, Row] = {}
    for line in lines:
        s = line["settings"]
        key = json.dumps({k: v for k, v in s.items() if k != "seed"}, sort_keys=True)
        if key not in rows:
            point = Point(group=line.get("group", ""), **s)
            rows[key] = Row(
                group=point.group, model=point.model(), dataset=point.dataset, reuse=point.reuse,
                width=point.width, share=point.share, shuffle=point.shuffle, schedule=point.schedule,
                epochs=point.epochs, batch_size=point.batch_size, recipe=point.recipe,
            )  # fmt: skip
        row = rows[key]
        threads = line.get("threads", "?")
        row.machines.append(f"{line.get('machine', '?')} ({threads} thread{'' if threads == 1 else 's'})")
        result = line.get("result")
        if result is None:
            row.diverged.append(s["seed"])
            continue
        row.seeds.append(s["seed"])
        row.accs.append(result["last_acc"])
        row.times.append(result["train_time_s"])
        row.params, row.mflops = result["params"], result["mflops"]
        row.train_images = result.get("train_images")
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(rows.values(), key=lambda r: (order.get(r.group, len(order)), r.width, r.reuse, r.epochs))


def table(rows: list[Row]) -> str:
    """The markdown table: mean ± sample std over seeds (min / max beside), params, MFLOPs, epochs, time."""
    machines = sorted({m for r in rows for m in r.machines})
    tag = {m: f"m{i}" for i, m in enumerate(machines, 1)}
    head = (
        "| model | variant | N | width | params | MFLOPs | epochs | train images | seeds | test acc. % (mean ± std) "
        "| min / max | train time per run | machine |"
    )
    out = [head, "|" + "---|" * 13]
    for r in rows:
        st = r.stats()
        acc = "—" if st is None else f"{st[0]:.2f} ± {'—' if st[1] is None else f'{st[1]:.2f}'}"
        spread = "—" if st is None else f"{st[2]:.2f} / {st[3]:.2f}"
        if r.diverged:
            acc += f" ({len(r.diverged)} diverged)"
        params = "—" if r.params is None else f"{r.params:,}"
        mflops = "—" if r.mflops is None else f"{r.mflops:.2f}"
        minutes = "—" if not r.times else duration(statistics.fmean(r.times))
        where = ", ".join(sorted({tag[m] for m in r.machines}))
        out.append(
            f"| {r.model} | {r.variant} | {r.reuse} | {r.width:g}x | {params} | {mflops} | {r.epochs} | "
            f"{'—' if r.train_images is None else f'{r.train_images:,}'} | "
            f"{len(r.seeds) + len(r.diverged)} | {acc} | {spread} | {minutes} | {where} |"
        )
    legend = [f"- {tag[m]}: {m}" for m in machines]
    return "\n".join(out) + "\n\nMachines:\n\n" + "\n".join(legend) + "\n"


def report_text(rows: list[Row], args: argparse.Namespace) -> str:
    datasets = ", ".join(sorted({r.dataset for r in rows}))
    schedules = ", ".join(sorted({f"recipe {r.recipe}, {r.schedule}, batch {r.batch_size}" for r in rows}))
    return (
        f"# Grid `{args.grid}`: {datasets}\n\n"
        f"Written by `benchmarks/reproduce.py` from `{args.jsonl.name}` ({schedules}). Test accuracy is the last "
        f"epoch's, in percent: mean ± sample standard deviation over the seeds, and the lowest / highest run. "
        f"Params count each shared weight once; MFLOPs are `torch.utils.flop_counter` on one image (2 per "
        f"multiply-add); train time excludes evaluation.\n\n" + table(rows)
    )


def plot(rows: list[Row], by: str, path: Path, title: str) -> None:
    """Accuracy (mean, min-max bars over seeds) against N (``by="n"``) or parameters (``by="params"``): shared,
    no-shuffle and no-share runs each with their own marker and colour (shared runs of another width in green);
    the ablations are nudged sideways so that their bars do not hide the shared run's at the same N. Without
    matplotlib (a bare GPU machine) there is no plot; the table is written all the same."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    style = {  # colour, marker, sideways nudge
        "shared, shuffle": ("tab:blue", "o", 0.0),
        "no shuffle": ("tab:orange", "s", -1.0),
        "no share": ("tab:red", "^", 1.0),
    }
    widths = [r.width for r in rows]
    main_width = max(set(widths), key=widths.count) if widths else 1.0
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.stats() is not None:
            series.setdefault((r.variant, r.width, r.epochs, r.dataset), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (variant, width, epochs, _), members in series.items():
        members.sort(key=lambda r: r.reuse if by == "n" else (r.params or 0))
        colour, marker, nudge = style[variant]
        colour = colour if width == main_width or variant != "shared, shuffle" else "tab:green"
        xs = [r.reuse + 0.12 * nudge if by == "n" else r.params * (1 + 0.02 * nudge) for r in members]
        st = [r.stats() for r in members]
        err = [[m - lo for m, _, lo, _ in st], [hi - m for m, _, _, hi in st]]
        line = "-" if len(xs) > 1 else "none"
        label = f"{variant}, {width:g}x, {epochs} epochs"
        ax.errorbar(xs, [m for m, *_ in st], yerr=err, color=colour, marker=marker, ls=line, capsize=3, label=label)
        if by == "params":  # which N each point is
            for x, r, (m, *_) in zip(xs, members, st, strict=True):
                ax.annotate(f"N={r.reuse}", (x, m), textcoords="offset points", xytext=(6, -10), fontsize=7)
    if by == "params":
        ax.set_xscale("log")
    ax.set(xlabel="N (uses of each LRU block)" if by == "n" else "parameters", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    TRAINER.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(lines: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    """Table and plots of ``lines``, to ``<results-dir>/<grid>.md`` and ``<grid>_acc_vs_{n,params}.png``."""
    rows = summarize(lines)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    TRAINER.write_text(args.results_dir / f"{args.grid}.md", report_text(rows, args))
    title = f"{args.grid}: test accuracy, mean and min-max over seeds"
    plot(rows, "n", args.results_dir / f"{args.grid}_acc_vs_n.png", title)
    plot(rows, "params", args.results_dir / f"{args.grid}_acc_vs_params.png", title)
    if args.docs is not None:
        update_docs(args.docs, args.grid, table(rows))
    return rows


def update_docs(path: Path, grid: str, text: str) -> None:
    """Put ``text`` between the lines ``<!-- grid:NAME -->`` and ``<!-- /grid:NAME -->`` of a markdown page."""
    start, end = f"<!-- grid:{grid} -->", f"<!-- /grid:{grid} -->"
    page = path.read_text()
    if start not in page or end not in page:
        raise ReuseError(f"--docs {path}: it has no {start} ... {end} block to put the table in; add those two lines")
    before, rest = page.split(start, 1)
    _, after = rest.split(end, 1)
    TRAINER.write_text(path, f"{before}{start}\n{text.rstrip()}\n{end}{after}")
