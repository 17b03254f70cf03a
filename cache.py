"""
The KV cache of decoding and the forwards that write it: one cache row per answer, each with its
own length, written by position (slot = position), and the attention of every new token by
mask.py's rule. sample.py's Decoder says which tokens each row feeds; this file makes one forward
of them.

    f = Forward(model, RowCache(layers, rows, capacity, device), model_forward, False, None)
    logits = feed(f, slots, lengths, items, keep)               # rows feeding different counts
    logits = feed_uniform(f, slots, length, longest, tokens, step_shape(k, m, device))
"""

import math
import weakref
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from common import ceil_to
from mask import dense_mask, make_mask_mod
from model import cache_kwarg, set_gate


# -------------------------------------------------------------------------------------------------
# the KV cache: one row per sequence, each with its own length

class RowLayer(CacheLayerMixin):
    """One layer of a RowCache: keys and values [rows, kv_heads, slots, head_dim], the slots grown
    in steps of 16 up to the capacity (all of it at once when compiled)."""
    is_compileable, is_sliding = True, False

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states, value_states):
        heads, dim = key_states.shape[1], key_states.shape[-1]
        self.keys = key_states.new_zeros(self.cache.rows, heads, 0, dim)
        self.values = value_states.new_zeros(self.cache.rows, heads, 0, value_states.shape[-1])
        self.is_initialized = True

    def grow(self, size):
        """Slots 0..size-1, keeping what is written. Attention reads the whole tensor, contiguous:
        a view of its first slots would be copied by SDPA at every step."""
        keys, values = self.keys, self.values
        self.keys = keys.new_zeros(*keys.shape[:2], size, keys.shape[-1])
        self.values = values.new_zeros(*values.shape[:2], size, values.shape[-1])
        self.keys[:, :, :keys.shape[2]] = keys
        self.values[:, :, :values.shape[2]] = values
        if size == self.cache.capacity and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)  # fixed addresses allow a CUDA graph
            torch._dynamo.mark_static_address(self.values)

    def update(self, key_states, value_states, *args, **kwargs):
        """Write each row's new tokens at that row's own slots; return the keys and values they
        attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[2] < self.cache.kv_len:
            self.grow(self.cache.kv_len)
        if self.cache.all_rows:  # one scatter per tensor, its index shared by every layer
            if self.cache.index is None:
                self.cache.index = self.cache.write_at[:, None, :, None].expand_as(key_states)
            self.keys.scatter_(2, self.cache.index, key_states)
            self.values.scatter_(2, self.cache.index, value_states)
            return self.keys, self.values
        rows, slots = self.cache.step_rows[:, None], self.cache.write_at
        self.keys[rows, :, slots] = key_states.transpose(1, 2)
        self.values[rows, :, slots] = value_states.transpose(1, 2)
        return self.keys[self.cache.step_rows], self.values[self.cache.step_rows]

    def get_mask_sizes(self, query_length):
        return self.cache.capacity, 0

    def get_seq_length(self):
        return 0  # rows differ: the lengths live in the decoder's rows

    def get_max_length(self):
        return self.cache.capacity


class RowCache(Cache):
    """A KV cache written by position, one row per sequence (gpt-fast's idea, per row). Row r holds
    its verified tokens at slots 0..length-1 (slot = position). A forward writes each taking-part
    row's new tokens at the slots `write_at`, right after that row's verified ones; a step keeps
    what it accepted by moving the row's length, and what it did not accept is overwritten by the
    row's next step: no cropping, no re-padding, no moving rows. Attention comes from mask.py's rule
    with each row's own metadata, so that rows which accepted different numbers of tokens stay
    exact."""

    def __init__(self, num_layers, rows, capacity, device):
        self.rows, self.capacity = rows, capacity
        self.slots = torch.arange(capacity, device=device)
        super().__init__(layers=[RowLayer(self) for _ in range(num_layers)])
        self.step_rows = None  # the cache rows taking part in this forward
        self.write_at = None  # [rows, queries]: the slot each new token is written to
        self.all_rows = True  # every row takes part (no gather)
        self.index = None  # the scatter index of this forward's writes
        self.kv_len = 0  # slots attention reads: every slot allocated so far

    def attend(self, needed, compiled):
        """The slots a forward reads: at least `needed`, in steps of 16 (a copy of the cache every
        16 slots; attention over at most 15 unused ones), never fewer than before (every slot when
        compiled: one shape)."""
        grown = max(self.kv_len, ceil_to(needed, 16))
        self.kv_len = self.capacity if compiled else min(self.capacity, grown)
        return self.kv_len


# -------------------------------------------------------------------------------------------------
# one forward: the new tokens of some rows, written after each row's cached ones

def model_forward(model, cache, tokens, positions, mask, keep, suppress):
    """Float logits of the model's forward, the never-written tokens (suppress) at -inf."""
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                logits_to_keep=keep, **{cache_kwarg(model): cache})
    logits = out.logits.float()
    return logits if suppress is None else logits.index_fill_(-1, suppress, -math.inf)


_COMPILED = weakref.WeakKeyDictionary()


def compiled_forward(model):
    """The decoding forward, compiled once per model: a graph per step shape (CUDA graphs on a GPU:
    the shapes never change between steps)."""
    if model not in _COMPILED:
        for name in ("recompile_limit", "cache_size_limit"):  # one graph per lossless step shape
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        _COMPILED[model] = torch.compile(model_forward, mode=mode, dynamic=False)
    return _COMPILED[model]


class Forward(NamedTuple):
    """How a decoder runs its forwards: the model, its cache, the forward function (compiled or
    not), whether every step has one shape, and the tokens never written."""
    model: object
    cache: RowCache
    fn: object
    compiled: bool
    suppress: object


def run(f, rows, tokens, positions, is_mask, mask, write_at, kv_len, keep):
    """Run the forward for the cache rows `rows` (a tensor of slots), each writing its new tokens
    at write_at; is_mask turns gated adapters on at the masks."""
    f.cache.step_rows, f.cache.write_at, f.cache.kv_len = rows, write_at, kv_len
    f.cache.all_rows, f.cache.index = len(rows) == f.cache.rows, None
    set_gate(f.model, is_mask)  # a gated adapter (lora.py) acts on the masks only: ar runs the base
    try:
        return f.fn(f.model, f.cache, tokens, positions, mask, keep, f.suppress)
    finally:
        set_gate(f.model, None)  # off again: a forward by anyone else (HF generate) is the base's


def feed(f, rows, lengths, items, keep, eager=False):
    """One forward of rows whose new tokens differ in number (prefill, block, adaptive): each row's
    items (token, position, limit, is_mask) left-padded to the longest. rows: cache slots, lengths:
    their cached token counts (Python lists). Returns float logits of the last `keep` queries of
    every row (0: all). A pad query writes to the slot after its row's new tokens, unseen. eager:
    not compiled (a prefill's shapes differ every time)."""
    device, n = f.cache.slots.device, len(rows)
    width = max(map(len, items))
    table = torch.tensor([[(0, 0, 0, 0)] * (width - len(x)) + x for x in items],
                         device=device).view(n, width, 4)
    token, position, limit, is_mask = table.unbind(-1)
    is_mask = is_mask.bool()
    counts = torch.tensor([len(x) for x in items], device=device)[:, None]
    real = torch.arange(width, device=device) >= width - counts  # left padding
    kv_len = f.cache.attend(max(lengths) + width + 1, f.compiled and not eager)
    length = torch.tensor(lengths, device=device)[:, None]
    write_at = torch.where(real, length + torch.arange(width, device=device) - (width - counts),
                           length + width)
    slots = f.cache.slots[:kv_len]
    q_doc = torch.where(real, 0, -1)
    keys = {"doc_ids": torch.where(slots < length, 0, -1).scatter_(1, write_at, q_doc),
            "position_ids": slots.expand(n, kv_len).scatter(1, write_at, position),
            "limit": (slots + 1).expand(n, kv_len).scatter(1, write_at, limit),
            "is_mask": torch.zeros(n, kv_len, dtype=torch.bool,
                                   device=device).scatter_(1, write_at, is_mask)}
    mask = dense_mask(keys, queries=(q_doc, position, torch.where(real, limit, 0), is_mask,
                                     write_at))
    if eager:
        f = f._replace(fn=model_forward)
    return run(f, torch.tensor(rows, device=device), token, position, is_mask, mask, write_at,
               kv_len, keep)


class StepShape(NamedTuple):
    """The new tokens of a uniform step, relative to a row's cache length (see step_shape); one
    for all rows, or one per row (`stack_shapes`: each field with a leading [rows])."""
    position: torch.Tensor  # [Q] position offsets
    limit: torch.Tensor  # [Q] limit offsets (mask.py's rule)
    is_mask: torch.Tensor  # [Q]
    visible: torch.Tensor  # [Q, Q + 1] which new token sees which, a last column of False
    group: torch.Tensor  # [k + 1] after a accepted drafts: the last group at or before a (index)
    skip: torch.Tensor  # [k + 1] a minus that group's count: its first masks drafted written tokens


def every_group(k):
    return tuple(range(k + 1))


def step_shape(k, m, device, after=None):
    """The new tokens of a uniform step, relative to a row's cache length c: [pending][d_1..d_k]
    then a group of m masks after each clean token c + i, i in `after` (the acceptance counts a
    group follows: 0..k by default, at least 0 and k), group G_i drafting what follows the clean
    token at c + i (k = m = 0: an ar step)."""
    after = every_group(k) if after is None else after
    clean = [(i, i + 1, False) for i in range(k + 1)]
    groups = [(i + 1 + j, i + 1, True) for i in after for j in range(m)]
    position, limit, is_mask = (torch.tensor(x, device=device) for x in zip(*(clean + groups)))
    Q = len(position)
    mod = make_mask_mod(torch.zeros(1, Q, device=device), position[None], limit[None],
                        is_mask[None])
    every = torch.arange(Q, device=device)
    visible = mod(0, None, every[:, None], every)
    group = [sum(x <= a for x in after) - 1 for a in range(k + 1)]
    skip = [a - after[g] for a, g in enumerate(group)]
    return StepShape(position, limit, is_mask, torch.cat([visible, visible.new_zeros(Q, 1)], 1),
                     torch.tensor(group, device=device), torch.tensor(skip, device=device))


def moved(after, real):
    """`after` for a row with `real` drafts (then fillers): the group after the first count at or
    past them moves to right after them (the groups past them see fillers: never taken)."""
    i = next(i for i, x in enumerate(after) if x >= real)
    return after[:i] + (real,) + after[i + 1:]


def stack_shapes(shapes):
    """One StepShape per row, of one length: rows that place their groups differently."""
    return StepShape(*(torch.stack(field) for field in zip(*shapes)))


def feed_uniform(f, rows, length, longest, tokens, shape):
    """One forward where every row feeds as many tokens (ar and lossless steps), built with tensor
    ops: a row's cached tokens are all visible (every new token's limit lies past them); among the
    new ones, `visible` says. rows: cache slots [n], length: their cached token counts [n] (longest:
    the largest, an int), tokens [n, Q], shape: one StepShape or one per row. Returns the float
    logits of every query (ar: the last)."""
    position_offset, is_mask, visible = shape.position, shape.is_mask, shape.visible
    n, Q = tokens.shape
    kv_len = f.cache.attend(longest + Q, f.compiled)
    length = length[:, None]
    rel = f.cache.slots[:kv_len] - length  # [n, kv]: a slot's place after the row's cached tokens
    if visible.dim() == 3:  # one shape per row
        new = visible.gather(2, rel.clamp(0, Q)[:, None, :].expand(n, Q, kv_len))
    else:
        new = visible[:, rel.clamp(0, Q)].transpose(0, 1)
    mask = ((rel < 0)[:, None, :] | new).contiguous()
    write_at = length + torch.arange(Q, device=tokens.device)
    return run(f, rows, tokens, length + position_offset, is_mask.expand(n, Q), mask[:, None],
               write_at, kv_len, 1 if Q == 1 else 0)


# -------------------------------------------------------------------------------------------------
# what a row feeds

def clean(tokens, start):
    """(token, position, limit, is_mask) of clean tokens at positions start, start + 1, ..."""
    return [(t, start + i, start + i + 1, False) for i, t in enumerate(tokens)]


def masks(mask_id, start, n):
    """A group of n masks drafting the tokens after position start - 1: each sees the clean tokens
    before start."""
    return [(mask_id, start + j, start, True) for j in range(n)]
