"""Realistic checks with public data found at $SHARED_DATA (never committed; see conftest.py): the
Qwen3 tokenizer (its vocab padded to 151,936 embedding rows, so the mask token takes a spare row) and
GSM8K rows. Skipped without it.
"""

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA, read_json, shared_tokenizer, tiny_model, write_parquet

pytestmark = pytest.mark.slow  # subprocesses: train.py, sample.py, torchrun



def gsm8k_rows(split, n):
    path = os.path.join(SHARED_DATA, "gsm8k", f"{split}.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    rows = []
    for line in Path(path).read_text().splitlines()[:n]:
        ex = json.loads(line)
        work, answer = ex["answer"].split("####")
        rows.append(
            {
                "prompt": ex["question"],
                "target": f"<think>\n{work.strip()}\n</think>\n\nThe answer is {answer.strip()}."})
    return rows


def test_qwen3_tokenizer_and_gsm8k_end_to_end(tmp_path):
    tok = shared_tokenizer("qwen3")
    train = write_parquet(tmp_path / "train.parquet", gsm8k_rows("train", 48))
    test = write_parquet(tmp_path / "test.parquet", gsm8k_rows("test", 4))
    model = tiny_model(
        "qwen3",
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        initializer_range=0.02)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    p = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--device=cpu",
            f"--init_from={tmp_path}/base",
            f"--train_files={train}",
            f"--val_files={test}",
            f"--out_dir={tmp_path}/out",
            "--max_steps=2",
            "--batch_size=4",
            "--max_length=512",
            "--demo_data=False",
            "--learning_rate=1e-3",
            "--log_every=1",
            f"--data_cache={tmp_path}/cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mask token id 151669" in p.stdout  # the first spare row: no resize, nothing shrunk
    assert "eval step 2" in p.stdout
    exported = read_json(tmp_path / "out" / "global_step_2" / "huggingface" / "config.json")
    assert exported["mask_token_id"] == 151669 and exported["vocab_size"] == 151936
    s = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--device=cpu",
            f"--out_dir={tmp_path}/out",
            f"--data_files={test}",
            "--scenario=ar,lossless,block_tf",
            "--max_new_tokens=6",
            "--num_samples=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600)
    assert s.returncode == 0, s.stderr[-3000:]
    table = s.stdout[s.stdout.index("scenario  samples"):]
    assert "2/2" in table.split("lossless")[1]
