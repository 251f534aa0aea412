"""A training run's curves as one PNG: metrics.jsonl (one line a step, written by ssr.py) drawn as a grid of
small panels, several runs overlaid: one colour a run, named in the first panel's legend by the shortest tail of
its path that tells the runs apart (`self-a`, or `seed0/run` and `seed1/run`).

    python plot.py out/smollm2-judge out/smollm2-ref --out curves.png

matplotlib is a dev dependency (requirements-dev.txt), not a training one: only this file imports it.
A metric a run did not log (an SSR run has no ref_metric_mean; a step with nothing judged logs null) is
left out of that run's line; a panel no run has a value for is left out of the grid. A panel of several metrics
(the judge's failure kinds, the answer checks) tells them apart by line style, in its own legend, and leaves out a
metric that is 0 in every run: six runs x seven failure kinds would otherwise be 42 lines, most of them flat at 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from data import DataError, read_jsonl
from judge import ANSWER_CHECKS, FAILURE_KINDS

# panel title -> the metrics.jsonl keys it draws (several keys: one line each, told apart by line style)
PANELS = {
    "reward (mean)": ["reward_mean"],
    "format valid rate": ["format_valid_rate"],
    "answer checks failed (share)": [f"answer_check_fail_{check}" for check in ANSWER_CHECKS],
    "judge parse failures": ["judge_parse_failure_rate", *(f"judge_fail_{kind}" for kind in FAILURE_KINDS)],
    "self-score (mean, 0-100)": ["self_score_mean"],
    # does the self-judge still rank? pairwise agreement with the reference metric within groups, Spearman with COMET
    "self-judge vs reference / COMET": ["self_ref_pairwise", "self_comet_spearman"],
    "reference metric (mean, 0-100)": ["ref_metric_mean"],
    "zero-spread groups": ["zero_spread_groups"],
    "response tokens (mean)": ["response_len_mean"],
    "kl_sampler": ["kl_sampler"],
    "grad norm": ["grad_norm"],
}
STYLES = ["-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]  # enough for every key


class PlotError(ValueError):
    """A missing or unreadable metrics.jsonl; the message names the file and line."""


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    try:
        # the data room's reader: unreadable file, bad UTF-8 or JSON named by line; a run still writing (or killed)
        # may have left its last line cut short, which is no step yet
        rows = read_jsonl(path, drop_cut_last=True)
    except DataError as e:
        raise PlotError(str(e)) from None
    for where, row in rows:
        if not isinstance(row.get("step"), int):
            raise PlotError(f"{where}: expected a JSON object with an integer 'step'")
    if not rows:
        raise PlotError(f"{path}: no steps logged")
    return [row for _, row in rows]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, steps where it is missing or not a finite number left out."""
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """The shortest tail of each run's path that tells the runs apart: `self-a`, or `s0/run` and `s1/run`."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    for k in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-k:]).lstrip("/") or "/" for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise PlotError(f"{run_dirs[0]}: the same run given twice")


def plot(run_dirs: list[Path], out_arg: str):
    out = Path(out_arg)
    if not out.name:  # '', '.' or '/': nothing to write to
        raise PlotError(f"--out {out_arg!r}: not a file name; give the PNG to write, e.g. curves.png")
    if out.is_dir():  # a PNG cannot replace a directory: refused before any drawing, leaving nothing behind
        raise PlotError(f"--out {out}: is a directory; give the PNG to write, e.g. {out / 'curves.png'}")
    if not out.parent.is_dir():
        raise PlotError(f"--out {out}: no such directory {out.parent}")
    for d in run_dirs:  # the PNG must not replace what it is drawn from
        if out.resolve() == (d / "metrics.jsonl").resolve():
            raise PlotError(f"--out {out}: is the metrics.jsonl of run {d}; give the PNG to write, e.g. curves.png")
    runs = dict(zip(run_labels(run_dirs), (read_metrics(d) for d in run_dirs)))

    import matplotlib  # after the checks: bad input is refused without loading it
    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    def drawn(key, several):  # a key with a value in some run; in a panel of several keys, a value other than 0
        return any(any(v != 0 for v in series(rows, key)[1]) if several else series(rows, key)[0]
                   for rows in runs.values())

    panels = {title: [k for k in keys if drawn(k, len(keys) > 1)] for title, keys in PANELS.items()}
    panels = {title: keys for title, keys in panels.items() if keys}
    if not panels:
        raise PlotError(f"{', '.join(runs)}: no metric to draw")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {key: STYLES[keys.index(key)] for keys in PANELS.values() for key in keys}  # fixed per key, any run set
    for n, (ax, (title, keys)) in enumerate(zip(axes.flat, panels.items())):
        for i, rows in enumerate(runs.values()):
            for key in keys:
                steps, values = series(rows, key)
                if steps:
                    ax.plot(steps, values, linestyle=styles[key], color=colors[i % len(colors)], lw=1.3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        handles = []
        if n == 0 and len(runs) > 1:  # which colour is which run: once, in the first panel
            handles += [Line2D([], [], color=colors[i % len(colors)], label=label) for i, label in enumerate(runs)]
        if len(keys) > 1:  # which line style is which metric: in the panel that draws several
            handles += [Line2D([], [], color="grey", linestyle=styles[key], label=key.removeprefix("judge_")
                               .removeprefix("answer_check_")) for key in keys]
        if handles:
            ax.legend(handles=handles, fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    # written to a temporary name, then renamed: a reader never sees half a PNG
    tmp = out.with_name(out.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=80)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a quota, a directory turned read-only: no half PNG left behind
        tmp.unlink(missing_ok=True)
        raise PlotError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, not argparse's usage block
        self.exit(2, f"plot: error: {message}\n")


def main(argv=None):
    p = Parser(prog="plot", description="draw runs' metrics.jsonl as PNG curves")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (ssr.py --out-dir), each with metrics.jsonl")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    try:
        plot(args.runs, args.out)
    except PlotError as e:
        p.error(str(e))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
