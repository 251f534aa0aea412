"""bench.py's command line: sizes checked before any benchmark starts (the benchmarks themselves run in
scripts/gpu_checks.sh and by hand; timings never live in tests)."""
import sys

import pytest

import bench


@pytest.mark.parametrize("argv, line", [
    (["sampler", "--prompts", "0"], "bench: error: argument --prompts: 0: must be >= 1"),
    (["sampler", "--new-tokens", "-5"], "bench: error: argument --new-tokens: -5: must be >= 1"),
    (["update", "--seq", "0"], "bench: error: argument --seq: 0: must be >= 1"),
    (["step", "--steps", "1"], "bench: error: argument --steps: 1: must be >= 2"),
    (["trl", "--rounds", "x"], "bench: error: argument --rounds: 'x' is not an integer"),
    (["update", "--peak-tflops", "0"], "bench: error: argument --peak-tflops: 0.0: must be a finite number > 0"),
    (["kernels", "--hbm-gbps", "nan"], "bench: error: argument --hbm-gbps: nan: must be a finite number > 0"),
    (["nope"], "bench: error: argument what: invalid choice: 'nope'"),
])
def test_bad_sizes_are_one_line(monkeypatch, capsys, argv, line):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines()[0].startswith(line), err
    assert len(err.strip().splitlines()) == 1, err
