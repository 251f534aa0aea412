"""Nothing silently wrong: every bad flag stopped before work starts, runs that cannot mix in one out-dir,
resumes that cannot drift, interrupted and failed saves that leave the newest checkpoint intact, and the
loop's invariants that a single step cannot show (the judge is synced, the schedule resumes, epochs cover
the data)."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed
import rundir
import ssr
from test_ssr import ROOT, SMALL, metrics, run_ssr, write_jsonl

# ----------------------------------------------------------------------------------------------------
# every bad flag: exit 2, one line naming it, no traceback, nothing loaded


@pytest.mark.parametrize("args, message", [
    (["--group-size", 0], "--group-size 0: must be at least 2"),
    (["--group-size", 1], "--group-size 1: must be at least 2"),
    (["--prompts-per-step", 0], "--prompts-per-step 0: must be at least 1"),
    (["--max-new-tokens", 0], "--max-new-tokens 0: must be at least 1"),
    (["--lr", -1], "--lr -1.0: must be > 0"),
    (["--lr", 1e39], "--lr 1e+39: must be > 0 and finite in fp32"),
    (["--temperature", -1], "--temperature -1.0: must be > 0"),
    (["--temperature", 0], "--temperature 0.0: must be > 0"),
    (["--top-p", 0], "--top-p 0.0: must be in (0, 1]"),
    (["--save-every", 0], "--save-every 0: must be at least 1"),
    (["--micro-batch-size", 0], "--micro-batch-size 0: must be at least 1"),
    (["--sampler-batch-size", 1], "--sampler-batch-size 1: must be at least --group-size"),
    (["--steps", 0], "--steps 0: must be at least 1"),
    (["--mini-batches", 3], "must split into --mini-batches 3"),
    (["--w-self", 0], "--w-self 0.0: must be >= 0, like --w-comet and --w-ref, and not all 0"),
    (["--w-ref", -1], "--w-ref -1.0: must be finite and >= 0"),
    (["--judge-samples", 2, "--judge-temperature", 0], "--judge-temperature 0.0: must be > 0 when"),
    (["--resume-override", "lr"], "--resume-override only means something with --resume"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: not a model directory"),
    (["--data", "/nonexistent.jsonl"], "--data /nonexistent.jsonl: no such readable file"),
    (["--w-comet", 0.5, "--comet-model", "/no/such/kiwi"], "--comet-model /no/such/kiwi: no such COMET"),
    (["--out-dir", "{file}"], "is a file, not a directory"),
    (["--out-dir", "{file}/sub"], "cannot create or write there"),
    (["--out-dir", ""], "--out-dir '': give a directory"),
    (["--w-self", "nan"], "--w-self nan: must be finite and >= 0"),
    (["--w-self", "inf"], "--w-self inf: must be finite and >= 0"),
    (["--w-comet", "inf"], "--w-comet inf: must be finite and >= 0"),
    (["--seed", 2**32], "--seed 4294967296: must be in [0, 2**32)"),
    (["--seed", -1], "--seed -1: must be in [0, 2**32)"),
    (["--preset", "ssr-zero-7b", "--model", ""], "--preset ssr-zero-7b is a recipe for a real model: pass --model"),
    (["--group-size", "x"], "argument --group-size: invalid int value: 'x'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--dist", "mpi"], "argument --dist: invalid choice: 'mpi'"),
])
def test_bad_flags_stop_before_any_work(tmp_path, model_dir, data_file, monkeypatch, capsys, args, message):
    """In-process through ssr.main (the CLI's own entry point): the model loader is booby-trapped, so a check
    that came after a model load would show as a failure here, not as a slow pass."""
    (tmp_path / "afile").write_text("x")
    args = [str(a).replace("{file}", str(tmp_path / "afile")) for a in args]
    given = dict(zip(args[::2], args[1::2]))
    base = {"--model": str(model_dir), "--data": str(data_file), "--out-dir": str(tmp_path / "out")} | given
    loaded = []
    monkeypatch.setattr(ssr, "load_trainer_model", lambda *a, **k: loaded.append(a) or 1 / 0)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        ssr.main([x for kv in base.items() for x in kv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not loaded and time.perf_counter() - t0 < 30
    assert len(err.strip().splitlines()) == 1 and err.startswith("ssr: error: ") and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs here")
@pytest.mark.parametrize("args", [["--decode", "kernel"], ["--logprob-backend", "triton"]])
def test_triton_paths_refused_where_triton_cannot_run(tmp_path, model_dir, data_file, monkeypatch, capsys, args):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # test files of the kernels set it for themselves
    test_bad_flags_stop_before_any_work(tmp_path, model_dir, data_file, monkeypatch, capsys, args,
                                        f"{' '.join(args)}: Triton runs on CUDA, or on CPU in its interpreter")


def test_rank_checks_use_the_world_size(model_dir, data_file, tmp_path):
    """Under torchrun validate() sees the world size: --dist none cannot spread over ranks, and the sources of a
    step must split evenly between them. A memory plan for more ranks (--plan-world) reads --dist none as ddp;
    --dist fsdp is FSDP2 on one process too."""
    base = ["--model", str(model_dir), "--data", str(data_file), "--out-dir", str(tmp_path / "o")]
    with pytest.raises(ssr.ConfigError, match="--dist none: several ranks need --dist ddp or --dist fsdp"):
        ssr.validate(ssr.parse_args(base + ["--dist", "none"]), world=2)
    with pytest.raises(ssr.ConfigError, match="--prompts-per-step 3: must be a multiple of the 2 ranks"):
        ssr.validate(ssr.parse_args(base + ["--prompts-per-step", "3"]), world=2)
    ssr.validate(ssr.parse_args(base + ["--prompts-per-step", "4"]), world=2)
    assert [ssr.dist_mode(ssr.parse_args(base + ["--dist", d]), w) for d, w in
            (("none", 1), ("auto", 1), ("fsdp", 1), ("none", 8), ("auto", 8), ("fsdp", 8))] == \
        ["none", "none", "fsdp", "ddp", "ddp", "fsdp"]


def test_bad_flag_through_a_real_subprocess(tmp_path, model_dir, data_file):
    proc = run_ssr("--model", model_dir, "--data", data_file, "--out-dir", tmp_path / "o", "--group-size", 1,
                   expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["ssr: error: --group-size 1: must be at least 2: GRPO compares the "
                                                "rollouts of a group"]
    assert not (tmp_path / "o").exists()  # refused before it created anything


def test_non_utf8_data_names_file_and_line(tmp_path, model_dir):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"src": "ok", "src_lang": "en", "tgt_lang": "zh"}\n{"src": "caf\xe9", "src_lang": "fr", '
                     b'"tgt_lang": "en"}\n')
    proc = run_ssr("--model", model_dir, "--data", data, "--out-dir", tmp_path / "o", expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"ssr: error: {data}:2: not UTF-8 (byte 0xe9 at column 13)"


# ----------------------------------------------------------------------------------------------------
# one run per out-dir; starting over is explicit


def common(model_dir, data_file, out, *extra):
    return ["--model", model_dir, "--data", data_file, "--out-dir", out, *SMALL, "--reward",
            "judge:letter_share_reward", *extra]


def test_second_run_refused_while_the_first_runs(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "ssr.py"),
                              *map(str, common(model_dir, data_file, out, "--steps", 6, "--save-every", 6))],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / ".lock").exists(), "the first run never took the lock"
        second = run_ssr(*common(model_dir, data_file, out, "--steps", 7, "--resume"), expect_ok=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"--out-dir {out} is in use by pid {first.pid}" in second.stderr, second.stderr
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert not (out / ".lock").exists()  # released at the end
    run_ssr(*common(model_dir, data_file, out, "--steps", 7, "--resume"))  # now it may go on
    assert [m["step"] for m in metrics(out)] == list(range(1, 8))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "earlier"}))
    proc = run_ssr(*common(model_dir, data_file, out, "--steps", 1))
    assert f"took over a stale lock of pid {dead.pid}" in proc.stdout


def test_restart_after_an_early_stop_is_explicit(tmp_path, model_dir, data_file):
    """A run stopped before its first checkpoint left logs: a new run refuses (no steps 1, 1, 2...), naming
    both ways out, and --resume says there is nothing to resume."""
    out = tmp_path / "run"
    run_ssr(*common(model_dir, data_file, out, "--steps", 2, "--save-every", 5))
    for p in out.glob("step_*"):  # as if it had been stopped before its save
        import shutil
        shutil.rmtree(p)
    again = run_ssr(*common(model_dir, data_file, out, "--steps", 2), expect_ok=False)
    assert again.returncode == 2 and "holds the logs of a run that saved no checkpoint" in again.stderr
    assert "delete metrics.jsonl and samples.jsonl to start over there, or use another --out-dir" in again.stderr
    resumed = run_ssr(*common(model_dir, data_file, out, "--steps", 2, "--resume"), expect_ok=False)
    assert resumed.returncode == 2 and "holds no step_N checkpoint" in resumed.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2]
    message = rundir.interrupted_message(out, None)  # what Ctrl-C would have said: no --resume advice
    assert "nothing to resume" in message and "--resume" not in message


# ----------------------------------------------------------------------------------------------------
# resume cannot drift


def test_resume_refuses_changed_meaning_and_accepts_steps_and_overrides(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    run = lambda *extra, **kw: run_ssr(*common(model_dir, data_file, out, "--warmup-steps", 4, *extra), **kw)
    run("--steps", 2, "--save-every", 2)
    # as an older ssr wrote it, before these flags existed: it ran with what are now their defaults
    state = torch.load(out / "step_2" / "trainer.pt", weights_only=True)
    newer = ("answer_checks", "judge_refresh", "judge_ema", "stop_on_collapse", "precision")
    torch.save(state | {"config": {k: v for k, v in state["config"].items() if k not in newer}},
               out / "step_2" / "trainer.pt")
    changed = run("--steps", 3, "--resume", "--group-size", 8, expect_ok=False)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert changed.stderr.strip() == ("ssr: error: --resume with changed settings (--group-size 4 -> 8): resume with "
                                      "the saved values, or name them in --resume-override group_size to change "
                                      "them on purpose")
    other_data = write_jsonl(tmp_path / "other.jsonl", [{"src": "x y", "src_lang": "en", "tgt_lang": "zh"}])
    data_changed = run_ssr(*common(model_dir, other_data, out, "--warmup-steps", 4, "--steps", 3, "--resume"),
                           expect_ok=False)
    assert "--data" in data_changed.stderr and "the data file's contents" in data_changed.stderr
    # --steps and the GPU paths may change; a learning-rate change is applied from the resumed step on, when asked for
    run("--steps", 3, "--resume", "--resume-override", "lr", "--lr", 2e-4, "--decode", "sdpa", "--logprob-backend",
        "torch")
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs == pytest.approx([1e-4 * 1 / 4, 1e-4 * 2 / 4, 2e-4 * 3 / 4])
    state = torch.load(out / "step_3" / "trainer.pt", weights_only=True)
    assert state["config"]["lr"] == 2e-4  # the saved config is what ran


def test_partial_metrics_line_and_truncated_state_on_resume(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    run_ssr(*common(model_dir, data_file, out, "--steps", 2, "--save-every", 1))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward_me')  # killed mid-write
    run_ssr(*common(model_dir, data_file, out, "--steps", 3, "--resume"))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    trainer = out / "step_3" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])
    proc = run_ssr(*common(model_dir, data_file, out, "--steps", 4, "--resume"), expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert f"{trainer}: cannot read" in proc.stderr and "resume from an earlier step_N" in proc.stderr
    # a DCP shard cut short (a copy interrupted): named, with its size and the size its metadata needs
    shard = out / "step_2" / "train_state" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    model = distributed.load_trainer_model(out / "step_2", "none", torch.device("cpu"))
    optimizer, scheduler = ssr.make_optimizer(ssr.Config(model="m"), model)
    with pytest.raises(distributed.CheckpointError) as err:
        distributed.load_train_state(out / "step_2", model, optimizer, scheduler)
    assert str(err.value) == (f"{shard}: cut short ({size // 2} of its {size} bytes); resume from an earlier step_N by "
                              f"deleting {out / 'step_2'}")


def test_failed_save_leaves_newest_checkpoint_intact(tmp_path, model_dir, data_file):
    """A write that fails mid-save (here: a file-size limit, as a full disk would): one line, no half
    checkpoint, and the newest complete one still resumes."""
    out = tmp_path / "run"
    run_ssr(*common(model_dir, data_file, out, "--steps", 1, "--save-every", 1))

    def limit_file_size():  # every file this process writes stops at 256 KiB; EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    proc = subprocess.run([sys.executable, str(ROOT / "ssr.py"),
                           *map(str, common(model_dir, data_file, out, "--steps", 2, "--save-every", 1, "--resume"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ssr: error: could not write step_2 (") and ("File too large" in line or "refused a write"
                                                                          in line), line
    assert line.endswith(f"); the newest complete checkpoint, {out / 'step_1'}, is intact")
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["step_1"]
    run_ssr(*common(model_dir, data_file, out, "--steps", 2, "--save-every", 1, "--resume"))


# ----------------------------------------------------------------------------------------------------
# what a single step cannot show


def test_judge_uses_the_current_weights_every_step(tmp_path, verdict_model_dir, two_rows, monkeypatch):
    """Self-judging means the judge *is* the policy of this step: at every judge call its weights equal the
    trainer's, which moved (a judge synced once, or never, would still pass a one-step test). Weight decay
    moves the weights even when a step's rollouts all score alike."""
    out = tmp_path / "run"
    cfg = ssr.parse_args(list(map(str, ["--model", verdict_model_dir, "--data", two_rows, "--out-dir", out, *SMALL,
                                        "--steps", 3, "--lr", 1e-3, "--temperature", 0.5, "--max-new-tokens", 32,
                                        "--judge-max-new-tokens", 32, "--weight-decay", 0.1])))
    seen = []
    real_judge = ssr.judge_translations

    def spy(run, rollouts, seed):
        trainer = dict(distributed.unwrap(run.model).named_parameters())
        judge = dict(run.judge_sampler.model.named_parameters())
        seen.append((max((trainer[k] - judge[k]).abs().max().item() for k in judge),
                     trainer["layers.0.mlp.up_proj.weight"].detach().clone()))
        return real_judge(run, rollouts, seed)

    monkeypatch.setattr(ssr, "judge_translations", spy)
    ssr.train(cfg)
    assert len(seen) == 3 and all(gap == 0.0 for gap, _ in seen), [gap for gap, _ in seen]
    assert not torch.equal(seen[0][1], seen[2][1])  # the policy did move between the judge calls
    assert all(m["judge_parse_failure_rate"] is not None for m in metrics(out))  # the judge really ran


def test_each_epoch_visits_every_row_once_whatever_the_global_rng():
    rows = [{"src": str(i)} for i in range(10)]
    cfg = ssr.Config(prompts_per_step=4, seed=3)
    torch.manual_seed(0)
    first = [r["src"] for step in range(5) for rank in range(2) for r in ssr.step_sources(rows, step, cfg, rank, 2)]
    torch.manual_seed(123)  # the data order is a function of (seed, epoch), not of the global RNG's state
    again = [r["src"] for step in range(5) for rank in range(2) for r in ssr.step_sources(rows, step, cfg, rank, 2)]
    assert first == again
    assert sorted(first[:10]) == sorted(first[10:20]) == sorted(map(str, range(10)))  # each epoch: every row once
    assert first[:10] != first[10:20]  # a fresh permutation per epoch
    one_rank = [r["src"] for step in range(5) for r in ssr.step_sources(rows, step, cfg, 0, 1)]
    assert one_rank == first  # the global batch does not depend on the world size


# ----------------------------------------------------------------------------------------------------
# a run directory is claimed, never assumed: only a smoke run's outputs are ever cleared, on what OUT records


def fake_run(out: Path, preset: str, model: str, step: int = 3):
    """An out-dir as a run leaves it: a checkpoint whose trainer.pt records the run, and its logs."""
    (out / f"step_{step}").mkdir(parents=True)
    torch.save({"step": step, "scheduler": {}, "config": {"preset": preset, "model": model}},
               out / f"step_{step}" / "trainer.pt")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


@pytest.mark.parametrize("args", [["--model", ""], ["--preset", "smoke"], []])
def test_a_smoke_run_never_wipes_a_real_run(tmp_path, data_file, monkeypatch, capsys, args):
    """An empty --model (an unset "$CKPT") makes a smoke run; the out-dir holds a real run's checkpoint, which
    trainer.pt says: refused in one line before anything is built or deleted."""
    out = fake_run(tmp_path / "real", "", "/ckpt/Qwen2.5-7B")
    monkeypatch.setattr(ssr, "make_smoke_model", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(args + ["--data", str(data_file), "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out} holds step_3 of a run of --model /ckpt/Qwen2.5-7B, not a smoke run's" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step_3"]  # nothing touched, no lock left


def test_the_smoke_run_clears_only_what_a_smoke_run_left(tmp_path):
    smoke_out = tmp_path / "smoke"
    fake_run(smoke_out, "smoke", str(smoke_out / "tiny_model"))
    recorded = {"preset": "smoke", "model": str(smoke_out / "tiny_model")}
    rundir.clear(rundir.claim(smoke_out, smoke_out / "step_3", recorded, resume=False, smoke=True))
    assert list(smoke_out.iterdir()) == []
    # logs of a run stopped before its first save: run.json says whose they are; no record, no clearing
    for record, cleared in (({"preset": "smoke", "model": "{out}/tiny_model"}, True),
                            ({"preset": "smoke", "model": "/elsewhere/tiny_model"}, False),
                            ({"preset": "", "model": "/ckpt/m"}, False), (None, False)):
        out = tmp_path / f"logs{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        if record:
            (out / "run.json").write_text(json.dumps(record).replace("{out}", str(out)))
        if cleared:
            rundir.clear(rundir.claim(out, None, rundir.read_run_record(out), resume=False, smoke=True))
        else:
            with pytest.raises(rundir.RunDirError, match="not a smoke run's"):
                rundir.claim(out, None, rundir.read_run_record(out), resume=False, smoke=True)
        assert (out / "metrics.jsonl").exists() != cleared


def test_clearing_a_smoke_run_removes_its_outputs_and_nothing_else(tmp_path):
    """A user's files beside a smoke run's outputs: a new smoke run clears the old run's checkpoints (step_<digits>
    holding trainer.pt), a save it was killed in and its logs; a user's step_* files and folders (a step_7/ without
    a trainer state is no checkpoint), the tiny model it reuses and its run record stay."""
    out = tmp_path / "smoke"
    tiny = out / "tiny_model"
    for step in (2, 10):
        fake_run(out, "smoke", str(tiny), step=step)
    (out / ".step_12.tmp").mkdir()
    (out / "samples.jsonl").write_text('{"step": 1}\n')
    tiny.mkdir()
    (tiny / "config.json").write_text("{}")
    (out / "run.json").write_text(json.dumps({"preset": "smoke", "model": str(tiny)}))
    users = ["step_2_best", "step_by_step_analysis", "step_7", ".step_notes.tmp"]
    for name in users:
        (out / name).mkdir()
        (out / name / "notes.txt").write_text("mine")
    (out / "step_notes.md").write_text("mine")
    rundir.clear(rundir.claim(out, out / "step_10", {"preset": "smoke", "model": str(tiny)}, resume=False, smoke=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(users + ["step_notes.md", "tiny_model", "run.json"])
    assert all((out / name / "notes.txt").read_text() == "mine" for name in users)


def test_plan_writes_nothing(tmp_path, monkeypatch, capsys):
    """--plan of a smoke run builds the tiny model's shape in a temporary directory, never in the out-dir (which
    another run may own), and takes no lock."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(["--plan", "--out-dir", str(out)])
    assert exit_info.value.code == 0 and "fits" in capsys.readouterr().out
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# a resume cannot drift: the data fingerprint is of the bytes read, paths are compared resolved


def test_checkpoints_record_the_data_that_was_read(tmp_path, model_dir, monkeypatch):
    """The data file rewritten mid-run: the checkpoint still records the hash of the rows trained on, so a
    resume on the new file is refused."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "The cat sleeps.", "src_lang": "en", "tgt_lang": "zh"}])
    first = data.read_bytes()
    cfg = ssr.parse_args(list(map(str, ["--model", model_dir, "--data", data, "--out-dir", tmp_path / "o", *SMALL,
                                        "--reward", "judge:letter_share_reward", "--steps", 1])))
    saved = []
    real_sample = ssr.sample_translations

    def rewrite_then_sample(run, sources, seed):
        write_jsonl(data, [{"src": "Something else.", "src_lang": "en", "tgt_lang": "zh"}])
        return real_sample(run, sources, seed)

    monkeypatch.setattr(ssr, "sample_translations", rewrite_then_sample)
    monkeypatch.setattr(ssr, "save_checkpoint", lambda *a, **k: saved.append(a[5]))
    ssr.train(cfg)
    import hashlib
    assert saved[0]["data_sha256"] == hashlib.sha256(first).hexdigest() != hashlib.sha256(data.read_bytes()).hexdigest()


def test_resume_compares_resolved_paths(tmp_path, monkeypatch):
    """The same directory through a relative path, ~ or a trailing slash is the same --model, not a change."""
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"model": str(tmp_path / "m"), "data": str(tmp_path / "d.jsonl"), "lr": 1e-6}
    assert rundir.config_changes(saved, {"model": "m/", "data": "./d.jsonl", "lr": 1e-6}, set()) == []
    with pytest.raises(rundir.RunDirError, match="--model"):
        rundir.config_changes(saved, {"model": "other", "data": "d.jsonl", "lr": 1e-6}, set())


# ----------------------------------------------------------------------------------------------------
# divergence stops the run; no checkpoint of non-finite weights


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, model_dir, data_file):
    """--lr 1e30: step 1's update is finite (weights ~1e30), step 2's loss is NaN. The run stops there with one
    line and exit 1; --keep-last 1 keeps step_1, the last finite checkpoint; no NaN checkpoint is written."""
    out = tmp_path / "run"
    proc = run_ssr(*common(model_dir, data_file, out, "--lr", 1e30, "--steps", 4, "--save-every", 1,
                           "--keep-last", 1), expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ssr: error: step 2: training diverged (loss nan")
    assert f"{out / 'step_1'} is the newest checkpoint: resume from it with a lower learning rate" in line
    assert sorted(p.name for p in out.glob("*step_*")) == ["step_1"]
    weights = load_file(out / "step_1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [m["step"] for m in metrics(out)] == [1]


def test_a_non_finite_gradient_norm_alone_stops_the_run(tmp_path, model_dir, data_file, monkeypatch, capsys):
    """A finite loss whose gradient norm overflowed (the clip then scales every gradient by 0 or NaN): the run
    stops at that step, naming the gradient norm, before the sampler gets the weights or a checkpoint is written."""
    out = tmp_path / "run"
    real_update = ssr.update_policy

    def update_with_overflowed_norm(run, rollouts):
        return {**real_update(run, rollouts), "grad_norm": float("inf")}

    monkeypatch.setattr(ssr, "update_policy", update_with_overflowed_norm)
    monkeypatch.setattr(ssr, "sync_sampler", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(list(map(str, common(model_dir, data_file, out, "--steps", 1))))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and line.startswith("ssr: error: step 1: training diverged (grad_norm inf)")
    assert not list(out.glob("*step_*")) and not (out / ".lock").exists()


def test_non_finite_weights_are_never_saved(tmp_path, model_dir, data_file, monkeypatch, capsys):
    """An update that leaves an inf in the weights while its loss and gradient were finite: the save refuses."""
    out = tmp_path / "run"
    real_update = ssr.update_policy

    def update_then_overflow(run, rollouts):
        stats = real_update(run, rollouts)
        with torch.no_grad():
            distributed.unwrap(run.model).layers[1].mlp.up_proj.weight[3, 5] = float("inf")
        return stats

    monkeypatch.setattr(ssr, "update_policy", update_then_overflow)
    monkeypatch.setattr(ssr, "save_checkpoint", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(list(map(str, common(model_dir, data_file, out, "--steps", 1))))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.strip().splitlines() == [
        "ssr: error: step 1: training diverged (weights not finite); stopped without saving this step: no checkpoint "
        "was written: start over with a lower --lr"]
    assert not (out / ".lock").exists()


# ----------------------------------------------------------------------------------------------------
# the lock: written whole, taken in one atomic step, a stale one taken over by exactly one process


def take_lock(rank, out, go, results):
    go.wait()
    try:
        rundir.lock(out)  # never released: the winner's record must stay
        results.put(("won", os.getpid()))
    except rundir.RunDirError as e:
        results.put(("refused", str(e)))
    except BaseException as e:  # a crash must reach the test as a result, not as a 60 s wait for one
        results.put(("crashed", repr(e)))


def test_stale_lock_is_taken_over_by_exactly_one_racer(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for round_ in range(4):
        out = tmp_path / f"r{round_}"
        out.mkdir()
        stale = json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "earlier"})
        (out / ".lock").write_text(stale if round_ % 2 else "")  # a dead owner, or no readable owner at all
        go, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=take_lock, args=(i, out, go, results)) for i in range(6)]
        for p in procs:
            p.start()
        go.set()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        winners = [pid for kind, pid in got if kind == "won"]
        assert len(winners) == 1, got
        assert json.loads((out / ".lock").read_text())["pid"] == winners[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no temp or claim file left behind


def test_stale_lock_being_taken_over_by_another_process_is_refused(tmp_path):
    """The racer that finds another's take-over claim is refused with a line naming the claim to delete."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "earlier"}))
    _, inode, mtime = rundir.look(tmp_path / ".lock")
    claim = tmp_path / f".lock.takeover.{inode}.{mtime}"
    claim.touch()
    with pytest.raises(rundir.RunDirError, match=f"--out-dir {tmp_path}: another process is taking over its stale "
                                                 f"lock right now \\(if none is, delete {claim}\\)"):
        rundir.lock(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == dead.pid


def test_lock_of_another_host_is_refused_even_if_its_pid_is_dead_here(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": "node-17", "pid": dead.pid, "started": "earlier"}))
    with pytest.raises(rundir.RunDirError, match=f"in use by pid {dead.pid} on node-17 .*cannot be checked from here"):
        rundir.lock(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "node-17"


def test_full_disk_while_taking_the_lock_leaves_no_lock(tmp_path):
    """The record is written whole before it becomes the lock: a write that fails leaves no (empty) lock to wedge
    every later run."""
    code = ("import resource, signal, sys, rundir; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
            "try: rundir.lock(rundir.Path(sys.argv[1]))\nexcept rundir.RunDirError as e: print(e); sys.exit(2)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "cannot write its lock file (File too large)" in proc.stdout, proc
    assert list((tmp_path / "o").iterdir()) == []
    rundir.lock(tmp_path / "o")()  # the next run takes it (and releases it)
    assert list((tmp_path / "o").iterdir()) == []


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path):
    """release() removes OUT/.lock only while the lock still names this process. Another process may hold it by
    then (ours was deleted by hand and a new run took it, or it was taken over): removing that one would let a
    third run start beside a live one."""
    release = rundir.lock(tmp_path)
    other = {"host": socket.gethostname(), "pid": os.getppid(), "started": "later"}  # a live process on this host
    (tmp_path / ".lock").write_text(json.dumps(other))
    release()
    assert json.loads((tmp_path / ".lock").read_text()) == other
    with pytest.raises(rundir.RunDirError, match=f"is in use by pid {os.getppid()} on {socket.gethostname()}"):
        rundir.lock(tmp_path)


# ----------------------------------------------------------------------------------------------------
# checkpoints are ordered by step number, not by name: step_9 < step_10 < step_11


def fake_checkpoints(out: Path, names: list[str]) -> Path:
    """Checkpoint folders as distributed.checkpoints recognises them (a trainer.pt), built directly."""
    for name in names:
        (out / name).mkdir(parents=True)
        torch.save({"step": int(name.removeprefix("step_")), "scheduler": {}, "config": {}}, out / name / "trainer.pt")
    return out


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    out = fake_checkpoints(tmp_path, ["step_10", "step_9", "step_11"])
    (out / "step_12").mkdir()  # no trainer state: not a checkpoint (a save never renamed into place)
    (out / "step_13_best").mkdir()
    (out / "step_13_best" / "trainer.pt").write_bytes(b"")  # a user's folder: not step_<digits>
    assert distributed.checkpoints(out) == [out / "step_9", out / "step_10", out / "step_11"]
    assert distributed.newest_checkpoint(out) == out / "step_11"


def test_keep_last_deletes_the_oldest_steps_not_the_first_names(tmp_path, tiny_model_dir):
    """A save at step 11 with --keep-last 2 beside step_9 and step_10 keeps step_10 and step_11 (by name, step_10
    sorts first and would be deleted)."""
    from checkpoint import load_pretrained

    out = fake_checkpoints(tmp_path, ["step_9", "step_10"])
    model = load_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    distributed.save_checkpoint(out, 11, model, optimizer, scheduler, {}, tiny_model_dir, keep_last=2)
    assert sorted(p.name for p in out.iterdir()) == ["step_10", "step_11"]


# ----------------------------------------------------------------------------------------------------
# --judge-model must speak the policy's language


@pytest.fixture(scope="module")
def tokenizer_models(tmp_path_factory):
    """A policy, a judge with the same tokenizer and other weights, one whose tokenizer has the same size but
    another vocabulary (trained on other text), and one with a smaller vocabulary (bytes only)."""
    from checkpoint import make_tiny_model

    root = tmp_path_factory.mktemp("tokenizers")
    english = ["the cat sleeps on the mat, and the dog sits by the door"] * 20
    other = ["今天很冷，我们在家里读书，喝茶，听音乐。" + "quick brown fox jumps"] * 20
    return {name: make_tiny_model(root / name, corpus=corpus, vocab_size=size, seed=seed)
            for name, corpus, size, seed in (("policy", english, 280, 0), ("same", english, 280, 1),
                                             ("other", other, 280, 0), ("smaller", None, 280, 0))}


@pytest.mark.parametrize("judge_name, message", [("other", "(vocabulary of 280 tokens, not 280; e.g. "),
                                                 ("smaller", "(vocabulary of 259 tokens, not 280; e.g. ")])
def test_judge_with_another_tokenizer_is_refused_before_any_work(tokenizer_models, data_file, tmp_path, monkeypatch,
                                                                capsys, judge_name, message):
    from checkpoint import load_tokenizer

    assert load_tokenizer(tokenizer_models["policy"]).vocab_size == 280  # the case: same size, other tokens
    monkeypatch.setattr(ssr, "load_trainer_model", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(ssr, "load_pretrained", lambda *a, **k: 1 / 0)
    judge_dir = tokenizer_models[judge_name]
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(["--model", str(tokenizer_models["policy"]), "--judge-model", str(judge_dir), "--data",
                  str(data_file), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"ssr: error: --judge-model {judge_dir}: its tokenizer is not the policy's {message}"), err
    assert not (tmp_path / "o").exists()


def test_judge_with_the_same_tokenizer_is_accepted(tokenizer_models, data_file, tmp_path):
    from checkpoint import load_tokenizer

    cfg = ssr.parse_args(["--model", str(tokenizer_models["policy"]), "--judge-model", str(tokenizer_models["same"]),
                          "--data", str(data_file), "--out-dir", str(tmp_path / "o"), "--max-prompt-tokens", "1024"])
    ssr.validate(cfg, 1)
    ssr.check_tokenizer(cfg, ssr.read_data(cfg.data)[0], load_tokenizer(cfg.model))  # byte-level: long prompts


def test_plan_validates_as_a_run_of_that_size_would(model_dir, data_file, tmp_path, capsys):
    """--plan --plan-world 3 is refused where a 3-rank run is: 64 prompts do not split over 3 ranks."""
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(["--plan", "--plan-world", "3", "--model", str(model_dir), "--data", str(data_file),
                  "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr()
    assert exit_info.value.code == 2 and "fits" not in err.out
    assert err.err.strip().splitlines() == ["ssr: error: --prompts-per-step 64: must be a multiple of the 3 ranks, and "
                                            "each rank's rollouts (168) must split into --mini-batches 1"]


def in_process(args, monkeypatch, capsys) -> tuple[int, str]:
    """ssr.main(args) with the model loaders booby-trapped: (exit status, stderr) of a refusal before any load."""
    monkeypatch.setattr(ssr, "load_trainer_model", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(ssr, "load_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(list(map(str, args)))
    return exit_info.value.code, capsys.readouterr().err


def test_resume_with_steps_below_the_checkpoint_is_refused(tmp_path, model_dir, data_file, monkeypatch, capsys):
    out = fake_run(tmp_path / "run", "", str(model_dir), step=3)
    code, err = in_process(["--model", model_dir, "--data", data_file, "--out-dir", out, "--resume", "--steps", 2],
                           monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"ssr: error: --steps 2: {out / 'step_3'} is already past it (step 3); pass a larger --steps to continue that "
        f"run"]


def test_data_that_is_not_valid_unicode_once_decoded(tmp_path, model_dir, monkeypatch, capsys):
    """Valid UTF-8 and valid JSON, but a \\ud800 escape decodes to a lone surrogate no tokenizer can encode."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"src": "ok", "src_lang": "en", "tgt_lang": "zh"}\n{"src": "bad \\ud800 text", "src_lang": "en", '
                    '"tgt_lang": "zh"}\n')
    code, err = in_process(["--model", model_dir, "--data", data, "--out-dir", tmp_path / "o"], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"ssr: error: {data}:2: not valid Unicode once decoded ('\\ud800': a lone surrogate \\u escape)"]


def test_malformed_model_config_is_one_line_before_any_load(tmp_path, model_dir, data_file, monkeypatch, capsys):
    import shutil

    bad = shutil.copytree(model_dir, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_attention_heads": 0}))
    code, err = in_process(["--model", bad, "--data", data_file, "--out-dir", tmp_path / "o"], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"ssr: error: {bad / 'config.json'}: num_attention_heads is 0; it must be a whole number >= 1"]


def test_damaged_trainer_state_advice_is_true(tmp_path, model_dir, data_file, monkeypatch, capsys):
    """A trainer.pt of garbage: torch's own message would suggest weights_only=False (unpickling a damaged file,
    and code execution, for nothing); the line says it is damaged and how to go on."""
    out = fake_run(tmp_path / "run", "", str(model_dir), step=3)
    (out / "step_3" / "trainer.pt").write_bytes(b"garbage text\n")
    code, err = in_process(["--model", model_dir, "--data", data_file, "--out-dir", out, "--resume", "--steps", 4],
                           monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"ssr: error: {out / 'step_3' / 'trainer.pt'}: cannot read (damaged: not a trainer state ssr wrote); resume "
        f"from an earlier step_N by deleting {out / 'step_3'}"]
    assert "weights_only" not in err


def test_full_disk_while_trimming_logs(tmp_path):
    """A resume rewrites the logs through a temp file: a write that fails leaves the old file and one line."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    code = ("import resource, signal, sys, rundir; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4, 4))\n"
            "try: rundir.trim_logs(rundir.Path(sys.argv[1]), 1)\nexcept rundir.RunDirError as e: print(e); sys.exit(2)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr == "", proc
    assert proc.stdout.strip() == (f"cannot rewrite {tmp_path / 'metrics.jsonl'} (File too large); it is unchanged: "
                                   f"free some space there and run the same command again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


# ----------------------------------------------------------------------------------------------------
# the logs on --resume: every line up to the checkpoint kept, whatever its text; a cut last line dropped

def test_trim_logs_keeps_every_line_up_to_the_step_whatever_the_text(tmp_path):
    """A model's output can hold U+2028, U+2029 or U+0085, which json.dumps(ensure_ascii=False) leaves raw (and
    str.splitlines breaks lines at); a full disk can cut the last line inside a character. Resuming at step 2
    keeps every line of steps 1 and 2 as it was and drops the rest."""
    samples = [{"step": step, "response": f"<answer>un{char}deux</answer>"}
               for step, char in ((1, "\u2028"), (1, "\u2029"), (2, "\u0085"), (3, "é"))]
    lines = [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in samples]  # as ssr.log_step writes them
    (tmp_path / "samples.jsonl").write_bytes(b"".join(lines))
    steps = [(json.dumps({"step": step, "reward_mean": 0.5}) + "\n").encode() for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(steps) + '{"step": 4, "note": "caf'.encode() + "é".encode()[:1])
    rundir.trim_logs(tmp_path, 2)
    assert (tmp_path / "samples.jsonl").read_bytes() == b"".join(lines[:3])
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(steps[:2])


@pytest.mark.parametrize("damaged, message", [
    ('{"step": 2, "rew', ":2: not valid JSON (Unterminated string starting at); --resume keeps each log up to its "
                         "checkpoint: fix or delete that line"),
    ('{"reward_mean": 1}', ":2: no integer 'step' (not a line ssr.py wrote); --resume keeps each log up to its "
                           "checkpoint: fix or delete that line"),
])
def test_trim_logs_names_a_damaged_line_instead_of_dropping_the_rest(tmp_path, damaged, message):
    """Only the last line can be cut by a crash; a damaged line before it is named, and the log is left as it was
    (cutting it there would drop every later step's line)."""
    text = '{"step": 1}\n' + damaged + '\n{"step": 3}\n'
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(rundir.RunDirError) as err:
        rundir.trim_logs(tmp_path, 3)
    assert str(err.value) == f"{tmp_path / 'metrics.jsonl'}{message}"
    assert (tmp_path / "metrics.jsonl").read_text() == text


# ----------------------------------------------------------------------------------------------------
# the launcher's variables: a complete env:// launch, or one process, or one line naming the variable


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "environment variable WORLD_SIZE is not set, but RANK=1 is: a distributed launch sets all of "
                    "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun does); unset RANK to run one "
                    "process"),
    ({"WORLD_SIZE": "2"}, "environment variable RANK is not set, but WORLD_SIZE=2 is"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE=0: must be at least 1"),
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE='abc': not a whole number"),
    ({"LOCAL_RANK": "0"}, "environment variable RANK is not set, but LOCAL_RANK=0 is"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "environment variable MASTER_ADDR is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "environment variable RANK=2: must be in [0, WORLD_SIZE=2)"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "port"},
     "environment variable MASTER_PORT='port': not a whole number"),
])
def test_leftover_launcher_variables_are_refused(tmp_path, model_dir, data_file, monkeypatch, capsys, env, message):
    """RANK=1 alone used to run as a rank 1 that wrote nothing (rank 0 writes the logs) and exit 0; WORLD_SIZE=2 alone
    trained one process on half the prompts; WORLD_SIZE=0 or abc was a traceback. Refused before anything is
    read or written."""
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "o"
    code, err = in_process(["--model", model_dir, "--data", data_file, "--out-dir", out], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"ssr: error: {message}"), err
    assert not out.exists()


def test_leftover_rank_through_a_real_subprocess(tmp_path, model_dir, data_file):
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES} | {"RANK": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "ssr.py"), "--model", str(model_dir), "--data", str(data_file),
                           "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ssr: error: environment variable WORLD_SIZE is not set, but RANK=1 is: a distributed launch sets all of RANK, "
        "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun does); unset RANK to run one process"]


def test_a_complete_launch_is_read_as_that_rank():
    """What torchrun (or srun with the same variables) sets is one rank of a job to join; none of the rank variables
    is one process, whatever MASTER_ADDR and MASTER_PORT say."""
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node-3", "MASTER_PORT": "29500"}
    assert distributed.launch_environment(torchrun) == distributed.Launch(rank=1, world=2, local_rank=1, env=True)
    assert distributed.launch_environment({}) == distributed.Launch(rank=0, world=1, local_rank=0, env=False)
    assert distributed.launch_environment({"MASTER_ADDR": "node-3", "MASTER_PORT": "29500"}) == distributed.Launch()


# ----------------------------------------------------------------------------------------------------
# setup is a checklist in cost order: data, tokenizers and resume compatibility before the plan, the out-dir and
# any model (the smoke model included)


def refused_before(args, monkeypatch, capsys, traps) -> tuple[str, str]:
    """ssr.main(args) with each of `traps` (ssr's functions) booby-trapped: it must exit 2 with one line before
    reaching any of them. Returns (stdout, the error line)."""
    for name in traps:
        monkeypatch.setattr(ssr, name, lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(list(map(str, args)))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return out, err.strip()


BUILDS = ("make_smoke_model", "warm_up", "check_memory", "load_trainer_model", "load_pretrained")


def test_smoke_run_refuses_rows_without_references_before_building_anything(tmp_path, monkeypatch, capsys):
    """--w-ref without --model: the data is read before the smoke model is built and warmed up (~20 s) and the plan
    printed, and before the out-dir is made."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"src": "hi", "src_lang": "en", "tgt_lang": "zh"}])
    out = tmp_path / "o"
    stdout, err = refused_before(["--data", data, "--out-dir", out, "--w-ref", 1], monkeypatch, capsys, BUILDS)
    assert err == f"ssr: error: {data}:1: missing or empty 'ref' (--w-ref needs a reference on every row)"
    assert "memory plan" not in stdout and "SMOKE RUN" not in stdout and not out.exists()


def test_bleu_without_mecab_is_refused_before_building_anything(tmp_path, monkeypatch, capsys):
    """--ref-metric bleu on rows with Japanese references, on a machine without MeCab (sacrebleu's own test for it,
    made true here): one line from data.bleu_tokenizer before the smoke model is built."""
    import sacrebleu.tokenizers.tokenizer_ja_mecab as ja_mecab

    import data

    monkeypatch.setattr(ja_mecab, "MeCab", None)
    data.bleu_tokenizer.cache_clear()  # an earlier test may have built the tokenizer (its success is cached)
    rows = write_jsonl(tmp_path / "train.jsonl",
                       [{"src": "hi", "ref": "こんにちは", "src_lang": "en", "tgt_lang": "ja"}])
    out = tmp_path / "o"
    stdout, err = refused_before(["--data", rows, "--out-dir", out, "--w-ref", 1, "--ref-metric", "bleu"],
                                 monkeypatch, capsys, BUILDS)
    assert err.startswith(f"ssr: error: --ref-metric bleu on {rows}: BLEU for Japanese targets needs sacrebleu's "
                          f"ja-mecab tokenizer"), err
    assert not out.exists()


def test_long_prompts_are_refused_before_the_plan_and_the_out_dir(tmp_path, model_dir, data_file, monkeypatch,
                                                                  capsys):
    out = tmp_path / "o"
    stdout, err = refused_before(["--model", model_dir, "--data", data_file, "--out-dir", out,
                                  "--max-prompt-tokens", 5], monkeypatch, capsys, BUILDS)
    assert err.startswith(f"ssr: error: {data_file}:1: the actor prompt is ") and err.endswith(
        " tokens, over --max-prompt-tokens 5"), err
    assert "memory plan" not in stdout and not out.exists()


def test_smoke_run_checks_prompts_with_its_tokenizer_before_the_warm_up(tmp_path, data_file, monkeypatch, capsys):
    """The smoke model's tokenizer is built with it (a second); the warm-up (~20 s) comes after the prompts fit."""
    stdout, err = refused_before(["--data", data_file, "--out-dir", tmp_path / "o", "--max-prompt-tokens", 5],
                                 monkeypatch, capsys, ("warm_up", "check_memory", "load_trainer_model"))
    assert err.startswith(f"ssr: error: {data_file}:1: the actor prompt is "), err
    assert "memory plan" not in stdout


# ----------------------------------------------------------------------------------------------------
# --resume-override model keeps the checkpoint's tokenizer


def test_resume_override_model_needs_the_checkpoints_tokenizer(tokenizer_models, data_file, tmp_path, monkeypatch,
                                                               capsys):
    """A checkpoint trained with the policy's tokenizer (saved in it), resumed with --model of another vocabulary:
    refused before any model loads (it used to train the checkpoint's weights on the other tokenizer's ids, or index
    past the embedding); a model with the same tokenizer may replace it."""
    import shutil

    out = tmp_path / "run"
    flags = ["--data", data_file, "--out-dir", out, "--max-prompt-tokens", 1024]  # byte-level tokens: long prompts
    cfg = ssr.parse_args(list(map(str, ["--model", tokenizer_models["policy"], *flags])))
    shutil.copytree(tokenizer_models["policy"], out / "step_2")  # its weights and tokenizer, as a save writes them
    saved = ssr.run_config(cfg, ssr.read_data(cfg.data)[1])
    torch.save({"step": 2, "scheduler": {}, "config": saved}, out / "step_2" / "trainer.pt")
    resume = [*flags, "--resume", "--resume-override", "model"]
    for name in ("other", "smaller"):
        code, err = in_process(["--model", tokenizer_models[name], *resume], monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"ssr: error: --resume-override model: --model {tokenizer_models[name]} has another "
                              f"tokenizer than {out / 'step_2'} (vocabulary of "), err
        assert err.strip().endswith("); its weights read their own tokenizer's ids: give a --model with the "
                                    "checkpoint's tokenizer"), err
    same = ssr.parse_args(list(map(str, ["--model", tokenizer_models["same"], *resume])))
    assert ssr.check_resume(same, out / "step_2", saved["data_sha256"], 0) == 2


# ----------------------------------------------------------------------------------------------------
# the smoke model is rebuilt when it was built for other settings


def test_smoke_model_is_rebuilt_for_another_template(tmp_path, model_dir, data_file):
    """OUT's smoke model, recorded as built for r1 (here: the session's unwarmed smoke model), is reused by a smoke run
    with r1's settings and rebuilt (warmed up for chat, recorded so) by one with --template chat: a model warmed up
    for r1 gave valid 0.00 under chat, where a model warmed up for chat gives ~0.8."""
    import shutil

    out = tmp_path / "smoke"
    tiny = shutil.copytree(model_dir, out / "tiny_model")
    sha = ssr.read_data(str(data_file))[1]
    (tiny / ssr.SMOKE_RECORD).write_text(json.dumps({"template": "r1", "seed": 0, "data_sha256": sha}))
    unwarmed = load_file(tiny / "model.safetensors")
    smoke = ["--data", data_file, "--out-dir", out, "--steps", 1, "--prompts-per-step", 2, "--log-samples", 0]
    run_ssr(*smoke)
    reused = load_file(tiny / "model.safetensors")
    assert all(torch.equal(reused[k], unwarmed[k]) for k in unwarmed)
    proc = run_ssr(*smoke, "--template", "chat")
    assert "smoke model rebuilt and warmed up" in proc.stdout
    rebuilt = load_file(tiny / "model.safetensors")
    assert any(not torch.equal(rebuilt[k], unwarmed[k]) for k in unwarmed)
    assert json.loads((tiny / ssr.SMOKE_RECORD).read_text()) == {"template": "chat", "seed": 0, "data_sha256": sha}
    assert metrics(out)[0]["format_valid_rate"] > 0.5


def test_smoke_record_names_template_seed_and_data():
    """What the reuse is decided on: each of template, seed and data changes the record; the RL flags do not."""
    base = ssr.parse_args([])
    record = ssr.smoke_record(base, "sha-a")
    assert record != ssr.smoke_record(ssr.parse_args(["--template", "chat"]), "sha-a")
    assert record != ssr.smoke_record(ssr.parse_args(["--seed", "1"]), "sha-a")
    assert record != ssr.smoke_record(base, "sha-b")
    assert record == ssr.smoke_record(ssr.parse_args(["--lr", "1e-3", "--steps", "3"]), "sha-a")


# ----------------------------------------------------------------------------------------------------
# an out-dir at the filesystem root; weights not finite before any update


@pytest.mark.parametrize("out_dir", ["/", "//", "/tmp/..", "/./"])
def test_out_dir_at_the_filesystem_root_is_refused(model_dir, data_file, out_dir):
    """--out-dir "$UNSET/" is "/": as root the run would write /step_1, /metrics.jsonl, ..."""
    cfg = ssr.parse_args(["--model", str(model_dir), "--data", str(data_file), "--out-dir", out_dir])
    with pytest.raises(ssr.ConfigError, match=f"^--out-dir {out_dir}: the filesystem root; give a directory"):
        ssr.validate(cfg, 1)


def test_non_finite_base_weights_are_named_not_blamed_on_the_learning_rate(tmp_path, model_dir, data_file,
                                                                           monkeypatch, capsys):
    import shutil

    from safetensors.torch import save_file

    bad = shutil.copytree(model_dir, tmp_path / "m")
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(ssr, "Sampler", lambda *a, **k: 1 / 0)  # refused before the sampler is even built
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(list(map(str, ["--model", bad, "--data", data_file, "--out-dir", out, *SMALL, "--steps", 1])))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines() == [
        f"ssr: error: {bad / 'model.safetensors'}: tensor 'model.layers.1.mlp.up_proj.weight' is not finite (inf or "
        f"NaN) in the base checkpoint itself, before any update: the checkpoint is damaged (a lower --lr would not "
        f"help); use an intact copy of it"], err
    assert not list(out.glob("*step_*"))


# ----------------------------------------------------------------------------------------------------
# a folder of the user's named step_N is never deleted by a save


def test_a_users_step_folder_where_the_run_saves_is_refused_at_the_start(tmp_path, model_dir, data_file, monkeypatch,
                                                                         capsys):
    out = tmp_path / "run"
    (out / "step_2").mkdir(parents=True)
    (out / "step_2" / "notes.txt").write_text("mine")
    (out / "step_9").mkdir()  # past --steps: never in the way
    code, err = in_process(["--model", model_dir, "--data", data_file, "--out-dir", out, "--steps", 3], monkeypatch,
                           capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"ssr: error: {out / 'step_2'} is not a checkpoint (no trainer.pt) but stands where this run saves step 2, "
        f"and it is never deleted to make room: move or rename it, or use another --out-dir"]
    assert (out / "step_2" / "notes.txt").read_text() == "mine"
    rundir.check_saves_free(out, 2, 8)  # a resume from step 2 saves 3..8 only


def test_a_save_never_deletes_a_users_step_folder(tmp_path, tiny_model_dir):
    """The folder appeared after the start (the claim-time check could not see it): the save is refused, in one
    CheckpointError, before anything is written, and the folder stays as it was."""
    from checkpoint import load_pretrained

    out = fake_checkpoints(tmp_path, ["step_1"])
    (out / "step_2").mkdir()
    (out / "step_2" / "notes.txt").write_text("mine")
    model = load_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(distributed.CheckpointError) as err:
        distributed.save_checkpoint(out, 2, model, optimizer, scheduler, {}, tiny_model_dir)
    assert str(err.value) == (f"could not write step_2: {out / 'step_2'} is in the way and is not a checkpoint (no "
                              f"trainer.pt), so it is not deleted: move it out of {out}, then continue from the newest "
                              f"complete checkpoint, {out / 'step_1'}, with --resume")
    assert (out / "step_2" / "notes.txt").read_text() == "mine" and not (out / ".step_2.tmp").exists()


# ----------------------------------------------------------------------------------------------------
# a full disk while appending a step's log lines


def test_full_disk_while_logging_stops_with_one_line_and_no_half_line(tmp_path, model_dir, data_file):
    """Step 2's metrics line does not fit (a file-size limit just above step 1's log, as a full disk would): the
    run stops with one line naming the file, the reason and the intact checkpoint; the log is left whole, so the
    resume that follows (with room again) runs."""
    out = tmp_path / "run"
    run_ssr(*common(model_dir, data_file, out, "--steps", 1, "--save-every", 1, "--log-samples", 0))
    before = (out / "metrics.jsonl").read_bytes()

    def limit_file_size():  # every file this process writes stops just past the log's current end
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 100, len(before) + 100))

    resume = common(model_dir, data_file, out, "--steps", 2, "--save-every", 1, "--log-samples", 0, "--resume")
    proc = subprocess.run([sys.executable, str(ROOT / "ssr.py"), *map(str, resume)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"ssr: error: step 2: cannot append to {out / 'metrics.jsonl'} (File too large); the run stopped there: "
        f"{out / 'step_1'}, the newest checkpoint, is intact: free some space and continue with --resume (the log "
        f"lines after its step are dropped)"]
    assert (out / "metrics.jsonl").read_bytes() == before
    run_ssr(*resume)
    assert [m["step"] for m in metrics(out)] == [1, 2]
