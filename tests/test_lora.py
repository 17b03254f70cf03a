"""Gated LoRA (lora.py): adapters on mask positions only leave the clean stream the base model's,
bit for bit; training, export, decoding, resume and the distributed wrappers keep it so."""

import os
import sys

import pytest
import torch

import lora
from conftest import ROOT, TORCHRUN, example, losses, read_json, tiny_model, train
from data import collate
from mask import dense_mask
from model import set_gate
from sample import generate

MASK = 127


def gated(base, seed=0):
    """A copy of base with adapters whose weights are random, as after training (B is zero at the
    start)."""
    model = tiny_model(base.config.model_type, vocab_size=128, seed=1)
    model.load_state_dict(base.state_dict())
    lora.add_adapters(model, 4, 8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def logits(model, batch):
    set_gate(model, batch["is_mask"])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=dense_mask(batch)).logits


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("layout", ["split", "interleaved"])
def test_the_clean_stream_is_the_base_model_bit_for_bit(arch, layout):
    base = tiny_model(arch, vocab_size=128, seed=1)
    model = gated(base)
    g = torch.Generator().manual_seed(2)
    examples = [
        example(
            torch.randint(0, 126, (3 + i,), generator=g).tolist(),
            torch.randint(0, 126, (9 + 2 * i,), generator=g).tolist(),
            4,
            MASK,
            layout,
            i % 4)
        for i in range(3)]
    batch = collate(examples, 96)  # several samples packed in a row
    ours, theirs = logits(model, batch), logits(base, batch)
    clean = (batch["doc_ids"] >= 0) & ~batch["is_mask"]
    assert torch.equal(ours[clean], theirs[clean])  # bitwise
    # the masks are the adapter's
    assert not torch.allclose(ours[batch["is_mask"]], theirs[batch["is_mask"]])


def test_ar_and_lossless_give_the_base_models_output_greedy_or_sampled():
    base = tiny_model("qwen3", vocab_size=128, seed=1)
    model = gated(base, seed=3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 126, (4 + 3 * i,), generator=g).tolist() for i in range(4)]
    opts = dict(block_size=4, mask_token_id=MASK)
    for sampling in ({}, {"temperature": 0.6, "top_p": 0.95}):
        want = [generate(base, [p], "ar", 24, seed=[3 + i], **opts, **sampling)[0][0]
                for i, p in enumerate(prompts)]
        for mode in ("ar", "lossless"):
            got = generate(model, prompts, mode, 24, batch_size=2, seed=3, **opts, **sampling)
            assert [t for t, _ in got] == want, (mode, sampling)
    base_drafts = generate(base, prompts, "block", 24, **opts)
    # the adapter drafts, the base verifies
    assert generate(model, prompts, "block", 24, **opts) != base_drafts


@pytest.mark.slow
def test_a_gated_lora_run_exports_the_base_model_unchanged(tmp_path, train_file):
    """train.py with finetune='gated_lora' from a checkpoint: its huggingface/ folder holds the base
    weights unchanged (AutoModelForCausalLM loads the plain base model) and the adapter apart;
    sample.py decodes with the adapter for the block modes, and lossless still equals ar."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    common = [f"--train_files={train_file}", "--batch_size=4"]
    train(tmp_path / "base", "--max_steps=6", "--mask_loss_weight=0", *common)
    base_folder = tmp_path / "base" / "global_step_6" / "huggingface"
    p = train(
        tmp_path / "lora",
        "--max_steps=6",
        "--finetune=gated_lora",
        f"--init_from={base_folder}",
        "--lora_rank=4",
        *common)
    assert "gated_lora: 14 adapted linears" in p.stdout and "trainable (" in p.stdout
    ar = losses(tmp_path / "lora")
    folder = tmp_path / "lora" / "global_step_6" / "huggingface"
    config = read_json(folder / "config.json")
    assert config["next_block_adapter"]["rank"] == 4 and (folder / lora.ADAPTER_FILE).exists()
    exported, before = load_file(folder / "model.safetensors"), load_file(
        base_folder / "model.safetensors")
    assert exported.keys() == before.keys() and all(
        torch.equal(exported[k], before[k]) for k in before)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert not any(lora.is_adapter_key(n) for n, _ in plain.named_parameters())
    adapter = load_file(folder / lora.ADAPTER_FILE)
    assert (
        adapter
        and all(lora.is_adapter_key(k) for k in adapter)
        and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k))
    assert len(set(round(v, 6) for v in ar.values())) > 1
    import subprocess
    s = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--device=cpu",
            f"--ckpt={folder}",
            f"--data_files={train_file}",
            "--num_samples=3",
            "--scenario=ar,lossless",
            "--max_new_tokens=20",
            f"--summary_json={tmp_path}/s.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600)
    assert s.returncode == 0, s.stderr[-2000:]
    summary = read_json(tmp_path / "s.json")["scenarios"]
    assert summary["lossless"]["same_as_ar"] == "3/3"
    s = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--device=cpu",
            f"--ckpt={base_folder}",
            f"--data_files={train_file}",
            "--num_samples=3",
            "--scenario=ar",
            "--max_new_tokens=20",
            f"--summary_json={tmp_path}/b.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600)
    assert (
        read_json(tmp_path / "b.json")["scenarios"]["ar"]["tokens"] == summary["ar"]["tokens"])


@pytest.mark.slow
def test_gated_lora_resumes_exactly_and_refuses_the_other_mode(tmp_path, train_file):
    import shutil
    common = [
        f"--train_files={train_file}",
        "--batch_size=4",
        "--finetune=gated_lora",
        "--lora_rank=4",
        "--save_every=2",
        "--keep_last=0",
        "--max_steps=6"]
    train(tmp_path / "a", *common)
    os.makedirs(tmp_path / "b")  # the same run, stopped after step 4
    shutil.copytree(tmp_path / "a" / "global_step_4", tmp_path / "b" / "global_step_4")
    p = train(tmp_path / "b", *common)
    assert "resumed from" in p.stdout
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert all(a[s] == b[s] for s in b) and sorted(b) == [5, 6]  # bitwise
    p = train(
        tmp_path / "b",
        "--max_steps=8",
        f"--train_files={train_file}",
        "--batch_size=4",
        check=False)
    assert (
        p.returncode == 1
        and "holds another run (finetune='gated_lora'; this one has finetune='full')" in p.stderr
        and p.stderr.count("\n") == 1)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_gated_lora_on_two_ranks_matches_one(tmp_path, train_file, parallel):
    common = [
        "--batch_size=2",
        "--gradient_accumulation_steps=2",
        f"--parallel={parallel}",
        "--max_steps=3",
        "--finetune=gated_lora",
        "--lora_rank=4"]
    train(tmp_path / "one", *common, train_files=train_file)
    train(tmp_path / "two", *common, launcher=TORCHRUN, train_files=train_file)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4, (one, two)
    from safetensors.torch import load_file
    a = load_file(tmp_path / "one" / "global_step_3" / "huggingface" / "model.safetensors")
    b = load_file(tmp_path / "two" / "global_step_3" / "huggingface" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the base stays frozen, sharded or not
    assert os.path.exists(tmp_path / "two" / "global_step_3" / "huggingface" / lora.ADAPTER_FILE)
