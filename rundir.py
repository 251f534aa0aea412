"""The run directory (--out-dir): one run owns it, a new run never mixes with an old one, and a resume cannot
quietly change what the run means.

- `lock(out)`: OUT/.lock names the owner (host, pid, start time) for the run's life; a second run refuses with
  one line. A lock left by a process that died (same host, pid gone) is reported and taken over.
- `claim(...)`: what a run may do with what OUT already holds: continue its newest checkpoint (--resume), or
  start in an empty directory. Logs without a checkpoint (a run stopped before its first save) are refused
  too: starting over must be explicit. The smoke run is the exception: it starts over, clearing what a smoke run
  left there, as OUT records it (its newest checkpoint's run config, or run.json); any other run's outputs are
  refused, whatever the new run's flags say. `check_saves_free(...)`: no folder of the user's where a save goes.
- `config_changes(...)`: on --resume, the saved config against the effective one. Flags that change what the
  run means (data, model, group size, seed, lengths, reward, judge, learning rate, ...) are refused unless
  --resume-override names them; flags about how it runs (steps, logging, batch sizes for memory) may change.
- `append_lines(...)`: each step's log lines, appended whole or not at all (a full disk leaves no half line);
  `trim_logs(...)`: on resume, drop what was logged after the checkpoint, through a temp file and a rename.

eval.py's --out follows the same rules, in the second half of this file: `check_eval_out` refuses other
settings, and another checkpoint under a known label (`fingerprint`, OUT/<label>/model.json); `load_rows`
resumes a test set's segments.jsonl, dropping a last line a kill cut short. Every rewrite of a file either
program owns goes through `replace_file`: an interrupt leaves the old file or the new one, never half.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from checkpoint import CheckpointError, load_tokenizer, read_config
from data import DataError, parse_jsonl, read_bytes, read_jsonl
from distributed import checkpoints, is_checkpoint

LOGS = ("metrics.jsonl", "samples.jsonl")
RUN_RECORD = "run.json"  # which run owns OUT: {"preset", "model"}

# Flags a resumed run may change: how it runs, not what it computes. Everything else is refused unless named
# in --resume-override (then applied: the loop reads the config every step; the LR is put into the restored
# schedule and the weight decay into the restored optimizer).
FREE_TO_CHANGE = {"steps", "save_every", "keep_last", "log_samples", "wandb", "dist_timeout", "resume",
                  "resume_override", "plan", "plan_world", "gpu_gib", "micro_batch_size", "sampler_batch_size",
                  "grad_checkpointing", "dist", "out_dir", "preset", "decode", "logprob_backend", "precision",
                  "stop_on_collapse"}


class RunDirError(ValueError):
    """The out-dir cannot be used as asked; the message says why and the ways out."""


def replace_file(path: Path, text: str):
    """Write through a temporary file and os.replace, so an interrupt leaves either the old or the new file. A
    write that fails (a full disk) leaves the old file and no temporary one, and says so in one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"cannot rewrite {path} ({e.strerror}); it is unchanged: free some space there and run "
                          f"the same command again") from None



def check_writable(out: Path):
    """OUT must be (or become) a directory we can write: said before any work, not at the first save."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out-dir {out}: is a file, not a directory")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"--out-dir {out}: cannot create or write there (no write permission on {existing})")


def lock(out: Path, flag: str = "--out-dir", tool: str = "ssr"):
    """Take OUT/.lock for this process (call the returned release() at the end). Refuses if a live run holds it.
    flag and tool name the directory in messages: ssr.py's --out-dir, or eval.py's --out.

    The lock file is written whole under a private name first and then hard-linked as OUT/.lock: one atomic
    step that fails if a lock exists, so no process ever sees an empty or half-written lock (a full disk fails
    the private write and leaves no lock). A stale lock (same host, pid gone) or one no ssr could have written
    (unreadable) is taken over by exactly one process: the taker first creates a claim named after that very
    lock file (O_EXCL: one winner), checks the lock is still the one it judged stale, and renames its own
    record over it. A lock naming another host is never taken over: its pid cannot be checked from here."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    mine = out / f".lock.{me['host']}.{me['pid']}.tmp"
    try:
        try:
            mine.write_text(json.dumps(me))
        except OSError as e:
            raise RunDirError(f"{flag} {out}: cannot write its lock file ({e.strerror}); free some space there "
                              f"or use another {flag}") from None
        for _ in range(3):  # the lock can vanish (released) or change (taken over) between our looks at it
            try:
                os.link(mine, path)  # atomic: fails if a lock exists, else the whole record appears at once
                return lambda: release(path, me)
            except FileExistsError:
                pass
            except OSError as e:
                raise RunDirError(f"{flag} {out}: cannot take {path} ({e.strerror})") from None
            seen = look(path)
            if seen is None:
                continue  # released meanwhile
            owner = parse_lock(seen[0])
            if owner and (owner.get("host") != me["host"] or pid_alive(owner.get("pid"))):
                elsewhere = owner.get("host") != me["host"]
                raise RunDirError(f"{flag} {out} is in use by pid {owner.get('pid')} on {owner.get('host')} (since "
                                  f"{owner.get('started')}"
                                  f"{'; another host: its pid cannot be checked from here' if elsewhere else ''}); use "
                                  f"another {flag}, or delete {path} if that run is dead")
            if take_over(path, mine, seen, f"{flag} {out}"):
                what = (f"a stale lock of pid {owner.get('pid')} (started {owner.get('started')}), which is no longer "
                        f"running" if owner else "an unreadable lock (no ssr wrote it)")
                print(f"{tool}: {path}: took over {what}")
                return lambda: release(path, me)
        raise RunDirError(f"{flag} {out}: could not take {path}: other runs are starting there at the same time")
    finally:
        mine.unlink(missing_ok=True)


def look(path: Path) -> tuple[bytes, int, int] | None:
    """The lock's bytes and identity (inode, mtime), or None if there is no lock."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            return f.read(), stat.st_ino, stat.st_mtime_ns
    except FileNotFoundError:
        return None


def parse_lock(text: bytes) -> dict | None:
    """The owner a lock names, or None if it names none (damaged, or not written by ssr)."""
    try:
        owner = json.loads(text)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner.get("host") else None


def take_over(path: Path, mine: Path, seen: tuple[bytes, int, int], where: str) -> bool:
    """Replace the stale lock `seen` by our record, if no other process is doing it; False if it changed."""
    claim = path.with_name(f".lock.takeover.{seen[1]}.{seen[2]}")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise RunDirError(f"{where}: another process is taking over its stale lock right now (if none is, "
                          f"delete {claim})") from None
    try:
        # we hold the claim and the lock's owner is dead: if it is still the lock we judged, nobody else can
        # change it before our rename (rename-over: there is a lock at every instant)
        if look(path) != seen:
            return False
        os.rename(mine, path)
        return True
    finally:
        claim.unlink(missing_ok=True)


def read_lock(path: Path) -> dict:
    seen = look(path)
    return (parse_lock(seen[0]) if seen else None) or {}


def pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def release(path: Path, me: dict):
    owner = read_lock(path)
    if (owner.get("host"), owner.get("pid")) == (me["host"], me["pid"]):
        path.unlink(missing_ok=True)


def claim(out: Path, newest: Path | None, recorded: dict | None, resume: bool, smoke: bool) -> list[Path]:
    """Check that this run may use OUT as asked (see the module docstring); returns what the run clears before it
    starts (clear() it once every other check has passed): a smoke run's outputs when a smoke run starts over, else
    nothing. Those are cleared only if OUT itself records a smoke run (`recorded`: the newest checkpoint's run
    config, else OUT/run.json): never on the new run's flags alone, which an empty --model "$UNSET" makes a smoke
    run's."""
    logs = [out / name for name in LOGS if (out / name).exists()]
    if resume:
        if newest is None:
            raise RunDirError(f"--resume: {out} holds no step_N checkpoint"
                              + (f" (only the logs of a run stopped before its first save: delete {out} or use "
                                 f"another --out-dir to start over)" if logs else ""))
        return []
    if newest is None and not logs:
        return []
    if smoke and is_smoke_run(out, recorded):
        return smoke_outputs(out)
    held = newest.name if newest is not None else f"the logs of a run ({' and '.join(p.name for p in logs)})"
    if smoke:
        whose = f"a run of --model {recorded.get('model')}" if recorded else "a run it does not name (no run.json)"
        raise RunDirError(f"{out} holds {held} of {whose}, not a smoke run's; the smoke run (no "
                          f"--model, or an empty one) only ever clears its own outputs: pass --model, or use another "
                          f"--out-dir")
    if newest is not None:
        raise RunDirError(f"{out} already holds {newest.name}: pass --resume to continue that run, or use another "
                          f"--out-dir")
    raise RunDirError(f"{out} holds the logs of a run that saved no checkpoint, so it cannot be resumed: delete "
                      f"{' and '.join(p.name for p in logs)} to start over there, or use another --out-dir")


def clear(paths: list[Path]):
    """Delete what claim() said a new smoke run clears."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def check_saves_free(out: Path, start: int, steps: int):
    """Every step_N this run may save (start < N <= steps: --stop-on-collapse saves at any step) must be free or a
    checkpoint. A step_N that is no checkpoint (no trainer.pt) is the user's, and a save never deletes it to make
    room: it is refused now rather than hours in, when distributed.save_checkpoint would refuse the save."""
    for path in sorted(out.glob("step_*")):
        m = re.fullmatch(r"step_(\d+)", path.name)
        if m and start < int(m.group(1)) <= steps and not is_checkpoint(path):
            raise RunDirError(f"{path} is not a checkpoint (no trainer.pt) but stands where this run saves step "
                              f"{m.group(1)}, and it is never deleted to make room: move or rename it, or use another "
                              f"--out-dir")


def smoke_outputs(out: Path) -> list[Path]:
    """What a new smoke run clears in a smoke run's OUT: the old run's checkpoints (step_<digits> holding its
    trainer state: distributed.checkpoints, the same test --resume uses), a save it was killed in
    (.step_<digits>.tmp, distributed.save_checkpoint's temporary name) and its logs. Derived from the names a smoke
    run writes, not from a glob: a user's step_2_best/, step_notes.md or step_by_step_analysis/ is not one of them.
    The smoke run's other files stay: tiny_model/ is reused if it was built for the new run's settings, else rebuilt
    (ssr.prepare_smoke_model; .tiny_model.tmp is cleared by the build that would use it), run.json is rewritten by
    the new run, and .lock is the new run's own."""
    interrupted_saves = [p for p in out.glob(".step_*.tmp") if re.fullmatch(r"\.step_\d+\.tmp", p.name)]
    return [*checkpoints(out), *interrupted_saves, *(out / name for name in LOGS if (out / name).exists())]


def is_smoke_run(out: Path, recorded: dict | None) -> bool:
    """Whether OUT's outputs are a smoke run's: its recorded model is the tiny model the smoke run builds in OUT."""
    return (recorded is not None and recorded.get("preset") == "smoke" and bool(recorded.get("model"))
            and Path(recorded["model"]).resolve() == (out / "tiny_model").resolve())


def read_run_record(out: Path) -> dict | None:
    """OUT/run.json: which run owns OUT (preset, model), written when a fresh run claims it; None if absent or
    unreadable (then nothing may be cleared on its word)."""
    try:
        record = json.loads((out / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_run_record(out: Path, preset: str, model: str):
    replace_file(out / RUN_RECORD, json.dumps({"preset": preset, "model": str(Path(model).resolve())}) + "\n")


PATH_FLAGS = ("model", "judge_model", "data", "out_dir")


def resolved_paths(config: dict) -> dict:
    """A run config with its path flags as absolute paths: a resume through another spelling of the same path
    (relative, ~, a trailing slash) is the same run."""
    return config | {k: str(Path(config[k]).expanduser().resolve()) for k in PATH_FLAGS
                     if isinstance(config.get(k), str) and config[k]}


def config_changes(saved: dict, effective: dict, overrides: set[str]) -> list[str]:
    """Refuse a resume whose effective config differs from the saved one in a flag that changes what the run
    means, unless overridden; returns the changed flags that were allowed (to report them)."""
    saved, effective = resolved_paths(saved), resolved_paths(effective)
    changed = sorted(k for k in effective.keys() | saved.keys() if saved.get(k) != effective.get(k))
    unknown = overrides - effective.keys()
    if unknown:
        raise RunDirError(f"--resume-override names {', '.join(sorted(unknown))}, which "
                          f"{'is not a flag' if len(unknown) == 1 else 'are not flags'}")
    refused = [k for k in changed if k not in FREE_TO_CHANGE and k not in overrides]
    if refused:
        diffs = "; ".join(f"{flag(k)} {saved.get(k)!r} -> {effective.get(k)!r}" for k in refused)
        raise RunDirError(f"--resume with changed settings ({diffs}): resume with the saved values, or name them in "
                          f"--resume-override {','.join(refused)} to change them on purpose")
    return changed


def flag(key: str) -> str:
    return "the data file's contents" if key == "data_sha256" else "--" + key.replace("_", "-")


def append_lines(path: Path, text: str):
    """Append whole lines to a log (metrics.jsonl, samples.jsonl), or nothing: a write that fails (a full disk) cuts
    the file back to its old end and raises the OSError, so no half line is left behind for a later line to follow
    (trim_logs drops a cut last line, a kill's, but a line cut in the middle would stop a resume)."""
    data = text.encode("utf-8")
    with open(path, "ab", buffering=0) as f:  # unbuffered: each write reaches the file here, or fails here
        end = f.seek(0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):  # a write can be short (the last bytes before a size limit)
                written += f.write(data[written:])
        except OSError:
            f.truncate(end)
            raise


def append_failed_message(path: Path, error: OSError, step: int, newest: Path | None) -> str:
    """What a run whose log append failed says as it stops: the file, the system's reason, and how to go on."""
    return (f"step {step}: cannot append to {path} ({error.strerror or error}); the run stopped there: "
            + (f"{newest}, the newest checkpoint, is intact: free some space and continue with --resume (the log lines "
               f"after its step are dropped)" if newest else
               f"no checkpoint was written yet: free some space, delete {' and '.join(LOGS)} in {path.parent} (or use "
               f"another --out-dir) and start over"))


def trim_logs(out: Path, step: int):
    """On resume: forget what was logged after the checkpoint (and a last line a kill or a full disk cut short, as
    data.parse_jsonl drops it), so the redone steps are logged once. Each file is rewritten through a temp file
    and a rename: a crash keeps the old. A damaged line before the end is named, never silently cut away with
    everything after it."""
    for name in LOGS:
        path = out / name
        if not path.exists():
            continue
        try:
            rows = read_jsonl(path, drop_cut_last=True)
        except DataError as e:
            raise RunDirError(f"{e}; --resume keeps each log up to its checkpoint: fix or delete that line") from None
        kept = []
        for where, row in rows:
            if not isinstance(row.get("step"), int):
                raise RunDirError(f"{where}: no integer 'step' (not a line ssr.py wrote); --resume keeps each log up "
                                  f"to its checkpoint: fix or delete that line")
            if row["step"] > step:
                break
            kept.append(row)
        # json.dumps as ssr.py logged them (metrics are ASCII; samples were written with ensure_ascii=False):
        # the kept lines come back byte for byte
        replace_file(path, jsonl(kept))


def interrupted_message(out: Path, newest: Path | None) -> str:
    """What an interrupted run leaves, truthfully."""
    if newest is not None:
        return f"ssr: interrupted; {newest} is the newest complete checkpoint: continue with --resume"
    return (f"ssr: interrupted before the first checkpoint, so there is nothing to resume: delete {out} (or use "
            f"another --out-dir) to start over")


# ----------------------------------------------------------------------------------------------------
# eval.py's --out: OUT/settings.json, OUT/<label>/model.json, OUT/<label>/<set>/segments.jsonl (one row per
# segment, appended per batch while translating, rewritten when scores are added)

def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def segments_path(out: Path, model_label: str, ts: TestSet) -> Path:
    return out / model_label / ts.name.replace(":", "_") / "segments.jsonl"


def load_rows(path: Path, ts: TestSet) -> list[dict]:
    """The rows a previous run wrote, checked against the set: row i must hold segment i's source and reference."""
    if not path.exists():
        return []
    fix = "delete the file to translate this set again"
    try:
        data = read_bytes(path)
        found = parse_jsonl(path, data, drop_cut_last=True)  # a last line cut by a kill is not a row
    except DataError as e:
        raise RunDirError(f"{e}; {fix}") from None
    complete = data[:data.rfind(b"\n") + 1]
    if complete != data:  # the run was killed inside a write: drop the broken last line, keep the rest
        replace_file(path, complete.decode("utf-8"))  # every line before it decoded: parse_jsonl checked them
    rows = []
    for where, row in found:
        if problem := segment_row_problem(row):
            raise RunDirError(f"{where}: not a segment row eval.py wrote ({problem}); {fix}")
        rows.append(row)
    if len(rows) > len(ts.srcs) or any(r.get("i") != i or r.get("src") != ts.srcs[i] or r.get("ref") != ts.refs[i]
                                       for i, r in enumerate(rows)):
        raise RunDirError(f"{path}: holds other segments than {ts.name} ({ts.origin}) has now; use another --out or "
                        f"delete the file")
    return rows


SEGMENT_FIELDS = {"i": int, "src": str, "ref": str, "hyp": str, "raw": str, "extracted": bool, "finish_reason": str,
                  "scores": dict}


def segment_row_problem(row: dict) -> str | None:
    """What is wrong with a segments.jsonl row edited by hand (the fields eval.py reads, by type), or None."""
    for key, kind in SEGMENT_FIELDS.items():
        if not isinstance(row.get(key), kind) or (kind is int and isinstance(row[key], bool)):
            return f"'{key}' missing or not a {kind.__name__}"
    for metric, score in row["scores"].items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return f"score '{metric}' is {score!r}, not a number"
    return None


def fingerprint(model_dir: str) -> dict:
    """What tells this checkpoint from any other, in well under a second: its resolved path, a hash of the files
    that shape its translations besides the weights, and the name, size and mtime of every weight file. Not the
    weights index: two fine-tunes of one base have byte-identical indexes (same names, shard plan and sizes).
    Not a hash of the weights: that reads every byte (15 GB for a 7B model). Rewriting a weight file changes its
    mtime, and a copy elsewhere has another path: both count as another model, never wrongly as the same one.
    Checks on the way that the directory is a checkpoint we can load."""
    path = Path(model_dir).expanduser().resolve()
    try:  # small files only: a missing file, an architecture or a tokenizer we cannot use fails now, not in hours
        read_config(path)
        load_tokenizer(path)
    except CheckpointError as e:
        raise RunDirError(f"--model {model_dir}: {e}") from None
    if not (weights := sorted(path.glob("*.safetensors"))):
        raise RunDirError(f"--model {model_dir}: no *.safetensors weights in {path}")
    shaping = [f for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
               if (path / f).is_file()]
    return {"path": str(path),
            "sha256": {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in shaping},
            "weights": {w.name: [w.stat().st_size, w.stat().st_mtime_ns] for w in weights}}


def read_record(path: Path, where: str) -> dict | None:
    """A JSON object eval.py wrote under --out (settings.json, model.json); None if there is none yet."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RunDirError(f"{where}: cannot read {path} ({e}); delete it or use another --out") from None
    if not isinstance(record, dict):
        raise RunDirError(f"{where}: {path} is not a JSON object; delete it or use another --out")
    return record


# what check_eval_out names when a label's folder holds another checkpoint's translations
FINGERPRINT_PARTS = {"path": "another path", "sha256": "other config/tokenizer files",
                     "weights": "other weight files (sizes or mtimes)"}


def check_eval_out(out: Path, settings: dict, models: dict[str, str], fingerprints: dict[str, dict]):
    """--out: a directory we can write or create, whose earlier outputs were made with these settings and, per
    label, by the very checkpoint now under that label (OUT/<label>/model.json). Another checkpoint under a known
    label is refused, never resumed: the translations on disk would be credited to the wrong model."""
    where = f"--out {out}"
    first = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists() or p.is_symlink())
    if not first.is_dir():
        raise RunDirError(f"{where}: {first} exists and is not a directory; give a directory (created if missing)")
    if not os.access(first, os.W_OK | os.X_OK):
        raise RunDirError(f"{where}: {first} is not writable; give a directory you can write")
    before = read_record(out / "settings.json", where)
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items()
               if before is not None and before.get(k) != v]
    # settings bind only what they made: a run that failed before writing a segment (too large a
    # --max-new-tokens) leaves a settings.json that must not refuse the corrected rerun
    if changed and any(p.stat().st_size for p in out.rglob("segments.jsonl")):
        raise RunDirError(f"{where}: holds outputs made with other settings ({'; '.join(changed)}); use another --out")
    for label, fp in fingerprints.items():
        folder, flag = out / label, f"--model {models[label]}"
        if (before := read_record(folder / "model.json", where)) is not None:
            if before != fp:
                changed = ", ".join(FINGERPRINT_PARTS[k] for k in fp if before.get(k) != fp[k])
                raise RunDirError(f"{flag}: {folder} holds the translations of another checkpoint ({before.get('path')};"
                                f" {changed}); refusing to mix them: use another --out, or delete {folder}")
        elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise RunDirError(f"{flag}: {folder} holds outputs without a model.json to say which checkpoint made them "
                            f"(an older eval.py?); use another --out, or delete {folder}")
