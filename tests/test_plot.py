"""plot.py: runs' metrics.jsonl drawn as one PNG; a bad or missing metrics.jsonl is one clear line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_plot(*args):
    return subprocess.run([sys.executable, str(ROOT / "plot.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def write_run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_runs_drawn_as_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # a dev dependency (requirements-dev.txt)
    from PIL import Image  # matplotlib's own dependency

    ssr_run = write_run(tmp_path / "ssr", [
        {"step": s, "reward_mean": -0.8 + 0.1 * s, "format_valid_rate": s / 5, "self_score_mean": None if s < 3 else 90.0,
         "judge_parse_failure_rate": 0.5, "judge_fail_no_tags": 0.5, "zero_spread_groups": 0.25,
         "response_len_mean": 50 - s, "kl_sampler": 1e-7, "grad_norm": 3.0, "answer_check_fail_copy": 0.1,
         "self_ref_pairwise": 0.5} for s in range(1, 6)])
    ref_run = write_run(tmp_path / "ref", [{"step": s, "reward_mean": 0.1 * s, "ref_metric_mean": 20.0 + s}
                                           for s in range(1, 4)])
    out = tmp_path / "curves.png"
    proc = run_plot(ssr_run, ref_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and not (tmp_path / "curves.png.tmp").exists()
    with Image.open(out) as image:
        image.verify()  # a complete, decodable PNG
    with Image.open(out) as image:
        # 11 panels with a value in some run: 4 rows of 3 at 80 dpi (4.2 x 2.8 inches a panel)
        assert image.size == (3 * 336, 4 * 224)
    only_ref = tmp_path / "ref.png"
    assert run_plot(ref_run, "--out", only_ref).returncode == 0
    with Image.open(only_ref) as image:  # the keys the run lacks are skipped: 2 panels in one row
        assert image.size == (2 * 336, 224)


@pytest.mark.parametrize("content, message", [
    (None, ": cannot read (No such file or directory)"),
    ('{"step": 1, "reward_mean": 0.5}\n{"step": 2, "rew\n', ":2: not valid JSON (Unterminated string"),
    ('{"reward_mean": 0.5}\n', ":1: expected a JSON object with an integer 'step'"),
    ("\n", ": no steps logged"),
])
def test_bad_metrics_file_is_one_line(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    proc = run_plot(run, "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"plot: error: {run / 'metrics.jsonl'}{message}"), line
    assert not (tmp_path / "x.png").exists()


def test_a_run_still_writing_is_drawn_to_its_last_whole_line(tmp_path):
    """A metrics.jsonl whose last line is cut short (the run is writing it, or was killed mid-write): drawn to the
    last whole step, as a resume would read it."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n{"step": 2, "reward_mean": 0.7}\n{"step": 3, "rew')
    proc = run_plot(run, "--out", tmp_path / "x.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_SIGNATURE)


def test_bad_command_lines_are_one_line(tmp_path):
    """No arguments, an empty --out, an --out that is a directory: one line, exit 2, nothing written (a directory
    --out used to be drawn, saved as DIR.tmp and left there when the rename onto the directory failed)."""
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", [{"step": 1, "reward_mean": 0.5}])
    (tmp_path / "curves.png").mkdir()
    for args, message in [((), "the following arguments are required: runs, --out"),
                          ((run, "--out", ""), "--out '': not a file name"),
                          ((run, "--out", tmp_path / "curves.png"),
                           f"--out {tmp_path / 'curves.png'}: is a directory")]:
        proc = run_plot(*args)
        assert proc.returncode == 2 and proc.stdout == ""
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"plot: error: {message}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run"]


def test_a_full_disk_at_savefig_is_one_line_and_leaves_nothing(tmp_path):
    """The disk fills while the PNG is written: simulated without root by a file-size limit set in the plotting
    process once matplotlib has loaded (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails with EFBIG
    as one on a full disk fails with ENOSPC). One line, exit 2, neither the PNG nor its temporary file left."""
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", [{"step": s, "reward_mean": 0.1 * s, "grad_norm": 1.0} for s in range(1, 6)])
    out = tmp_path / "curves.png"
    # the font cache is built (or read) before the limit; a PNG of these panels is tens of kB
    limited = ("import resource, runpy, sys; import matplotlib.font_manager; "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    # no .pyc under the limit: a module compiled there would be cached cut short, for every later run to trip on
    proc = subprocess.run([sys.executable, "-B", "-c", limited, str(ROOT / "plot.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [f"plot: error: --out {out}: cannot write it (File too large)"]
    assert not out.exists() and not (tmp_path / "curves.png.tmp").exists()


def test_runs_are_named_by_the_shortest_tail_that_tells_them_apart(tmp_path):
    from plot import PlotError, run_labels

    assert run_labels([tmp_path / "self-a", tmp_path / "self-b"]) == ["self-a", "self-b"]
    assert run_labels([tmp_path / "s0" / "run", tmp_path / "s1" / "run"]) == ["s0/run", "s1/run"]
    with pytest.raises(PlotError, match="the same run given twice"):
        run_labels([tmp_path / "run", tmp_path / "x" / ".." / "run"])


def test_a_metric_at_0_in_every_run_is_left_out_of_a_panel_of_several(tmp_path):
    """Seven judge failure kinds a run: only those that ever happened are drawn (and named in the legend); a panel
    of one metric keeps it at 0 (a zero-spread rate of 0 is news)."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    run = write_run(tmp_path / "run", [{"step": s, "judge_parse_failure_rate": 0.0, "judge_fail_no_tags": 0.0,
                                        "zero_spread_groups": 0.0} for s in range(1, 4)])
    assert run_plot(run, "--out", tmp_path / "x.png").returncode == 0
    with Image.open(tmp_path / "x.png") as image:  # the failures panel (every key 0) is gone: one panel is left
        assert image.size == (336, 224)


def test_out_naming_a_runs_metrics_is_refused(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "reward_mean": 0.5}])
    before = (run / "metrics.jsonl").read_bytes()
    proc = run_plot(run, "--out", run / "metrics.jsonl")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"plot: error: --out {run / 'metrics.jsonl'}: is the metrics.jsonl of run {run}; "
                                   "give the PNG to write, e.g. curves.png")
    assert (run / "metrics.jsonl").read_bytes() == before
