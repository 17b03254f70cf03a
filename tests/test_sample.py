"""sample.py: decoding scenarios against references (HF generate, full recompute), crafted logits for the
adaptive rules, and the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_model, write_parquet
from configurator import UserError
from mask import dense_mask
from model import cache_kwarg
from sample import MODES, extract_answer, generate

MASK = 127


def test_ar_equals_hf_generate():
    for arch in ("qwen3", "llama"):
        model = tiny_model(arch, vocab_size=128)
        for seed in range(4):
            prompt = torch.randint(0, 126, (3 + 4 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
            eos = model.generation_config.eos_token_id  # Llama's config has one, Qwen3's none
            ours, stats = generate(model, prompt, "ar", 4, MASK, 24, eos)
            theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0)
            assert ours == theirs[0, len(prompt):].tolist()
            assert stats == {"forwards": len(ours), "tokens": len(ours)} and len(set(ours)) > 3


@pytest.mark.parametrize("B", [1, 2, 3, 4, 6])
def test_lossless_equals_ar_on_random_model(B):
    model = tiny_model("qwen3", vocab_size=128, seed=B)
    for seed in range(3):
        prompt = torch.randint(0, 126, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        ar, _ = generate(model, prompt, "ar", B, MASK, 30, eos_token_id=3)
        trace = []
        ll, stats = generate(model, prompt, "lossless", B, MASK, 30, eos_token_id=3, trace=trace)
        assert ll == ar
        assert stats["forwards"] == len(trace) and stats["tokens"] == sum(len(t) for t, _ in trace) == len(ll)
        assert all(1 <= len(t) <= B for t, _ in trace)


def test_block_step_with_cache_equals_full_recompute():
    model = tiny_model("llama", vocab_size=128)
    prompt, B = [5, 9, 2, 44, 7], 4
    trace = []
    out, _ = generate(model, prompt, "block", B, MASK, 12, trace=trace)
    done = 0
    for tokens, logits in trace:
        seq = prompt + out[:done]
        n = len(seq)
        ids = torch.tensor([seq + [MASK] * (B - 1)])
        meta = {"doc_ids": torch.zeros_like(ids), "position_ids": torch.arange(n + B - 1)[None],
                "limit": torch.tensor([list(range(1, n + 1)) + [n] * (B - 1)]),
                "is_mask": torch.tensor([[False] * n + [True] * (B - 1)])}
        with torch.no_grad():
            full = model(input_ids=ids, position_ids=meta["position_ids"], attention_mask=dense_mask(meta)).logits
        torch.testing.assert_close(logits, full[0, n - 1:n - 1 + len(tokens)], atol=1e-4, rtol=1e-4)
        done += len(tokens)
    assert done == len(out) == 12


class Scripted(torch.nn.Module):
    """A tiny real model (the KV cache fills as usual) whose logits follow a script: after position p the next
    token is token(p + 1), with probability 0.99 from clean tokens and mask_probs[j] from mask M_j."""

    def __init__(self, mask_probs, repeat_offset=None, eos_position=None, eos_id=60):
        super().__init__()
        self.inner = tiny_model("qwen3", vocab_size=64)
        self.config, self.mask_probs, self.repeat_offset = self.inner.config, mask_probs, repeat_offset
        self.eos_position, self.eos_id = eos_position, eos_id

    def token(self, position):
        return self.eos_id if position == self.eos_position else 1 + position % 40

    def forward(self, input_ids, position_ids, attention_mask, use_cache, logits_to_keep=0, **cache):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=use_cache, **{cache_kwarg(self.inner): next(iter(cache.values()))})
        logits = torch.full_like(out.logits, 0.0)
        j, prev = -1, None
        for q, (tok, pos) in enumerate(zip(input_ids[0].tolist(), position_ids[0].tolist())):
            # index of a mask in its group: groups are runs of masks at consecutive positions
            j = (j + 1 if j >= 0 and pos == prev + 1 else 0) if tok == 63 else -1
            prev = pos
            target = self.token(pos + (0 if j + 1 == self.repeat_offset else 1))
            p = 0.99 if j < 0 else self.mask_probs[j]
            logits[0, q] = torch.log(torch.tensor((1 - p) / 63))
            logits[0, q, target] = torch.log(torch.tensor(p))
        out.logits = logits[:, -logits_to_keep:]
        return out


def _tpf(model, mode, threshold=0.7, max_new=12, B=4, eos=None):
    trace = []
    out, stats = generate(model, list(range(1, 8)), mode, B, 63, max_new, eos, threshold, trace)
    return out, [len(t) for t, _ in trace]


def test_adaptive_honours_threshold():
    model = Scripted(mask_probs=[0.9, 0.6, 0.4])
    assert _tpf(model, "adaptive", 0.7)[1] == [2] * 6    # offset 1 (0.9) kept, offset 2 (0.6) not
    assert _tpf(model, "adaptive", 0.5)[1] == [3] * 4    # offsets 1 and 2 kept
    assert _tpf(model, "adaptive", 0.95)[1] == [1] * 12  # only offset 0
    assert _tpf(model, "block")[1] == [4] * 3            # block keeps everything
    expected = [1 + p % 40 for p in range(7, 19)]  # the token at each new position 7, 8, ..
    for threshold in (0.5, 0.7, 0.95):
        assert _tpf(model, "adaptive", threshold)[0] == expected


def test_adaptive_stops_at_a_repeated_token():
    model = Scripted(mask_probs=[0.99, 0.99, 0.99], repeat_offset=2)  # offset 2 repeats offset 1's token
    out, per_forward = _tpf(model, "adaptive", 0.7)
    assert per_forward == [2] * 6 and all(a != b for a, b in zip(out, out[1:]))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_stops_at_eos_and_max_new_tokens(mode):
    model = Scripted(mask_probs=[0.99, 0.99, 0.99], eos_position=13)
    out, _ = _tpf(model, mode, eos=60, max_new=50)
    assert out[-1] == 60 and len(out) == 13 - 7 + 1 and 60 not in out[:-1]
    out, _ = _tpf(Scripted(mask_probs=[0.99, 0.99, 0.99]), mode, max_new=10)
    assert len(out) == 10


def test_lossless_accepts_every_right_draft():
    model = Scripted(mask_probs=[0.99, 0.99, 0.99])
    out, per_forward = _tpf(model, "lossless", max_new=13)
    ar, _ = _tpf(model, "ar", max_new=13)
    assert out == ar and per_forward == [1, 4, 4, 4]  # the prefill verifies one token, then B per forward


def test_generate_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(UserError, match="empty prompt"):
        generate(model, [], "ar", 4, MASK, 5)
    with pytest.raises(UserError, match="needs a mask token"):
        generate(model, [1, 2], "lossless", 4, None, 5)
    with pytest.raises(UserError, match="mode must be one of"):
        generate(model, [1, 2], "beam", 4, MASK, 5)


def test_extract_answer():
    assert extract_answer("work\nThe answer is 1,234.") == "1,234"
    assert extract_answer("so 3 apples and 12 pears") == "12"
    assert extract_answer("#### 42", r"#### (\S+)") == "42"
    assert extract_answer("no digits") is None


# ---------------------------------------------------------------- the command line, on a briefly trained model

def sample_cli(*args):
    return subprocess.run([sys.executable, "sample.py", "--device=cpu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_lossless_equals_ar_on_a_trained_model(trained_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import data
    path = os.path.join(trained_demo["out_dir"], "global_step_%d" % trained_demo["steps"], "huggingface")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(path)
    end = data.end_of_turn_id(tok)
    accepted = []
    for messages, _, _ in data.load_samples(trained_demo["test"])[:8]:
        prompt = data.render_prompt(tok, messages)[1]
        ar, _ = generate(model, prompt, "ar", 4, model.config.mask_token_id, 60, end)
        ll, stats = generate(model, prompt, "lossless", 4, model.config.mask_token_id, 60, end)
        assert ll == ar
        accepted.append(stats["tokens"] / stats["forwards"])
    assert sum(accepted) / len(accepted) > 1.3, accepted  # drafts really are accepted


def test_cli_all_scenarios_with_summary_json(trained_demo, tmp_path):
    p = sample_cli(f"--out_dir={trained_demo['out_dir']}", f"--data={trained_demo['test']}", "--num_samples=4",
                   "--max_new_tokens=40", f"--summary_json={tmp_path}/s.json", "--verbose=True")
    assert p.returncode == 0, p.stderr
    summary = json.load(open(tmp_path / "s.json"))["scenarios"]
    assert set(summary) == {"ar", "tf", "block", "block_tf", "adaptive", "lossless"}
    assert summary["lossless"]["same_as_ar"] == "4/4" and summary["lossless"]["tokens"] == summary["ar"]["tokens"]
    assert summary["ar"]["forwards"] == summary["ar"]["tokens"]
    assert "top-5" in p.stdout and "tokens/forward" in p.stdout


def test_cli_block_size_mismatch_warns_and_uses_trained(trained_demo):
    p = sample_cli(f"--out_dir={trained_demo['out_dir']}", "--prompt=What is 123+456?", "--scenario=lossless",
                   "--block_size=8", "--max_new_tokens=10")
    assert p.returncode == 0, p.stderr
    assert "warning: block_size=8 but the model was trained with 4: using 4" in p.stdout


def test_cli_bad_input(tmp_path, trained_demo):
    p = sample_cli(f"--out_dir={tmp_path}/none")
    assert p.returncode == 1 and "none' not found (run train.py first" in p.stderr and p.stderr.count("\n") == 1
    p = sample_cli(f"--ckpt={tmp_path}")
    assert p.returncode == 1 and "holds no checkpoint" in p.stderr
    bad = write_parquet(tmp_path / "bad.parquet", [{"prompt": "", "target": "x"}])
    p = sample_cli(f"--out_dir={trained_demo['out_dir']}", f"--data={bad}")
    assert p.returncode == 1 and "bad.parquet row 0: column 'prompt' message 0 has empty content" in p.stderr
    # a plain Hugging Face model without a mask token: block scenarios refused, ar and tf still run
    from model import demo_tokenizer
    plain = tiny_model(vocab_size=128)
    plain.save_pretrained(tmp_path / "plain")
    demo_tokenizer().save_pretrained(tmp_path / "plain")
    plain.save_pretrained(tmp_path / "no_tokenizer")
    p = sample_cli(f"--ckpt={tmp_path}/no_tokenizer", "--prompt=What is 1+2?")
    assert p.returncode == 1 and "no tokenizer in the model folder" in p.stderr and p.stderr.count("\n") == 1
    p = sample_cli(f"--ckpt={tmp_path}/plain", "--prompt=What is 1+2?", "--scenario=lossless")
    assert p.returncode == 1 and "has no mask token" in p.stderr and p.stderr.count("\n") == 1
    p = sample_cli(f"--ckpt={tmp_path}/plain", f"--data={trained_demo['test']}", "--num_samples=2",
                   "--max_new_tokens=5")
    assert p.returncode == 0 and "running ar and tf only" in p.stdout, p.stderr
