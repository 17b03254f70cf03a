"""
Decode with a next-block model: every scenario (docs/design.md, "Decoding"), batched over many
prompts with a per-row KV cache, greedy or sampled, each row with its own settings; then the
command line.

  python sample.py                     # the demo: newest checkpoint in out/demo, held-out problems
  python sample.py --ckpt=out/x --data_files=test.parquet --scenario=lossless --batch_size=64
  python sample.py --temperature=0.6 --top_p=0.95 --samples_per_prompt=4   # sampled, avg/maj/pass@4
  python sample.py --prompt='What is 123+456?' --scenario=ar,lossless --verbose=True
  python sample.py --data_files=train.parquet --num_samples=0 --scenario=lossless \
      --write_parquet=own.parquet      # the model's own answers, as training rows
  torchrun --standalone --nproc_per_node=8 sample.py --ckpt=out/x --data_files=test.parquet

Scenarios (the research trainer's numbering in brackets):
  ar        next-token decoding, the baseline [1]
  tf        teacher forcing over prompt + target: next-token accuracy (the overfit test) [1.1]
  block     each forward over [pending][B-1 masks] emits B tokens, all accepted (lossy) [2]
  block_tf  one forward in the training layout: accuracy per offset and tpf_tf [2.1]
  adaptive  like block, keeping offsets while the chosen token's probability >= threshold and it
            repeats no token [3]
  lossless  self-speculative: drafts verified by the clean stream in the same forward; output == ar
Under torchrun each rank decodes its share of the samples and rank 0 prints one summary.

The engine under generate() is the Decoder: rows join it (their prompts prefilled), step together
and leave when they finish, each with its own sampling, seed, stop tokens and length; serve.py
drives the same Decoder from its request queue.
"""

# configurator first: from here on a mistake, or a Ctrl-C while torch loads, prints one line
from configurator import SCENARIOS, UserError, at_least, check_sample, configure, one_of
import json
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

import chat
import data
import formats
import grade
from checkpoint import find_hf_folder, load_for_decoding
from common import (Progress, all_gather, ceil_to, compute_cleanup, compute_init, device_mesh,
                    dist_info, print0, resolve_device, text_table, to_device)
from cache import Forward, RowCache, clean, compiled_forward, every_group, feed, feed_uniform, \
    masks, model_forward, moved, stack_shapes, step_shape
from mask import dense_mask
from model import block_metrics, load_config, set_gate, summarize_metrics, tp_plan
from policy import calibrate, draft_policy
from sampling import (GREEDY, Sampling, check_sampling, choose_rows, generation_defaults,
                      never_written, sampling_from, stop_ids)
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
write_jsonl = ""                 # the same rows as JSON lines in the OpenAI `messages` shape
device = "auto"                  # 'auto', 'cpu', 'cuda'
dtype = "float32"                # 'float32' (lossless == ar exactly) or 'bfloat16'
tensor_parallel = 1              # under torchrun: ranks sharding the model (TP); each group of them
#                                  decodes its share of the answers
# -------------------------------------------------------------------------------------------------
MODES = ("ar", "block", "adaptive", "lossless")


# -------------------------------------------------------------------------------------------------
# decoding: rows, prefill, steps

@dataclass(eq=False)
class Row:
    """One answer: its prompt and settings (how tokens are chosen, the seed of its draws, the
    tokens that end it, its most new tokens), and its state while it decodes in a cache row."""
    prompt: list
    seed: int = 0
    sampling: Sampling = GREEDY
    stops: frozenset = frozenset()
    max_new: int = 256
    key: object = None  # the caller's name for it (generate: the prompt's index)
    trace: list = None  # a list: each forward's (tokens accepted, their logits) are appended
    slot: int = -1  # its cache row
    length: int = 0  # verified tokens in the cache
    pending: list = None  # verified tokens not yet in it (the prompt, until its prefill)
    drafts: list = field(default_factory=list)  # the drafts of the last lossless step
    out: list = field(default_factory=list)  # the answer so far
    forwards: int = 0  # the forwards it took part in
    shapes: Counter = field(default_factory=Counter)  # its lossless steps per "k,m"
    finish: str = None  # why it ended: 'stop' (a stop token), 'length', or the caller's reason
    scoring: list = field(default_factory=list)  # (where in out, drafts) the policy will score

    def __post_init__(self):
        self.prompt = list(self.prompt)
        self.pending = list(self.prompt)

    @property
    def done(self):
        return self.finish is not None


def step_width(mode, B):
    """The most new tokens a row feeds in one forward of this mode."""
    return {"ar": 1, "block": 2 * B - 1, "adaptive": 2 * B - 1, "lossless": B * B}[mode]


class Fed(NamedTuple):
    """The rows a step feeds: each one's Row (None: an idle cache row fed as padding), whether it
    decodes, its cache row and its cached token count."""
    rows: list
    live: list
    slots: list
    lengths: list


class Decoder:
    """The engine: a KV cache of `rows` rows and the answers decoding in them (docs/design.md,
    "Decoding"). Rows `join` (their prompts prefilled together), `step` together, one forward per
    step, and are `release`d once done; each keeps its own sampling, seed, stops and length.

    ar and lossless steps read what they feed from tensors on the device, one entry per cache row:
    for every live row r, length[r.slot] == r.length, last[r.slot] == r.pending[0] (its one
    verified token not yet cached), draft[r.slot, :len(r.drafts)] == r.drafts and seed[r.slot] ==
    r.seed. A step updates both sides from the same tokens."""

    def __init__(self, model, *, mode, rows, capacity, block_size, mask_token_id, threshold=0.7,
                 drafts=0, policy=None, compiled=False, suppress=()):
        one_of("mode", mode, MODES)
        self.model, self.mode, self.mask_id, self.threshold = model, mode, mask_token_id, threshold
        self.B, self.D = block_size, block_size - 1
        self.drafts, self.policy = drafts, policy  # lossless: a fixed count, or a DraftPolicy
        self.device = next(model.parameters()).device
        layers = model.config.get_text_config().num_hidden_layers
        never = sorted(set(suppress) | ({mask_token_id} if mask_token_id is not None else set()))
        self.f = Forward(model, RowCache(layers, rows, capacity, self.device),
                         compiled_forward(model) if compiled else model_forward, compiled,
                         torch.tensor(never, device=self.device) if never else None)
        self.slots = [None] * rows  # the Row in each cache row
        self.shapes = {}
        self.tp_mesh = getattr(model, "next_block_tp", (None,))[0]  # tensor parallel: a group
        zeros = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.length, self.last, self.seed = zeros, zeros.clone(), zeros.clone()
        self.draft = torch.zeros(rows, max(self.D, 1), dtype=torch.long, device=self.device)
        self.every = torch.arange(rows, device=self.device)

    @property
    def free(self):
        return self.slots.count(None)

    @property
    def busy(self):
        return [r for r in self.slots if r is not None and not r.done]

    def join(self, rows):
        """Take rows into free cache rows and prefill them together (one forward)."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        if len(rows) > len(free):
            raise ValueError(f"{len(rows)} rows join a decoder with {len(free)} free")
        for row, s in zip(rows, free):
            row.slot, self.slots[s] = s, row
        if rows:
            self.prefill(rows)

    def release(self):
        """The rows that are done, their cache rows freed."""
        done = [r for r in self.slots if r is not None and r.done]
        for r in done:
            self.slots[r.slot] = None
        return done

    def fed(self):
        """The rows a step feeds: the busy ones, or with compile every cache row (one shape: idle
        ones as padding at their own slot, nothing cached)."""
        rows = list(self.slots) if self.f.compiled else self.busy
        live = [r is not None and not r.done for r in rows]
        slots = [r.slot if ok else s for s, (r, ok) in enumerate(zip(rows, live))]
        return Fed(rows, live, slots, [r.length if ok else 0 for r, ok in zip(rows, live)])

    def agree(self, m, after):
        """The ranks of a tensor-parallel group step with the same shape: group rank 0's choice of
        drafts and groups (both come from each rank's own timings, which differ)."""
        if self.tp_mesh is None or self.policy is None:
            return m, after
        group = self.tp_mesh.get_group()
        choice = torch.full((self.D + 2,), -1, device=self.device)  # m, then `after`, -1 padded
        choice[0], choice[1:len(after) + 1] = m, torch.tensor(after, device=self.device)
        dist.broadcast(choice, src=dist.get_global_rank(group, 0), group=group)
        m, *after = choice.tolist()
        return m, tuple(a for a in after if a >= 0)

    def shape(self, k, m, after=None):
        after = every_group(k) if after is None else after
        if (k, m, after) not in self.shapes:
            self.shapes[k, m, after] = step_shape(k, m, self.device, after)
        return self.shapes[k, m, after]

    def choose(self, rows, logits, positions, seeds, with_prob=False):
        settings = [r.sampling if r is not None else GREEDY for r in rows]
        return choose_rows(logits, positions, seeds, settings, with_prob)

    def accept(self, row, new, logits):
        """Append new tokens to row's output until a stop token or its max_new."""
        kept = []
        for t in new:
            row.out.append(t)
            kept.append(t)
            if t in row.stops or len(row.out) >= row.max_new:
                row.finish = "stop" if t in row.stops else "length"
                break
        if row.trace is not None:
            row.trace.append((kept, logits[:len(kept)]))
        return kept

    def new_drafts(self, row, drafts, scored=True):
        row.drafts = drafts
        if self.policy is None or not (drafts or row.scoring):  # an ar step: nothing to score
            return
        if scored and drafts:  # fillers say nothing about the model's drafts
            row.scoring.append((len(row.out), drafts))
        waiting = []  # score the drafts whose tokens are written (or never will be: it is done)
        for at, ds in row.scoring:
            if row.done or len(row.out) >= at + len(ds):
                self.policy.score(ds, row.out[at:at + len(ds)])
            else:
                waiting.append((at, ds))
        row.scoring = waiting

    def prefill(self, rows):
        """The first forward of new rows: [prompt] (ar) or [prompt][B-1 masks]."""
        D = 0 if self.mode == "ar" else self.D
        items = [clean(r.pending, 0) + masks(self.mask_id, len(r.pending), D) for r in rows]
        logits = feed(self.f, [r.slot for r in rows], [0] * len(rows), items, D + 1, eager=True)
        pos = torch.tensor([len(r.pending) for r in rows], device=self.device)[:, None]
        self.finish_block(rows, logits, pos + torch.arange(D + 1, device=self.device))

    def finish_block(self, rows, logits, positions):
        """What each row accepts from a forward over [pending][masks] (prefill, block, adaptive):
        the token after pending, then (block) every offset, (adaptive) the confident ones, or
        (lossless) none: they are the first drafts."""
        seeds = torch.tensor([r.seed for r in rows], device=self.device)
        tokens, probs = self.choose(rows, logits, positions, seeds, with_prob=True)
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
            elif self.mode in ("ar", "lossless"):
                new, drafts = new[:1], new[1:]
            kept = self.accept(row, new, lg)
            row.pending = kept if self.mode in ("block", "adaptive") else new
            if self.mode == "lossless":
                self.new_drafts(row, drafts)

    def step(self):
        """One decoding step of the busy rows (all rows with compile: one shape, one graph)."""
        busy = self.busy
        if not busy:
            return
        if self.mode in ("block", "adaptive"):
            return self.block_step()
        fed = self.fed()
        if self.policy is not None and not self.policy.calibrated(len(fed.rows)):
            calibrate(self.policy, self.f, fed.slots, fed.lengths, self.mask_id, self.shape)
        t0 = time.perf_counter()
        n, found = len(fed.rows), min(len(r.drafts) for r in busy)
        m, after = (self.drafts if self.mode == "lossless" else 0), None  # ar: m = 0
        if self.policy is not None:  # lossless, drafts='auto'
            m = self.policy.best(n)
            m, after = self.agree(m, self.policy.groups(n, min(m, found)))
        k = min(m, found)
        after = every_group(k) if after is None else after
        dev, seen = self.device, (k, m, after) in self.shapes
        shape = self.shape(k, m, after)
        real = [k - r.drafts[:k].count(self.mask_id) if ok else k
                for r, ok in zip(fed.rows, fed.live)]  # drafts before the fillers
        if min(real, default=k) < k:  # rows whose drafts end early: a group right after them
            shape = stack_shapes([self.shape(k, m, moved(after, r)) for r in real])
        at = self.every if n == len(self.slots) else torch.tensor(fed.slots, device=dev)
        length, seeds = self.length[at], self.seed[at]
        group_masks = length.new_full((n, len(after) * m), self.mask_id if m else 0)
        tokens = torch.cat([self.last[at, None], self.draft[at, :k], group_masks], 1)
        logits = feed_uniform(self.f, at, length, max(fed.lengths), tokens, shape)
        pos = length[:, None] + 1 + torch.arange(k + 1, device=dev)
        verified = self.choose(fed.rows, logits[:, :k + 1], pos, seeds)
        accepted = (tokens[:, 1:k + 1] == verified[:, :k]).long().cumprod(1).sum(1)
        bonus = verified.gather(1, accepted[:, None])
        grown = length + 1 + accepted
        if not all(fed.live):  # idle cache rows of a compiled step stay empty (else they would
            grown = grown * torch.tensor(fed.live, device=dev)  # grow past the capacity)
        self.length[at], self.last[at] = grown, bonus[:, 0]
        out = [verified, accepted[:, None]]
        if m:  # the next drafts: those of the group after the last accepted token, or where no
            # group follows it (a partial acceptance) the later ones of the last group before it,
            # which drafted the tokens just written and those after them, then fillers (never
            # right: the mask token)
            group = shape.group.expand(n, -1).gather(1, accepted[:, None])[:, 0]
            skip = shape.skip.expand(n, -1).gather(1, accepted[:, None])
            drafted = skip[:, 0] == 0
            offset = skip + torch.arange(m, device=dev)
            index = group[:, None] * m + offset.clamp(max=m - 1)
            groups = logits[:, k + 1:][torch.arange(n, device=dev)[:, None], index]
            gpos = (length + accepted)[:, None] + 2 + torch.arange(m, device=dev)
            drafts = self.choose(fed.rows, groups, gpos, seeds)
            out += [drafted[:, None].long(), torch.where(offset < m, drafts, self.mask_id)]
            self.draft[at, :m] = out[-1]
        host = torch.cat(out, 1).tolist()
        for row, ok, lg, h in zip(fed.rows, fed.live, logits, host):
            if not ok:  # an idle cache row of a compiled step: its state is unused
                continue
            a = h[k + 1]
            row.forwards += 1
            row.shapes[f"{k},{m}" + (f",{len(after)}" if len(after) != k + 1 else "")] += 1
            row.length += 1 + a  # pending and the accepted drafts are cached; the bonus is pending
            self.accept(row, row.drafts[:a] + [h[a]], lg[:a + 1])
            row.pending = [h[a]]
            if self.mode == "lossless":  # m = 0: an ar step, no drafts
                self.new_drafts(row, h[k + 3:] if m else [], scored=bool(m and h[k + 2]))
        if self.policy is not None and seen:  # compiled and warm: as decoding pays for it
            self.policy.observe(n, k, m, time.perf_counter() - t0, after)

    def block_step(self):
        """block and adaptive: [pending][B-1 masks] after each row's cached tokens."""
        fed = self.fed()
        items = [clean(r.pending, r.length) + masks(self.mask_id, r.length + len(r.pending), self.D)
                 if ok else [] for r, ok in zip(fed.rows, fed.live)]
        logits = feed(self.f, fed.slots, fed.lengths, items, self.B)
        busy = [r for r, ok in zip(fed.rows, fed.live) if ok]
        logits = logits[torch.tensor(fed.live, device=self.device)]
        pos = torch.tensor([r.length + len(r.pending) for r in busy], device=self.device)
        self.finish_block(busy, logits, pos[:, None] + torch.arange(self.B, device=self.device))


def _confident_run(preds, probs, threshold):
    """Offsets 1.. of an adaptive step, kept while each is confident and differs from the token
    before it."""
    for k in range(1, len(preds)):
        if probs[k] < threshold or preds[k] == preds[k - 1]:
            break
        yield preds[k]


def check_drafts(drafts, B):
    if drafts != "auto" and not (isinstance(drafts, int) and not isinstance(drafts, bool)
                                 and 0 <= drafts <= B - 1):
        raise UserError(f"drafts={drafts!r}: expected 'auto' or an int in [0, {B - 1}] "
                        "(block_size - 1)")
    return drafts


def check_length(model, longest, max_new_tokens):
    """One line when a prompt of `longest` tokens plus its answer does not fit the model."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and longest + max_new_tokens > limit:
        raise UserError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} is longer "
                        f"than the model's {limit} positions: shorten it or lower max_new_tokens")


def model_block(model, block_size=None, mask_token_id=None):
    """(block size, mask token id): the given ones, else the model's config's."""
    B = block_size or getattr(model.config, "next_block_size", None) or 1
    mask = mask_token_id if mask_token_id is not None else getattr(model.config, "mask_token_id",
                                                                  None)
    return B, mask


@torch.inference_mode()
def generate(model, prompts, mode="ar", max_new_tokens=256, *, block_size=None,
             mask_token_id=None, eos_token_id=None, batch_size=16, threshold=0.7, drafts="auto",
             temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, suppress_tokens=(),
             compile=False, progress=False, trace=None):
    """Decode many prompts at once with a per-row KV cache (README, "Decoding", shows a call).
    mode: 'ar', 'block', 'adaptive' or 'lossless'. prompts: token-id lists (or one list of ints: one
    result, not a list). block_size and mask_token_id default to the model's config; eos_token_id:
    an id or ids that end an answer; suppress_tokens: ids never written (the mask token never is).

    Tokens are chosen greedily (temperature 0), or drawn from the filtered distribution (top_k,
    top_p, min_p, as HF generate) with a noise of (seed, position) only: seed is an int (prompt i
    draws with seed + i) or one per prompt. An answer depends on its prompt, its seed and these
    settings only, never on the batch or the ranks; lossless gives ar's answer in fewer forwards,
    verifying per step `drafts`: 'auto' (chosen from measured cost and acceptance) or an int in
    [0, block_size - 1].

    Returns per prompt (new token ids, {"tokens", "forwards", "shapes"}): forwards it took part
    in, its prefill included; shapes (lossless): its steps per "k,m". batch_size rows decode
    together, a finished row's cache row taking the next prompt at once. compile=True: one shape
    per step, compiled. progress: a bar of answers done. trace=[]: the first prompt's forwards
    append (their tokens, their logits rows)."""
    single = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and isinstance(prompts[0], int)
    prompts = [list(prompts)] if single else [list(p) for p in prompts]
    B, mask_token_id = model_block(model, block_size, mask_token_id)
    check_generate(prompts, mode, max_new_tokens, batch_size, B, mask_token_id, drafts)
    sampling = check_sampling(temperature, top_k, top_p, min_p)
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise UserError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts (give an int, or one "
                        "seed per prompt)")
    stops = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    longest = max(len(p) for p in prompts)
    check_length(model, longest, max_new_tokens)
    rows = min(batch_size, len(prompts))
    capacity = ceil_to(longest + max_new_tokens + step_width(mode, B) + B, 64)  # + B: padding's
    policy = (draft_policy(model, B - 1, compile, sampling)
              if mode == "lossless" and drafts == "auto" else None)
    dec = Decoder(model, mode=mode, rows=rows, capacity=capacity, block_size=B,
                  mask_token_id=mask_token_id, threshold=threshold,
                  drafts=0 if drafts == "auto" else drafts, policy=policy, compiled=compile,
                  suppress=suppress_tokens)
    waiting = deque(Row(p, seed=s, sampling=sampling, stops=stops, max_new=max_new_tokens, key=i,
                        trace=trace if i == 0 else None)
                    for i, (p, s) in enumerate(zip(prompts, seeds)))
    results = [None] * len(prompts)
    bar, tokens, forwards = Progress(len(prompts), "decoding", "answers", enabled=progress), 0, 0
    t0 = time.time()
    while waiting or dec.busy:
        # continuous batching: free cache rows take the next prompts, prefilled together
        dec.join([waiting.popleft() for _ in range(min(dec.free, len(waiting)))])
        dec.step()
        for r in dec.release():
            stats = {"forwards": r.forwards, "tokens": len(r.out)}
            if mode == "lossless":
                stats["shapes"] = dict(r.shapes)
            results[r.key] = (r.out, stats)
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
    check_drafts(drafts, B)


# -------------------------------------------------------------------------------------------------
# teacher forcing (tf, block_tf)

@torch.no_grad()
def teacher_forced(model, ids, spans, block_size, mask_token_id):
    """One forward in the training layout (block offset 0): block_metrics counts. With block_size
    1 it is plain teacher forcing: next-token accuracy over the response."""
    ex = data.build_example(ids, spans, block_size, mask_token_id if mask_token_id is not None
                            else -1)
    batch = to_device(data.collate([ex], len(ex["input_ids"])), next(model.parameters()).device)
    set_gate(model, batch["is_mask"])  # a gated adapter (lora.py) acts on the masks
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=dense_mask(batch)).logits
    set_gate(model, None)
    return block_metrics(logits.argmax(-1).cpu(), {k: v.cpu() for k, v in batch.items()},
                         block_size)


# -------------------------------------------------------------------------------------------------
# the command line: reading, decoding, reporting, writing

class Prompt(NamedTuple):
    """A prompt to decode, read from data_files or --prompt."""
    messages: list  # the conversation up to the turn decoded
    ids: list  # its token ids, the generation prompt included
    whole: tuple  # (ids, spans) of the whole conversation, for tf and block_tf; None: no target
    target: str  # the reference answer, or None
    tools: list  # tool schemas handed to the template, or None


class Answer(NamedTuple):
    """One decoded answer."""
    tokens: list  # its new token ids
    forwards: int  # the forwards it took part in
    text: str  # decoded, special tokens skipped
    raw: str  # decoded as written, its stop token left out (a training row's target)
    finished: bool  # it ended with a stop token (not at max_new_tokens)


def read_prompts(conversation, text, files, keys, n):
    """The Prompts: text (--prompt) as one user message, or the first n rows of files (0: all);
    keys: (prompt_key, response_key, messages_key, tools_key)."""
    if text:
        rows = [([{"role": "user", "content": text}], 1, None, "--prompt")]
    else:
        rows = chat.read_rows(expand_files(files), *keys, require_target=False)[:n or None]
    prompts = []
    for messages, first, tools, where in rows:
        asked, target = chat.split_for_decoding(messages, first)
        try:
            whole = conversation.encode(messages, first, tools)[:2] if target is not None else None
            prompts.append(Prompt(asked, conversation.prompt_ids(asked, tools), whole, target,
                                  tools))
        except chat.TemplateError as e:
            raise UserError(f"{where}: the chat template refused this conversation: {e}") from None
    return prompts


def decode_answers(model, tokenizer, prompts, mode, mine, k, settings, stops, traced):
    """{j: Answer} for this rank's answers `mine` (answer j: prompt j // k, drawn with seed + j);
    settings: generate()'s keyword arguments. traced: show the first answer's forwards."""
    trace = [] if traced else None
    decoded = generate(model, [prompts[j // k].ids for j in mine], mode,
                       seed=[settings["seed"] + j for j in mine], trace=trace,
                       progress=traced, **{s: v for s, v in settings.items() if s != "seed"})
    answers = {}
    for j, (new, stats) in zip(mine, decoded):
        finished = bool(new) and new[-1] in stops
        answers[j] = Answer(new, stats["forwards"], tokenizer.decode(new, skip_special_tokens=True),
                            tokenizer.decode(new[:-1] if finished else new), finished)
    if trace is not None and decoded:
        print(f"\n[{mode}] sample 0, {len(decoded[0][0])} tokens in {decoded[0][1]['forwards']} "
              "forwards:")
        print(show(tokenizer, trace, use_color, verbose), flush=True)
    return answers


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


def summary_row(name, sizes, wall):
    """One line of the summary table: sizes, (tokens, forwards) per answer of every rank."""
    tokens, forwards = sum(t for t, _ in sizes), sum(f for _, f in sizes)
    return {"scenario": name, "samples": len(sizes), "tokens": tokens, "forwards": forwards,
            "tokens/forward": tokens / max(forwards, 1), "wall_s": wall,
            "tokens/s": tokens / max(wall, 1e-9)}


def teacher_columns(name, counts, B):
    """tf: next-token accuracy; block_tf: accuracy per offset and tpf_tf (block_metrics counts)."""
    if not counts:
        return {}
    metrics = summarize_metrics(sum(counts), 1 if name == "tf" else B)
    if name == "tf":
        return {"accuracy": metrics["acc@0"], "tokens/forward": ""}
    return {"accuracy": " ".join(f"{metrics[f'acc@{i}']:.2f}" for i in range(B)),
            "tokens/forward": metrics["tpf_tf"]}


def training_rows(prompts, answers, k, opened):
    """Each prompt with each finished answer as a conversation: the prompt's messages, then the
    answer as an assistant turn, opened with what the generation prompt opened."""
    return [{"prompt": prompts[j // k].messages, "tools": prompts[j // k].tools,
             "target": [{"role": "assistant", "content": opened + a.raw}]}
            for j, a in sorted(answers.items()) if a.finished]


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
    drafts = check_drafts(int(drafts) if str(drafts).isdigit() else drafts, B)
    sampling = sampling_from(generation_defaults(path), temperature, top_k, top_p, min_p)
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
    prompts = read_prompts(conversation, prompt, data_files,
                           (prompt_key, response_key, messages_key, tools_key), num_samples)
    stops = stop_ids(conversation, path)
    settings = dict(block_size=B, mask_token_id=mask_id, eos_token_id=stops, batch_size=batch_size,
                    threshold=threshold, drafts=drafts, seed=seed, compile=compile,
                    max_new_tokens=max_new_tokens,
                    suppress_tokens=never_written(conversation, mask_id, stops),
                    **sampling._asdict())
    mine = list(range(dp_rank, len(prompts) * k, dp))  # each group decodes its share of answers
    use_color = sys.stdout.isatty() if color is None else color
    how = "greedy" if sampling.temperature == 0 else ", ".join(
        f"{f} {v}" for f, v in zip(sampling._fields, sampling))
    print0(f"checkpoint {path} | block_size {B} | mask token {mask_id} | {len(prompts)} prompts x "
           f"{k} | {how} | batch_size {batch_size} | device {dev}"
           + (f" x {world} ranks" if world > 1 else "")
           + (f" (tensor parallel {tensor_parallel})" if tensor_parallel > 1 else ""))
    if k > 1 and sampling.temperature == 0:
        print0(f"note: greedy decoding gives the same answer {k} times (set temperature)")

    summary, outputs = {}, {}
    for name in wanted:
        t0 = time.time()
        if name in ("tf", "block_tf"):
            counts, sizes = None, {}
            for i in range(dp_rank, len(prompts), dp):
                if prompts[i].whole is not None:
                    c = teacher_forced(model, *prompts[i].whole, 1 if name == "tf" else B, mask_id)
                    counts = c if counts is None else counts + c
                    sizes[i] = (sum(e - s for s, e in prompts[i].whole[1]), 1)
            counts = [c for c, r in zip(all_gather(counts), range(world)) if c is not None and
                      r % tensor_parallel == 0]  # a group's ranks counted the same
            merged = {i: s for part in all_gather(sizes) for i, s in part.items()}
            wall = max(all_gather(time.time() - t0))
            summary[name] = summary_row(name, list(merged.values()), wall)
            summary[name].update(teacher_columns(name, counts, B))
            continue
        answers = decode_answers(model, tokenizer, prompts, name, mine, k, settings, stops,
                                 traced=rank == 0)
        wall = max(all_gather(time.time() - t0))
        merged = {j: a for part in all_gather(answers) for j, a in part.items()}
        summary[name] = summary_row(name, [(len(a.tokens), a.forwards) for a in merged.values()],
                                    wall)
        summary[name].update(grade.accuracy({j: a.text for j, a in merged.items()},
                                            [p.target for p in prompts], k, answer_regex))
        outputs[name] = merged
    for name, row in summary.items():
        if name in MODES and "ar" in summary:
            row["speedup"] = row["tokens/s"] / max(summary["ar"]["tokens/s"], 1e-9)
        if name in MODES and name != "ar" and "ar" in outputs:
            same = sum(outputs[name][j].tokens == a.tokens for j, a in outputs["ar"].items())
            row["same_as_ar"] = f"{same}/{len(outputs['ar'])}"
    columns = ["scenario", "samples", "tokens", "forwards", "tokens/forward", "wall_s", "tokens/s",
               "speedup", "accuracy", *([f"maj@{k}", f"pass@{k}"] if k > 1 else []), "same_as_ar"]
    print0("\n" + text_table([{c: r.get(c, "") for c in columns} for r in summary.values()]))
    if summary_json and rank == 0:
        with open(summary_json, "w") as f:
            json.dump({"checkpoint": path, "block_size": B, "batch_size": batch_size,
                       "samples_per_prompt": k, "sampling": sampling._asdict(),
                       "world_size": world, "scenarios": summary}, f, indent=1)
    if (write_parquet or write_jsonl) and rank == 0 and outputs:
        name = next((s for s in ("lossless", "ar") if s in outputs), next(iter(outputs)))
        opened = conversation.generation[len(conversation.header):]
        rows = training_rows(prompts, outputs[name], k, opened)
        formats.write_rows(rows, write_parquet, write_jsonl)
        print0(f"wrote {len(rows)} rows to {' and '.join(p for p in (write_parquet, write_jsonl) if p)}"
               f" (the {name} answers; {len(outputs[name]) - len(rows)} that hit max_new_tokens "
               "left out)")
    compute_cleanup()
