"""train.py with the data people bring: ShareGPT JSON lines with malformed rows skipped and counted
(printed, and saved in checkpoint.json), text the tokenizer cannot represent reported once,
val_files equal to train_files warned about; and SIGHUP (a closed terminal, a dropped ssh session)
saving like SIGTERM.
"""

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, TINY, read_json, start, train

pytestmark = pytest.mark.slow  # train.py as a process


def wait_for_steps(out_dir, n, proc, timeout=120):
    """Until metrics.jsonl has n rows (or the process ended)."""
    path, deadline = os.path.join(out_dir, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path):
            with open(path) as f:
                if len(f.readlines()) >= n:
                    return
        time.sleep(0.05)


def test_sharegpt_jsonl_with_bad_rows_trains_and_counts_them(tmp_path, train_file):
    rows = pq.read_table(train_file).to_pylist()
    lines = [json.dumps({"conversations": [
        {"from": "human", "value": r["prompt"][0]["content"] + ("\x00" if i == 3 else "")},
        {"from": "gpt", "value": r["target"][0]["content"]}]}) for i, r in enumerate(rows)]
    lines.insert(10, '{"conversations": [{"from": "robot", "value": "x"}]}')
    lines.insert(20, '{"conversations": [')
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("\n".join(lines) + "\n")
    p = train(tmp_path / "out", f"--train_files={data}", f"--val_files={data}", "--max_steps=1",
              "--batch_size=4", check=False)
    assert p.returncode == 1 and p.stderr == (
        f"error: {data} line 11: key 'conversations' message 0 has unknown role 'robot' "
        "(ShareGPT 'from': expected one of human, gpt, system, function_call, observation)\n")
    p = train(tmp_path / "out", f"--train_files={data}", f"--val_files={data}", "--max_steps=1",
              "--batch_size=4", "--skip_bad_rows=True")
    out = p.stdout
    assert f"skipped 2 malformed rows of train_files (skip_bad_rows; first: {data} line 11: " in out
    assert out.count("skipped 2 malformed rows") == 1  # val_files is the same data: said once
    assert "note: 1 rows: text the tokenizer has no token for (NUL bytes, emoji" in out
    assert f"(first: {data} line 4)" in out and out.count("no token for") == 1
    assert (f"warning: val_files and train_files share 1 file(s) ({data}): the validation numbers "
            "are on training data") in out
    assert f"data: {len(rows)} train samples" in out
    sidecar = read_json(tmp_path / "out" / "global_step_1" / "checkpoint.json")
    assert sidecar["bad_rows"] == {"train": 2, "val": 2}


def test_sighup_saves_at_the_end_of_the_step_and_exits_0(tmp_path, train_file):
    p = start(tmp_path, [f"--train_files={train_file}", "--max_steps=100000", "--batch_size=2"])
    wait_for_steps(tmp_path, 2, p)
    p.send_signal(signal.SIGHUP)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and "SIGHUP: saving a checkpoint at the end of this step" in stdout, \
        stderr
    saved = [n for n in os.listdir(tmp_path) if n.startswith("global_step_")]
    assert len(saved) == 1 and "Traceback" not in stderr
    step = int(saved[0].split("_")[-1])
    p = train(tmp_path, f"--train_files={train_file}", "--batch_size=2", f"--max_steps={step + 1}")
    assert f"resumed from {tmp_path / saved[0]} (step {step}" in p.stdout


def test_a_terminal_that_closes_costs_no_progress(tmp_path, train_file):
    """train.py on a terminal (its controlling one) that closes: the kernel sends SIGHUP and from
    then on every write to the terminal fails (EIO). The run still saves and exits 0."""
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--out_dir={tmp_path}",
                          f"--train_files={train_file}", "--max_steps=100000", "--batch_size=2"],
                         cwd=ROOT, stdin=follower, stdout=follower, stderr=follower,
                         start_new_session=True,
                         preexec_fn=lambda: fcntl.ioctl(1, termios.TIOCSCTTY, 0),
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(follower)
    seen, closing = [], threading.Event()

    def drain():  # the terminal reads what the run writes, until it closes
        while not closing.is_set():
            if select.select([leader], [], [], 0.05)[0]:
                try:
                    seen.append(os.read(leader, 4096))
                except OSError:
                    return

    reader = threading.Thread(target=drain)
    reader.start()
    wait_for_steps(tmp_path, 2, p)
    closing.set()
    reader.join()
    os.close(leader)  # the terminal is gone: SIGHUP, and writes to it fail from here on
    assert p.wait(timeout=120) == 0, b"".join(seen)[-2000:]
    assert [n for n in os.listdir(tmp_path) if n.startswith("global_step_")]
