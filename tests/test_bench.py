"""bench.py on CPU with tiny shapes: it runs, and its JSON holds the ratios and the lossless == ar count."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_cpu_json(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--check=True", "--rows=1", "--seq_len=64",
                        "--prompt_len=16", "--steps=1", "--decode_samples=2", "--max_new_tokens=12",
                        f"--json_path={tmp_path}/b.json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.load(open(tmp_path / "b.json"))
    assert out["check"]["lossless_equals_ar"] == "1/1"
    assert out["train"]["split"]["total_tokens"] > out["train"]["plain"]["total_tokens"] > 0
    assert out["train"]["split_vs_plain_time"] > 0
    decode = out["decode"]
    assert decode["lossless"]["same_as_ar"] == decode["ar"]["same_as_ar"] == 2  # lossless output == ar output
    assert decode["ar"]["tokens"] == decode["lossless"]["tokens"]
