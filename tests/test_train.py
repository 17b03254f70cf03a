"""train.py as a user runs it (subprocesses): loss, exact resume, accumulation, checkpoints, bad
input."""

import json
import os
import shutil
import signal
import time

import pytest
import torch

from conftest import TORCHRUN, example, jsonl, losses, read_json, start, train

pytestmark = pytest.mark.slow  # subprocesses: train.py, sample.py, torchrun


def weights(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "huggingface", "model.safetensors"))


def test_loss_falls(tmp_path, train_file):
    train(tmp_path, "--max_steps=40", "--batch_size=8", "--learning_rate=1e-2",
          train_files=train_file)
    curve = losses(tmp_path)
    assert curve[40] < 0.6 * curve[1], curve


def test_resume_is_exact_and_keep_last_prunes(tmp_path, train_file):
    a, b = tmp_path / "a", tmp_path / "b"
    train(
        a,
        "--max_steps=8",
        "--save_every=2",
        "--keep_last=2",
        "--batch_size=4",
        train_files=train_file)
    assert sorted(os.listdir(a)) == [
        "global_step_6",
        "global_step_8",
        "metrics.jsonl",
        "train.lock"]
    # b: the same run interrupted after step 6: its newest checkpoint is 6, its metrics end there
    os.makedirs(b)
    shutil.copytree(a / "global_step_6", b / "global_step_6")
    with open(a / "metrics.jsonl") as src, open(b / "metrics.jsonl", "w") as dst:
        dst.writelines(line for line in src if json.loads(line)["step"] <= 6)
    # debris of a crash while saving must never be loaded
    shutil.copytree(a / "global_step_8", b / "global_step_9.tmp")
    os.makedirs(b / "global_step_10" / "huggingface")  # no checkpoint.json: incomplete
    p = train(
        b,
        "--max_steps=8",
        "--save_every=2",
        "--keep_last=2",
        "--batch_size=4",
        train_files=train_file)
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
    common = [
        "--batch_size=2",
        "--gradient_accumulation_steps=2",
        f"--parallel={parallel}",
        "--save_every=2"]
    train(tmp_path / "one", "--max_steps=4", *common, train_files=train_file)
    train(tmp_path / "two", "--max_steps=4", *common, launcher=TORCHRUN, train_files=train_file)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4, (one, two)
    assert os.path.exists(tmp_path / "two" / "global_step_4" / "state" / "rank1.pt")
    # two ranks resume what two ranks wrote: drop the last checkpoint, run again
    shutil.rmtree(tmp_path / "two" / "global_step_4")
    os.remove(tmp_path / "two" / "metrics.jsonl")
    p = train(tmp_path / "two", "--max_steps=4", *common, launcher=TORCHRUN, train_files=train_file)
    assert "resumed from" in p.stdout
    again = losses(tmp_path / "two")
    assert sorted(again) == [3, 4] and max(abs(again[s] - two[s]) for s in again) < 1e-5


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, train_file):
    proc = start(tmp_path, [f"--train_files={train_file}", "--max_steps=100000", "--batch_size=2"])
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "SIGTERM: saving a checkpoint at the end of this step" in out and "saved step" in out
    saved = [d for d in os.listdir(tmp_path) if d.startswith("global_step_")]
    assert len(saved) == 1 and not saved[0].endswith(".tmp")
    step = int(saved[0].split("_")[-1])
    p = train(tmp_path, f"--max_steps={step + 2}", "--batch_size=2", train_files=train_file)
    assert f"resumed from {tmp_path}/global_step_{step}" in p.stdout
    assert os.path.exists(tmp_path / f"global_step_{step + 2}")


def test_incompatible_out_dir_is_refused(tmp_path, train_file):
    train(tmp_path, "--max_steps=1", "--batch_size=2", train_files=train_file)
    p = train(
        tmp_path,
        "--max_steps=2",
        "--batch_size=2",
        "--block_size=2",
        check=False,
        train_files=train_file)
    assert p.returncode == 1 and "holds another run (block_size=4" in p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr  # one line, no traceback
    assert os.path.exists(tmp_path / "global_step_1" / "checkpoint.json")  # nothing was lost
    p = train(tmp_path, "--max_steps=2", "--batch_size=2", "--block_size=2", "--resume=disable",
              train_files=train_file)
    assert "checkpoints of the previous run are in" in p.stdout


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, train_file):
    train(tmp_path, "--max_steps=1", "--batch_size=2", train_files=train_file)
    p = train(tmp_path, "--max_steps=6", "--batch_size=2", "--learning_rate=1e30", "--min_lr=1e30",
              "--grad_clip=0", check=False, train_files=train_file)
    assert p.returncode == 1 and "holds another run" not in p.stderr, p.stderr
    assert "steps in a row had a non-finite loss or grad norm" in p.stderr, p.stderr
    assert "newest checkpoint" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert any(row.get("skipped") for row in jsonl(tmp_path / "metrics.jsonl"))
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("global")) == ["global_step_1"]


def test_wandb_without_network_or_key_still_trains(tmp_path, train_file, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    # no ~/.netrc: no key
    p = train(
        tmp_path,
        "--max_steps=2",
        "--batch_size=2",
        "--wandb_log=True",
        train_files=train_file,
        env={"HOME": str(tmp_path), "WANDB_SILENT": "true"})
    assert "logging offline" in p.stdout and losses(tmp_path)[2] > 0


def test_export_loads_with_auto_classes_and_matches_training_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import collate
    from mask import dense_mask
    from checkpoint import export_hf
    from chat import MASK_TOKEN, training_tokenizer
    from model import forward_losses, load_model
    torch.manual_seed(0)
    tok, mask_id, new = training_tokenizer("demo")
    model = load_model(
        "demo", mask_id, new, demo_overrides=dict(hidden_size=32, num_layers=2, num_heads=2))
    batch = collate([example([5, 6, 7], [8, 9, 10, 11, 12], 4, mask_id)], 32)
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
    # a bf16 run exports bf16 weights and says so in config.json; the live model keeps its fp32
    # config
    export_hf(model, tok, str(tmp_path / "bf16"), master=True, dtype=torch.bfloat16)
    assert read_json(tmp_path / "bf16" / "config.json")["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    # (save_pretrained itself turns it into a str)
    assert str(model.config.dtype).endswith("float32")
