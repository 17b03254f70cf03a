"""bench.py on CPU with tiny shapes: it runs, its JSON holds the GPU tests' result (skipped here), a
model trained by train.py and measured, the ratios, lossless == ar greedy and sampled, the (k, m)
steps lossless chose, serve.py's numbers; a part that crashes is recorded without stopping the
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
        for mode in ("ar", "lossless_auto", "lossless_full"):  # n prompts in one chunk: 2 rounds
            assert res[mode]["prompts"] == 2 * n
            assert res[mode]["same_as_ar"] == 2 * n and res[mode]["tokens"] == res["ar"]["tokens"]
        assert ("same_as_ar" in res["hf_generate"]) == (not sampled)  # HF draws its own samples
        assert res["lossless_full"]["tokens_per_forward"] >= 1
        mix = res["lossless_auto"]["shapes"]
        assert mix and sum(mix.values()) == pytest.approx(1)
        kmg = [[int(x) for x in s.split(",")] for s in mix]  # k,m or k,m,g (g < k + 1 groups)
        assert all(0 <= x[0] <= x[1] < 4 and (x[2:] == [] or 2 <= x[2] <= x[0]) for x in kmg), mix


@pytest.mark.slow
def test_bench_cpu_json(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--check=True",
                        *(f"--{k}={v}" for k, v in TINY.items()), "--trained_steps=5",
                        "--trained_samples=4", "--trained_tpf=0",
                        f"--summary_json={tmp_path}/b.json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # see ONE_THREAD
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = read_json(tmp_path / "b.json")
    tests = out["gpu_tests"]  # pytest -m gpu: on CPU every test skips
    assert tests["returncode"] == 0 and "skipped" in tests["summary"], tests
    trained = out["trained"]
    assert set(trained) == {"small_b4"}  # CPU: the first block size, a dry run
    small = trained["small_b4"]  # the CPU shape, trained 5 steps: the structure, not a drafter
    assert small["rounds"] == [{"steps": 5, "tpf_tf": small["tpf_tf"]}] and small["tpf_tf"] >= 1
    assert set(small["decode"]) == {"batch_1", "batch_2"}
    assert_decode(small["decode"], 4)
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
        assert batches["batch_1"]["hf_generate"].get("same_as_ar", 6) == 6  # greedy: HF == ar
    assert "lossless_auto" in p.stdout and "k,m mix" in p.stdout
    assert set(out["seconds"]) == {"gpu_tests", "trained", "train", "decode"}


@pytest.mark.slow
def test_trained_trains_in_rounds_up_to_its_cap(monkeypatch):
    """train.py resumes its run with more steps each round, up to the cap, when the model does not
    draft well enough yet; it is measured all the same."""
    import bench
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # train.py's; see ONE_THREAD
    monkeypatch.setattr(bench, "TRAINED_SHAPES", {"cpu": {"tiny": (1, 32, 2, 3e-3, 3, 5)}})
    saved = []
    report = bench.bench_trained(torch.device("cpu"), [4], 3.0, 0, 2, 8, [1], 0, saved.append)
    tiny = report["tiny_b4"]
    assert [r["steps"] for r in tiny["rounds"]] == [3, 5] and tiny["steps"] == 5
    assert tiny["tpf_tf"] < 3 and "error" not in tiny
    assert_decode(tiny["decode"], 2)
    assert saved == [report]


@pytest.mark.slow
def test_bench_serve_measures_lossless_against_ar(trained_demo, tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--what=serve", "--device=cpu",
                        f"--ckpt={trained_demo['out_dir']}", f"--data_files={trained_demo['test']}",
                        "--serve_clients=1,3", "--serve_rounds=1", "--max_new_tokens=24",
                        f"--summary_json={tmp_path}/s.json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    serve = read_json(tmp_path / "s.json")["serve"]
    assert set(serve) == {"clients_1", "clients_3"}
    for clients, modes in serve.items():
        ar, ll = modes["ar"], modes["lossless"]
        assert ar["answers"] == ll["answers"] == 8 and ar["tokens"] == ll["tokens"] > 0
        assert ar["tokens_per_forward"] == 1 and ll["tokens_per_forward"] > 1
        assert modes["lossless_vs_ar"] == pytest.approx(ll["tokens_per_s"] / ar["tokens_per_s"])
        for row in (ar, ll):
            assert 0 < row["ttft_p50"] <= row["ttft_p99"]
            assert 0 < row["per_token_p50"] <= row["per_token_p99"]
    assert "serve   1 clients: lossless" in p.stdout


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
    assert out["decode"]["greedy"]["batch_1"]["lossless_auto"]["same_as_ar"] == 2  # 1 prompt, 2 rounds
    assert "batch_2" not in out["decode"]["greedy"]  # more rows than prompts: skipped


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
    load, prompts, settings, source = bench.decode_inputs(bench.PRESETS["tiny"][0], 16, 128,
                                                          str(tmp_path / "hf"), files["test"], 4, 0)
    assert load(torch.device("cpu")).dtype == torch.float32
    assert (len(prompts), source) == (4, str(tmp_path / "hf"))
    assert settings == bench.Decoding(chat.Chat(tok).stop_ids(), mask_id, tok.pad_token_id, 3)
