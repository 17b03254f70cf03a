"""The embedded demo, shortened (train a little, sample), and the shipped config files."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_demo_end_to_end(trained_demo, tmp_path):
    assert "eval step" in trained_demo["stdout"] and "tpf_tf" in trained_demo["stdout"]
    p = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--device=cpu",
            f"--out_dir={trained_demo['out_dir']}",
            f"--data_files={trained_demo['test']}",
            "--num_samples=10",
            "--color=True"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600)
    assert p.returncode == 0, p.stderr
    table = p.stdout[p.stdout.index("scenario  samples"):]
    for name in ("ar", "tf", "block", "block_tf", "adaptive", "lossless"):
        assert f"\n{name:>8} " in table, table
    assert "10/10" in table.split("lossless")[1]  # lossless decodes exactly what ar decodes
    assert "\033[38;5;" in p.stdout  # one example with each forward's tokens coloured


@pytest.mark.slow
def test_train_writes_the_demo_data_when_missing(tmp_path):
    """`python train.py` with the defaults, from a fresh directory: the data set appears, training
    runs."""
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--device=cpu",
            "--max_steps=2",
            "--n_layer=1",
            "--n_embd=32",
            "--n_head=2",
            "--val_files=None"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "writing the synthetic data set" in p.stdout
    assert os.path.exists(tmp_path / "data/demo/train.parquet") and os.path.exists(
        tmp_path / "data/demo/test.parquet")
    assert os.path.exists(tmp_path / "out/demo/global_step_2/huggingface/config.json")


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_config_files_load_in_train_py(path):
    """Every shipped config file is read by train.py itself (a key it does not know would stop it
    there); the check that follows, max_length=1, proves it got that far. Each names its launch
    command and its batch arithmetic in its header."""
    p = subprocess.run([sys.executable, "train.py", path, "--max_length=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.strip() == "error: max_length=1: must be >= 2", p.stderr
    text = Path(path).read_text()
    assert "train.py" in "".join(text.split("\n")[:6]) and "batch arithmetic" in text


@pytest.mark.slow
def test_the_seed_recipe_takes_512_samples_per_step_on_4_ranks(tmp_path):
    from demo import write_demo_data
    files = write_demo_data(str(tmp_path / "data"), n_train=600, n_test=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "train.py", os.path.join(ROOT, "config", "seed_recipe.py"), "--init_from=demo",
           f"--train_files={files['train']}", "--device=cpu", "--dtype=float32",
           f"--out_dir={tmp_path}/out", f"--data_cache={tmp_path}/cache", "--data_only=True"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "of 512 samples (2 per micro-batch x 64 micro-steps x 4 ranks)" in p.stdout, p.stdout
