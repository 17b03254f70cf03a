"""The attention rule: mask.py against an independent reference written from docs/design.md in
words, and the two renderings (dense bool, FlexAttention BlockMask) against each other."""

import random

import pytest
import torch

from conftest import example, tiny_model
from data import build_example, collate
from mask import block_mask, dense_mask, make_mask_mod

MASK_ID = 99


def reference_layout(P, n, B, s, layout):
    """Tokens of one sample, in plain Python: dicts with kind, pos, and for masks the block start
    position."""
    blocks, a = [], 0
    while a < n:
        length = (B - s if s else B) if a == 0 else B
        blocks.append((a, min(length, n - a)))
        a += length
    prompt = [{"kind": "clean", "pos": t} for t in range(P)]
    clean = {
        a: [{"kind": "clean", "pos": P + i} for i in range(a, a + length)] for a, length in blocks}
    masks = {a: [{"kind": "mask", "pos": P + a + j, "block": P + a} for j in range(length - 1)]
             for a, length in blocks}
    if layout == "split":
        return prompt + sum(clean.values(), []) + sum(masks.values(), [])
    return prompt + sum((masks[a] + clean[a] for a, _ in blocks), [])


def visible(q, k):
    """The rule in words. Different documents never see each other; padding sees only itself. A
    clean token sees the clean tokens at or before its position; a mask sees the clean tokens before
    its block's start and the masks of its own block at or before its position. Nobody else sees a
    mask."""
    if q is k:
        return True
    if q["doc"] != k["doc"] or "pad" in (q["kind"], k["kind"]):
        return False
    if k["kind"] == "clean":
        return k["pos"] <= q["pos"] if q["kind"] == "clean" else k["pos"] < q["block"]
    return q["kind"] == "mask" and q["block"] == k["block"] and k["pos"] <= q["pos"]


def random_row(rng, B, layout, max_length=96):
    """Several random samples packed in one row: (collated batch, reference tokens, token ids per
    sample)."""
    examples, tokens = [], []
    for doc in range(rng.randint(1, 4)):
        P, n, s = rng.randint(1, 6), rng.randint(1, 14), rng.randrange(B)
        ids = [rng.randint(1, 90) for _ in range(P + n)]
        ex = example(ids[:P], ids[P:], B, MASK_ID, layout, s)
        if sum(len(e["input_ids"]) for e in examples) + len(ex["input_ids"]) > max_length:
            break
        examples.append(ex)
        for t in reference_layout(P, n, B, s, layout):
            t["doc"] = doc
            is_label = t["pos"] + 1 < P + n and (t["kind"] == "mask" or t["pos"] >= P - 1)
            t["id"], t["label"] = (ids[t["pos"]] if t["kind"] == "clean" else MASK_ID), \
                (ids[t["pos"] + 1] if is_label else -100)
            tokens.append(t)
    batch = collate(examples, max_length)
    tokens += [{"kind": "pad", "doc": -1} for _ in range(max_length - len(tokens))]
    return batch, tokens


@pytest.mark.parametrize("layout", ["split", "interleaved"])
@pytest.mark.parametrize("B", range(1, 9))
def test_dense_mask_equals_reference(B, layout):
    rng = random.Random(B * 10 + (layout == "split"))
    for _ in range(6):
        batch, tokens = random_row(rng, B, layout)
        real = [t for t in tokens if t["kind"] != "pad"]
        assert batch["input_ids"][0, :len(real)].tolist() == [t["id"] for t in real]
        assert batch["position_ids"][0, :len(real)].tolist() == [t["pos"] for t in real]
        assert batch["labels"][0, :len(real)].tolist() == [t["label"] for t in real]
        expected = torch.tensor([[visible(q, k) for k in tokens] for q in tokens])
        assert torch.equal(dense_mask(batch)[0, 0], expected)


def test_every_block_offset_and_partial_blocks():
    for B in (2, 3, 4, 8):
        for s in range(B):
            for n in range(1, 2 * B + 2):
                ex = example([5, 6], list(range(10, 10 + n)), B, MASK_ID, "split", s)
                batch = collate([ex], len(ex["input_ids"]))
                tokens = reference_layout(2, n, B, s, "split")
                for t in tokens:
                    t["doc"] = 0
                expected = torch.tensor([[visible(q, k) for k in tokens] for q in tokens])
                assert torch.equal(dense_mask(batch)[0, 0], expected), (B, s, n)


def reference_conversation(T, spans, offsets, B, layout):
    """Tokens of a conversation (T clean tokens, several learned spans), in plain Python: every span
    cut into blocks of its own offset; a block's masks stand before its first token (interleaved) or
    after all clean tokens (split). A mask's "block" is its block's start: it sees the clean tokens
    before it, earlier turns included."""
    clean = [{"kind": "clean", "pos": t} for t in range(T)]
    masks = []
    for (s, e), off in zip(spans, offsets):
        a = s
        while a < e:
            length = min((B - off if off else B) if a == s else B, e - a)
            group = [{"kind": "mask", "pos": a + j, "block": a} for j in range(length - 1)]
            masks.append((a, group))
            a += length
    if layout == "split":
        return clean + [m for _, group in masks for m in group]
    out = []
    for t in clean:
        out += [m for a, group in masks if a == t["pos"] for m in group] + [t]
    return out


@pytest.mark.parametrize("layout", ["split", "interleaved"])
def test_conversations_with_several_learned_turns(layout):
    """Each assistant turn has its own blocks and offset; masks see everything before their block,
    earlier turns (and what lies between them: tool output, user turns) included; labels only inside
    the turns.
    """
    rng = random.Random(7 + (layout == "split"))
    for _ in range(40):
        B = rng.randint(1, 6)
        spans, at = [], rng.randint(1, 5)
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 9)
            spans.append((at, at + n))
            at += n + rng.randint(1, 4)  # context between turns
        T = spans[-1][1]
        offsets = [rng.randrange(B) for _ in spans]
        ids = [rng.randint(1, 90) for _ in range(T)]
        ex = build_example(ids, spans, B, MASK_ID, layout, offsets)
        batch = collate([ex], len(ex["input_ids"]))
        tokens = reference_conversation(T, spans, offsets, B, layout)
        learned = {t for s, e in spans for t in range(s, e)}
        for t in tokens:
            t["doc"] = 0
            t["id"] = ids[t["pos"]] if t["kind"] == "clean" else MASK_ID
            t["label"] = ids[t["pos"] + 1] if t["pos"] + 1 in learned else -100
        assert batch["input_ids"][0].tolist() == [t["id"] for t in tokens]
        assert batch["position_ids"][0].tolist() == [t["pos"] for t in tokens]
        assert batch["labels"][0].tolist() == [t["label"] for t in tokens]
        expected = torch.tensor([[visible(q, k) for k in tokens] for q in tokens])
        assert torch.equal(dense_mask(batch)[0, 0], expected)


def test_python_data_py_draws_both_layouts():
    import subprocess
    import sys
    from conftest import ROOT
    p = subprocess.run(
        [sys.executable, "data.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (
        p.returncode == 0 and "layout 'split':" in p.stdout and "layout 'interleaved':" in p.stdout)
    grid = p.stdout.split("layout 'split':")[1].split("layout")[0].strip().splitlines()
    assert grid[0].split() == "p0 p1 p2 r0 r1 r2 r3 r4 r5 m1 m2 m4 m5".split()
    rows = {line.split()[0]: line.split()[1:] for line in grid[1:]}
    # the prompt and r0-r2, then its own group
    assert (
        rows["m5"] == "# # # # # # . . . . . # #".split())
    assert rows["r5"][9:] == [".", ".", ".", "."]  # clean tokens never see a mask


def _batch(seed=0, rows=2, L=300):
    rng = random.Random(seed)
    parts = [
        random_row(rng, rng.randint(2, 6), rng.choice(["split", "interleaved"]), L)[0]
        for _ in range(rows)]
    return {
        k: torch.cat([p[k] for p in parts])
        for k in parts[0]
        if isinstance(parts[0][k], torch.Tensor)}


def test_block_mask_equals_dense_at_token_and_tile_level():
    from torch.nn.attention.flex_attention import create_mask
    batch = _batch()
    b, L = batch["input_ids"].shape
    dense = dense_mask(batch)
    mod = make_mask_mod(batch["doc_ids"], batch["position_ids"], batch["limit"], batch["is_mask"])
    assert torch.equal(create_mask(mod, b, 1, L, L, device="cpu"), dense)
    tiles = block_mask(
        batch
    ).to_dense()  # [b, 1, L/128, L/128]: 1 where a tile has any visible pair
    T = -(-L // 128)
    padded = torch.zeros(b, 1, T * 128, T * 128, dtype=torch.bool)
    padded[..., :L, :L] = dense
    assert torch.equal(tiles.bool(), padded.view(b, 1, T, 128, T, 128).any(-1).any(-2))


def test_flex_attention_forward_equals_sdpa_with_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention
    batch = _batch(seed=1)
    b, L = batch["input_ids"].shape
    q, k, v = (torch.randn(b, 4, L, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(batch))
    out = flex_attention(q, k, v, block_mask=block_mask(batch))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hf_model_flex_equals_sdpa_in_eval():
    """HF's flex path (compiled on CPU, ~20 s) against its SDPA path on the same weights."""
    sdpa, flex = tiny_model("qwen3", attn="sdpa"), tiny_model("qwen3", attn="flex_attention")
    flex.load_state_dict(sdpa.state_dict())
    batch = _batch(seed=2)
    kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    with torch.no_grad():
        a = sdpa(attention_mask=dense_mask(batch), **kw).logits
        b = flex(attention_mask=block_mask(batch), **kw).logits
    real = batch["doc_ids"] >= 0
    torch.testing.assert_close(b[real], a[real], atol=1e-4, rtol=1e-4)


# ---------------- logits on a real (tiny, random) HF model

def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=dense_mask(batch)).logits


def _keyed(batch, logits, row=0):
    """logits by what each token means: (doc, is_mask, position, limit) is unique in a row."""
    keys = zip(
        batch["doc_ids"][row].tolist(),
        batch["is_mask"][row].tolist(),
        batch["position_ids"][row].tolist(),
        batch["limit"][row].tolist())
    return {k: logits[row, i] for i, k in enumerate(keys) if k[0] >= 0}


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_layouts_agree_and_clean_stream_is_plain_causal(arch):
    model = tiny_model(arch, vocab_size=128)
    rng = random.Random(7)
    for B in (2, 4, 5):
        for s in range(B):
            P, n = rng.randint(2, 9), rng.randint(5, 30)
            ids = [rng.randint(1, 120) for _ in range(P + n)]
            rows = {lay: collate([example(ids[:P], ids[P:], B, 127, lay, s)], 128)
                    for lay in ("split", "interleaved")}
            split = _keyed(rows["split"], _logits(model, rows["split"]))
            inter = _keyed(rows["interleaved"], _logits(model, rows["interleaved"]))
            assert split.keys() == inter.keys()
            assert max((split[k] - inter[k]).abs().max().item() for k in split) < 1e-4
            with torch.no_grad():
                causal = model(input_ids=torch.tensor([ids])).logits[0]
            clean = torch.stack([split[(0, False, t, t + 1)] for t in range(P + n)])
            assert (clean - causal).abs().max().item() < 1e-4


def test_packed_documents_do_not_leak():
    model = tiny_model("qwen3")
    rng = random.Random(3)
    examples = [
        example(
            [rng.randint(1, 120) for _ in range(4)],
            [rng.randint(1, 120) for _ in range(9)],
            4,
            127,
            "split",
            rng.randrange(4))
        for _ in range(3)]
    packed = collate(examples, 128)
    together = _logits(model, packed)
    for doc, ex in enumerate(examples):
        alone = _keyed(collate([ex], 64), _logits(model, collate([ex], 64)))
        mine = {k[1:]: v for k, v in _keyed(packed, together).items() if k[0] == doc}
        assert max((mine[k[1:]] - v).abs().max().item() for k, v in alone.items()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention training needs CUDA")
def test_cuda_blockmask_training_step_equals_dense():
    """On a GPU: the BlockMask path and the dense path give the same losses and gradients (fp32)."""
    from model import forward_losses
    batch = {k: v.cuda() for k, v in _batch(seed=4).items()}
    results = {}
    for attn in ("flex_attention", "sdpa"):
        model = tiny_model("qwen3", attn=attn).cuda().train()
        losses, _, _ = forward_losses(model, batch)
        losses.sum().backward()
        results[attn] = (losses.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(
        results["flex_attention"][0], results["sdpa"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        results["flex_attention"][1], results["sdpa"][1], atol=1e-3, rtol=1e-3)
