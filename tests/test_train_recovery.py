"""Crash recovery of the training loop: SIGKILL at random points, a checkpoint left between the two renames
of a save, truncated or hand-edited checkpoint files, a full disk.

Every recovered run is compared with an uninterrupted one: bit-identical weights and the same log, every
step exactly once. The kill loop runs in a subprocess (this file is also its driver, see the bottom).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import traceback
import uuid
import warnings

import pytest
import torch
from safetensors.torch import load_file

import selfmoe.checkpoints as checkpoints_mod
import selfmoe.io_utils as io_utils
import selfmoe.run_dir as run_dir_mod
from selfmoe.io_utils import WriteError
from selfmoe.train import (CHECKPOINT_DIR, CHECKPOINT_FILES, LOG_NAME, MANIFEST_NAME, CheckpointError, TrainConfig,
                           train_expert)

from _tiny_lm import load_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TOTAL_STEPS = 9  # 10 records, micro-batches of 2, 2 per step: 3 steps an epoch, 3 epochs


def records():
    return [{"instruction": f"What is {i} plus {i + 3}?", "input": "", "output": f"{i} + {i + 3} = {2 * i + 3}.",
             "domain": "math"} for i in range(10)]


def cfg(**kw):
    base = dict(batch_size=4, micro_batch_size=2, num_epochs=3, learning_rate=1e-2, progress=False, save_steps=1,
                logging_steps=1, warmup_ratio=0.0, lora_dropout=0.2)  # dropout: the RNG states must be restored too
    base.update(kw)
    return TrainConfig(**base)


def train(lm_path, out, save_steps=1, **kw):
    model, tok = load_tiny_lm(lm_path)
    return train_expert(model, tok, records(), out, cfg(save_steps=save_steps), **kw)


def weights(out):
    return load_file(str(out / "adapter_model.safetensors"))


def metric_lines(out):
    lines = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in lines if "event" not in m]


def assert_same_run(out, ref):
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    got = metric_lines(out)
    assert [s for s, *_ in got] == list(range(1, TOTAL_STEPS + 1))  # every step exactly once
    assert got == metric_lines(ref)


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def step_of(ckpt):
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


@pytest.fixture(scope="module")
def reference(lm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(lm_path, out)
    return out


@pytest.fixture(scope="module")
def crashed(lm_path, tmp_path_factory):
    """A run killed after step 5 (checkpoint of step 5, log through step 5), and a copy of its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("crashed")
    out, snap = root / "run", root / "step4"

    def cb(state, model):
        if state.step == 4:
            shutil.copytree(out / CHECKPOINT_DIR, snap)
        if state.step == 5:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(lm_path, out, callbacks=[cb])
    assert step_of(out / CHECKPOINT_DIR) == 5 and step_of(snap) == 4
    return out, snap


def copy_run(crashed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(crashed[0], out)
    return out, crashed[1]


# ------------------------------------------------------------------------------------- kill -9 loop


def test_kill_9_at_random_points_then_resume_is_bit_identical_with_a_complete_log(lm_path, tmp_path):
    """Six SIGKILLs (fixed seed) in a run that checkpoints every step, each followed by a resume; the last
    resume runs to the end. Two kills land between the renames of a checkpoint save (checkpoint/ moved aside,
    the new one not yet in place), the others before a file-system call or a forward (a write cut in half),
    anywhere in what is left of the run, the final export included. About 10 s: one interpreter, forked runs."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    argv = [sys.executable, os.path.abspath(__file__)] + [os.fspath(a) for a in (lm_path, ref, out)] + ["20240609", "6"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)  # the driver: seed 20240609, 6 kills
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    killed = [r for r in report["runs"][:-1] if r["status"] == "SIGKILL"]
    assert len(killed) == 6, report
    assert any(r["spec"][0] == "aside" for r in killed), report  # the between-renames window was hit
    assert report["runs"][-1]["status"] == "exit 0", report
    assert_same_run(out, ref)
    assert leftovers(out) == [] and step_of(out / CHECKPOINT_DIR) == TOTAL_STEPS


# ------------------------------------------------------------------------------------ between renames


@pytest.mark.parametrize("state", ["old_and_new", "old_only"])
def test_resume_recovers_the_newest_complete_checkpoint_left_by_a_kill_between_renames(crashed, tmp_path, lm_path,
                                                                                       reference, state):
    """atomic_directory renames checkpoint/ to .checkpoint.old-* and then the new .checkpoint.tmp-* to checkpoint/;
    a kill in between leaves no checkpoint/. 'old_only': the new one was still being written (no manifest, a
    truncated file), so the old one (step 4) is the newest complete checkpoint."""
    out, snap = copy_run(crashed, tmp_path)
    shutil.copytree(snap, out / ".checkpoint.old-0123456789ab")
    new = out / ".checkpoint.tmp-ba9876543210"
    os.rename(out / CHECKPOINT_DIR, new)
    if state == "old_only":
        (new / MANIFEST_NAME).unlink(missing_ok=True)
        with open(new / "optimizer.pt", "r+b") as f:
            f.truncate(100)
    res = train(lm_path, out, resume=True)
    assert res.resumed_from == (5 if state == "old_and_new" else 4)
    assert_same_run(out, reference)
    assert leftovers(out) == []


def test_stale_checkpoint_copies_are_removed_when_a_checkpoint_is_published(crashed, tmp_path, lm_path):
    out, snap = copy_run(crashed, tmp_path)
    stale = [out / ".checkpoint.old-aaaaaaaaaaaa", out / ".checkpoint.tmp-bbbbbbbbbbbb"]
    seen = {}

    def cb(state, model):  # runs after each step's checkpoint
        if state.step == 6:
            for d in stale:
                shutil.copytree(snap, d)
        seen[state.step] = leftovers(out)

    train(lm_path, out, resume=True, callbacks=[cb])
    assert seen[6] == sorted(d.name for d in stale) and seen[7] == [] and leftovers(out) == []


def test_leftovers_are_removed_on_resume(crashed, tmp_path, lm_path):
    out, snap = copy_run(crashed, tmp_path)
    shutil.copytree(snap, out / ".checkpoint.old-aaaaaaaaaaaa")  # complete but older
    (out / ".checkpoint.tmp-bbbbbbbbbbbb").mkdir()  # a save killed at once
    (out / ".log.jsonl.tmp-cccccccccccc").write_text("{")
    seen = []
    # No checkpoint is saved before the last step, so only the resume can have removed them.
    train(lm_path, out, resume=True, save_steps=100, callbacks=[lambda state, model: seen.append(leftovers(out))])
    assert seen[0] == [] and leftovers(out) == []


def test_a_kill_between_the_checkpoint_and_the_log_line_loses_no_line(crashed, tmp_path, lm_path, reference,
                                                                      monkeypatch):
    out, _ = copy_run(crashed, tmp_path)
    real = checkpoints_mod.save_checkpoint

    def save_then_die(out_dir, **kw):
        path = real(out_dir, **kw)
        if kw["state"].step == 7:
            raise RuntimeError("simulated kill after the checkpoint of step 7")
        return path

    monkeypatch.setattr(checkpoints_mod, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(lm_path, out, resume=True)
    monkeypatch.undo()
    assert step_of(out / CHECKPOINT_DIR) == 7
    res = train(lm_path, out, resume=True)
    assert res.resumed_from == 7
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------ trainer state


def rewrite(ckpt, name, text):
    """Replace a checkpoint file and record it in the manifest, as a careful hand edit would."""
    data = text.encode()
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit,file,what", [
    ({"step": 99999}, "trainer_state.json", "step 99999 is beyond this run's last step 9"),
    ({"epoch": 0}, "trainer_state.json", "does not match epoch 0 and step_in_epoch 2"),
    ({"step": "5"}, "trainer_state.json", "step must be an int"),
    ({"step": 4, "step_in_epoch": 1}, "optimizer.pt", "optimizer has taken 5 steps, trainer_state.json says step 4"),
    # 2 processes cut each epoch's last step to an even number of micro-batches: 2 steps an epoch, not 3
    ({"world_size": 2, "total_steps": 6, "epoch": 2, "step_in_epoch": 1}, "trainer_state.json",
     "total_steps 6 does not match this run's 9 (the checkpoint was written by 2 process(es), this run has 1: "
     "resume with 2)"),
])
def test_a_hand_edited_trainer_state_is_refused_naming_the_file(crashed, tmp_path, lm_path, edit, file, what):
    out, _ = copy_run(crashed, tmp_path)
    ckpt = out / CHECKPOINT_DIR
    state = json.loads((ckpt / "trainer_state.json").read_text())
    plain = json.dumps({**state, **edit})
    (ckpt / "trainer_state.json").write_text(plain)  # the manifest's checksum catches a plain edit
    with pytest.raises(CheckpointError, match="manifest.json records .*was modified") as info:
        train(lm_path, out, resume=True)
    assert str(ckpt / "trainer_state.json") in str(info.value)
    rewrite(ckpt, "trainer_state.json", plain)  # an edit that fixed the manifest too
    with pytest.raises(CheckpointError) as info:
        train(lm_path, out, resume=True)
    msg = str(info.value)
    assert msg.startswith(str(ckpt / file) + ": ") and what in msg and "\n" not in msg
    assert not (out / "adapter_model.safetensors").exists()  # nothing published
    assert step_of(ckpt) == edit.get("step", 5) and leftovers(out) == []  # and nothing moved or removed


def test_a_checkpoint_of_another_run_is_refused(crashed, tmp_path, lm_path):
    out, _ = copy_run(crashed, tmp_path)
    ckpt = out / CHECKPOINT_DIR
    record = json.loads((ckpt / "train_config.json").read_text())
    record["config"]["seed"] = 7
    rewrite(ckpt, "train_config.json", json.dumps(record))
    with pytest.raises(CheckpointError, match=r"train_config.json: the checkpoint belongs to a different run \(seed"):
        train(lm_path, out, resume=True)


def test_cli_reports_a_bad_checkpoint_in_one_line_with_exit_code_2(crashed, tmp_path, lm_path, capsys):
    from selfmoe.cli import main
    from selfmoe.data import write_jsonl

    data = tmp_path / "math.jsonl"
    write_jsonl(data, records()[:4])
    out = tmp_path / "cli"
    args = ["train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output", out, "--max-steps", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--save-steps", "1", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    state = out / CHECKPOINT_DIR / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 99999}))
    capsys.readouterr()
    assert main([str(a) for a in args + ["--resume"]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"selfmoe train-expert: error: {state}: ")


# ------------------------------------------------------------------------------- truncated files


@pytest.mark.parametrize("name,manifest", [(n, True) for n in CHECKPOINT_FILES + (MANIFEST_NAME,)]
                         + [(n, False) for n in CHECKPOINT_FILES])
def test_a_truncated_checkpoint_file_is_an_error_naming_it(crashed, tmp_path, lm_path, name, manifest):
    """With a manifest the size gives it away; without one (a checkpoint from an older selfmoe) the reader
    fails, and that failure is a CheckpointError naming the file too, never a reader's own traceback."""
    out, _ = copy_run(crashed, tmp_path)
    ckpt = out / CHECKPOINT_DIR
    if not manifest:
        (ckpt / MANIFEST_NAME).unlink(missing_ok=True)
    size = (ckpt / name).stat().st_size
    with open(ckpt / name, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError) as info:
        train(lm_path, out, resume=True)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and info.value.path == ckpt / name
    assert msg.startswith(f"{ckpt / name}: ") and "cannot resume" in msg and "\n" not in msg
    assert not (out / "adapter_model.safetensors").exists()


def test_a_truncated_checkpoint_falls_back_to_an_older_complete_one(crashed, tmp_path, lm_path, reference):
    out, snap = copy_run(crashed, tmp_path)
    shutil.copytree(snap, out / ".checkpoint.old-0123456789ab")  # a kill before the old copy was removed
    with open(out / CHECKPOINT_DIR / "trainable.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.warns(RuntimeWarning, match=r"resuming from .*\.checkpoint\.old-0123456789ab \(step 4\).*trainable"):
        res = train(lm_path, out, resume=True)
    assert res.resumed_from == 4
    assert_same_run(out, reference)
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------ disk full


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="tells the files apart by /proc/self/fd")
@pytest.mark.parametrize("failing", ["trainable.safetensors", "optimizer.pt", "trainer_state.json", MANIFEST_NAME])
def test_disk_full_while_saving_a_checkpoint_names_the_file_and_keeps_the_previous_one(
        crashed, tmp_path, lm_path, reference, monkeypatch, failing):
    out, _ = copy_run(crashed, tmp_path)
    real = io_utils._write_all

    def full_disk_at_step_7(fd, data):  # the low-level writer every checkpoint file goes through
        name = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(name) == failing and step_of(out / CHECKPOINT_DIR) == 6:
            enospc()
        return real(fd, data)

    monkeypatch.setattr(io_utils, "_write_all", full_disk_at_step_7)
    with pytest.raises(OSError) as info:
        train(lm_path, out, resume=True)
    monkeypatch.undo()
    assert isinstance(info.value, WriteError) and info.value.errno == errno.ENOSPC
    assert str(info.value) == f"could not write {out / CHECKPOINT_DIR / failing}: No space left on device"
    assert step_of(out / CHECKPOINT_DIR) == 6 and leftovers(out) == []  # the previous checkpoint, intact
    res = train(lm_path, out, resume=True)
    assert res.resumed_from == 6
    assert_same_run(out, reference)


def test_disk_full_while_writing_the_log_or_the_final_model_names_the_file(crashed, tmp_path, lm_path, monkeypatch):
    out, _ = copy_run(crashed, tmp_path)
    monkeypatch.setattr(run_dir_mod, "append_jsonl", enospc)
    with pytest.raises(WriteError, match=f"^could not write {out / LOG_NAME}: No space left on device$"):
        train(lm_path, out, resume=True)
    monkeypatch.undo()

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file is being written")
    real = io_utils._write_all

    def full(fd, data):  # the final adapter's weights: written through io_utils like every other file
        if os.readlink(f"/proc/self/fd/{fd}").endswith("adapter_model.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(io_utils, "_write_all", full)
    final = out / "adapter_model.safetensors"
    with pytest.raises(WriteError, match=f"^could not write {final}: No space left on device$") as info:
        train(lm_path, out, resume=True)
    assert info.value.errno == errno.ENOSPC
    assert step_of(out / CHECKPOINT_DIR) == TOTAL_STEPS and not (out / "adapter_model.safetensors").exists()
    assert leftovers(out) == []


def test_io_utils_write_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(io_utils, "_write_all", enospc)
    for write in (lambda p: io_utils.atomic_write_text(p, "x"), lambda p: io_utils.atomic_write_json(p, {}),
                  lambda p: io_utils.write_bytes(p, b"x"), lambda p: io_utils.write_json(p, {})):
        path = tmp_path / "f.json"
        with pytest.raises(WriteError) as info:
            write(path)
        assert str(info.value) == f"could not write {path}: No space left on device"
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------- the kill-loop driver


def _child(model, tok, out, resume, spec, note):
    """Train in a forked child. ``spec`` = (kind, n, seed): kind "count" only counts the events, "any"
    SIGKILLs itself at the n-th event (a file-system call or a forward; a write is half done first),
    "aside" right after the n-th save moved checkpoint/ aside, before the new one is renamed in. ``seed``
    seeds the temporary names (uuid4), so that a run is reproducible."""
    signal.alarm(120)  # never outlive the test
    counts = {"any": 0, "aside": 0, "after_step": []}
    kind, n, seed = spec
    names = random.Random(seed)
    uuid.uuid4 = lambda: uuid.UUID(int=names.getrandbits(128), version=4)

    def die(what):
        with open(note, "w") as f:
            f.write(what)
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(name, fn):
        def wrapped(*args, **kwargs):
            counts["any"] += 1
            if kind == "any" and counts["any"] == n:
                if name == "write" and len(args[1]) > 1:
                    fn(args[0], bytes(args[1][: len(args[1]) // 2]))
                    die("in the middle of a write")
                die("before a forward" if name == "forward" else f"before os.{name}")
            result = fn(*args, **kwargs)
            if name == "rename" and os.path.basename(os.fspath(args[0])) == CHECKPOINT_DIR:
                counts["aside"] += 1
                if kind == "aside" and counts["aside"] == n:
                    die("between the renames of a checkpoint save")
            return result
        return wrapped

    for name in ("write", "fsync", "rename", "replace", "mkdir", "unlink", "rmdir"):
        setattr(os, name, hook(name, getattr(os, name)))
    model.register_forward_pre_hook(lambda *a: hook("forward", lambda: None)())
    train_expert(model, tok, records(), out, cfg(), resume=resume,
                 callbacks=[lambda state, m: counts["after_step"].append(counts["any"])])
    return counts


def _run_forked(fn):
    """Run ``fn`` in a forked child (it inherits the loaded model untouched: the parent never trains)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "SIGKILL" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _driver(lm_path, ref, out, seed, kills):
    """Reference run (counting events), then ``kills`` runs killed at seeded random events, then a final
    resume without a kill. Prints a JSON report as its last line."""
    import pathlib

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model, tok = load_tiny_lm(lm_path)  # once: a forked child starts from it in no time
    ref, out = pathlib.Path(ref), pathlib.Path(out)
    note = out.parent / "kill-note.txt"
    counts_file = out.parent / "counts.json"

    def reference():
        counts = _child(model, tok, ref, False, ("count", 0, seed), note)
        counts_file.write_text(json.dumps(counts))

    status = _run_forked(reference)
    assert status == "exit 0", status
    counts = json.loads(counts_file.read_text())
    total, after_step = counts["any"], counts["after_step"]
    rng = random.Random(seed)
    kinds = ["any"] * (kills - 2) + ["aside"] * 2
    rng.shuffle(kinds)
    runs = []
    for kind in kinds + ["none"]:
        done = 0  # the step the next run resumes from (roughly: the newest checkpoint, wherever it is)
        for name in os.listdir(out) if out.is_dir() else []:
            try:
                done = max(done, step_of(out / name)) if CHECKPOINT_DIR in name else done
            except (OSError, ValueError):  # none there, or one a kill cut short
                pass
        if kind == "aside" and done == TOTAL_STEPS:
            kind = "any"  # no checkpoint save left to catch between its renames
        # A point somewhere in what is left of the run (the final export included), so that every kill lands.
        remaining = total - (after_step[done - 1] if done else 0)
        spec = (kind, {"any": max(1, int(rng.uniform(0.05, 0.8) * remaining)), "aside": 1, "none": 0}[kind],
                rng.getrandbits(32))
        note.unlink(missing_ok=True)
        status = _run_forked(lambda: _child(model, tok, out, True, spec, note))
        runs.append({"spec": spec, "status": status, "at": note.read_text() if note.exists() else None})
    print(json.dumps({"events_per_run": total, "runs": runs}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _driver(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
