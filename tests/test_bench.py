"""bench.py on CPU with tiny shapes: it runs, its JSON holds the checks (a model trained by train.py
included), the ratios, lossless == ar greedy and sampled, and the (k, m) steps lossless chose; the
flex check fails on a leaky mask; a part or a run that crashes is recorded without stopping the
others (a GPU session may get one try)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_json

TINY = dict(device="cpu", rows=1, seq_len=64, prompt_len=16, steps=1, decode_samples=3,
            max_new_tokens=12, decode_batches="1,2")
MODES = ("ar", "lossless_auto", "lossless_full", "hf_generate")
# ONE_THREAD: the subprocess runs on one thread: on a busy 2-core machine two threads spin waiting
# for each other, and the run takes 10x longer


def assert_decode(batches, n, sampled=False):
    """One sampling setting of a decode result: numbers, ratios, lossless == ar, the (k, m) mix."""
    for res in batches.values():
        assert set(res) == set(MODES)
        for mode, r in res.items():
            assert r["tokens"] > 0 and r["forwards"] > 0 and r["seconds"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
            for key, base in (("speedup_vs_ar", "ar"), ("speedup_vs_hf", "hf_generate")):
                assert r[key] == pytest.approx(r["tokens_per_s"] / res[base]["tokens_per_s"])
        for mode in ("ar", "lossless_auto", "lossless_full"):
            assert res[mode]["same_as_ar"] == n and res[mode]["tokens"] == res["ar"]["tokens"]
        assert ("same_as_ar" in res["hf_generate"]) == (not sampled)  # HF draws its own samples
        assert res["lossless_full"]["tokens_per_forward"] >= 1
        mix = res["lossless_auto"]["shapes"]
        assert mix and sum(mix.values()) == pytest.approx(1)
        assert all(0 <= int(k) <= int(m) < 4 for k, m in (s.split(",") for s in mix))


@pytest.mark.slow
def test_bench_cpu_json(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--check=True",
                        *(f"--{k}={v}" for k, v in TINY.items()), "--check_steps=5",
                        "--check_samples=4", "--check_tpf=0", f"--summary_json={tmp_path}/b.json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # see ONE_THREAD
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = read_json(tmp_path / "b.json")
    for layout in ("split", "interleaved"):  # CPU: the BlockMask forward against the dense one
        flex = out["check_flex"][layout]
        assert flex["ok"] and flex["flex_fp32_loss_rel_diff"] < 1e-4
    decoding = out["check_decoding"]
    assert decoding["failures"] == []
    assert decoding["lossless_equals_ar"] == decoding["lossless_equals_ar_sampled"] == "5/5"
    assert all(decoding[f"batched_{m}_equals_alone"] == "5/5"
               for m in ("ar", "block", "adaptive", "lossless"))
    trained = out["check_trained"]
    assert trained["failures"] == []
    small = trained["small"]  # the CPU shape, trained 5 steps: the structure, not a drafting model
    assert small["rounds"] == [{"steps": 5, "tpf_tf": small["tpf_tf"]}] and small["tpf_tf"] >= 1
    assert set(small["eager"]) == {"batch_1", "batch_2"} and "compiled" not in small
    assert_decode(small["eager"], 4)
    assert out["check_tensor_parallel"] == {"skipped": "CPU", "failures": []}
    assert "tensor parallel: skipped (CPU)" in p.stdout
    train = out["train"]
    masks = train["split"]["total_tokens"] - train["split"]["clean_tokens"]
    assert train["split"]["clean_tokens"] == train["plain"]["total_tokens"] == 64
    assert masks == 48 - 12
    assert train["split_vs_plain_time"] == pytest.approx(
        train["split"]["seconds"] / train["plain"]["seconds"])
    assert set(out["decode"]) == {"greedy", "sampled"}
    for how, batches in out["decode"].items():
        assert set(batches) == {"batch_1", "batch_2"}
        assert_decode(batches, 3, sampled=how == "sampled")
        assert batches["batch_1"]["hf_generate"].get("same_as_ar", 3) == 3  # greedy: HF == ar
    assert "lossless_auto" in p.stdout and "k,m mix" in p.stdout
    assert set(out["seconds"]) == {"check_flex", "check_decoding", "check_trained",
                                   "check_tensor_parallel", "train", "decode"}


@pytest.mark.slow
def test_check_trained_trains_in_rounds_up_to_its_cap_and_fails_short_of_check_tpf(monkeypatch):
    """train.py resumes its run with more steps each round; a model that never drafts well enough
    is a failure of the check, and still measured."""
    import bench
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # train.py's; see ONE_THREAD
    monkeypatch.setattr(bench, "TRAINED_SHAPES", {"cpu": {"tiny": (1, 32, 2, 3e-3, 3, 5, False)}})
    for key, value in (("check_samples", 2), ("max_new_tokens", 8), ("decode_batches", (1,))):
        monkeypatch.setattr(bench, key, value)
    saved = []
    report = bench.check_trained(torch.device("cpu"), saved.append)
    tiny = report["tiny"]
    assert [r["steps"] for r in tiny["rounds"]] == [3, 5] and tiny["steps"] == 5
    assert report["failures"] == [f"trained tiny: tpf_tf {tiny['tpf_tf']:.2f} < 3 after 5 steps"]
    assert_decode(tiny["eager"], 2)
    assert saved == [report]


def run_main(args):
    """bench.py run as a script, in this process (so that a test can plant a fault in a module it
    uses)."""
    import runpy
    argv, sys.argv = sys.argv, ["bench.py", *args]
    try:
        runpy.run_path(os.path.join(ROOT, "bench.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_a_crashing_part_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    import data

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(data, "collate", broken)  # the train part packs rows with it, decode not
    settings = dict(TINY, decode_samples=1, sampling="greedy", summary_json=tmp_path / "b.json")
    with pytest.raises(SystemExit) as exit_:
        run_main([f"--{k}={v}" for k, v in settings.items()])
    assert exit_.value.code == 1
    out = read_json(tmp_path / "b.json")
    assert "CUDA out of memory (simulated)" in out["train"]["error"]
    assert out["decode"]["greedy"]["batch_1"]["lossless_auto"]["same_as_ar"] == 1
    assert "batch_2" not in out["decode"]["greedy"]  # more rows than prompts: skipped


def test_the_flex_check_catches_a_mask_bug(monkeypatch):
    """A BlockMask that lets each mask see the first clean token of its own block must fail the
    check."""
    from torch.nn.attention.flex_attention import create_block_mask

    import bench
    import mask
    import model

    def leaky_block_mask(batch, num_queries=None):
        d, p, lim, m = batch["doc_ids"], batch["position_ids"], batch["limit"], batch["is_mask"]
        rule = mask.make_mask_mod(d, p, lim, m)

        def leaky(b, h, q, k):
            return rule(b, h, q, k) | (m[b, q] & ~m[b, k] & (p[b, k] == lim[b, q])
                                       & (d[b, q] == d[b, k]))

        return create_block_mask(leaky, B=d.shape[0], H=None, Q_LEN=d.shape[1],
                                 KV_LEN=d.shape[1], device="cpu", _compile=False)

    cfg = bench.PRESETS["tiny"][0]
    samples = bench.samples_for(2, 120, 20, cfg["vocab_size"])
    cpu = torch.device("cpu")
    assert bench.check_flex(cfg, cpu, samples, cfg["vocab_size"] - 1)["failures"] == []
    monkeypatch.setattr(model, "block_mask", leaky_block_mask)
    report = bench.check_flex(cfg, cpu, samples, cfg["vocab_size"] - 1)
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
    report = bench.check_flex(cfg, torch.device("cpu"), bench.samples_for(2, 40, 8, 2048), 2047)
    split = report["split"]
    assert not split["ok"] and "shared memory (simulated)" in split["flex_fp32_error"]
    assert split["dense_bf16_loss_rel_diff"] > 0
    assert split["flex_bf16_loss_rel_diff"] == pytest.approx(split["dense_bf16_loss_rel_diff"])
    assert report["failures"] == ["flex vs dense split", "flex vs dense interleaved"]


def test_a_checkpoint_decodes_in_fp32_at_its_block_size_with_its_stop_tokens(tmp_path, monkeypatch):
    """A bf16 export (config.json says bfloat16) is still decoded in fp32, where lossless == ar
    exactly."""
    import bench
    import chat
    from checkpoint import export_hf
    from demo import write_demo_data
    from model import load_model
    tok, mask_id, new = chat.training_tokenizer("demo")
    model = load_model("demo", mask_id, new,
                       demo_overrides=dict(hidden_size=32, num_layers=1, num_heads=2))
    model.config.next_block_size = 3
    export_hf(model, tok, str(tmp_path / "hf"), master=True, dtype=torch.bfloat16)
    files = write_demo_data(str(tmp_path / "data"), n_train=4, n_test=4)
    monkeypatch.setattr(bench, "ckpt", str(tmp_path / "hf"))
    monkeypatch.setattr(bench, "data_files", files["test"])
    load, prompts, settings, source = bench.decode_inputs(bench.PRESETS["tiny"][0], 16, 2)
    assert load(torch.device("cpu")).dtype == torch.float32
    assert (len(prompts), source) == (4, str(tmp_path / "hf"))
    assert settings == {"eos": chat.Chat(tok).stop_ids(), "mask_id": mask_id, "pad_id":
                        tok.pad_token_id, "B": 3}
