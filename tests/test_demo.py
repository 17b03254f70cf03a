"""The embedded demo, shortened (train a little, sample), and the shipped config files."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from configurator import configure, script_defaults


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
            "--color=True",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    table = p.stdout[p.stdout.index("scenario  samples"):]
    for name in ("ar", "tf", "block", "block_tf", "adaptive", "lossless"):
        assert f"\n{name:>8} " in table, table
    assert "10/10" in table.split("lossless")[1]  # lossless decodes exactly what ar decodes
    assert "\033[38;5;" in p.stdout  # one example with each forward's tokens coloured


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
            "--val_files=None",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "writing the synthetic data set" in p.stdout
    assert os.path.exists(tmp_path / "data/demo/train.parquet") and os.path.exists(
        tmp_path / "data/demo/test.parquet"
    )
    assert os.path.exists(tmp_path / "out/demo/global_step_2/huggingface/config.json")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_config_files_set_only_known_keys(path):
    config = configure(script_defaults(os.path.join(ROOT, "train.py")), [path])
    assert config["block_size"] == 4
    header = open(path).read().split("\n")[:6]
    assert any("train.py" in line for line in header) and any("batch arithmetic" in line for line in
                                                              open(path).read().split("\n"))


def test_seed_recipe_batch_arithmetic():
    config = configure(script_defaults(os.path.join(ROOT, "train.py")), [os.path.join(ROOT, "config", "seed_recipe.py")])
    world = 4
    # samples per optimizer step
    assert config["batch_size"] * config["gradient_accumulation_steps"] == 512
    # micro-steps per GPU, as the seed's YAML
    assert config["gradient_accumulation_steps"] // world == 64
    assert (config["max_length"], config["learning_rate"], config["epochs"]) == (2048, 1e-5, 3)
