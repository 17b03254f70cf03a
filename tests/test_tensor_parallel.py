"""Tensor parallel on CPU (gloo): tensor_parallel=2 on 4 ranks (TP 2 x FSDP 2) trains what one
process trains, for Qwen3 and Llama, full and gated LoRA; checkpoints move across a change of TP and
data-parallel ranks, and their exports are the single process's model; sample.py decodes under TP
what one process decodes. (Its mistakes, each one line: tests/test_errors.py.)"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, jsonl, read_json, tiny_model, train

pytestmark = pytest.mark.slow
FOUR = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 4 heads and 2 KV heads, so that 2 ranks can split them
SHAPE = ["--n_embd=64", "--n_head=4", "--batch_size=4", "--gradient_accumulation_steps=2"]


def metrics(out_dir):
    return {r["step"]: r for r in jsonl(os.path.join(out_dir, "metrics.jsonl"))
            if "loss" in r}


def assert_same_run(a, b, steps, tol=1e-5):
    ra, rb = metrics(a), metrics(b)
    assert sorted(ra) == sorted(rb) == list(steps)
    for s in steps:
        for key in ("loss", "grad_norm"):
            assert abs(ra[s][key] - rb[s][key]) <= tol * abs(ra[s][key]), (s, key, ra[s], rb[s])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama with the demo's tokenizer, as a local Hugging Face folder."""
    from demo import demo_tokenizer
    path = tmp_path_factory.mktemp("llama")
    tiny_model("llama", vocab_size=128, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128).save_pretrained(path)
    demo_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("model,finetune", [("demo", "full"), ("demo", "gated_lora"),
                                            ("llama", "full")])
def test_four_ranks_with_tensor_parallel_2_train_what_one_process_trains(
        tmp_path, train_file, llama_folder, model, finetune):
    args = [*SHAPE, "--max_steps=4", f"--finetune={finetune}", "--learning_rate=1e-3"]
    if model == "llama":
        args.append(f"--init_from={llama_folder}")
    train(tmp_path / "one", *args, train_files=train_file)
    p = train(tmp_path / "tp", *args, "--tensor_parallel=2", launcher=FOUR,
              train_files=train_file)
    assert "tensor parallel 2" in p.stdout
    assert_same_run(tmp_path / "one", tmp_path / "tp", range(1, 5))


def test_checkpoints_move_across_tensor_and_data_parallel_sizes(tmp_path, train_file):
    """tp 2 x dp 2 saves step 2; tp 1 x dp 2 resumes it to step 4; one process resumes that to step
    6: the losses, the samples and the exported weights of an uninterrupted single process."""
    import shutil

    from safetensors.torch import load_file
    args = [*SHAPE, "--max_steps=6", "--save_every=2", "--keep_last=0", "--log_samples=True"]
    train(tmp_path / "one", *args, train_files=train_file)
    run = tmp_path / "moved"
    for launcher, tp, resume_at in ((FOUR, 2, None), (TWO, 1, 2), (None, 1, 4)):
        for later in range(resume_at + 2, 7, 2) if resume_at else ():  # drop the later ones
            shutil.rmtree(run / f"global_step_{later}")
        p = train(run, *args, f"--tensor_parallel={tp}", launcher=launcher,
                  train_files=train_file)
        assert resume_at is None or f"global_step_{resume_at} (step {resume_at}" in p.stdout
    assert_same_run(tmp_path / "one", run, range(1, 7))
    for step in (2, 6):  # exported by the tensor-parallel run, and at the end
        want, got = (load_file(os.path.join(d, f"global_step_{step}", "huggingface",
                                            "model.safetensors")) for d in (tmp_path / "one", run))
        assert set(want) == set(got), (step, set(want) ^ set(got))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)

    def samples(d):  # the data position: the same samples, step by step (the last row wins)
        return {r["step"]: r["samples"] for r in jsonl(d / "samples.jsonl")
                if "samples" in r}
    assert samples(run) == samples(tmp_path / "one")


# sample.py under TP with each rank's draft policy choosing differently, as each rank's own timings
# make it do at random: rank 1 always drafts everything in every group, rank 0 groups after none,
# half and all
SKEWED = """import os, runpy, sys
sys.path.insert(0, os.getcwd())
import policy
if os.environ["RANK"] == "1":
    policy.DraftPolicy.best = lambda self, n: self.D
    policy.DraftPolicy.groups = lambda self, n, k, *priced: tuple(range(k + 1))
else:
    policy.DraftPolicy.groups = lambda self, n, k, *priced: tuple(sorted({0, k // 2, k}))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("finetune,sampling", [
    ("full", []), ("gated_lora", ["--temperature=0.7", "--top_p=0.9", "--samples_per_prompt=2"])])
def test_sample_py_under_tensor_parallel_decodes_what_one_process_decodes(tmp_path, train_file,
                                                                          finetune, sampling):
    """Its ranks' draft policies made to disagree (as their own clocks can make them): the group
    steps with rank 0's shapes, and decodes what one process decodes."""
    train(tmp_path / "run", *SHAPE, "--max_steps=6", f"--finetune={finetune}",
          "--learning_rate=1e-2", train_files=train_file)
    (tmp_path / "skewed.py").write_text(SKEWED)
    args = ["sample.py", "--device=cpu", f"--out_dir={tmp_path}/run", f"--data_files={train_file}",
            "--num_samples=4", "--max_new_tokens=20", "--batch_size=3",
            "--scenario=ar,block,adaptive,lossless"] + sampling
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = []
    for launcher, tp in (([sys.executable], 1), (TWO + [str(tmp_path / "skewed.py")], 2)):
        out = tmp_path / f"tp{len(outs)}.json"
        p = subprocess.run(launcher + args + [f"--tensor_parallel={tp}", f"--summary_json={out}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(read_json(out)["scenarios"])
    one, tp2 = outs
    for mode in ("ar", "block", "adaptive", "lossless"):
        assert one[mode]["tokens"] == tp2[mode]["tokens"], (mode, sampling)
        assert one[mode].get("same_as_ar") == tp2[mode].get("same_as_ar"), mode
    assert tp2["lossless"]["same_as_ar"] == f"{tp2['ar']['samples']}/{tp2['ar']['samples']}"
