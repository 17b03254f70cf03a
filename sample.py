"""
Decode with a next-block model: every scenario (docs/design.md, "Decoding"), batched over many
prompts with a per-row KV cache, greedy or sampled; then grading and the command line.

  python sample.py                     # the demo: newest checkpoint in out/demo, held-out problems
  python sample.py --ckpt=out/x --data_files=test.parquet --scenario=lossless --batch_size=64
  python sample.py --temperature=0.6 --top_p=0.95 --samples_per_prompt=4   # sampled, avg/maj/pass@4
  python sample.py --prompt='What is 123+456?' --scenario=ar,lossless --verbose=True
  python sample.py --data_files=train.parquet --num_samples=0 --scenario=lossless \
      --write_parquet=own.parquet      # the model's own answers, as training rows
  torchrun --standalone --nproc_per_node=8 sample.py --ckpt=out/x --data_files=test.parquet

Scenarios (the seed's numbering in brackets):
  ar        next-token decoding, the baseline [1]
  tf        teacher forcing over prompt + target: next-token accuracy (the overfit test) [1.1]
  block     each forward over [pending][B-1 masks] emits B tokens, all accepted (lossy) [2]
  block_tf  one forward in the training layout: accuracy per offset and tpf_tf [2.1]
  adaptive  like block, keeping offsets while the chosen token's probability >= threshold and it
            repeats no token [3]
  lossless  self-speculative: drafts verified by the clean stream in the same forward; output == ar
Under torchrun each rank decodes its share of the samples and rank 0 prints one summary.

In Python:
    model, tokenizer, _ = load_for_decoding("out/demo", torch.device("cpu"))   # fp32: exact
    stops = chat.Chat(tokenizer).stop_ids()
    results = generate(model, [ids_a, ids_b], "lossless", 256, eos_token_id=stops,
                       temperature=0.6, top_p=0.95, seed=0)
    for tokens, stats in results: ...  # stats: {"tokens", "forwards", ...}
"""

# configurator first: from here on a mistake, or a Ctrl-C while torch loads, prints one line
from configurator import UserError, at_least, check_sample, configure, one_of
import json
import math
import os
import re
import sys
import time
import weakref
from collections import Counter, deque
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, CacheLayerMixin

import chat
import data
from checkpoint import find_hf_folder, load_for_decoding
from common import (Progress, all_gather, ceil_to, compute_cleanup, compute_init, device_mesh,
                    dist_info, print0, resolve_device, to_device)
from mask import dense_mask, make_mask_mod
from model import (block_metrics, cache_kwarg, load_config, set_gate, summarize_metrics,
                   tp_plan)
from store import expand_files

# -------------------------------------------------------------------------------------------------
# config (python sample.py [config.py] --key=value)
out_dir = "out/demo"             # where the newest checkpoint is looked up when ckpt is ''
ckpt = ""                        # an HF folder from train.py, its global_step_N, or a run's out_dir
data_files = "data/demo/test.parquet"  # prompts (and targets: they give tf, block_tf, accuracy)
prompt = ""                      # decode this one prompt instead of data_files
prompt_key = "prompt"            # prompt column
response_key = "target"          # target column (optional: it gives tf, block_tf and accuracy)
messages_key = "messages"        # whole-conversation column: its last assistant turn is decoded
tools_key = "tools"              # tool schemas column, handed to the chat template when present
chat_template_kwargs = None      # template options; None = those the checkpoint was trained with
prompt_format = None             # 'Question: {prompt}\nAnswer: ' for tokenizers without a template
scenario = "all"                 # ar, tf, block, block_tf, adaptive, lossless; a comma list; 'all'
num_samples = 100                # the first N rows of data_files; 0 = all
samples_per_prompt = 1           # k answers per prompt (seeds differ): avg@k, maj@k, pass@k
max_new_tokens = 256             # per answer
batch_size = 16                  # answers decoded at once (KV cache rows); finished rows refill
block_size = 0                   # 0 = the trained one (another value warns, uses the trained)
threshold = 0.7                  # adaptive: keep an offset while its chosen token's probability is
#                                  >= this
drafts = "auto"                  # lossless: drafts verified per step: 'auto' (chosen per step from
#                                  measured cost and acceptance), or an int in [0, block_size-1]
temperature = "auto"             # 0: greedy; 'auto': the checkpoint's generation_config.json (as
#                                  HF generate), greedy without one
top_k = None                     # keep the k most likely tokens; None: generation_config's, else 0
top_p = None                     # keep the smallest set with this mass; None: generation_config's
min_p = None                     # drop tokens below min_p x the top probability; None: as top_p
seed = 0                         # answer j of the run's list (prompt i, sample s: j = i * k + s)
#                                  draws with seed + j
compile = False                  # torch.compile the decoding step (CUDA graphs on a GPU)
answer_regex = ""                # the answer (group 1); '' = \boxed{..}, "The answer is ..",
#                                  "#### ..", the last number
verbose = False                  # print every forward's tokens with their top-5 probabilities
color = None                     # colour each forward's tokens: None = on a terminal; True/False
summary_json = ""                # also write the summary numbers to this JSON file
write_parquet = ""               # write each prompt with each finished answer as a training row
device = "auto"                  # 'auto', 'cpu', 'cuda'
dtype = "float32"                # 'float32' (lossless == ar exactly) or 'bfloat16'
tensor_parallel = 1              # under torchrun: ranks sharding the model (TP); each group of them
#                                  decodes its share of the answers
# -------------------------------------------------------------------------------------------------
SCENARIOS = ("ar", "tf", "block", "block_tf", "adaptive", "lossless")
MODES = ("ar", "block", "adaptive", "lossless")


# -------------------------------------------------------------------------------------------------
# choosing a token: greedy, or a draw that depends on (seed, position) only

class Sampling(NamedTuple):
    """How a token is chosen from logits: temperature 0 is greedy; else Hugging Face's filters, in
    its order (temperature, top-k, top-p, min-p), then a draw."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


_M32 = 0xFFFFFFFF


def _mul32(h, c):
    """(h * c) mod 2^32 for int64 tensors h < 2^32, without an int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h):
    """MurmurHash3's finalizer: every input bit flips about half the output bits."""
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel(seeds, positions, ids):
    """Gumbel(0, 1) noise for the token ids at positions of rows drawn with seeds: a hash of (seed,
    position, token id), so that a position's noise depends on nothing else (not the batch, the
    step or the mode). seeds [n], positions [n, P], ids [n, P, K] or [V] (every token)."""
    s = seeds[:, None] & _M32
    a = _mix32(s ^ _mix32(positions ^ 0x68E31DA4))
    b = _mix32(((s + 0x1B873593) & _M32) ^ _mix32(positions ^ 0x2C1B3C6D))
    h = _mix32(_mix32(a[..., None] ^ ids) ^ b[..., None])
    u = ((h >> 9).float() + 0.5) * 2.0 ** -23  # 23 bits: exactly in (0, 1) in float32
    return -torch.log(-torch.log(u))


def filtered(logits, s):
    """(scores, ids): logits / temperature with top-k, top-p and min-p applied, removed tokens at
    -inf. With top-k or top-p only the candidates are kept, most likely first (ids: their token
    ids); else every token (ids None). top-p keeps the smallest set whose mass reaches top_p (at
    least one token), as HF's TopPLogitsWarper."""
    scores, ids = logits / s.temperature, None
    if s.top_k or s.top_p < 1.0:
        k = min(s.top_k or scores.shape[-1], scores.shape[-1])
        scores, ids = scores.topk(k, -1) if s.top_k else scores.sort(-1, descending=True)
    if s.top_p < 1.0:
        probs = scores.softmax(-1)
        above = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each
        scores = scores.masked_fill(above >= s.top_p, -math.inf)
        kept = int((above < s.top_p).sum(-1).max())
        scores, ids = scores[..., :kept], ids[..., :kept]
    if s.min_p > 0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), -math.inf)
    return scores, ids


def choose(logits, positions, seeds, s, with_prob=False):
    """The token at each position: the argmax (temperature 0), or argmax(filtered scores + the
    Gumbel noise of (seed, position)), a draw from the filtered distribution. logits [n, P, V],
    positions [n, P]: where the chosen token will stand, seeds [n]. With with_prob, also the chosen
    token's probability under the filtered distribution."""
    if s.temperature == 0:
        tokens = logits.argmax(-1)
        return (tokens, logits.softmax(-1).amax(-1)) if with_prob else tokens
    scores, ids = filtered(logits, s)
    every = torch.arange(logits.shape[-1], device=logits.device) if ids is None else ids
    pick = (scores + gumbel(seeds, positions, every)).argmax(-1)
    tokens = pick if ids is None else ids.gather(-1, pick[..., None])[..., 0]
    if not with_prob:
        return tokens
    return tokens, scores.softmax(-1).gather(-1, pick[..., None])[..., 0]


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
        self.keys = key_states.new_zeros(self.cache.rows, key_states.shape[1], 0,
                                         key_states.shape[-1])
        self.values = value_states.new_zeros(self.cache.rows, value_states.shape[1], 0,
                                             value_states.shape[-1])
        self.is_initialized = True

    def grow(self, size):
        """Slots 0..size-1, keeping what is written. Attention reads the whole tensor, contiguous:
        a view of its first slots would be copied by SDPA at every step."""
        keys, values = self.keys, self.values
        self.keys = keys.new_zeros(*keys.shape[:2], size, keys.shape[-1])
        self.values = values.new_zeros(*values.shape[:2], size, values.shape[-1])
        self.keys[:, :, :keys.shape[2]], self.values[:, :, :values.shape[2]] = keys, values
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

    def attend(self, needed, fixed):
        """The slots a forward reads: at least `needed`, in steps of 16 (a copy of the cache every
        16 slots; attention over at most 15 unused ones), never fewer than before (every slot when
        compiled: one shape)."""
        self.kv_len = self.capacity if fixed else min(self.capacity,
                                                      max(self.kv_len, ceil_to(needed, 16)))
        return self.kv_len


# -------------------------------------------------------------------------------------------------
# one forward: the new tokens of some rows, written after each row's cached ones

def model_forward(model, cache, tokens, positions, mask, keep):
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                logits_to_keep=keep, **{cache_kwarg(model): cache})
    return out.logits.float()


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


def forward(model, cache, rows, tokens, pos, msk, mask, write_at, kv_len, keep, fn):
    """Run fn (the model forward) for the cache rows `rows` (a tensor of slots), each writing its
    new tokens at write_at; msk turns gated adapters on at the masks."""
    cache.step_rows, cache.write_at, cache.kv_len = rows, write_at, kv_len
    cache.all_rows, cache.index = len(rows) == cache.rows, None
    set_gate(model, msk)  # a gated adapter (lora.py) acts on the masks only: ar runs the base
    return fn(model, cache, tokens, pos, mask, keep)


def feed(model, cache, rows, lengths, items, keep, fn=model_forward, fixed=False):
    """One forward of rows whose new tokens differ in number (prefill, block, adaptive): each row's
    items (token, position, limit, is_mask) left-padded to the longest. rows: cache slots, lengths:
    their cached token counts (Python lists). Returns float logits of the last `keep` queries of
    every row (0: all). A pad query writes to the slot after its row's new tokens, unseen."""
    device, n = cache.slots.device, len(rows)
    width = max(map(len, items))
    table = torch.tensor([[(0, 0, 0, 0)] * (width - len(x)) + x for x in items],
                         device=device).view(n, width, 4)
    tok, pos, lim, msk = table.unbind(-1)
    msk = msk.bool()
    counts = torch.tensor([len(x) for x in items], device=device)[:, None]
    real = torch.arange(width, device=device) >= width - counts  # left padding
    kv_len = cache.attend(max(lengths) + width + 1, fixed)
    length = torch.tensor(lengths, device=device)[:, None]
    write_at = torch.where(real, length + torch.arange(width, device=device) - (width - counts),
                           length + width)
    slots = cache.slots[:kv_len]
    q_doc = torch.where(real, 0, -1)
    keys = {"doc_ids": torch.where(slots < length, 0, -1).scatter_(1, write_at, q_doc),
            "position_ids": slots.expand(n, kv_len).scatter(1, write_at, pos),
            "limit": (slots + 1).expand(n, kv_len).scatter(1, write_at, lim),
            "is_mask": torch.zeros(n, kv_len, dtype=torch.bool,
                                   device=device).scatter_(1, write_at, msk)}
    mask = dense_mask(keys, queries=(q_doc, pos, torch.where(real, lim, 0), msk, write_at))
    return forward(model, cache, torch.tensor(rows, device=device), tok, pos, msk, mask, write_at,
                   kv_len, keep, fn)


def step_shape(k, m, device):
    """The new tokens of a uniform step, relative to a row's cache length c: [pending][d_1..d_k]
    [G_0]..[G_k], group G_i holding m masks that draft what follows the clean token at c + i (k =
    m = 0: an ar step). Returns (position offsets, limit offsets, is_mask, visible: which new token
    sees which, by mask.py's rule, [Q, Q + 1] with a last column of False)."""
    clean = [(i, i + 1, False) for i in range(k + 1)]
    groups = [(i + 1 + j, i + 1, True) for i in range(k + 1) for j in range(m)]
    pos, lim, msk = (torch.tensor(x, device=device) for x in zip(*(clean + groups)))
    Q = len(pos)
    mod = make_mask_mod(torch.zeros(1, Q, device=device), pos[None], lim[None], msk[None])
    visible = mod(0, None, torch.arange(Q, device=device)[:, None], torch.arange(Q, device=device))
    return pos, lim, msk, torch.cat([visible, visible.new_zeros(Q, 1)], 1)


def feed_uniform(model, cache, rows, length, longest, tokens, shape, fn=model_forward,
                 fixed=False):
    """One forward where every row feeds the same shape (ar and lossless steps), built with tensor
    ops: a row's cached tokens are all visible (every new token's limit lies past them); among the
    new ones, `visible` says. rows: cache slots [n], length: their cached token counts [n] (longest:
    the largest, an int), tokens [n, Q]. Returns the float logits of every query (ar: the last)."""
    pos_off, _, msk, visible = shape
    n, Q = tokens.shape
    kv_len = cache.attend(longest + Q, fixed)
    length = length[:, None]
    rel = cache.slots[:kv_len] - length  # [n, kv]: a slot's place after the row's cached tokens
    mask = ((rel < 0)[:, None, :] | visible[:, rel.clamp(0, Q)].transpose(0, 1)).contiguous()
    write_at = length + torch.arange(Q, device=tokens.device)
    return forward(model, cache, rows, tokens, length + pos_off, msk.expand(n, Q), mask[:, None],
                   write_at, kv_len, 1 if Q == 1 else 0, fn)


# -------------------------------------------------------------------------------------------------
# how many drafts a lossless step verifies

def queries(k, m):
    """Queries per row of a lossless step with k drafts and m masks per group."""
    return 1 + k + (k + 1) * m


class DraftPolicy:
    """drafts='auto': the k of each lossless step (all rows alike; m = k masks per group, so that
    the next step has k drafts), chosen to maximise expected tokens per second. Expected tokens =
    1 + sum_j prod_{i<=j} a_i, with a_i the measured rate at which draft i is right given the ones
    before it (every draft is scored against the tokens finally written, verified or not). Seconds,
    per batch size (rows rounded up to a power of two) and k: the measured time of such steps, a
    moving average; a k not yet measured is priced by a calibration (a forward of each k, timed on
    the device when a batch larger than any calibrated appears; smaller ones are read off a line
    through it) times what real steps have cost over theirs (caches grow, a step does more than its
    forward). Every 32 steps of a batch size, two steps take another k in turn, so that a price
    left behind by a growing cache, a changing load or a poor calibration is measured again."""

    def __init__(self, D):
        self.D, self.right, self.tried = D, [0] * D, [0] * D
        self.forward = {}  # batch size -> [seconds of a forward with k drafts, k = 0..D]
        self.steps = {}  # (batch size, k) -> seconds of a whole step, measured
        self.factor = {}  # batch size -> seconds of a step / seconds of its forward, measured
        self.last_factor = 1.0  # the latest of them: for a batch size not yet measured
        self.taken = Counter()  # steps chosen per batch size

    @staticmethod
    def size(n):
        return 1 << (n - 1).bit_length()

    def rate(self, i):
        return (self.right[i] + 1) / (self.tried[i] + 2)

    def expected(self, k):
        tokens, p = 1.0, 1.0
        for i in range(k):
            p *= self.rate(i)
            tokens += p
        return tokens

    def calibrated(self, n):
        """Whether steps of n rows have prices: a batch size this large or larger calibrated."""
        return any(b >= self.size(n) for b in self.forward)

    def forward_seconds(self, n, k):
        """A forward of n rows with k drafts: calibrated at its batch size, or read off a line
        (seconds = base + slope x queries) through the next larger batch size calibrated."""
        b = self.size(n)
        if b in self.forward:
            return self.forward[b][k]
        above = min(c for c in self.forward if c > b)
        xs = [above * queries(j, j) for j in range(self.D + 1)]
        ys = self.forward[above]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) /
                    max(sum((x - mx) ** 2 for x in xs), 1e-12), 0.0)
        return max(max(my - slope * mx, 0.0) + slope * n * queries(k, k), 1e-9)

    def seconds(self, n, k):
        b = self.size(n)
        factor = self.factor.get(b, self.last_factor)
        return self.steps.get((b, k)) or self.forward_seconds(n, k) * factor

    def best(self, n):
        best = max(range(self.D + 1), key=lambda k: (self.expected(k) / self.seconds(n, k), -k))
        self.taken[self.size(n)] += 1
        t = self.taken[self.size(n)]
        if self.D and t % 32 >= 30:  # two steps: the first drafts, the second is measured
            others = [k for k in range(self.D + 1) if k != best]
            return others[t // 32 % len(others)]
        return best

    def observe(self, n, k, seconds):
        """A step of n rows with k drafts took `seconds`, everything included."""
        def average(old, new):
            return new if old is None else 0.7 * old + 0.3 * new
        b = self.size(n)
        self.steps[b, k] = average(self.steps.get((b, k)), seconds)
        self.factor[b] = self.last_factor = average(self.factor.get(b),
                                                    seconds / self.forward_seconds(n, k))

    def score(self, drafts, written):
        """Count how many of drafts (the tokens after some position) agree with the tokens
        finally written there, in order."""
        for i, (d, t) in enumerate(zip(drafts, written)):
            if self.tried[i] >= 4096:  # the last few thousand drafts speak: rates can drift
                self.tried[i], self.right[i] = self.tried[i] / 2, self.right[i] / 2
            self.tried[i] += 1
            if d != t:
                return
            self.right[i] += 1


_POLICIES = weakref.WeakKeyDictionary()


def draft_policy(model, D, fixed, sampling):
    """The model's DraftPolicy for steps of this kind (compiled or not) and these sampling settings
    (they change how often drafts are right), kept across calls."""
    per_model = _POLICIES.setdefault(model, {})
    return per_model.setdefault((D, fixed, next(model.parameters()).dtype, sampling),
                                DraftPolicy(D))


# -------------------------------------------------------------------------------------------------
# decoding: rows, prefill, steps

class Row:
    """One answer being decoded in a cache row: verified tokens in the cache (length), verified
    tokens not yet in it (pending), the drafts of the last lossless step, the output so far and the
    forwards it took part in."""

    def __init__(self, index, prompt, seed, slot):
        self.index, self.prompt, self.seed, self.slot = index, list(prompt), seed, slot
        self.length, self.pending, self.drafts, self.out = 0, list(prompt), [], []
        self.forwards, self.shapes, self.done = 0, Counter(), False
        self.scoring = []  # (where in out, drafts): drafts to score once their tokens are written


def clean(tokens, start):
    """(token, position, limit, is_mask) of clean tokens at positions start, start + 1, ..."""
    return [(t, start + i, start + i + 1, False) for i, t in enumerate(tokens)]


def masks(mask_id, start, n):
    """A group of n masks drafting the tokens after position start - 1: each sees the clean tokens
    before start."""
    return [(mask_id, start + j, start, True) for j in range(n)]


class Decoder:
    """The state of one generate() call: the cache, its rows, how tokens are chosen, and what is
    accepted from each forward (docs/design.md, "Decoding")."""

    def __init__(self, model, mode, rows, capacity, B, mask_id, eos, max_new, sampling, threshold,
                 policy, drafts, fixed, trace):
        self.model, self.mode, self.B, self.D, self.mask_id = model, mode, B, B - 1, mask_id
        self.eos, self.max_new, self.sampling, self.threshold = eos, max_new, sampling, threshold
        self.policy, self.drafts, self.fixed, self.trace = policy, drafts, fixed, trace
        self.device = next(model.parameters()).device
        layers = model.config.get_text_config().num_hidden_layers
        self.cache = RowCache(layers, rows, capacity, self.device)
        self.slots = [None] * rows  # the Row in each cache row
        self.fn = compiled_forward(model) if fixed else model_forward
        self.shapes = {}
        self.tp_mesh = getattr(model, "next_block_tp", (None,))[0]  # tensor parallel: a group
        # what ar and lossless steps feed, per cache row, kept on the device: cached tokens, the
        # pending token, the drafts, the seed
        zeros = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.length, self.last, self.seed = zeros, zeros.clone(), zeros.clone()
        self.draft = torch.zeros(rows, max(self.D, 1), dtype=torch.long, device=self.device)
        self.every = torch.arange(rows, device=self.device)

    def agree(self, m):
        """The ranks of a tensor-parallel group step with the same shape: group rank 0's choice."""
        if self.tp_mesh is None or self.policy is None:
            return m
        group = self.tp_mesh.get_group()
        choice = torch.tensor([m], device=self.device)
        dist.broadcast(choice, src=dist.get_global_rank(group, 0), group=group)
        return int(choice.item())

    def shape(self, k, m):
        if (k, m) not in self.shapes:
            self.shapes[k, m] = step_shape(k, m, self.device)
        return self.shapes[k, m]

    def seeds(self, rows):
        return torch.tensor([r.seed if r else 0 for r in rows], device=self.device)

    def accept(self, row, new, logits):
        """Append new tokens to row's output until a stop token or max_new_tokens."""
        kept = []
        for t in new:
            row.out.append(t)
            kept.append(t)
            if t in self.eos or len(row.out) >= self.max_new:
                row.done = True
                break
        if self.trace is not None and row.index == 0:
            self.trace.append((kept, logits[:len(kept)]))
        return kept

    def new_drafts(self, row, drafts):
        row.drafts = drafts
        if self.policy is not None:
            row.scoring.append((len(row.out), drafts))

    def score_drafts(self, row):
        """Score the row's drafts whose tokens are written (or will never be: the row is done)."""
        waiting = []
        for at, drafts in row.scoring:
            if row.done or len(row.out) >= at + len(drafts):
                self.policy.score(drafts, row.out[at:at + len(drafts)])
            else:
                waiting.append((at, drafts))
        row.scoring = waiting

    def prefill(self, rows):
        """The first forward of new rows: [prompt] (ar) or [prompt][B-1 masks]."""
        D = 0 if self.mode == "ar" else self.D
        items = [clean(r.pending, 0) + masks(self.mask_id, len(r.pending), D) for r in rows]
        logits = feed(self.model, self.cache, [r.slot for r in rows], [0] * len(rows), items, D + 1)
        pos = torch.tensor([len(r.pending) for r in rows], device=self.device)[:, None]
        pos = pos + torch.arange(D + 1, device=self.device)
        self.finish_block(rows, logits, pos)

    def finish_block(self, rows, logits, positions):
        """What each row accepts from a forward over [pending][masks] (prefill, block, adaptive):
        the token after pending, then (block) every offset, (adaptive) the confident ones, or
        (lossless) none: they are the first drafts."""
        seeds = self.seeds(rows)
        tokens, probs = choose(logits, positions, seeds, self.sampling, with_prob=True)
        if self.mode in ("ar", "lossless"):  # the device state the next steps read
            at = torch.tensor([r.slot for r in rows], device=self.device)
            self.length[at] = torch.tensor([r.length + len(r.pending) for r in rows],
                                           device=self.device)
            self.last[at], self.seed[at] = tokens[:, 0], seeds
            self.draft[at, :tokens.shape[1] - 1] = tokens[:, 1:]
        for row, lg, new, p in zip(rows, logits, tokens.tolist(), probs.tolist()):
            row.forwards += 1
            row.length += len(row.pending)  # what this forward fed as clean tokens is now cached
            if self.mode == "adaptive":
                new = new[:1] + list(_confident_run(new, p, self.threshold))
            elif self.mode == "lossless":
                new, drafts = new[:1], new[1:]
            elif self.mode == "ar":
                new = new[:1]
            kept = self.accept(row, new, lg)
            row.pending = kept if self.mode in ("block", "adaptive") else new
            if self.mode == "lossless":
                self.new_drafts(row, drafts)
                if self.policy is not None:
                    self.score_drafts(row)

    def step(self, busy):
        """One decoding step of the busy rows (all rows with compile: one shape, one graph)."""
        if self.mode in ("block", "adaptive"):
            return self.block_step(busy)
        rows = list(self.slots) if self.fixed else busy  # with compile, idle rows run as padding
        if self.policy is not None and not self.policy.calibrated(len(rows)):
            calibrate(self, busy)
        t0 = time.perf_counter()
        m = 0  # ar
        if self.policy is not None:  # lossless, drafts='auto'
            m = self.agree(self.policy.best(len(rows)))
        elif self.mode == "lossless":
            m = self.drafts
        k = min(m, min(len(r.drafts) for r in busy))
        n, dev, seen = len(rows), self.device, (k, m) in self.shapes
        at = self.every if len(rows) == len(self.slots) else torch.tensor([r.slot for r in rows],
                                                                             device=dev)
        length, seeds = self.length[at], self.seed[at]
        masks_ = length.new_full((n, (k + 1) * m), self.mask_id if m else 0)
        tokens = torch.cat([self.last[at, None], self.draft[at, :k], masks_], 1)
        logits = feed_uniform(self.model, self.cache, at, length, max(r.length for r in busy),
                              tokens, self.shape(k, m), self.fn, self.fixed)
        pos = length[:, None] + 1 + torch.arange(k + 1, device=dev)
        verified = choose(logits[:, :k + 1], pos, seeds, self.sampling)
        accepted = (tokens[:, 1:k + 1] == verified[:, :k]).long().cumprod(1).sum(1)
        bonus = verified.gather(1, accepted[:, None])
        self.length[at], self.last[at] = length + 1 + accepted, bonus[:, 0]
        out = [verified, accepted[:, None]]
        if m:  # the next drafts: those of the group after the last accepted token
            groups = logits[:, k + 1:].unflatten(1, (k + 1, m))[torch.arange(n, device=dev),
                                                                 accepted]
            gpos = (length + accepted)[:, None] + 2 + torch.arange(m, device=dev)
            out.append(choose(groups, gpos, seeds, self.sampling))
            self.draft[at, :m] = out[-1]
        host = torch.cat(out, 1).tolist()
        for row, lg, h in zip(rows, logits, host):
            if row is None or row.done:  # an idle slot of a compiled step: its state is unused
                continue
            a = h[k + 1]
            row.forwards += 1
            row.shapes[f"{k},{m}"] += 1
            row.length += 1 + a  # pending and the accepted drafts are cached; the bonus is pending
            self.accept(row, row.drafts[:a] + [h[a]], lg[:a + 1])
            row.pending = [h[a]]
            if self.mode == "lossless":
                self.new_drafts(row, h[k + 2:])
                if self.policy is not None:
                    self.score_drafts(row)
        if self.policy is not None and k == m and seen:  # a steady step, as decoding pays for it
            self.policy.observe(n, m, time.perf_counter() - t0)

    def block_step(self, busy):
        """block and adaptive: [pending][B-1 masks] after each row's cached tokens."""
        rows = list(self.slots) if self.fixed else busy
        live = [r is not None and not r.done for r in rows]
        items = [clean(r.pending, r.length) + masks(self.mask_id, r.length + len(r.pending), self.D)
                 if ok else [] for r, ok in zip(rows, live)]
        lengths = [r.length if ok else 0 for r, ok in zip(rows, live)]
        slots = [r.slot if ok else s for s, (r, ok) in enumerate(zip(rows, live))]
        logits = feed(self.model, self.cache, slots, lengths, items, self.B, self.fn, self.fixed)
        logits = logits[torch.tensor(live, device=self.device)]
        pos = torch.tensor([r.length + len(r.pending) for r in busy], device=self.device)
        self.finish_block(busy, logits, pos[:, None] + torch.arange(self.B, device=self.device))


def _confident_run(preds, probs, threshold):
    """Offsets 1.. of an adaptive step, kept while each is confident and differs from the token
    before it."""
    for k in range(1, len(preds)):
        if probs[k] < threshold or preds[k] == preds[k - 1]:
            break
        yield preds[k]


def calibrate(decoder, busy):
    """Time a forward of each k on the current rows (the best of three after a warm-up run, which
    also compiles it): the draft policy's prices at this batch size. These forwards write nothing
    that counts: every slot they fill lies past its row's length, overwritten by its next step."""
    rows = list(decoder.slots) if decoder.fixed else busy
    live = [r is not None and not r.done for r in rows]
    n, dev = len(rows), decoder.device
    slots = torch.tensor([r.slot if ok else s for s, (r, ok) in enumerate(zip(rows, live))],
                         device=dev)
    lengths = [r.length if ok else 0 for r, ok in zip(rows, live)]
    seconds = []
    for k in range(decoder.D + 1):
        tokens = torch.full((n, queries(k, k)), decoder.mask_id, device=dev)
        times = []
        for _ in range(4):  # a warm-up (and compilation), then the best of three
            t0 = time.perf_counter()
            feed_uniform(decoder.model, decoder.cache, slots, torch.tensor(lengths, device=dev),
                         max(lengths), tokens, decoder.shape(k, k), decoder.fn,
                         decoder.fixed)[0, 0, 0].item()
            times.append(time.perf_counter() - t0)
        seconds.append(min(times[1:]))
    decoder.policy.forward[decoder.policy.size(n)] = seconds


@torch.inference_mode()
def generate(model, prompts, mode="ar", max_new_tokens=256, *, block_size=None,
             mask_token_id=None, eos_token_id=None, batch_size=16, threshold=0.7, drafts="auto",
             temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, compile=False,
             progress=False, trace=None):
    """Decode many prompts at once with a per-row KV cache. mode: 'ar', 'block', 'adaptive' or
    'lossless'. prompts: a list of token-id lists (or one list of ints: one result, not a list).
    block_size and mask_token_id default to the model's config (next_block_size, mask_token_id);
    eos_token_id: an id or a list of ids that end an answer.

    Tokens are chosen greedily (temperature 0), or drawn from the filtered distribution (top_k,
    top_p, min_p, as HF generate) with a noise that depends on the prompt's seed and the position
    only: seed is an int (prompt i draws with seed + i) or one seed per prompt. A prompt's answer
    depends on its tokens, its seed and these settings only, never on the batch, its neighbours or
    the number of ranks; lossless gives ar's answer, token for token, in fewer forwards.
    drafts (lossless): 'auto' picks the drafts verified per step from measured cost and acceptance;
    an int k in [0, block_size-1] fixes them (block_size-1: every draft, k=0: ar steps).

    Returns, per prompt, (new token ids, {"tokens", "forwards", "shapes"}): forwards are the
    forwards the prompt took part in, its prefill included; shapes (lossless) counts its steps per
    "k,m". batch_size rows decode together; a finished row's slot takes the next prompt at once.
    compile=True compiles the decoding step (every step of a shape has the same shape). progress:
    a bar (or a line now and then) of answers done. trace=[]: the first prompt's forwards append
    (their tokens, their logits rows)."""
    single = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and isinstance(prompts[0], int)
    prompts = [list(prompts)] if single else [list(p) for p in prompts]
    B = block_size or getattr(model.config, "next_block_size", None) or 1
    mask_token_id = mask_token_id if mask_token_id is not None else \
        getattr(model.config, "mask_token_id", None)
    check_generate(prompts, mode, max_new_tokens, batch_size, B, mask_token_id, drafts)
    sampling = check_sampling(temperature, top_k, top_p, min_p)
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise UserError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts (give an int, or one "
                        "seed per prompt)")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    width = {"ar": 1, "block": 2 * B - 1, "adaptive": 2 * B - 1, "lossless": B * B}[mode]
    longest = max(len(p) for p in prompts)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and longest + max_new_tokens > limit:
        raise UserError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} is longer "
                        f"than the model's {limit} positions: shorten it or lower max_new_tokens")
    rows = min(batch_size, len(prompts))
    capacity = ceil_to(longest + max_new_tokens + width + B, 64)  # + B: the padding's slot
    policy = (draft_policy(model, B - 1, compile, sampling)
              if mode == "lossless" and drafts == "auto" else None)
    dec = Decoder(model, mode, rows, capacity, B, mask_token_id, eos, max_new_tokens, sampling,
                  threshold, policy, drafts, compile, trace)
    waiting, results = deque(range(len(prompts))), [None] * len(prompts)
    bar, tokens, forwards = Progress(len(prompts), "decoding", "answers", enabled=progress), 0, 0
    t0 = time.time()
    while waiting or any(dec.slots):
        new = []  # continuous batching: free slots take the next prompts, prefilled together
        for s in range(rows):
            if dec.slots[s] is None and waiting:
                i = waiting.popleft()
                dec.slots[s] = Row(i, prompts[i], seeds[i], s)
                new.append(dec.slots[s])
        if new:
            dec.prefill(new)
        busy = [r for r in dec.slots if r is not None and not r.done]
        if busy:
            dec.step(busy)
        for s, r in enumerate(dec.slots):
            if r is not None and r.done:
                stats = {"forwards": r.forwards, "tokens": len(r.out)}
                if mode == "lossless":
                    stats["shapes"] = dict(r.shapes)
                results[r.index] = (r.out, stats)
                dec.slots[s] = None
                tokens, forwards = tokens + len(r.out), forwards + r.forwards
                bar.update(1, f"{tokens / (time.time() - t0):.0f} tokens/s, "
                              f"{tokens / forwards:.2f} tokens/forward")
    bar.close()
    return results[0] if single else results


def check_generate(prompts, mode, max_new_tokens, batch_size, B, mask_token_id, drafts):
    """One line for the first argument of generate() that cannot work."""
    one_of("mode", mode, MODES)
    if not prompts:
        raise UserError("no prompts: there is nothing to decode")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty: there is nothing to decode from")
    at_least("max_new_tokens", max_new_tokens, 1)
    at_least("batch_size", batch_size, 1)
    if mode != "ar" and mask_token_id is None:
        raise UserError(f"mode {mode!r} needs a mask token: this model was not trained by train.py")
    if drafts != "auto" and not (isinstance(drafts, int) and 0 <= drafts <= B - 1):
        raise UserError(f"drafts={drafts!r}: expected 'auto' or an int in [0, {B - 1}] "
                        "(block_size - 1)")


def check_sampling(temperature, top_k, top_p, min_p):
    """The Sampling of these settings, or one line naming the one out of range."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise UserError(f"temperature={temperature!r}: must be a number >= 0 (0: greedy)")
    if not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"top_k={top_k!r}: must be an int >= 0 (0: off)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p!r}: must be in (0, 1] (1: off)")
    if not isinstance(min_p, (int, float)) or not 0 <= min_p < 1:
        raise UserError(f"min_p={min_p!r}: must be in [0, 1) (0: off)")
    return Sampling(float(temperature), top_k, float(top_p), float(min_p))


# -------------------------------------------------------------------------------------------------
# teacher forcing (tf, block_tf)

@torch.no_grad()
def teacher_forced(model, ids, spans, block_size, mask_token_id):
    """One forward in the training layout (block offset 0): block_metrics counts. With block_size
    1 it is plain teacher forcing: next-token accuracy over the response."""
    ex = data.build_example(ids, spans, block_size, mask_token_id if mask_token_id is not None
                            else -1)
    batch = to_device(data.collate([ex], len(ex["input_ids"])), next(model.parameters()).device)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=dense_mask(batch)).logits
    return block_metrics(logits.argmax(-1).cpu(), {k: v.cpu() for k, v in batch.items()},
                         block_size)


# -------------------------------------------------------------------------------------------------
# grading answers

def boxed(text):
    """The contents of the last \\boxed{...} (or \\fbox{...}) in text, nested braces included; None
    if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    i = text.find("{", start) if start >= 0 else -1
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text, pattern=""):
    """The answer in a text: answer_regex's group 1; else the last \\boxed{..}; else what follows
    "The answer is"; else what follows "####" (GSM8K); else the last number."""
    if pattern:
        m = re.search(pattern, text)
        return m.group(1).strip() if m else None
    found = boxed(text)
    if found is not None:
        return found.strip()
    for rule in (r"The answer is[:\s]*([^\n]*?)\.?\s*$", r"####\s*(.+?)\s*$"):
        m = re.search(rule, text.strip(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].rstrip(".") if numbers else None


def normalize_answer(answer):
    """A canonical form for comparing answers: no surrounding $ or spaces, \\text{..} and
    \\left/\\right unwrapped, \\dfrac as \\frac, a trailing period dropped, numbers as numbers
    (1,234 -> 1234, 1.0 -> 1)."""
    if answer is None:
        return None
    a = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer.strip().strip("$").strip())
    a = re.sub(r"\\(left|right|!|,|;)", "", a).replace("\\dfrac", "\\frac").replace("\\tfrac",
                                                                                     "\\frac")
    a = re.sub(r"\^\{?\\circ\}?", "", a).replace(" ", "").rstrip(".")
    number = a.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a) else a
    try:
        value = float(number)
        return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)
    except (ValueError, OverflowError):
        return a


def same_answer(text, target, pattern=""):
    """(graded, correct): whether the target has an answer, and whether text's answer equals it."""
    want = normalize_answer(extract_answer(target, pattern))
    if want is None:
        return False, False
    return True, normalize_answer(extract_answer(text, pattern)) == want


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(texts, target, pattern=""):
    """Whether the most common normalised answer among texts (ties: the first seen) is right."""
    answers = [normalize_answer(extract_answer(t, pattern)) for t in texts]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    return same_answer(max(votes, key=lambda a: (votes[a], -answers.index(a))), target, pattern)[1]


# -------------------------------------------------------------------------------------------------
# the command line: reading, reporting, writing

COLORS = ("\033[38;5;39m", "\033[38;5;208m")


def show(tokenizer, trace, use_color, verbose):
    """The generated text, each forward's tokens in alternating colours; with verbose, the top-5
    per token."""
    pieces = []
    for i, (tokens, logits) in enumerate(trace):
        text = tokenizer.decode(tokens)
        pieces.append(f"{COLORS[i % 2]}{text}\033[0m" if use_color else text)
        if verbose:
            print(f"  forward {i + 1}: {tokenizer.convert_ids_to_tokens(tokens)}")
            for t, p in zip(tokens, logits.softmax(-1)):
                top = p.topk(5)
                alts = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(j))!r} {v:.2f}"
                                 for v, j in zip(top.values.tolist(), top.indices.tolist()))
                print(f"    {tokenizer.convert_ids_to_tokens(t)!r:>14}  top-5: {alts}")
    return "".join(pieces) if use_color else " | ".join(pieces)


def table(rows):
    """Rows of dicts -> aligned text."""
    cols = list(rows[0])
    cells = [cols] + [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
                      for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def sampling_from(folder, temperature, top_k, top_p, min_p):
    """The Sampling the settings mean: 'auto' and None take the checkpoint's generation_config.json
    (as HF generate does: its values apply when it samples), greedy without one."""
    try:
        with open(os.path.join(folder, "generation_config.json")) as f:
            gen = json.load(f)
    except (OSError, ValueError):
        gen = {}
    sampled = bool(gen.get("do_sample"))
    if temperature == "auto":
        temperature = float(gen.get("temperature") or 1.0) if sampled else 0.0
    elif isinstance(temperature, str):
        try:
            temperature = float(temperature)
        except ValueError:
            raise UserError(f"temperature={temperature!r}: expected 'auto' or a number") from None
    defaults = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
    chosen = {k: v if v is not None else gen.get(k) if sampled and gen.get(k) is not None
              else defaults[k] for k, v in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p))}
    return check_sampling(temperature, **chosen)


def read_prompts(conversation, path):
    """(prompt messages, prompt ids, (ids, spans) of the whole conversation or None, reference
    answer or None, tools) per sample: --prompt, or the first num_samples rows of data_files."""
    if prompt:
        rows = [([{"role": "user", "content": prompt}], 1, None, "--prompt")]
    else:
        rows = chat.read_rows(expand_files(data_files), prompt_key, response_key, messages_key,
                              tools_key, require_target=False)[:num_samples or None]
    samples = []
    for messages, first, tools, where in rows:
        asked, target = chat.split_for_decoding(messages, first)
        try:
            whole = conversation.encode(messages, first, tools)[:2] if target is not None else None
            samples.append((asked, conversation.prompt_ids(asked, tools), whole, target, tools))
        except chat.TemplateError as e:
            raise UserError(f"{where}: the chat template refused this conversation: {e}") from None
    return samples


def summary_row(name, merged, wall, counts, samples, k, B):
    """One line of the summary table from every rank's results: (tokens, forwards, text) per
    answer for decoding, block_metrics counts for tf and block_tf."""
    tokens, forwards = sum(r[0] for r in merged.values()), sum(r[1] for r in merged.values())
    row = {"scenario": name, "samples": len(merged), "tokens": tokens, "forwards": forwards,
           "tokens/forward": tokens / max(forwards, 1), "wall_s": wall,
           "tokens/s": tokens / max(wall, 1e-9)}
    if name in ("tf", "block_tf"):
        if counts:
            metrics = summarize_metrics(sum(counts), 1 if name == "tf" else B)
            row["accuracy"] = metrics["acc@0"] if name == "tf" else \
                " ".join(f"{metrics[f'acc@{i}']:.2f}" for i in range(B))
            row["tokens/forward"] = metrics["tpf_tf"] if name == "block_tf" else ""
        return row
    graded = [i for i in range(len(samples)) if samples[i][3] is not None
              and same_answer("", samples[i][3], answer_regex)[0]]
    if graded:
        texts = {i: [merged[i * k + s][2] for s in range(k)] for i in graded}
        right = {i: sum(same_answer(t, samples[i][3], answer_regex)[1] for t in texts[i])
                 for i in graded}
        row["accuracy"] = sum(right.values()) / (k * len(graded))
        if k > 1:
            row[f"maj@{k}"] = sum(majority_correct(texts[i], samples[i][3], answer_regex)
                                  for i in graded) / len(graded)
            row[f"pass@{k}"] = sum(pass_at_k(k, right[i], k) for i in graded) / len(graded)
    return row


def write_answers(path, samples, answers, k, opened):
    """Each prompt with each finished answer as a training row (prompt messages, target = the
    answer as an assistant turn, opened with what the generation prompt opened), for train.py."""
    rows = [{"prompt": samples[j // k][0],
             "target": [{"role": "assistant", "content": opened + text}]}
            for j, (text, finished) in sorted(answers.items()) if finished]
    table_ = pa.Table.from_pylist(rows)
    pq.write_table(table_, path + ".tmp")
    os.replace(path + ".tmp", path)
    return len(rows)


# -------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    config = configure(globals())
    check_sample(config, dist_info()[2])  # every value, before anything slow happens
    resolve_device(device)
    wanted = list(SCENARIOS) if scenario == "all" else [s.strip() for s in scenario.split(",")]
    path = find_hf_folder(ckpt or out_dir)
    model_config = load_config(path)
    mask_id = getattr(model_config, "mask_token_id", None)
    trained = getattr(model_config, "next_block_size", None)
    if mask_id is None:
        blocky = [s for s in wanted if s not in ("ar", "tf")]
        if scenario != "all" and blocky:
            raise UserError(f"{path} has no mask token (config.mask_token_id): not trained by "
                            f"train.py, so {', '.join(blocky)} cannot run; ar and tf can")
        print0(f"note: {path} has no mask token: running ar and tf only")
        wanted = [s for s in wanted if s in ("ar", "tf")]
    if block_size and trained and block_size != trained:
        print0(f"warning: block_size={block_size} but the model was trained with {trained}: "
               f"using {trained}")
    B, k = trained or block_size or 4, samples_per_prompt
    drafts = int(drafts) if str(drafts).isdigit() else drafts
    if drafts != "auto" and not (isinstance(drafts, int) and drafts < B):
        raise UserError(f"drafts={drafts!r}: expected 'auto' or an int in [0, {B - 1}] "
                        "(block_size - 1)")
    sampling = sampling_from(path, temperature, top_k, top_p, min_p)
    if tensor_parallel > 1:
        tp_plan(model_config, tensor_parallel)  # the model's plan and sizes, before loading it
    rank, _, world, dev = compute_init(device)
    mesh = device_mesh(dev, tensor_parallel)
    dp, dp_rank = world // tensor_parallel, mesh["dp"].get_local_rank() if mesh else 0
    model, tokenizer, _ = load_for_decoding(path, dev, mesh["tp"] if tensor_parallel > 1 else None)
    model = model.to(getattr(torch, dtype))
    options = chat_template_kwargs if chat_template_kwargs is not None else \
        getattr(model.config, "chat_template_kwargs", None) or {}
    conversation = chat.Chat(tokenizer, options, prompt_format)
    samples, eos = read_prompts(conversation, path), conversation.stop_ids()
    mine = list(range(dp_rank, len(samples) * k, dp))  # each group decodes its share of the answers
    use_color = sys.stdout.isatty() if color is None else color
    how = "greedy" if sampling.temperature == 0 else ", ".join(f"{f} {v}" for f, v in zip(
        sampling._fields, sampling))
    print0(f"checkpoint {path} | block_size {B} | mask token {mask_id} | {len(samples)} prompts x "
           f"{k} | {how} | batch_size {batch_size} | device {dev}"
           + (f" x {world} ranks" if world > 1 else "")
           + (f" (tensor parallel {tensor_parallel})" if tensor_parallel > 1 else ""))
    if k > 1 and sampling.temperature == 0:
        print0(f"note: greedy decoding gives the same answer {k} times (set temperature)")

    summary, outputs = {}, {}
    for name in wanted:
        t0, counts, results = time.time(), None, {}
        if name in ("tf", "block_tf"):
            for i in range(dp_rank, len(samples), dp):
                if samples[i][2] is not None:
                    c = teacher_forced(model, *samples[i][2], 1 if name == "tf" else B, mask_id)
                    counts = c if counts is None else counts + c
                    results[i] = (sum(e - s for s, e in samples[i][2][1]), 1)
        else:
            trace = [] if rank == 0 else None
            decoded = generate(model, [samples[j // k][1] for j in mine], name, max_new_tokens,
                               block_size=B, mask_token_id=mask_id, eos_token_id=eos,
                               batch_size=batch_size, threshold=threshold, drafts=drafts,
                               seed=[seed + j for j in mine], compile=compile,
                               progress=rank == 0, trace=trace, **sampling._asdict())
            for j, (new, stats) in zip(mine, decoded):
                finished = bool(new) and new[-1] in eos
                text = tokenizer.decode(new, skip_special_tokens=True)
                raw = tokenizer.decode(new[:-1] if finished else new)
                results[j] = (stats["tokens"], stats["forwards"], text, new, raw, finished)
            if trace is not None:
                print(f"\n[{name}] sample 0, {len(decoded[0][0])} tokens in "
                      f"{decoded[0][1]['forwards']} forwards:")
                print(show(tokenizer, trace, use_color, verbose), flush=True)
        wall = max(all_gather(time.time() - t0))
        merged = {i: r for part in all_gather(results) for i, r in part.items()}
        counts = [c for c, r in zip(all_gather(counts), range(world)) if c is not None and
                  r % tensor_parallel == 0]  # a group's ranks counted the same
        summary[name] = summary_row(name, merged, wall, counts, samples, k, B)
        if name in MODES:
            outputs[name] = merged
    for name, row in summary.items():
        if name in MODES and "ar" in summary:
            row["speedup"] = row["tokens/s"] / max(summary["ar"]["tokens/s"], 1e-9)
        if name in MODES and name != "ar" and "ar" in outputs:
            same = sum(outputs[name][j][3] == outputs["ar"][j][3] for j in outputs["ar"])
            row["same_as_ar"] = f"{same}/{len(outputs['ar'])}"
    columns = ["scenario", "samples", "tokens", "forwards", "tokens/forward", "wall_s", "tokens/s",
               "speedup", "accuracy", *([f"maj@{k}", f"pass@{k}"] if k > 1 else []), "same_as_ar"]
    print0("\n" + table([{c: r.get(c, "") for c in columns} for r in summary.values()]))
    if summary_json and rank == 0:
        with open(summary_json, "w") as f:
            json.dump({"checkpoint": path, "block_size": B, "batch_size": batch_size,
                       "samples_per_prompt": k, "sampling": sampling._asdict(),
                       "world_size": world, "scenarios": summary}, f, indent=1)
    if write_parquet and rank == 0 and outputs:
        name = next((s for s in ("lossless", "ar") if s in outputs), next(iter(outputs)))
        opened = conversation.generation[len(conversation.header):]
        answers = {j: (r[4], r[5]) for j, r in outputs[name].items()}
        n = write_answers(write_parquet, samples, answers, k, opened)
        print0(f"wrote {n} rows to {write_parquet} (the {name} answers; {len(answers) - n} that "
               "hit max_new_tokens left out)")
    compute_cleanup()
