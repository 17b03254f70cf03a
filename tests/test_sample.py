"""sample.py: decoding scenarios against references (HF generate, full recompute), crafted logits
for the adaptive rules, and the command line."""

import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT, jsonl, python, read_json, tiny_model, write_parquet
from configurator import UserError
from mask import dense_mask
from model import cache_kwarg
from cache import step_shape
from policy import DraftPolicy, queries
import sample
import sampling
from grade import extract_answer, majority_correct, normalize_answer, pass_at_k, same_answer
from sample import MODES

MASK = 127


def generate(model, prompts, mode, B, mask_id, max_new, eos_token_id=None, threshold=0.7,
             batch_size=16, **kwargs):
    """sample.generate with this file's habits: block size and mask id given, greedy and every
    draft verified (stats that do not depend on timing) unless asked."""
    kwargs.setdefault("drafts", B - 1)
    return sample.generate(model, prompts, mode, max_new, block_size=B, mask_token_id=mask_id,
                           eos_token_id=eos_token_id, threshold=threshold, batch_size=batch_size,
                           **kwargs)


def random_prompts(n, seed=0, vocab=126):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (3 + 4 * i,), generator=g).tolist() for i in range(n)]


def test_ar_equals_hf_generate():
    for arch in ("qwen3", "llama"):
        model = tiny_model(arch, vocab_size=128)
        eos = model.generation_config.eos_token_id  # Llama's config has one, Qwen3's none
        prompts = random_prompts(4)
        batched = generate(model, prompts, "ar", 4, MASK, 24, eos, batch_size=3)
        for prompt, (ours, stats) in zip(prompts, batched):
            theirs = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=24,
                pad_token_id=0)
            assert ours == theirs[0, len(prompt):].tolist()
            assert stats == {"forwards": len(ours), "tokens": len(ours)} and len(set(ours)) > 3
            assert generate(model, prompt, "lossless", 4, MASK, 24, eos)[0] == ours


def test_one_prompt_gives_one_result_many_give_a_list():
    model = tiny_model("qwen3", vocab_size=128)
    tokens, stats = generate(model, [5, 6, 7], "ar", 4, MASK, 5)
    assert isinstance(tokens[0], int) and stats["tokens"] == len(tokens) == 5
    (tokens2, _), = generate(model, [[5, 6, 7]], "ar", 4, MASK, 5)
    assert tokens2 == tokens


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_batched_decoding_equals_each_prompt_alone(arch, mode):
    """Prompts of different lengths; rows that stop early (EOS) and late (max_new_tokens); more
    prompts than rows, so finished rows refill: every row gives what its prompt gives alone, with
    honest stats.
    """
    model = tiny_model(arch, vocab_size=128, seed=3)
    prompts = random_prompts(7, seed=1)
    # prompt 0 stops early
    eos = generate(model, prompts[0], mode, 4, MASK, 20, threshold=0.05)[0][6]
    alone = [
        generate(model, p, mode, 4, MASK, 20, eos_token_id=eos, threshold=0.05, seed=i)
        for i, p in enumerate(prompts)]
    lengths = [len(t) for t, _ in alone]
    assert (
        min(lengths) < 20
        and max(lengths) == 20
        and len({tuple(t) for t, _ in alone}) == len(prompts))
    for batch_size in (1, 3, 8):
        assert (
            generate(model, prompts, mode, 4, MASK, 20, eos, 0.05, batch_size) == alone
        ), batch_size


@pytest.mark.parametrize("B", [1, 2, 3, 4, 6])
def test_lossless_equals_ar_on_random_model(B):
    model = tiny_model("qwen3", vocab_size=128, seed=B)
    prompts = random_prompts(3, seed=B)
    ar = generate(model, prompts, "ar", B, MASK, 30, eos_token_id=3, batch_size=2)
    for prompt, (want, _) in zip(prompts, ar):
        trace = []
        ll, stats = generate(model, prompt, "lossless", B, MASK, 30, eos_token_id=3, trace=trace)
        assert ll == want
        assert stats["forwards"] == len(trace) and stats["tokens"] == sum(
            len(t) for t, _ in trace
        ) == len(ll)
        assert all(1 <= len(t) <= B for t, _ in trace)
    # real outputs
    assert sum(len(t) for t, _ in ar) >= 60 and len({t for out, _ in ar for t in out}) > 20


def full_logits(model, seq, masks_after=0):
    """Logits of a plain forward over seq, plus masks_after masks drafting after it (no cache)."""
    n, B1 = len(seq), masks_after
    ids = torch.tensor([seq + [MASK] * B1])
    meta = {"doc_ids": torch.zeros_like(ids), "position_ids": torch.arange(n + B1)[None],
            "limit": torch.tensor([list(range(1, n + 1)) + [n] * B1]),
            "is_mask": torch.tensor([[False] * n + [True] * B1])}
    with torch.no_grad():
        return model(
            input_ids=ids, position_ids=meta["position_ids"], attention_mask=dense_mask(meta)
        ).logits[0]


@pytest.mark.parametrize("mode", ["block", "lossless"])
def test_cached_steps_equal_a_full_recompute(mode):
    """Every forward's logits, cached, in a batch whose rows accept different numbers of tokens,
    equal a plain forward over the row's accepted prefix (and, for block, its masks)."""
    model, B = tiny_model("llama", vocab_size=128), 4
    prompts = [[5, 9, 2, 44, 7]] + random_prompts(3, seed=5)
    trace = []
    (out, stats), *_ = generate(model, prompts, mode, B, MASK, 12, trace=trace, batch_size=4)
    done, prompt = 0, prompts[0]
    for tokens, logits in trace:
        seq = prompt + out[:done]
        if mode == "block":
            full = full_logits(model, seq, B - 1)[len(seq) - 1:len(seq) - 1 + len(tokens)]
        else:  # the clean stream's verification of each accepted token
            full = torch.stack(
                [full_logits(model, seq + out[done : done + i])[-1] for i in range(len(tokens))])
        full[..., MASK] = -math.inf  # the mask token is never written: its logit is suppressed
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
        done += len(tokens)
    assert done == len(out) == 12 and stats["forwards"] == len(trace)


class Scripted(torch.nn.Module):
    """A tiny real model (the KV cache fills as usual) whose logits follow a script: after position
    p the next token is token(p + 1), with probability 0.99 from clean tokens and mask_probs[j] from
    mask M_j.
    """

    def __init__(self, mask_probs, repeat_offset=None, eos_position=None, eos_id=60):
        super().__init__()
        self.inner = tiny_model("qwen3", vocab_size=64)
        self.config, self.mask_probs, self.repeat_offset = (
            self.inner.config,
            mask_probs,
            repeat_offset)
        self.eos_position, self.eos_id = eos_position, eos_id

    def token(self, position):
        return self.eos_id if position == self.eos_position else 1 + position % 40

    def forward(
        self, input_ids, position_ids, attention_mask, use_cache, logits_to_keep=0, **cache):
        out = self.inner(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **{cache_kwarg(self.inner): next(iter(cache.values()))})
        logits = torch.full_like(out.logits, 0.0)
        for b in range(len(input_ids)):
            j, prev = -1, None
            for q, (tok, pos) in enumerate(zip(input_ids[b].tolist(), position_ids[b].tolist())):
                # index of a mask in its group: groups are runs of masks at consecutive positions
                j = (j + 1 if j >= 0 and pos == prev + 1 else 0) if tok == 63 else -1
                prev = pos
                target = self.token(pos + (0 if j + 1 == self.repeat_offset else 1))
                p = 0.99 if j < 0 else self.mask_probs[j]
                logits[b, q] = torch.log(torch.tensor((1 - p) / 63))
                logits[b, q, target] = torch.log(torch.tensor(p))
        out.logits = logits[:, -logits_to_keep:]
        return out


def _tpf(model, mode, threshold=0.7, max_new=12, B=4, eos=None):
    trace = []
    out, stats = generate(model, list(range(1, 8)), mode, B, 63, max_new, eos, threshold,
                          trace=trace)
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
    # offset 2 repeats offset 1's token
    model = Scripted(mask_probs=[0.99, 0.99, 0.99], repeat_offset=2)
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
    # the prefill verifies one token, then B per forward
    assert out == ar and per_forward == [1, 4, 4, 4,]


def test_generate_rejects_bad_input():
    model = tiny_model()
    for prompts, kwargs, message in (
        ([], {}, "no prompts: there is nothing to decode"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([1, 2], {"mask_token_id": None, "mode": "lossless"}, "needs a mask token"),
        ([1, 2], {"mode": "beam"}, "mode='beam': expected one of"),
        ([1, 2], {"batch_size": 0}, "batch_size=0: must be >= 1"),
        ([1, 2], {"max_new_tokens": 0}, "max_new_tokens=0: must be >= 1"),
        ([1] * 500, {"max_new_tokens": 100}, "longer than the model's 512 positions"),
        ([1, 2], {"temperature": -1}, "temperature=-1: must be a number >= 0"),
        ([1, 2], {"temperature": 1, "top_p": 0}, "top_p=0: must be in \\(0, 1\\]"),
        ([1, 2], {"temperature": 1, "top_p": 1.5}, "top_p=1.5: must be in \\(0, 1\\]"),
        ([1, 2], {"temperature": 1, "top_k": -2}, "top_k=-2: must be an int >= 0"),
        ([1, 2], {"temperature": 1, "min_p": 1.0}, "min_p=1.0: must be in \\[0, 1\\)"),
        ([[1, 2], [3]], {"seed": [1, 2, 3]}, "seed: 3 seeds for 2 prompts"),
        ([1, 2], {"mode": "lossless", "drafts": 4}, "drafts=4: expected 'auto' or an int in \\[0, 3\\]"),
        ([1, 2], {"mode": "lossless", "drafts": "all"}, "drafts='all': expected 'auto'")):
        args = dict(mode="ar", block_size=4, mask_token_id=MASK, max_new_tokens=5) | kwargs
        with pytest.raises(UserError, match=message):
            sample.generate(model, prompts, **args)


def test_compiled_step_gives_the_same_tokens():
    """compile=True: one fixed-shape step (every slot, every cache slot), compiled by inductor (gcc
    here)."""
    model = tiny_model("qwen3", vocab_size=128)
    prompts = random_prompts(5, seed=2)
    for mode in ("ar", "lossless"):
        eager = generate(model, prompts, mode, 4, MASK, 16, eos_token_id=3, batch_size=2)
        try:
            compiled = generate(
                model, prompts, mode, 4, MASK, 16, eos_token_id=3, batch_size=2, compile=True)
        except Exception as e:  # a machine without a C compiler cannot run inductor
            pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e)[:200]}")
        assert compiled == eager


def test_a_compiled_steps_idle_cache_rows_stay_empty(monkeypatch):
    """With compile every step feeds every cache row, the idle ones as padding: their lengths must
    not grow step after step (they did, until a long-idle row wrote past the cache's capacity, as a
    server with one client of eight would). Answer after answer in one cache row, the other
    idle; the step itself eager (the path, not the compiler, is what is tested)."""
    model = tiny_model("llama", vocab_size=128, seed=11)
    want = generate(model, [[1, 2, 3, 4, 5]], "ar", 4, MASK, 60)[0][0]
    for mode in ("ar", "lossless"):
        dec = sample.Decoder(model, mode=mode, rows=2, capacity=128, block_size=4,
                             mask_token_id=MASK, drafts=3)
        dec.f = dec.f._replace(compiled=True)  # every row, every cache slot, each step
        for _ in range(5):  # 5 x 60 tokens through a cache of 128 slots
            row = sample.Row([1, 2, 3, 4, 5], max_new=60)
            dec.join([row])
            while dec.busy:
                dec.step()
            dec.release()
            assert row.out == want, mode
        assert dec.length[1] == 0


# ---------------- sampling: the filtered distribution, drawn with a noise of (seed, position)

def exact_distribution(model, prompt, settings, steps=2, buggy=None):
    """{continuation: probability} of every `steps`-token continuation of prompt under the filtered
    distribution (enumerated with plain forwards). buggy: 'double_temperature' or
    'top_p_one_more', the mistakes the sampling test must catch."""
    def filtered_probs(seq):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        s = settings._replace(temperature=settings.temperature ** 2) \
            if buggy == "double_temperature" else settings
        scores = logits / s.temperature
        if s.top_k:
            scores = scores.masked_fill(scores < scores.topk(s.top_k).values[-1], -math.inf)
        if s.top_p < 1:
            order = scores.argsort(descending=True)
            probs = scores.softmax(-1)[order]
            above = probs.cumsum(-1) - probs
            drop = above >= s.top_p
            if buggy == "top_p_one_more":
                drop[int((~drop).sum())] = False
            scores[order[drop]] = -math.inf
        return scores.softmax(-1)

    out = {(): 1.0}
    for _ in range(steps):
        nxt = {}
        for seq, p in out.items():
            for t, q in enumerate(filtered_probs(prompt + list(seq)).tolist()):
                if q > 0:
                    nxt[seq + (t,)] = p * q
        out = nxt
    return out


def tv(p, q):
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.mark.parametrize("settings,n", [(sampling.Sampling(1.0), 20000),
                                        (sampling.Sampling(0.7, top_k=5, top_p=0.8), 8000)])
def test_ar_samples_the_filtered_distribution(settings, n):
    """Many seeds of one prompt: the empirical distribution of ar's 2-token continuations equals the
    enumerated filtered one (total variation below what the sampling noise allows), while the
    mistakes a sampler makes (the temperature applied twice, top-p keeping one token too many) are
    farther from it than that: the test can fail."""
    model = tiny_model("qwen3", vocab_size=12, seed=4)
    prompt = [3, 7, 1, 9]
    want = exact_distribution(model, prompt, settings)
    counts = Counter(tuple(t) for t, _ in generate(
        model, [prompt] * n, "ar", 4, None, 2, batch_size=4096, seed=list(range(n)),
        **settings._asdict()))
    got = {k: c / n for k, c in counts.items()}
    bound = 0.6 * math.sqrt(2 * len(want) / (math.pi * n))  # ~1.2x the expected TV of n draws
    assert tv(got, want) < bound, (tv(got, want), bound)
    bugs = ["double_temperature"] * (settings.temperature != 1) + ["top_p_one_more"] * (
        settings.top_p < 1)
    for bug in bugs:  # at T=1 applying it twice changes nothing
        assert tv(exact_distribution(model, prompt, settings, buggy=bug), want) > 2 * bound, bug


SAMPLED = [dict(temperature=0.6, top_k=20, top_p=0.95), dict(temperature=1.0, top_p=0.9),
           dict(temperature=1.0, min_p=0.05)]


@pytest.mark.parametrize("settings", SAMPLED)
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sampled_lossless_equals_ar_and_each_row_its_prompt_alone(settings, arch):
    """The same seeds: lossless writes ar's tokens at batch 1, 3 and 16 with refill (and with every
    fixed draft count and 'auto'); each row is its prompt decoded alone with its seed; other seeds
    give other answers."""
    model = tiny_model(arch, vocab_size=128, seed=7)
    prompts = random_prompts(9, seed=3)
    seeds = [100 + 3 * i for i in range(len(prompts))]
    ar = generate(model, prompts, "ar", 4, MASK, 24, eos_token_id=5, seed=seeds, **settings)
    alone = [generate(model, p, "ar", 4, MASK, 24, eos_token_id=5, seed=[s], **settings)
             for p, s in zip(prompts, seeds)]
    assert [t for t, _ in ar] == [t for t, _ in alone]
    for batch_size in (1, 3, 16):
        for drafts in ("auto", 0, 1, 3):
            ll = generate(model, prompts, "lossless", 4, MASK, 24, eos_token_id=5, seed=seeds,
                          batch_size=batch_size, drafts=drafts, **settings)
            assert [t for t, _ in ll] == [t for t, _ in ar], (batch_size, drafts)
    other = generate(model, prompts, "ar", 4, MASK, 24, eos_token_id=5, seed=7, **settings)
    assert sum(a[0] != b[0] for a, b in zip(other, ar)) >= len(prompts) - 1
    assert len({tuple(t) for t, _ in ar}) == len(prompts)


def test_no_mode_writes_the_mask_or_a_suppressed_token_even_when_it_is_most_likely():
    """A model whose most likely token, everywhere, is the mask (then token 9): no mode, greedy or
    sampled (even at a high temperature), writes it, nor a suppressed id; lossless stays ar."""
    model = tiny_model("qwen3", vocab_size=128, seed=2)
    bias = torch.zeros(128)
    bias[MASK], bias[9] = 50.0, 40.0  # far above every other logit: greedy would take them
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    prompts = random_prompts(4, seed=5)
    for settings in [{}, dict(temperature=1.0), dict(temperature=5.0, top_p=0.99)]:
        ar = generate(model, prompts, "ar", 4, MASK, 12, seed=3, **settings)
        assert all(MASK not in t for t, _ in ar)
        assert sum(t.count(9) for t, _ in ar) > 40  # the next most likely: what is written
        kept = generate(model, prompts, "ar", 4, MASK, 12, seed=3, suppress_tokens=[9], **settings)
        assert all(MASK not in t and 9 not in t for t, _ in kept)
        for mode in ("block", "adaptive", "lossless"):
            out = generate(model, prompts, mode, 4, MASK, 12, seed=3, suppress_tokens=[9],
                           **settings)
            assert all(MASK not in t and 9 not in t for t, _ in out), (mode, settings)
            if mode == "lossless":
                assert [t for t, _ in out] == [t for t, _ in kept]


def test_temperature_zero_is_greedy_whatever_the_seed():
    model = tiny_model("qwen3", vocab_size=128)
    prompts = random_prompts(4)
    greedy = generate(model, prompts, "ar", 4, MASK, 16)
    for seed in (0, 9):
        assert generate(model, prompts, "ar", 4, MASK, 16, seed=seed, top_p=0.5) == greedy


def test_block_and_adaptive_draft_with_the_same_noise():
    """block and adaptive draw every offset with the noise of its position: with masks that copy
    the clean stream, block's sampled answer is ar's, and a row's answer does not depend on its
    batch."""
    model = Scripted(mask_probs=[0.99, 0.99, 0.99])
    prompt = list(range(1, 8))
    for settings in SAMPLED:
        ar = generate(model, prompt, "ar", 4, 63, 12, seed=[4], drafts=3, **settings)[0]
        for mode in ("block", "adaptive", "lossless"):
            assert generate(model, prompt, mode, 4, 63, 12, seed=[4], **settings)[0] == ar, mode


def test_any_draft_schedule_stays_exact(monkeypatch):
    """Lossless steps of any (k drafts, m masks per group, a group after every acceptance or after
    none and all alone), changing from step to step (so that k < m too), give ar's tokens at batch
    1, 8 and 64 with refill."""
    model = tiny_model("llama", vocab_size=128, seed=11)
    prompts = random_prompts(70, seed=4)
    want = generate(model, prompts, "ar", 4, MASK, 20, eos_token_id=9, batch_size=64,
                    temperature=0.8, top_p=0.9)

    class Scripted_(DraftPolicy):  # calibrates and measures as usual, then picks at random
        rng = random.Random(0)

        def best(self, n):
            return self.rng.randrange(self.D + 1)

        def groups(self, n, k):  # after none and all, and after some of the counts between
            between = self.rng.sample(range(1, k), self.rng.randrange(k)) if k >= 2 else []
            return tuple(sorted({0, k, *between}))

    monkeypatch.setattr(sample, "draft_policy", lambda model, D, fixed, sampling: Scripted_(D))
    for batch_size in (1, 8, 64):
        got = generate(model, prompts, "lossless", 4, MASK, 20, eos_token_id=9, drafts="auto",
                       batch_size=batch_size, temperature=0.8, top_p=0.9)
        assert [t for t, _ in got] == [t for t, _ in want], batch_size
        shapes = Counter(s for _, stats in got for s in stats["shapes"])
        kmg = [[int(x) for x in s.split(",")] for s in shapes]
        assert len(shapes) >= 5 and any(x[0] < x[1] for x in kmg), shapes
        assert any(len(x) == 3 for x in kmg), shapes  # fewer groups than k + 1


def test_rows_that_place_their_groups_differently_see_what_mask_py_says():
    """One step where rows place their groups of masks after different acceptance counts
    (cache.stack_shapes) gives every query the logits of mask.py's rule for its own row's tokens,
    as cache.feed builds them (the dense reference, one row's items at a time)."""
    from cache import Forward, RowCache, clean, feed, feed_uniform, masks, model_forward, \
        stack_shapes, step_shape
    model, cpu = tiny_model("qwen3", vocab_size=128, seed=3), torch.device("cpu")
    prompts, k, m = random_prompts(3, seed=5), 3, 3
    afters = [(0, 2, 3), (0, 1, 3), (0, 1, 2)]
    fed = [[11 + r, 20 + r, 30 + r, 40 + r] for r in range(3)]  # pending, then 3 drafts
    lengths, logits = [len(p) for p in prompts], []
    for uniform in (True, False):
        f = Forward(model, RowCache(2, 3, 64, cpu), model_forward, False, None)
        feed(f, [0, 1, 2], [0, 0, 0], [clean(p, 0) for p in prompts], 1, eager=True)
        if uniform:
            tokens = torch.tensor([x + [MASK] * (m * 3) for x in fed])
            shape = stack_shapes([step_shape(k, m, cpu, a) for a in afters])
            logits.append(feed_uniform(f, torch.arange(3), torch.tensor(lengths), max(lengths),
                                       tokens, shape))
        else:
            items = [clean(x, c) + [q for i in a for q in masks(MASK, c + i + 1, m)]
                     for x, c, a in zip(fed, lengths, afters)]
            logits.append(feed(f, [0, 1, 2], lengths, items, 0))
    stacked, alone = logits
    assert torch.allclose(stacked, alone, atol=1e-5)
    assert not torch.allclose(stacked[0, -m:], stacked[1, -m:], atol=1e-3)  # groups differ


@pytest.mark.parametrize("after,moved", [((0, 3), (0, 1)), ((0, 1, 3), (0, 1, 2))])
def test_a_partial_acceptance_drafts_from_the_last_groups_later_masks(monkeypatch, after, moved):
    """Groups after no draft and after all (and after one): a row that accepts 2 of its 3 drafts
    (no group after 2) drafts next from the later masks of the last group before 2, those after
    the tokens it wrote (then fillers); a row that accepts all from the group after all. The next
    step moves the first row's group after all to right after its drafts. The step's logits are
    made up (argmax: what the test says)."""
    model = tiny_model("llama", vocab_size=128, seed=11)

    class Groups_(DraftPolicy):
        def calibrated(self, n):
            return True

        def best(self, n):
            return 3

        def groups(self, n, k):
            return after if k == 3 else (0,)

    dec = sample.Decoder(model, mode="lossless", rows=2, capacity=64, block_size=4,
                         mask_token_id=MASK, policy=Groups_(3))
    rows = [sample.Row(p, max_new=30) for p in random_prompts(2, seed=1)]
    dec.join(rows)
    drafts = [list(r.drafts) for r in rows]
    fed = []

    def made_up(f, at, length, longest, tokens, shape):
        fed.append(shape)
        logits = torch.zeros(2, tokens.shape[1], 128)
        for r, right in enumerate((2, 3)):  # drafts right: row 0 two, row 1 all three
            for i in range(4):
                logits[r, i, drafts[r][i] if i < right else 5] = 1.0
            for g, count in enumerate(after):  # the group after `count` drafts: 60 + 10 count + j
                for j in range(3):
                    logits[r, 4 + 3 * g + j, 60 + 10 * count + j] = 1.0
        return logits

    monkeypatch.setattr(sample, "feed_uniform", made_up)
    dec.step()
    assert rows[0].out[-3:] == drafts[0][:2] + [5] and rows[1].out[-4:] == drafts[1] + [5]
    before = max(x for x in after if x <= 2)  # the last group before 2: its masks after 2 - before
    assert rows[0].drafts == [60 + 10 * before + j for j in range(2 - before, 3)] + \
        [MASK] * (2 - before)
    assert rows[1].drafts == [90, 91, 92]
    assert dec.draft[:, :3].tolist() == [rows[0].drafts, rows[1].drafts]
    dec.step()
    assert fed[0].position.dim() == 1  # every row had all its drafts: one shape
    want = [step_shape(3, 3, torch.device("cpu"), x) for x in (moved, after)]
    for field, got in zip(fed[1], (torch.stack(x) for x in zip(*want))):
        assert torch.equal(field, got)


def test_the_draft_policy_weighs_acceptance_against_cost():
    policy = DraftPolicy(3)
    policy.forward[64] = {1: 1.0, 4: 4.0, 16: 16.0}  # compute-bound: a forward costs its queries
    for _ in range(100):
        policy.score([1, 2, 3], [1, 2, 3])  # every draft right: 4 tokens per step
    assert policy.best(64) == 0  # 4 tokens for 16x the cost: ar wins
    policy.forward[1] = {1: 1.0, 4: 1.05, 16: 1.2}  # a GPU at batch 1: queries nearly free
    assert policy.best(1) == 3
    bad = DraftPolicy(3)
    bad.forward = policy.forward
    for _ in range(100):
        bad.score([1, 2, 3], [9, 9, 9])  # drafts never right
    assert bad.best(1) == 0


def test_the_draft_policy_places_two_groups_where_queries_cost():
    """Two groups (after no draft and after all) where queries cost and drafts are mostly all right;
    a group after the drafts a step most often stops at where queries are nearly free."""
    policy = DraftPolicy(7)
    policy.forward[64] = {1: 1.0, 8: 8.0, 64: 64.0}
    for _ in range(100):
        policy.score(list(range(7)), list(range(7)))
    assert policy.groups(64, 7) == (0, 7) and policy.groups(64, 1) == (0, 1)
    assert policy.expected(7, (0, 7)) == pytest.approx(policy.expected(7), rel=0.05)
    partial = DraftPolicy(7)
    partial.forward[1] = {1: 1.0, 8: 1.001, 64: 1.01}
    for _ in range(100):
        partial.score(list(range(7)), [0, 1, 2, 9, 9, 9, 9])  # three right, then wrong
    assert 3 in partial.groups(1, 7)  # a group after the three right drafts
    assert partial.expected(7, (0, 7)) < 0.7 * partial.expected(7, partial.groups(1, 7))
    flat = DraftPolicy(7)
    flat.forward[64] = {1: 1.0, 22: 1.0}  # a flat line through small shapes only
    assert flat.seconds(64, 7) == pytest.approx(64 / 22)  # 64 queries: priced by queries past 22
    assert flat.seconds(64, 7, 7, (0, 7)) == pytest.approx(1.0)


def test_the_draft_policy_places_groups_where_steps_stop_part_way():
    """B=16 sampled as measured (steps stop part-way after 3, 8 and 9 drafts): where queries are
    nearly free, a group after each of those too; where they cost (this CPU at batch 1), two. A
    step after a partial acceptance drafts from the first group's later masks: counted, it is
    worth more than a step of fillers that writes one token."""
    rates = [0.993, 1.0, 1.0, 0.944, 0.999, 0.992, 1.0, 1.0, 0.886, 0.922, 0.998, 1.0, 1.0, 1.0,
             0.974]
    policy = DraftPolicy(15)
    policy.right, policy.tried = [1000 * r for r in rates], [1000] * 15
    policy.forward[1] = {1: 1.0, 4: 1.001, 46: 1.01, 256: 1.05}  # a GPU at batch 1
    groups = policy.groups(1, 15)
    assert {0, 3, 8, 9, 15} <= set(groups) and len(groups) < 16, groups
    assert policy.best(1) == 15
    policy.forward[1] = {1: 4.4, 4: 5.0, 46: 6.9, 256: 12.9}  # this CPU at batch 1
    assert policy.groups(1, 15) == (0, 15)
    tokens, stops = policy.stops(15, policy.rates())
    partial = sum(p for _, p, _, _ in stops)  # P(0 < accepted < 15)
    assert policy.expected(15, (0, 15)) > 1.1 * (tokens + partial) / (1 + partial)
    assert policy.expected(15, (0, 15)) < policy.expected(15, groups) < policy.expected(15)


def test_the_draft_policy_fits_one_line_through_every_measured_shape():
    """Measured steps outweigh the calibration; a noisy price of one shape is pulled to the line the
    others draw; a smaller batch starts from the next larger one's line, scaled by rows."""
    policy = DraftPolicy(3)
    policy.forward[8] = {1: 1.0, 4: 1.1, 16: 1.3}  # calibrated: drafts nearly free
    for _ in range(100):
        policy.score([1, 2, 3], [1, 2, 3])
    assert policy.best(5) == 3  # 5 rows are priced at the batch size 8
    for k in (0, 1, 2):
        for _ in range(10):
            policy.observe(8, k, k, 1.0 + queries(k, k))  # measured: each query costs
    assert policy.seconds(8, 3) > 0.75 * (1.0 + 16)  # k = 3, never measured: near the line
    assert policy.best(8) == 0
    policy.observe(8, 1, 1, 100.0)  # one step of a noisy moment does not decide alone
    assert policy.seconds(8, 1) < 10
    policy.forward[4] = {}  # not calibrated at 4: the line of 8, per query halved
    base, slope = policy.line(8)
    assert policy.line(2)[1] == pytest.approx(slope / 4, rel=0.05)
    assert policy.calibrated(3) and not policy.calibrated(9)


def test_the_draft_policy_finds_far_drafts_it_has_seldom_tried():
    """A policy at 8 of 15 drafts (B=16 at batch 1 on a CPU, as measured): the drafts past 8 seldom
    tried, one offset weaker, and no step beyond 25 queries measured. It takes 15: a draft seldom
    tried counts about as good as the one before it (not a coin), and a shape past the largest
    measured is priced from the calibration's forward of it (not by queries from a small one)."""
    policy = DraftPolicy(15)
    policy.forward[1] = {1: 4.4, 4: 5.0, 46: 6.9, 256: 12.9}  # a forward's base cost dominates
    for i in range(200):  # 8 drafts per step; every 8th step drafts 15, its 9th sometimes wrong
        written = list(range(8)) + [99 if i % 64 == 0 else 8] + list(range(9, 15))
        policy.score(list(range(15 if i % 8 == 0 else 8)), written)
    rates = policy.rates()
    assert rates[8] < 0.9 and min(rates[9:]) > 0.95  # 25 tried: as good as the drafts before
    policy.observe(1, 0, 0, 4.7)
    for _ in range(5):
        policy.observe(1, 8, 8, 6.9, (0, 8))  # 25 queries: the largest shape measured
    assert policy.seconds(1, 15, 15, (0, 15)) < 9.0  # the measured line's 8.8, not 46/25 x 6.9
    assert policy.best(1) == 15
    never = DraftPolicy(3)
    for _ in range(100):
        never.score([1], [1])  # only the first draft ever tried: the others count as good as it
    assert never.rates()[2] == pytest.approx(never.rates()[0], rel=0.01)
    bad = DraftPolicy(3)
    for _ in range(100):
        bad.score([1], [2])
    assert max(bad.rates()) < 0.02  # and as bad


def test_the_draft_policy_explores_only_its_neighbours_and_rarely_a_losing_one():
    policy = DraftPolicy(3)
    policy.forward[1] = {1: 1.0, 4: 1.5, 16: 3.0}  # drafts pay; 2 is close behind 3 (0.9x)
    for _ in range(100):
        policy.score([1, 2, 3], [1, 2, 3])
    choices = [policy.best(1) for _ in range(64)]
    assert choices.count(3) == 60 and set(choices) == {3, 2}  # best 3, its neighbour 2
    assert choices[29:31] == [2, 2] and choices[61:63] == [2, 2]  # two steps in a row
    more = [policy.best(1) for _ in range(64)]
    assert more[62] == 0 and more.count(0) == 1  # step 127: an ar step, its price measured
    slow = DraftPolicy(3)
    slow.forward[64] = {1: 1.0, 4: 4.0, 16: 16.0}  # every draft costs more than it brings
    choices = [slow.best(64) for _ in range(512)]
    assert choices.count(0) == 508 and choices.count(1) == 4  # every 256 steps, two
    dip = DraftPolicy(7)  # best 3, a dip after it, every draft close behind (0.9x): it takes turns
    dip.forward[1] = {1: 1.0, 4: 1.1, 8: 1.15, 15: 1.4, 64: 3.0}
    for i in range(200):  # the 4th draft right a third of the time
        dip.score(list(range(7)), [0, 1, 2, 3 if i % 3 == 0 else 9, 4, 5, 6])
    choices = [dip.best(1) for _ in range(128)]
    assert choices.count(3) == 120 and choices[93:95] == [7, 7] and choices[29:31] == [4, 4]


def test_pass_at_k_and_majority_vote():
    assert pass_at_k(4, 0, 4) == 0 and pass_at_k(4, 1, 4) == 1
    assert pass_at_k(4, 1, 1) == 0.25 and abs(pass_at_k(5, 2, 2) - 0.7) < 1e-12
    right = "The answer is 12."
    assert majority_correct(["The answer is 12.", "The answer is 11.", "#### 12"], right)
    assert not majority_correct(["The answer is 11.", "The answer is 11.", "12"], right)
    assert not majority_correct(["no answer"], right)


def test_extract_and_compare_answers():
    assert extract_answer("work\nThe answer is 1,234.") == "1,234"
    assert extract_answer("so 3 apples and 12 pears") == "12"
    assert extract_answer("#### 42", r"#### (\S+)") == "42"
    assert extract_answer("no digits") is None
    # GSM8K's format
    assert (
        extract_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72")
    assert extract_answer("so $x = \\boxed{\\frac{14}{3}}$.") == "\\frac{14}{3}"  # nested braces
    assert extract_answer("\\boxed{1} then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == \
        "\\left( 3, \\frac{\\pi}{2} \\right)"
    for a, b in (("1,234", "1234"), ("1.0", "1"), ("$5$", "5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
                 ("\\text{(C)}", "(C)"), ("90^\\circ", "90"), ("0.50", "0.5"), ("-3", "-3.0")):
        assert normalize_answer(a) == normalize_answer(b), (a, b)
    assert normalize_answer("12") != normalize_answer("1,2") and normalize_answer(
        "x+1"
    ) != normalize_answer("x-1")
    assert same_answer("... so \\boxed{1,000}", "The answer is 1000.") == (True, True)
    assert same_answer("... The answer is 999.", "#### 1000") == (True, False)
    assert same_answer("anything", "no answer in here") == (False, False)


def test_grading_real_benchmarks():
    """GSM8K and MATH500 references ($SHARED_DATA, skipped without it) graded against themselves:
    every reference answer is found in its own solution text."""
    from conftest import SHARED_DATA
    gsm, math = (os.path.join(SHARED_DATA, p) for p in ("gsm8k/test.jsonl", "math500/test.jsonl"))
    if not (os.path.exists(gsm) and os.path.exists(math)):
        pytest.skip("no GSM8K / MATH500 under SHARED_DATA")
    rows = jsonl(gsm)[:300]
    assert all(
        same_answer(r["answer"], "#### " + r["answer"].split("####")[1]) == (True, True)
        for r in rows)
    rows = jsonl(math)
    graded = [same_answer(r["solution"], "\\boxed{" + r["answer"] + "}") for r in rows]
    assert sum(c for _, c in graded) >= 0.98 * len(rows)  # the few misses: answers written two ways


# ---------------- the command line, on a briefly trained model

def sample_cli(*args):
    return python("sample.py", "--device=cpu", *args)


@pytest.mark.slow
def test_batched_decoding_of_a_trained_model(trained_demo):
    """A briefly trained model, where drafts get accepted: every mode decodes each prompt of a batch
    as it does alone, and lossless gives ar's output in fewer forwards."""
    import chat
    from checkpoint import load_for_decoding
    model, tok, _ = load_for_decoding(trained_demo["out_dir"], torch.device("cpu"))
    conversation = chat.Chat(tok)
    stop, mask_id = conversation.stop_ids(), model.config.mask_token_id
    prompts = [
        conversation.prompt_ids(m[:first])
        for m, first, _, _ in chat.read_rows([trained_demo["test"]])[:10]]
    results = {}
    for mode in MODES:
        results[mode] = generate(model, prompts, mode, 4, mask_id, 60, stop, batch_size=4)
        assert results[mode] == [
            generate(model, p, mode, 4, mask_id, 60, stop) for p in prompts
        ], mode
    assert [t for t, _ in results["lossless"]] == [t for t, _ in results["ar"]]
    tpf = sum(s["tokens"] for _, s in results["lossless"]) / sum(
        s["forwards"] for _, s in results["lossless"])
    assert tpf > 1.3, tpf  # drafts really are accepted


@pytest.mark.slow
def test_cli_all_scenarios_with_summary_json(trained_demo, tmp_path):
    p = sample_cli(
        f"--out_dir={trained_demo['out_dir']}",
        f"--data_files={trained_demo['test']}",
        "--num_samples=4",
        "--max_new_tokens=40",
        f"--summary_json={tmp_path}/s.json",
        "--verbose=True")
    assert p.returncode == 0, p.stderr
    summary = read_json(tmp_path / "s.json")["scenarios"]
    assert set(summary) == {"ar", "tf", "block", "block_tf", "adaptive", "lossless"}
    assert (
        summary["lossless"]["same_as_ar"] == "4/4"
        and summary["lossless"]["tokens"] == summary["ar"]["tokens"])
    assert summary["ar"]["forwards"] == summary["ar"]["tokens"]
    assert "top-5" in p.stdout and "tokens/forward" in p.stdout


@pytest.mark.slow
def test_cli_batch_sizes_and_prompts_only_data_agree(trained_demo, tmp_path):
    import pyarrow.parquet as pq
    rows = pq.read_table(trained_demo["test"]).to_pylist()[:6]
    prompts_only = write_parquet(
        tmp_path / "prompts.parquet", [{"prompt": r["prompt"]} for r in rows])
    outs = []
    for batch_size in (1, 4):
        p = sample_cli(
            f"--out_dir={trained_demo['out_dir']}",
            f"--data_files={prompts_only}",
            "--num_samples=0",
            "--scenario=ar,lossless",
            "--max_new_tokens=40",
            "--drafts=3",  # forwards that do not depend on the measured cost
            f"--batch_size={batch_size}",
            f"--summary_json={tmp_path}/{batch_size}.json")
        assert p.returncode == 0, p.stderr
        outs.append(read_json(tmp_path / f"{batch_size}.json")["scenarios"])
    for summary in outs:
        # no targets
        assert summary["lossless"]["same_as_ar"] == "6/6" and "accuracy" not in summary["ar"]
    for mode in ("ar", "lossless"):
        assert outs[0][mode]["tokens"] == outs[1][mode]["tokens"] and outs[0][mode]["forwards"] == \
            outs[1][mode]["forwards"]


@pytest.mark.slow
def test_cli_under_torchrun_splits_the_samples(trained_demo, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "sample.py",
        "--device=cpu",
        f"--out_dir={trained_demo['out_dir']}",
        f"--data_files={trained_demo['test']}",
        "--num_samples=5",
        "--scenario=ar,block_tf,lossless",
        "--max_new_tokens=40",
        "--drafts=3",
        f"--summary_json={tmp_path}/two.json"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("scenario  samples") == 1  # rank 0 prints the one summary
    one = sample_cli(f"--out_dir={trained_demo['out_dir']}", f"--data_files={trained_demo['test']}",
                     "--num_samples=5", "--scenario=ar,block_tf,lossless", "--max_new_tokens=40",
                     "--drafts=3", f"--summary_json={tmp_path}/one.json")
    assert one.returncode == 0, one.stderr
    two, one = (read_json(tmp_path / f"{n}.json")["scenarios"] for n in ("two", "one"))
    for name in ("ar", "block_tf", "lossless"):
        for key in ("samples", "tokens", "forwards", "accuracy"):
            assert two[name].get(key) == one[name].get(key), (name, key)
    assert two["lossless"]["same_as_ar"] == "5/5"


@pytest.mark.slow
def test_cli_block_size_mismatch_warns_and_uses_trained(trained_demo):
    p = sample_cli(
        f"--out_dir={trained_demo['out_dir']}",
        "--prompt=What is 123+456?",
        "--scenario=lossless",
        "--block_size=8",
        "--max_new_tokens=10")
    assert p.returncode == 0, p.stderr
    assert "warning: block_size=8 but the model was trained with 4: using 4" in p.stdout


@pytest.mark.slow
def test_cli_bad_input(tmp_path, trained_demo):
    p = sample_cli(f"--out_dir={tmp_path}/none")
    assert (
        p.returncode == 1
        and "none' not found (run train.py first" in p.stderr
        and p.stderr.count("\n") == 1)
    p = sample_cli(f"--ckpt={tmp_path}")
    assert p.returncode == 1 and "holds no checkpoint" in p.stderr
    bad = write_parquet(tmp_path / "bad.parquet", [{"prompt": "", "target": "x"}])
    p = sample_cli(f"--out_dir={trained_demo['out_dir']}", f"--data_files={bad}")
    assert (
        p.returncode == 1
        and "bad.parquet row 0: column 'prompt' message 0 has empty content" in p.stderr)
    # a plain Hugging Face model without a mask token: block scenarios refused, ar and tf still run
    from demo import demo_tokenizer
    plain = tiny_model(vocab_size=128)
    plain.save_pretrained(tmp_path / "plain")
    demo_tokenizer().save_pretrained(tmp_path / "plain")
    plain.save_pretrained(tmp_path / "no_tokenizer")
    p = sample_cli(f"--ckpt={tmp_path}/no_tokenizer", "--prompt=What is 1+2?")
    assert (
        p.returncode == 1
        and "no tokenizer in the model folder" in p.stderr
        and p.stderr.count("\n") == 1)
    p = sample_cli(f"--ckpt={tmp_path}/plain", "--prompt=What is 1+2?", "--scenario=lossless")
    assert p.returncode == 1 and "has no mask token" in p.stderr and p.stderr.count("\n") == 1
    p = sample_cli(
        f"--ckpt={tmp_path}/plain",
        f"--data_files={trained_demo['test']}",
        "--num_samples=2",
        "--max_new_tokens=5")
    assert p.returncode == 0 and "running ar and tf only" in p.stdout, p.stderr
