"""train.py as a user runs it (subprocesses): loss, exact resume, accumulation, checkpoints, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from data import write_demo_data

TINY = ["--device=cpu", "--init_from=demo", "--n_layer=2", "--n_embd=32", "--n_head=2", "--max_length=128",
        "--demo_data=False", "--val_files=None", "--log_every=1", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--warmup_ratio=0.1"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_demo_data(str(tmp_path_factory.mktemp("data")), n_train=96, n_test=16)["train"]


def train(out_dir, *args, check=True, launcher=None, env=None, train_files=None):
    data_arg = [f"--train_files={train_files}"] if train_files else []
    cmd = (launcher or [sys.executable]) + ["train.py"] + TINY + [f"--out_dir={out_dir}"] + data_arg + list(args)
    run_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=run_env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "huggingface", "model.safetensors"))


def test_loss_falls(tmp_path, train_file):
    train(tmp_path, "--max_steps=40", "--batch_size=8", "--learning_rate=1e-2", train_files=train_file)
    curve = losses(tmp_path)
    assert curve[40] < 0.6 * curve[1], curve


def test_resume_is_exact_and_keep_last_prunes(tmp_path, train_file):
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, "--max_steps=8", "--save_every=2", "--keep_last=2", "--batch_size=4", train_files=train_file)
    assert sorted(os.listdir(a)) == ["global_step_6", "global_step_8", "metrics.jsonl"]
    # b: the same run interrupted after step 6: its newest checkpoint is 6, its metrics end there
    os.makedirs(b)
    shutil.copytree(a / "global_step_6", b / "global_step_6")
    with open(a / "metrics.jsonl") as src, open(b / "metrics.jsonl", "w") as dst:
        dst.writelines(line for line in src if json.loads(line)["step"] <= 6)
    # debris of a crash while saving must never be loaded
    shutil.copytree(a / "global_step_8", b / "global_step_9.tmp")
    os.makedirs(b / "global_step_10" / "huggingface")  # no checkpoint.json: incomplete
    p = train(b, "--max_steps=8", "--save_every=2", "--keep_last=2", "--batch_size=4", train_files=train_file)
    assert "resumed from" in p.stdout and "global_step_6" in p.stdout
    assert losses(a) == losses(b)  # bitwise, every step
    wa, wb = weights(a / "global_step_8"), weights(b / "global_step_8")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_accumulation_matches_bigger_batch(tmp_path, train_file):
    train(tmp_path / "a", "--max_steps=4", "--batch_size=1", "--gradient_accumulation_steps=4",
          train_files=train_file)
    train(tmp_path / "b", "--max_steps=4", "--batch_size=4", "--gradient_accumulation_steps=1",
          train_files=train_file)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_and_resume(tmp_path, train_file, parallel):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = ["--batch_size=2", "--gradient_accumulation_steps=2", f"--parallel={parallel}", "--save_every=2"]
    train(tmp_path / "one", "--max_steps=4", *common, train_files=train_file)
    train(tmp_path / "two", "--max_steps=4", *common, launcher=torchrun, train_files=train_file)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4, (one, two)
    assert os.path.exists(tmp_path / "two" / "global_step_4" / "state" / "rank1.pt")
    # two ranks resume what two ranks wrote: drop the last checkpoint, run again
    shutil.rmtree(tmp_path / "two" / "global_step_4")
    os.remove(tmp_path / "two" / "metrics.jsonl")
    p = train(tmp_path / "two", "--max_steps=4", *common, launcher=torchrun, train_files=train_file)
    assert "resumed from" in p.stdout
    again = losses(tmp_path / "two")
    assert sorted(again) == [3, 4] and max(abs(again[s] - two[s]) for s in again) < 1e-5


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, train_file):
    cmd = [sys.executable, "train.py"] + TINY + [f"--out_dir={tmp_path}", f"--train_files={train_file}",
                                                 "--max_steps=100000", "--batch_size=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    saved = [d for d in os.listdir(tmp_path) if d.startswith("global_step_")]
    assert len(saved) == 1 and not saved[0].endswith(".tmp")
    step = int(saved[0].split("_")[-1])
    p = train(tmp_path, f"--max_steps={step + 2}", "--batch_size=2", train_files=train_file)
    assert f"resumed from {tmp_path}/global_step_{step}" in p.stdout
    assert os.path.exists(tmp_path / f"global_step_{step + 2}")


def test_incompatible_out_dir_is_refused(tmp_path, train_file):
    train(tmp_path, "--max_steps=1", "--batch_size=2", train_files=train_file)
    p = train(tmp_path, "--max_steps=2", "--batch_size=2", "--block_size=2", check=False, train_files=train_file)
    assert p.returncode == 1 and "holds another run (block_size=4" in p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr  # one line, no traceback
    assert os.path.exists(tmp_path / "global_step_1" / "checkpoint.json")  # nothing was lost
    p = train(tmp_path, "--max_steps=2", "--batch_size=2", "--block_size=2", "--resume=disable",
              train_files=train_file)
    assert "starting over" in p.stdout


def test_nan_loss_stops_with_a_message(tmp_path, train_file):
    train(tmp_path, "--max_steps=1", "--batch_size=2", train_files=train_file)
    p = train(tmp_path, "--max_steps=6", "--batch_size=2", "--learning_rate=1e30", "--min_lr=1e30",
              "--grad_clip=0", check=False, train_files=train_file)
    assert p.returncode == 1 and "loss is nan at step" in p.stderr and "newest checkpoint" in p.stderr, p.stderr
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("global")) == ["global_step_1"]


@pytest.mark.parametrize("args,env,message", [
    (["--batch_sise=2"], {}, "unknown config key 'batch_sise' (did you mean batch_size"),
    (["--max_steps=two"], {}, "--max_steps: expected int, got 'two'"),
    (["--train_files=/nonexistent/x.parquet"], {}, "data file '/nonexistent/x.parquet' not found"),
    (["--init_from=/nonexistent"], {}, "init_from='/nonexistent' is not a folder"),
    (["--init_from={tmp}/model_only"], {}, "model_only: no tokenizer in the model folder"),
    (["--resume=maybe"], {}, "resume must be 'auto' or 'disable'"),
    (["--max_length=10"], {}, "no training samples left: every prompt in"),
    (["--device=cpu", "--attention=flex"], {}, "attention='flex' needs CUDA"),
    (["--block_offset=later"], {}, "block_offset must be 'random' or an int"),
    # checked before waiting for the other rank, which never comes here
    (["--gradient_accumulation_steps=3"], {"WORLD_SIZE": "2"}, "must be divisible by the 2 ranks"),
])
def test_bad_input_is_one_line(tmp_path, train_file, args, env, message):
    from conftest import tiny_model
    tiny_model().save_pretrained(tmp_path / "model_only")  # weights and config, no tokenizer
    args = [a.format(tmp=tmp_path) for a in args]
    p = train(tmp_path, "--max_steps=1", *args, check=False, env=env, train_files=train_file)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and message in p.stderr, p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr


def test_wandb_without_network_or_key_still_trains(tmp_path, train_file, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    p = train(tmp_path, "--max_steps=2", "--batch_size=2", "--wandb_log=True", train_files=train_file,
              env={"HOME": str(tmp_path), "WANDB_SILENT": "true"})  # no ~/.netrc: no key
    assert "logging offline" in p.stdout and losses(tmp_path)[2] > 0


def test_export_loads_with_auto_classes_and_matches_training_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import build_example, collate
    from mask import dense_mask
    from model import MASK_TOKEN, export_hf, forward_losses, load_model
    torch.manual_seed(0)
    model, tok, mask_id = load_model("demo", demo_overrides=dict(hidden_size=32, num_layers=2, num_heads=2))
    batch = collate([build_example([5, 6, 7], [8, 9, 10, 11, 12], 4, mask_id)], 32)
    losses_, _, _ = forward_losses(model, batch)
    losses_.mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    export_hf(model, tok, str(tmp_path), master=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="sdpa")
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.config.mask_token_id == mask_id == tok2.convert_tokens_to_ids(MASK_TOKEN)
    assert tok2.chat_template == tok.chat_template
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
        masked = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=dense_mask(batch))
        torch.testing.assert_close(loaded(**masked).logits, model(**masked).logits)
    # a bf16 run exports bf16 weights and says so in config.json; the live model keeps its fp32 config
    export_hf(model, tok, str(tmp_path / "bf16"), master=True, dtype=torch.bfloat16)
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    assert str(model.config.dtype).endswith("float32")  # (save_pretrained itself turns it into a str)
