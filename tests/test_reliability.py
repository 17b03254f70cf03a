"""Faults a cluster injects (kill -9 at any moment, signals, a full disk, corrupted files, two
launches at once) and what train.py must do: never lose or mix checkpoints, resume exactly, say what
happened in one line.
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest

from conftest import ROOT, TINY, TORCHRUN, jsonl, losses, python, read_json, start, train

pytestmark = pytest.mark.slow  # subprocesses: train.py, torchrun, kill -9


def samples_per_step(out_dir):
    """{step: sample ids} from samples.jsonl (log_samples=True); the last row of a step wins."""
    rows = jsonl(os.path.join(out_dir, "samples.jsonl"))
    return {r["step"]: r["samples"] for r in rows if "samples" in r}  # not the markers


def debris(out_dir):
    names = os.listdir(out_dir)
    return [
        n
        for n in names
        if n.endswith((".tmp", ".deleting", ".corrupt"))
        or n.startswith("global_step_")
        and not os.path.exists(os.path.join(out_dir, n, "checkpoint.json"))]


def processes_using(path):
    """Pids of live processes whose command line mentions path (a run's out_dir)."""
    pids = []
    for proc in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(proc, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(proc.replace("cmdline", "stat")) as f:
                zombie = f.read().split(")")[-1].split()[0] == "Z"
        except OSError:
            continue
        if str(path) in cmdline and not zombie:
            pids.append(int(proc.split("/")[2]))
    return pids


def wait_for_rows(out_dir, n, proc, timeout=120):
    """Wait until metrics.jsonl has n rows (or the process ended)."""
    path, deadline = os.path.join(out_dir, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(Path(path).read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_random_kill_9_never_loses_or_mixes_anything(tmp_path, train_file, launcher):
    """kill -9 at random moments (training, saving, pruning), then the same command again, until the
    run ends: every resume is clean, no debris is left, the losses (last row per step) are bitwise
    those of an uninterrupted run, and the samples each step trained on are the same: none skipped,
    none repeated.
    """
    steps, kills = (24, 6) if launcher == "python" else (12, 3)
    args = [
        f"--train_files={train_file}",
        f"--max_steps={steps}",
        "--batch_size=2",
        "--save_every=1",
        "--keep_last=2",
        "--log_samples=True"]
    wrap = TORCHRUN if launcher == "torchrun" else None
    if launcher == "torchrun":
        args += ["--gradient_accumulation_steps=2", "--parallel=ddp"]
    ref = tmp_path / "ref"
    p = start(ref, args, wrap)
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    out, rng = tmp_path / "faults", random.Random(0)
    for attempt in range(kills):
        p = start(out, args, wrap)
        metrics = out / "metrics.jsonl"
        rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        wait_for_rows(out, rows + 1, p)  # it has resumed and is training
        time.sleep(rng.uniform(0, 0.6))  # somewhere in a step, a save or a prune
        p.kill()
        p.communicate()
        # torchrun's workers notice their launcher is gone within a second
        deadline = time.time() + 30
        while processes_using(out) and time.time() < deadline:
            time.sleep(0.2)
        assert not processes_using(out), "workers outlived their launcher"
    p = start(out, args, wrap)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    assert losses(out) == losses(ref)
    assert samples_per_step(out) == samples_per_step(ref)
    ids = [i for step in sorted(samples_per_step(out)) for i in samples_per_step(out)[step]]
    assert len(ids) == len(set(ids))  # 24 steps of 4 samples out of 96: one epoch, no sample twice
    assert debris(out) == [] and sorted(
        n for n in os.listdir(out) if n.startswith("global_step_")
    ) == [f"global_step_{steps - 1}", f"global_step_{steps}"]


def test_resume_disable_on_a_longer_run_keeps_the_new_run(tmp_path, train_file):
    args = [f"--train_files={train_file}", "--batch_size=2", "--save_every=2", "--keep_last=2"]
    train(tmp_path, "--max_steps=6", *args)
    p = train(tmp_path, "--max_steps=4", "--resume=disable", "--learning_rate=1e-3", *args)
    assert "the 2 checkpoints of the previous run are in" in p.stdout
    kept = sorted(n for n in os.listdir(tmp_path) if n.startswith("global_step_"))
    # the new run's, not pruned by the old run's step 6
    assert kept == ["global_step_2", "global_step_4",]
    moved = glob.glob(str(tmp_path / "previous_runs" / "*" / "global_step_6" / "checkpoint.json"))
    assert len(moved) == 1  # the old run is kept, aside
    new = read_json(tmp_path / "global_step_4" / "checkpoint.json")
    assert new["config"]["learning_rate"] == 1e-3
    # a plain re-run resumes the new run
    p = train(tmp_path, "--max_steps=5", "--learning_rate=1e-3", *args)
    assert "resumed from" in p.stdout and "global_step_4" in p.stdout


def test_resume_with_another_batch_geometry_skips_and_repeats_no_sample(tmp_path, train_file):
    args = [f"--train_files={train_file}", "--log_samples=True", "--save_every=3"]
    train(tmp_path, "--max_steps=3", "--batch_size=4", *args)
    # 12 + 3 x 28 = 96: the whole epoch
    p = train(tmp_path, "--max_steps=31", "--batch_size=3", *args)
    assert "resumed from" in p.stdout
    per_step = samples_per_step(tmp_path)
    ids = [i for step in sorted(per_step) for i in per_step[step]]
    assert len(ids) == len(set(ids)) == 96
    assert [len(per_step[s]) for s in sorted(per_step)] == [4] * 3 + [3] * 28


def test_two_trainers_on_one_out_dir(tmp_path, train_file):
    first = start(tmp_path, [f"--train_files={train_file}", "--max_steps=100000", "--batch_size=2"])
    wait_for_rows(tmp_path, 2, first)
    p = train(tmp_path, f"--train_files={train_file}", "--max_steps=5", check=False)
    first.kill()
    first.communicate()
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert f"out_dir '{tmp_path}' is in use by another trainer (pid {first.pid} on " in p.stderr
    # the holder died (kill -9): its lock went with it
    p = train(tmp_path, f"--train_files={train_file}", "--max_steps=2", "--batch_size=2")
    assert (tmp_path / "global_step_2" / "checkpoint.json").exists()


def test_debris_of_a_crash_is_swept(tmp_path, train_file):
    args = [f"--train_files={train_file}", "--batch_size=2", "--save_every=2"]
    train(tmp_path, "--max_steps=2", *args)
    # a prune cut short
    shutil.copytree(tmp_path / "global_step_2", tmp_path / "global_step_1.deleting")
    shutil.copytree(tmp_path / "global_step_2", tmp_path / "global_step_4.tmp")  # a save cut short
    os.makedirs(tmp_path / "global_step_3" / "state")  # an incomplete folder
    p = train(tmp_path, "--max_steps=4", *args)
    assert (
        "swept the debris of an interrupted run: global_step_1.deleting, global_step_3, "
        "global_step_4.tmp"
        in p.stdout)
    assert "resumed from" in p.stdout and debris(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip bytes in the weights", "truncate the optimizer state",
                                    "garbage checkpoint.json", "delete a rank file"])
def test_a_corrupted_newest_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, train_file, damage):
    args = [
        f"--train_files={train_file}",
        "--batch_size=2",
        "--save_every=2",
        "--keep_last=3",
        "--max_steps=6"]
    train(tmp_path / "ref", *args)
    out = tmp_path / "run"  # the same run, stopped after saving step 4
    shutil.copytree(tmp_path / "ref", out)
    shutil.rmtree(out / "global_step_6")
    newest = out / "global_step_4"
    if damage == "flip bytes in the weights":
        path = newest / "huggingface" / "model.safetensors"
        blob = bytearray(path.read_bytes())
        for i in range(len(blob) // 2, len(blob) // 2 + 64):
            blob[i] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif damage == "truncate the optimizer state":
        path = max(glob.glob(str(newest / "state" / "*.distcp")), key=os.path.getsize)
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "garbage checkpoint.json":
        (newest / "checkpoint.json").write_text("{not json")
    else:
        os.remove(newest / "state" / "rank0.pt")
    # sample.py decodes the newest checkpoint whose export is intact, and says so when it passes one
    p = python("sample.py", f"--out_dir={out}", "--prompt=hi", "--max_new_tokens=4",
               "--scenario=ar", "--device=cpu")
    export_damaged = damage in ("flip bytes in the weights", "garbage checkpoint.json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (f"note: decoding {out}/global_step_2: the newer global_step_4 cannot be trusted ("
            in p.stdout) == export_damaged, p.stdout[-2000:]
    p = train(out, *args)
    warning = [line for line in p.stdout.splitlines() if "cannot be trusted" in line]
    assert len(warning) == 1 and "set aside as" in warning[0]
    assert "global_step_4.corrupt" in warning[0]
    assert "resumed from" in p.stdout and "global_step_2" in p.stdout
    assert losses(out) == losses(tmp_path / "ref")  # steps 3..6 redone from step 2: the same losses
    assert (out / "global_step_4.corrupt").is_dir()  # kept for a look, never loaded


def train_on_small_tmpfs(mnt, size, args, after):
    """train.py with a tmpfs of this size mounted at mnt, in a private mount namespace (skips the
    test without mount rights); then the shell command after."""
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {mnt} && cd {ROOT} && OMP_NUM_THREADS=1 "
        f"{sys.executable} train.py {' '.join(TINY)} {args}; echo rc=$?; {after}")
    p = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    if "rc=" not in p.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()[:200]}")
    return p


def assert_full_disk_line(p, start):
    assert "rc=1" in p.stdout, p.stdout + p.stderr
    error = p.stderr.strip()
    assert error.count("\n") == 0 and error.startswith(start), error
    assert "No space left on device" in error, error


def test_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(tmp_path, train_file):
    """out_dir on a small tmpfs (needs mount rights: skipped without them) that holds a checkpoint
    or two, not three. One line names the path and the OS reason; the checkpoints that fitted are
    intact and the newest resumes."""
    mnt = tmp_path / "small"
    out = mnt / "run"
    args = f"--out_dir={out} --train_files={train_file} --batch_size=2 --max_steps=3 --save_every=1"
    p = train_on_small_tmpfs(mnt, "1200k", f"{args} --keep_last=0", f"cp -r {out} {tmp_path}/after")
    assert_full_disk_line(p, "error: cannot save ")
    after = tmp_path / "after"
    saved = sorted(int(n.rsplit("_", 1)[1]) for n in os.listdir(after)
                   if n.startswith("global_step_"))
    assert saved and saved[-1] < 3 and debris(after) == []
    assert all(os.path.exists(after / f"global_step_{n}" / "checkpoint.json") for n in saved)
    p = train(after, f"--train_files={train_file}", "--batch_size=2", "--max_steps=3",
              "--save_every=1")
    assert f"resumed from {after / f'global_step_{saved[-1]}'} " in p.stdout, p.stdout


def test_ctrl_c_saves_like_sigterm_and_twice_aborts(tmp_path, train_file):
    p = start(tmp_path, [f"--train_files={train_file}", "--max_steps=100000", "--batch_size=2"])
    wait_for_rows(tmp_path, 2, p)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert (
        p.returncode == 0 and "SIGINT: saving a checkpoint at the end of this step" in stdout
    ), stderr
    assert (
        "Traceback" not in stderr
        and len([n for n in os.listdir(tmp_path) if n.startswith("global_step_")]) == 1)
    p = start(
        tmp_path / "twice",
        [f"--train_files={train_file}", "--max_steps=100000", "--batch_size=2", "--save_every=1"])
    wait_for_rows(tmp_path / "twice", 2, p)
    p.send_signal(signal.SIGINT)
    # the second once the first is handled: two signals pending at once are one to Python
    while "SIGINT: saving" not in p.stdout.readline():
        pass
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr
    assert "Traceback" not in stderr


def test_torchrun_sigterm_saves_on_every_rank(tmp_path, train_file):
    p = start(tmp_path, [f"--train_files={train_file}", "--max_steps=100000", "--batch_size=2",
                         "--gradient_accumulation_steps=2", "--parallel=ddp"], TORCHRUN)
    wait_for_rows(tmp_path, 2, p)
    workers = [pid for pid in processes_using(tmp_path) if pid != p.pid]
    for pid in workers:  # a scheduler signals every process of the job
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    saved = [n for n in os.listdir(tmp_path) if n.startswith("global_step_")]
    assert len(saved) == 1 and (tmp_path / saved[0] / "state" / "rank1.pt").exists()


def test_torchrun_mistake_prints_its_line_every_time_under_load(tmp_path):
    """A mistake every rank finds (gradient accumulation not divisible over 2 ranks): rank 0's line
    is out before torchrun stops the job, and it is what torchrun's report ends with (the root
    cause), 10 times in 10 with 5 jobs at once."""
    from concurrent.futures import ThreadPoolExecutor
    line = "error: gradient_accumulation_steps=1 must be divisible by the 2 ranks"

    def job(i):
        cmd = TORCHRUN + ["train.py", *TINY, f"--out_dir={tmp_path}/run{i}", "--max_steps=2"]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))

    with ThreadPoolExecutor(5) as pool:
        runs = list(pool.map(job, range(10)))
    for p in runs:
        tail = [x for x in p.stderr.splitlines() if x.strip()][-3:]
        assert p.returncode != 0 and p.stderr.startswith(line), p.stderr[-1500:]
        assert any(x.strip().startswith(f"traceback : {line}") for x in tail), tail
    assert not any(os.path.exists(tmp_path / f"run{i}" / "global_step_2") for i in range(10))


def test_a_config_file_that_calls_exit_says_so_and_keeps_its_code(tmp_path):
    (tmp_path / "leave.py").write_text("import sys\nbatch_size = 2\nsys.exit(3)\n")
    p = subprocess.run([sys.executable, "train.py", str(tmp_path / "leave.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and p.stderr == (f"error: {tmp_path}/leave.py line 3: the config file "
                                              "called sys.exit(3)\n"), p.stderr


def test_metrics_mark_resumes_and_wandb_resumes_its_run(tmp_path, train_file, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    env = {"HOME": str(tmp_path), "WANDB_SILENT": "true"}
    args = [f"--train_files={train_file}", "--batch_size=2", "--save_every=2", "--wandb_log=True"]
    train(tmp_path, "--max_steps=2", *args, env=env)
    run_id = read_json(tmp_path / "global_step_2" / "checkpoint.json")["wandb_id"]
    train(tmp_path, "--max_steps=4", *args, env=env)
    events = jsonl(tmp_path / "metrics.jsonl")
    marks = [(r["event"], r["step"]) for r in events if "event" in r]
    assert marks == [("start", 0), ("resume", 2)]
    assert read_json(tmp_path / "global_step_4" / "checkpoint.json")["wandb_id"] == run_id
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    # both logged to the same run id
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)


def test_resume_after_the_data_changed_is_refused(tmp_path):
    from conftest import write_parquet
    from demo import write_demo_data
    path = write_demo_data(str(tmp_path / "data"), n_train=40, n_test=4)["train"]
    args = [f"--train_files={path}", "--batch_size=2", "--max_steps=4", "--save_every=2"]
    train(tmp_path / "out", *args[:-2], "--max_steps=2", "--save_every=2")
    import pyarrow.parquet as pq
    rows = pq.read_table(path).to_pylist()
    rows[5]["target"][0]["content"] += " (edited)"
    write_parquet(path, rows)
    p = train(tmp_path / "out", *args, check=False)
    assert (
        p.returncode == 1
        and p.stderr.count("\n") == 1
        and "the training data changed since" in p.stderr)
    assert os.path.exists(tmp_path / "out" / "global_step_2" / "checkpoint.json")  # nothing lost


def test_a_full_disk_while_tokenizing_is_one_line(tmp_path, train_file):
    """data_cache on a tiny tmpfs (skipped without mount rights): one line naming the folder and the
    reason; the data file is untouched and nothing half-written is left in the cache."""
    mnt = tmp_path / "small"
    before = Path(train_file).read_bytes()
    args = f"--out_dir={tmp_path}/out --train_files={train_file} --max_steps=1"
    p = train_on_small_tmpfs(mnt, "16k", f"{args} --data_cache={mnt}/cache", f"ls -a {mnt}/cache")
    assert_full_disk_line(p, "error: cannot write the data store in ")
    leftovers = p.stdout.split("rc=1")[1].split()
    assert not [n for n in leftovers if n not in (".", "..", "checksums.json")], leftovers
    assert Path(train_file).read_bytes() == before


def damage(newest, how):
    """Break a checkpoint the way a file system, a copy or a person might."""
    if how == "flip bytes":
        path = newest / "huggingface" / "model.safetensors"
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif how == "edit checkpoint.json":  # valid JSON, another data position: its checksum says so
        sidecar = read_json(newest / "checkpoint.json")
        sidecar["data"]["consumed"] = 0
        (newest / "checkpoint.json").write_text(json.dumps(sidecar))


def test_a_step_corrupted_twice_still_resumes_and_corrupt_folders_stay_bounded(tmp_path,
                                                                              train_file):
    """The newest checkpoint is damaged, the run falls back and saves that step again, which is
    damaged again: every restart reaches the newest intact checkpoint with one line, the losses are
    the uninterrupted run's, and at most one .corrupt folder is kept per step (pruned like the
    others)."""
    args = [f"--train_files={train_file}", "--batch_size=2", "--save_every=2", "--keep_last=3",
            "--max_steps=6"]
    train(tmp_path / "ref", *args)
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", out)
    for how in ("flip bytes", "edit checkpoint.json", "flip bytes"):
        shutil.rmtree(out / "global_step_6")  # stopped after saving step 4, which is damaged
        damage(out / "global_step_4", how)
        p = train(out, *args)
        warnings = [line for line in p.stdout.splitlines() if "cannot be trusted" in line]
        assert len(warnings) == 1 and "global_step_4.corrupt" in warnings[0], p.stdout
        assert "resumed from" in p.stdout and "global_step_2 (step 2" in p.stdout
        assert losses(out) == losses(tmp_path / "ref")
        assert sorted(n for n in os.listdir(out) if "global_step" in n) == [
            "global_step_2", "global_step_4", "global_step_4.corrupt", "global_step_6"]
    train(out, *args[:-1], "--max_steps=10")  # steps 8 and 10 prune 2, 4 and the corrupt 4
    assert sorted(n for n in os.listdir(out) if "global_step" in n) == [
        "global_step_10", "global_step_6", "global_step_8"]


class Pwned:
    """What a crafted checkpoint file could hold: unpickling it runs a command."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def forge(folder, rel, blob):
    """Replace a checkpoint file and update the manifest and checkpoint.json's own checksum, as an
    attacker who knows the format would: only what the file holds can give it away."""
    import zlib
    (folder / rel).write_bytes(blob)
    raw = read_json(folder / "checkpoint.json")
    raw.pop("checksum")
    raw["files"][rel] = [len(blob), zlib.crc32(blob)]
    raw["checksum"] = zlib.crc32(json.dumps(raw, sort_keys=True, default=str).encode())
    (folder / "checkpoint.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("rel", ["state/rank0.pt", "state/.metadata"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, train_file, rel):
    import io
    import pickle

    import torch
    args = [f"--train_files={train_file}", "--batch_size=2", "--save_every=2", "--max_steps=4"]
    train(tmp_path, *args)
    flag = tmp_path / "pwned"
    buffer = io.BytesIO()
    if rel.endswith(".pt"):
        torch.save({"rng": Pwned(flag)}, buffer)
    else:
        pickle.dump(Pwned(flag), buffer)
    forge(tmp_path / "global_step_4", rel, buffer.getvalue())
    p = train(tmp_path, *args[:-1], "--max_steps=6")
    assert not flag.exists()  # nothing ran
    warnings = [line for line in p.stdout.splitlines() if "cannot be trusted" in line]
    assert len(warnings) == 1 and "refused" in warnings[0], p.stdout
    assert "resumed from" in p.stdout and "global_step_2 (step 2" in p.stdout


def run_with_fault(out_dir, fault, *args):
    """train.py in a process whose model.clip_grads first plants a fault: 'nan_grad@3,4' fills the
    gradients with NaN at steps 3 and 4; 'nan_weight@2' puts a NaN into a weight after step 2's
    update would be made."""
    kind, steps = fault.split("@")
    code = f"""
import runpy, sys
import model
real, step = model.clip_grads, [0]
def clip(m, max_norm):
    step[0] += 1
    hit = step[0] in {{{steps}}}
    if hit and "{kind}" == "nan_grad":
        for p in m.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
    norm = real(m, max_norm)
    if hit and "{kind}" == "nan_weight":
        next(m.parameters()).data.view(-1)[0] = float("nan")
    return norm
model.clip_grads = clip
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""
    cmd = [sys.executable, "-c", code, *TINY, f"--out_dir={out_dir}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_non_finite_gradient_is_skipped_and_never_saved(tmp_path, train_file):
    from safetensors.torch import load_file
    args = [f"--train_files={train_file}", "--batch_size=2", "--keep_last=0", "--max_steps=5",
            "--save_every=1"]
    p = run_with_fault(tmp_path / "one", "nan_grad@3", *args)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["step"]: r for r in jsonl(tmp_path / "one" / "metrics.jsonl")
            if "loss" in r}
    assert rows[3].get("skipped") == 1 and rows[3]["grad_norm"] != rows[3]["grad_norm"]  # nan
    assert all("skipped" not in rows[s] for s in (1, 2, 4, 5))
    assert "non-finite: step skipped" in p.stdout
    weights = load_file(tmp_path / "one" / "global_step_3" / "huggingface" / "model.safetensors")
    before = load_file(tmp_path / "one" / "global_step_2" / "huggingface" / "model.safetensors")
    assert all(torch_equal(weights[k], before[k]) for k in weights)  # the step changed nothing
    # three in a row: the run stops with one line; what was saved is finite
    p = run_with_fault(tmp_path / "three", "nan_grad@3,4,5", *args[:-2], "--max_steps=8",
                       "--save_every=2", "--max_nonfinite=3")
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert "3 steps in a row had a non-finite loss or grad norm" in p.stderr
    assert sorted(n for n in os.listdir(tmp_path / "three") if "global_step" in n) == [
        "global_step_2", "global_step_4"]
    # a weight that is not finite is never saved
    p = run_with_fault(tmp_path / "weight", "nan_weight@2", *args[:-2], "--max_steps=3",
                       "--save_every=2")
    assert p.returncode == 1 and "the weights at step 2 are not finite: not saved" in p.stderr
    assert not any("global_step" in n for n in os.listdir(tmp_path / "weight"))


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


def test_metrics_that_cannot_be_written_stop_with_one_line(tmp_path, train_file):
    args = [f"--train_files={train_file}", "--batch_size=2", "--save_every=2"]
    train(tmp_path, *args, "--max_steps=2")
    os.remove(tmp_path / "metrics.jsonl")
    os.makedirs(tmp_path / "metrics.jsonl")  # as a full or read-only disk would: the write fails
    p = train(tmp_path, *args, "--max_steps=4", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "cannot write" in p.stderr and "metrics.jsonl" in p.stderr and "intact" in p.stderr
    assert (tmp_path / "global_step_2" / "checkpoint.json").exists()


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path, train_file):
    p = start(tmp_path, [f"--train_files={train_file}", "--max_steps=1"])
    time.sleep(0.4)  # inside the imports
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and stderr.strip() == "interrupted", stderr


def test_resume_disable_moves_the_sample_log_and_a_finished_run_logs_no_resume(tmp_path,
                                                                              train_file):
    args = [f"--train_files={train_file}", "--batch_size=2", "--max_steps=2", "--log_samples=True"]
    train(tmp_path, *args)
    train(tmp_path, *args)  # nothing to do: no resume marker
    marks = [r for r in jsonl(tmp_path / "metrics.jsonl") if "event" in r]
    assert [m["event"] for m in marks] == ["start"]
    assert jsonl(tmp_path / "samples.jsonl")[0].get("event") == "start"
    train(tmp_path, *args, "--resume=disable")
    moved = glob.glob(str(tmp_path / "previous_runs" / "*" / "samples.jsonl"))
    assert len(moved) == 1 and len(jsonl(moved[0])) == 3  # the marker and 2 steps
    assert len(jsonl(tmp_path / "samples.jsonl")) == 3
