"""
mask.py: who may attend to whom in a next-block row, rendered two ways from one mask_mod.

The rule (DESIGN.md section 2), for query q and key k of one row:
  - tokens of different documents never see each other;
  - every token sees the clean tokens of its document whose position is below its limit: a clean token's limit
    is its own position + 1 (plain causal attention), a mask's limit is the start of its block (so a mask sees
    the prompt and all earlier blocks, never the block it drafts);
  - a mask also sees the masks of its own group (same limit) up to its own position;
  - clean tokens never attend to mask tokens, so the clean stream computes exactly what a causal LM computes;
  - every token sees itself (padding sees only itself, so no softmax row is empty).

dense_mask renders it as a bool tensor [batch, 1, Q, L] (True = may attend) for SDPA on CPU and for decoding
steps; block_mask renders it as a FlexAttention BlockMask for training on CUDA. Both evaluate the same mask_mod.
"""
import torch

try:
    from torch.nn.attention.flex_attention import create_block_mask
except ImportError:  # torch without FlexAttention: dense masks still work
    create_block_mask = None


def make_mask_mod(doc_ids, position_ids, limit, is_mask, q_offset=0):
    """mask_mod(b, h, q, k) -> may query q attend to key k. The metadata tensors are [batch, L] over all keys;
    queries are the last L - q_offset of them (decoding steps query only the new tokens)."""

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_offset
        same_doc = doc_ids[b, q] == doc_ids[b, kv_idx]
        sees_clean = ~is_mask[b, kv_idx] & (position_ids[b, kv_idx] < limit[b, q])
        same_group = (is_mask[b, q] & is_mask[b, kv_idx] & (limit[b, kv_idx] == limit[b, q])
                      & (position_ids[b, kv_idx] <= position_ids[b, q]))
        return (same_doc & (sees_clean | same_group)) | (q == kv_idx)

    return mask_mod


def _mod(batch, num_queries=None):
    L = batch["doc_ids"].shape[1]
    q_offset = 0 if num_queries is None else L - num_queries
    return make_mask_mod(batch["doc_ids"], batch["position_ids"], batch["limit"], batch["is_mask"], q_offset)


def dense_mask(batch, num_queries=None):
    """Bool [batch, 1, Q, L], True where the query may attend. Q = L, or the last num_queries tokens."""
    b, L = batch["doc_ids"].shape
    Q = L if num_queries is None else num_queries
    device = batch["doc_ids"].device
    idx_b = torch.arange(b, device=device)[:, None, None, None]
    idx_q = torch.arange(Q, device=device)[None, None, :, None]
    idx_k = torch.arange(L, device=device)[None, None, None, :]
    return _mod(batch, num_queries)(idx_b, None, idx_q, idx_k)


def block_mask(batch, num_queries=None):
    """The same rule as a FlexAttention BlockMask (one per batch; heads share it), on the batch's device."""
    if create_block_mask is None:
        raise RuntimeError("this torch has no FlexAttention; use attention='sdpa'")
    b, L = batch["doc_ids"].shape
    Q = L if num_queries is None else num_queries
    device = batch["doc_ids"].device
    return create_block_mask(_mod(batch, num_queries), B=b, H=None, Q_LEN=Q, KV_LEN=L, device=device,
                             _compile=device.type == "cuda")
