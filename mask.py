"""
mask.py: who may attend to whom in a next-block row, rendered two ways from one mask_mod
(docs/design.md, "The attention rule").

The rule, for query q and key k of one row:
  - tokens of different documents never see each other;
  - every token sees the clean tokens of its document whose position is below its limit: a clean
    token's limit is its own position + 1 (plain causal attention), a mask's limit is the start of
    its block (so a mask sees the prompt and all earlier blocks, never the block it drafts);
  - a mask also sees the masks of its own group (same limit) up to its own position;
  - clean tokens never attend to mask tokens, so the clean stream computes exactly what a causal LM
    computes;
  - every token sees itself (padding sees only itself, so no softmax row is empty).

dense_mask renders it as a bool tensor [batch, 1, Q, L] (True = may attend) for SDPA on CPU and for
decoding steps; block_mask renders it as a FlexAttention BlockMask for training on CUDA. Both
evaluate the same mask_mod. `python data.py` draws the rule for one small sample, in both layouts.
"""

import torch

try:
    from torch.nn.attention.flex_attention import create_block_mask
except ImportError:  # torch without FlexAttention: dense masks still work
    create_block_mask = None


def make_mask_mod(doc_ids, position_ids, limit, is_mask, queries=None):
    """mask_mod(b, h, q, k) -> may query q attend to key k. The metadata tensors are [batch, L] over
    the keys.

    queries=None: query q is key q (training: a row attends to itself). In a decoding step the
    queries are the new tokens: queries = (doc, pos, limit, is_mask, slot), each [batch, Q], slot
    being the key index where each query's own key sits (each row of a batch writes its new tokens
    at its own offset in the KV cache).
    """
    if queries is None:
        queries = (doc_ids, position_ids, limit, is_mask, None)
    q_doc, q_pos, q_limit, q_mask, q_slot = queries

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = q_doc[b, q_idx] == doc_ids[b, kv_idx]
        sees_clean = ~is_mask[b, kv_idx] & (position_ids[b, kv_idx] < q_limit[b, q_idx])
        same_group = (q_mask[b, q_idx] & is_mask[b, kv_idx]
                      & (limit[b, kv_idx] == q_limit[b, q_idx])
                      & (position_ids[b, kv_idx] <= q_pos[b, q_idx]))
        itself = (q_idx if q_slot is None else q_slot[b, q_idx]) == kv_idx
        return (same_doc & (sees_clean | same_group)) | itself

    return mask_mod


def _mod(batch):
    return make_mask_mod(batch["doc_ids"], batch["position_ids"], batch["limit"], batch["is_mask"])


def dense_mask(batch, queries=None):
    """Bool [batch, 1, Q, L], True where the query may attend. Q = L (training: a row attends to
    itself), or the decoding step's queries (see make_mask_mod)."""
    b, L = batch["doc_ids"].shape
    device = batch["doc_ids"].device
    if queries is not None:
        keys = batch["doc_ids"], batch["position_ids"], batch["limit"], batch["is_mask"]
        mod, Q = make_mask_mod(*keys, queries), queries[0].shape[1]
    else:
        mod, Q = _mod(batch), L
    idx_b = torch.arange(b, device=device)[:, None, None, None]
    idx_q = torch.arange(Q, device=device)[None, None, :, None]
    idx_k = torch.arange(L, device=device)[None, None, None, :]
    return mod(idx_b, None, idx_q, idx_k)


def block_mask(batch):
    """The same rule as a FlexAttention BlockMask (one per batch; heads share it), on the batch's
    device."""
    if create_block_mask is None:
        raise RuntimeError("this torch has no FlexAttention; use attention='sdpa'")
    b, L = batch["doc_ids"].shape
    device = batch["doc_ids"].device
    return create_block_mask(_mod(batch), B=b, H=None, Q_LEN=L, KV_LEN=L, device=device,
                             _compile=device.type == "cuda")


def row_multiple(attention):
    """What a training row's length is rounded up to: FlexAttention's block of 128 (few shapes to
    compile, whole tiles), else 8."""
    return 128 if attention == "flex_attention" else 8


def draw(batch, names, row=0):
    """The dense mask of one row as text: a line per query, '#' where it may attend, '.' where
    not."""
    allowed = dense_mask(batch)[row, 0]
    width = max(len(n) for n in names) + 1
    lines = [" " * width + "".join(n.rjust(width) for n in names)]
    for q, name in enumerate(names):
        marks = "".join(("#" if a else ".").rjust(width) for a in allowed[q].tolist())
        lines.append(name.rjust(width) + marks)
    return "\n".join(lines)
