"""bench.py on CPU with tiny shapes: it runs, its JSON holds the checks, the ratios and the lossless == ar count;
the flex check fails on a leaky mask; a part or a run that crashes is recorded without stopping the others (a GPU
session may get one try)."""
import json
import subprocess
import sys

import pytest
import torch

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


def test_the_flex_check_catches_a_mask_bug(monkeypatch):
    """A BlockMask that lets each mask see the first clean token of its own block must fail the check."""
    from torch.nn.attention.flex_attention import create_block_mask

    import bench
    import mask
    import model

    def leaky_block_mask(batch, num_queries=None):
        d, p, lim, m = batch["doc_ids"], batch["position_ids"], batch["limit"], batch["is_mask"]
        rule = mask.make_mask_mod(d, p, lim, m)

        def leaky(b, h, q, k):
            return rule(b, h, q, k) | (m[b, q] & ~m[b, k] & (p[b, k] == lim[b, q]) & (d[b, q] == d[b, k]))

        return create_block_mask(leaky, B=d.shape[0], H=None, Q_LEN=d.shape[1], KV_LEN=d.shape[1], device="cpu",
                                 _compile=False)

    cfg = bench.PRESETS["tiny"][0]
    samples = bench.samples_for(2, 120, 20, cfg["vocab_size"])
    assert bench.check_flex(cfg, torch.device("cpu"), samples, cfg["vocab_size"] - 1)["failures"] == []
    monkeypatch.setattr(model, "block_mask", leaky_block_mask)
    report = bench.check_flex(cfg, torch.device("cpu"), samples, cfg["vocab_size"] - 1)
    assert report["failures"] == ["flex vs dense split", "flex vs dense interleaved"]
    assert report["split"]["flex_fp32_loss_rel_diff"] > 1e-2


def test_a_crashing_flex_run_fails_the_check_and_the_others_still_compare(monkeypatch):
    import bench

    def fake(cfg, attn, dev, batch, bf16):
        if attn == "flex_attention" and not bf16:
            raise RuntimeError("out of resource: shared memory (simulated)")
        return torch.arange(4.0) + (0.01 if bf16 else 0.0), None

    monkeypatch.setattr(bench, "_loss_and_grads", fake)
    cfg = bench.PRESETS["tiny"][0]
    report = bench.check_flex(cfg, torch.device("cpu"), bench.samples_for(2, 40, 8, cfg["vocab_size"]), 2047)
    split = report["split"]
    assert not split["ok"] and "shared memory (simulated)" in split["flex_fp32_error"]
    assert split["dense_bf16_loss_rel_diff"] > 0
    assert split["flex_bf16_loss_rel_diff"] == pytest.approx(split["dense_bf16_loss_rel_diff"])
    assert report["failures"] == ["flex vs dense split", "flex vs dense interleaved"]


def test_a_checkpoint_decodes_in_fp32_at_its_block_size_with_its_stop_tokens(tmp_path, monkeypatch):
    """A bf16 export (config.json says bfloat16) is still decoded in fp32, where lossless == ar exactly."""
    import bench
    from data import stop_ids, write_demo_data
    from model import export_hf, load_model
    model, tok, mask_id = load_model("demo", demo_overrides=dict(hidden_size=32, num_layers=1, num_heads=2))
    model.config.next_block_size = 3
    export_hf(model, tok, str(tmp_path / "hf"), master=True, dtype=torch.bfloat16)
    files = write_demo_data(str(tmp_path / "data"), n_train=4, n_test=4)
    monkeypatch.setattr(bench, "ckpt", str(tmp_path / "hf"))
    monkeypatch.setattr(bench, "data", files["test"])
    load, prompts, eos, mid, B, source = bench.decode_inputs("tiny", bench.PRESETS["tiny"][0], 16, 2)
    assert load(torch.device("cpu")).dtype == torch.float32
    assert (len(prompts), eos, mid, B, source) == (4, stop_ids(tok), mask_id, 3, str(tmp_path / "hf"))
