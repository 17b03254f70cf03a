"""bench.py on CPU with tiny shapes: it runs, its JSON holds the checks, the ratios and the lossless == ar count,
and a part that crashes is recorded without stopping the others (a GPU session may get one try)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = dict(device="cpu", rows=1, seq_len=64, prompt_len=16, steps=1, decode_samples=2, max_new_tokens=12)


def test_bench_cpu_json(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--check=True", *(f"--{k}={v}" for k, v in TINY.items()),
                        f"--json={tmp_path}/b.json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.load(open(tmp_path / "b.json"))
    for layout in ("split", "interleaved"):  # CPU: the BlockMask forward against the dense one
        assert out["check_flex"][layout]["ok"] and out["check_flex"][layout]["flex_fp32_loss_rel_diff"] < 1e-4
    assert out["check_lossless"]["lossless_equals_ar"] == "1/1"
    assert out["train"]["split"]["total_tokens"] > out["train"]["plain"]["total_tokens"] > 0
    assert out["train"]["split_vs_plain_time"] > 0
    decode = out["decode"]
    assert decode["lossless"]["same_as_ar"] == decode["ar"]["same_as_ar"] == 2  # lossless output == ar output
    assert decode["ar"]["tokens"] == decode["lossless"]["tokens"]
    assert set(out["seconds"]) == {"check_flex", "check_lossless", "train", "decode"}


def test_a_crashing_part_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    import bench

    def broken(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "bench_train", broken)
    for key, value in dict(TINY, decode_samples=1, json=str(tmp_path / "b.json")).items():
        monkeypatch.setattr(bench, key, value)
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 1
    out = json.load(open(tmp_path / "b.json"))
    assert "CUDA out of memory (simulated)" in out["train"]["error"]
    assert out["decode"]["lossless"]["same_as_ar"] == 1


def test_bad_keys_are_one_line_errors():
    for arg, message in (("--what=trian", "what='trian'"), ("--preset=qwen9", "unknown preset 'qwen9'"),
                         ("--block_size=0", "block_size must be >= 1"),
                         ("--json=/nonexistent/b.json", "json='/nonexistent/b.json': No such file")):
        p = subprocess.run([sys.executable, "bench.py", "--device=cpu", arg], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
        assert message in p.stderr
