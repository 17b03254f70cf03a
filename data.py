"""
data.py: samples -> next-block training rows (docs/design.md, "The layout").

  build_example  the next-block layout of one sample: clean tokens + mask groups, labels, attention
                 metadata
  collate        truncate and pack examples into [rows, L] tensors (documents never meet)
  Batches        the deterministic, rank-sharded, resumable iterator of a run (samples or a token
                 budget per micro-batch); eval_batches: every sample once, for validation

    python data.py          # draws the layout and the attention rule of one small sample
"""

import bisect

import numpy as np
import torch

from common import ceil_to
from configurator import UserError, one_of
from store import as_store

EXAMPLE_KEYS = ("input_ids", "position_ids", "labels", "doc_ids", "is_mask", "limit", "offset",
                "block_start")
PAD_VALUES = {"input_ids": 0, "position_ids": 0, "labels": -100, "doc_ids": -1, "is_mask": False,
              "limit": 0, "offset": -1, "block_start": False}


# -------------------------------------------------------------------------------------------------
# the next-block layout of one sample

def block_starts(n, block_size, offset):
    """Where the blocks of an n-token response start: 0, then every block_size tokens after a first
    block of block_size - offset tokens (offset > 0) or block_size tokens (offset 0)."""
    return np.concatenate([[0], np.arange(block_size - offset if offset else block_size, n,
                                          block_size)])


def build_example(ids, spans, block_size, mask_token_id, layout="split", offsets=0):
    """The training row of one sample (docs/design.md, "The layout"). ids: the clean token ids of
    the whole sample; spans: the [start, end) index ranges of ids that are supervised (the response;
    every assistant turn of a conversation); offsets: the block offset of each span (an int for
    all). Returns 1-D tensors:

    input_ids, position_ids, labels   as the model sees them (labels -100 where nothing is
                                      supervised)
    doc_ids                           0 here; collate renumbers per row
    is_mask, limit                    the attention metadata of mask.py: a token sees clean tokens
                                      with position < limit (pos + 1 for clean tokens, its block's
                                      start for masks)
    offset                            0 for supervised clean tokens, j + 1 for mask M_j, -1 if
                                      unsupervised
    block_start                       the clean token whose label is the first token of a block
    last_needed                       the clean index this token depends on (for truncation)

    Each span is cut into blocks of block_size tokens, the first one block_size - offset long when
    offset > 0. A block of len >= 2 tokens starting at index a gets len - 1 masks: M_j has position
    a + j (that of the token it stands in for), label ids[a + j + 1], and sees the clean tokens
    before a: the prompt, earlier turns, earlier blocks. layout "split" puts all clean tokens first
    and the mask groups after them; "interleaved" puts each group before its block (the seed's
    picture). Both mean the same thing.
    """
    B = block_size
    if not (isinstance(B, int) and B >= 1):
        raise UserError(f"block_size must be an int >= 1, got {B!r}")
    one_of("layout", layout, ("split", "interleaved"))
    x = np.asarray(ids, dtype=np.int64)
    T = len(x)
    offsets = np.broadcast_to(np.asarray(offsets), (len(spans),))
    targets, firsts = [], []  # every supervised index, and the start of its block
    for (s, e), o in zip(spans, offsets.tolist()):
        if not (isinstance(o, int) and 0 <= o < B):
            raise UserError(f"block_offset must be an int in [0, {B - 1}] or 'random', got {o!r}")
        if not 1 <= s < e <= T:
            raise UserError(f"a sample needs a prompt and a response: span {(s, e)} of {T} tokens")
        i = np.arange(e - s)
        starts = block_starts(e - s, B, o)
        targets.append(s + i)
        firsts.append(s + starts[np.searchsorted(starts, i, side="right") - 1])
    if not targets:
        raise UserError("a sample needs a prompt and a response: no supervised span")
    target, first = np.concatenate(targets), np.concatenate(firsts)
    if mask_token_id is not None and mask_token_id >= 0 and (x == mask_token_id).any():
        raise UserError(f"the mask token (id {mask_token_id}) appears among a sample's clean "
                        f"tokens, at index {int(np.argmax(x == mask_token_id))}: the clean stream "
                        "must never see a mask")

    # clean tokens: a plain causal LM over the whole sample, supervised where the next token is a
    # target
    t = np.arange(T)
    supervised = np.zeros(T, bool)
    supervised[target - 1] = True
    clean = dict(input_ids=x, position_ids=t, limit=t + 1, is_mask=np.zeros(T, bool),
                 labels=np.where(supervised, np.append(x[1:], -100), -100),
                 offset=np.where(supervised, 0, -1), block_start=np.isin(t, np.unique(first) - 1),
                 last_needed=t, anchor=t, group=np.ones(T, int))

    # masks: M stands in for target i when target i + 1 is in the same block
    m = np.flatnonzero((target[1:] == target[:-1] + 1) & (first[1:] == first[:-1]))
    pos = target[m]
    masks = dict(input_ids=np.full(len(m), mask_token_id), position_ids=pos, limit=first[m],
                 is_mask=np.ones(len(m), bool), labels=x[pos + 1], offset=pos - first[m] + 1,
                 block_start=np.zeros(len(m), bool), last_needed=pos + 1, anchor=first[m],
                 group=np.zeros(len(m), int))

    both = {k: np.concatenate([clean[k], masks[k]]) for k in clean}
    if layout == "split":
        order = np.arange(len(both["input_ids"]))
    else:  # each block's masks right before its first clean token; each part in position order
        order = np.lexsort((both["position_ids"], both["group"], both["anchor"]))
    both["doc_ids"] = np.zeros(len(order), dtype=np.int64)
    return {k: torch.from_numpy(both[k][order]) for k in EXAMPLE_KEYS + ("last_needed",)}


# -------------------------------------------------------------------------------------------------
# packing

def truncate(example, max_length):
    """Cut the end of the sample so the example fits max_length tokens (masks included): the same as
    building it from the shorter sample. None if not even one supervised token fits. Prompts are
    never cut."""
    need = example["last_needed"]
    if len(need) <= max_length:
        return example
    n_keep = int(need.sort().values[max_length])  # the largest n with #{need < n} <= max_length
    labelled = example["labels"] != -100
    first_target = int(need[labelled & ~example["is_mask"]].min()) + 1 if labelled.any() else 0
    if n_keep <= first_target:
        return None
    keep = need < n_keep
    out = {k: v[keep] for k, v in example.items()}
    lost_label = ~out["is_mask"] & (out["last_needed"] + 1 >= n_keep)
    out["labels"] = out["labels"].masked_fill(lost_label, -100)
    out["offset"] = out["offset"].masked_fill(lost_label, -1)
    out["block_start"] = out["block_start"] & ~lost_label
    return out


def first_fit(lengths, capacity):
    """Rows of indices into lengths: each length goes to the first row it fits in, or a new row."""
    rows, fill = [], []
    for i, n in enumerate(lengths):
        r = next((r for r in range(len(rows)) if fill[r] + n <= capacity), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += n
    return rows


def row_length(fullest, max_length, pad_multiple):
    """max_length, or with pad_multiple the shortest multiple of it that holds the fullest row
    (fewer shapes to compile)."""
    return max_length if pad_multiple is None else max(pad_multiple, ceil_to(fullest, pad_multiple))


def collate(examples, max_length, pad_multiple=None, pad_id=0, rows=None):
    """Pack examples (from build_example) into rows and return a dict of [rows, L] tensors plus
    counts 'truncated' and 'dropped'. Rows are filled first fit, or as given (rows: lists of indices
    into examples). Each example keeps its own document id in its row (positions restart at 0 per
    document); padding sits only at the end of a row, labels -100, doc id -1. L: row_length. An
    empty input gives one all-padding row, so that every rank can still run its forward."""
    fitted = [truncate(ex, max_length) for ex in examples]
    dropped = sum(cut is None for cut in fitted)
    truncated = sum(cut is not None and cut is not ex for cut, ex in zip(fitted, examples))
    if rows is None:
        kept = [ex for ex in fitted if ex is not None]
        rows = [[kept[i] for i in row] for row in first_fit([len(ex["input_ids"]) for ex in kept],
                                                            max_length)]
    else:
        rows = [[fitted[i] for i in row if fitted[i] is not None] for row in rows]
    rows = rows or [[]]
    fullest = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    L = row_length(fullest, max_length, pad_multiple)
    batch = {}
    for key in EXAMPLE_KEYS:
        pad = pad_id if key == "input_ids" else PAD_VALUES[key]
        dtype = torch.bool if isinstance(pad, bool) else torch.long
        out = torch.full((len(rows), L), pad, dtype=dtype)
        for r, row in enumerate(rows):
            at = 0
            for doc, ex in enumerate(row):
                n = len(ex[key])
                out[r, at:at + n] = doc if key == "doc_ids" else ex[key]
                at += n
        batch[key] = out
    batch["truncated"], batch["dropped"] = truncated, dropped
    return batch


def too_long(samples, max_length, block_size):
    """(indices of the samples to keep, dropped, truncated): a sample whose prompt (everything
    before its first supervised token) fills max_length is dropped; one whose example (masks
    included, block offset 0: the most masks) is longer than max_length will be cut, response side.
    From the stored lengths: nothing is read."""
    samples = as_store(samples)
    keep = np.flatnonzero(samples.first_span_start() < max_length)
    lengths = example_lengths(samples, block_size, np.zeros(len(samples.spans), np.int64))
    return keep, len(samples) - len(keep), int((lengths[keep] > max_length).sum())


def example_lengths(samples, block_size, span_offsets):
    """len(build_example(...)) of every sample: clean tokens + masks (len - 1 per block of a
    span)."""
    span_len, owner = samples.span_lengths()
    o = np.asarray(span_offsets)[:len(span_len)]
    first = np.where(o > 0, block_size - o, block_size)
    blocks = 1 + np.where(span_len > first, -(-(span_len - first) // block_size), 0)
    masks = np.bincount(owner, weights=span_len - blocks, minlength=len(samples)).astype(np.int64)
    return samples.clean_lengths() + masks


def plan_budget(lengths, order, rows, length):
    """Token-budget micro-batches: lists of `rows` rows of sample ids (taken in `order`), each row
    holding at most `length` tokens, filled from a window of the next samples, largest that fits
    first, so that rows end up full and every micro-batch costs about the same. The tail that cannot
    fill a micro-batch is left for the next epoch's shuffle."""
    lengths = lengths[order].tolist()
    window = int(np.clip(16 * rows * length / max(1.0, float(np.mean(lengths))), 32, 4096))
    pool_len, pool_id, taken, plan = [], [], 0, []

    def refill():
        nonlocal taken
        while len(pool_len) < window and taken < len(order):
            at = bisect.bisect_right(pool_len, lengths[taken])
            pool_len.insert(at, lengths[taken])
            pool_id.insert(at, int(order[taken]))
            taken += 1

    refill()
    while pool_len and (taken < len(order) or sum(pool_len) >= rows * length):
        micro = []
        for _ in range(rows):
            space, row = length, []
            while (j := bisect.bisect_right(pool_len, space) - 1) >= 0:  # the largest that fits
                space -= pool_len.pop(j)
                row.append(pool_id.pop(j))
                refill()
            micro.append(row)
        plan.append(micro)
    return plan


# -------------------------------------------------------------------------------------------------
# the iterator

class Batches:
    """Deterministic, rank-sharded, epoch-aware micro-batches with an exact, saveable position.

    batch_size mode (batch_tokens=0): every optimizer step takes the next `batch_size * micro_steps
    * world_size` samples of the epoch's shuffled order; this rank takes its slice and cuts it into
    micro-batches of batch_size samples. The position is (epoch, samples consumed), which means the
    same for any batch geometry: a run resumed with another batch_size, accumulation or world size
    goes on with the next unseen sample. An epoch ends when fewer samples are left than a step takes
    (they are skipped: drop_last).

    batch_tokens mode: each micro-batch is batch_tokens // L rows of L = min(max_length,
    batch_tokens) tokens (masks included), planned by plan_budget. An epoch is a fixed plan of
    micro-batches; a step takes the next micro_steps * world_size of them, rank r the r-th share.
    The position is (epoch, micro-batches consumed): resumable with any accumulation or world size,
    not with another batch_tokens or max_length.

    Either way the plan comes from the seed and the epoch alone, so that a run on N ranks sees what
    a run on 1 sees. Block offsets are drawn per span (each assistant turn) and epoch."""

    def __init__(self, samples, batch_size, micro_steps, max_length, block_size, mask_token_id,
                 layout="split", block_offset="random", seed=1337, rank=0, world_size=1,
                 shuffle=True, pad_multiple=None, pad_id=0, batch_tokens=0):
        self.samples = as_store(samples)
        self.batch_size, self.micro_steps, self.batch_tokens = batch_size, micro_steps, batch_tokens
        self.max_length, self.block_size, self.mask_token_id = max_length, block_size, mask_token_id
        self.layout, self.block_offset = layout, block_offset
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.pad_multiple, self.pad_id = pad_multiple, pad_id
        counts = self.samples.span_ends - self.samples.span_starts
        self.first_offset = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.epoch, self.consumed, self._plans = 0, 0, {}
        self.step_samples = []  # the sample ids of the last step, all ranks (to audit resumes)
        n = len(self.samples)
        if batch_tokens:
            self.row_length = min(max_length, batch_tokens)
            self.rows = batch_tokens // self.row_length
            prompts = self.samples.first_span_start()
            if (prompts >= self.row_length).any():
                i = int(np.argmax(prompts >= self.row_length))
                raise UserError(f"{self.samples.where(i)}: its prompt alone has {prompts[i]} "
                                f"tokens, not fewer than batch_tokens={batch_tokens}: raise "
                                "batch_tokens (or lower max_length)")
            self.global_batch = micro_steps * world_size  # micro-batches per step
            self.steps_per_epoch = len(self._plan(0)) // self.global_batch
            what = (f"fill {len(self._plan(0))} micro-batches of batch_tokens={batch_tokens}, "
                    f"fewer than one optimizer step needs ({micro_steps} micro-steps x "
                    f"{world_size} ranks)")
        else:
            self.global_batch = batch_size * micro_steps * world_size
            self.steps_per_epoch = n // self.global_batch
            what = (f"are fewer than one optimizer step needs (batch_size {batch_size} x "
                    f"{micro_steps} micro-steps x {world_size} ranks)")
        if self.steps_per_epoch == 0:
            raise UserError(f"{n} samples {what}")

    def _epoch_plan(self, epoch):
        """The epoch's order of samples and the block offset of every span."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.samples)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        n_spans = int((self.samples.span_ends - self.samples.span_starts).sum())
        if self.block_offset == "random":
            offsets = rng.integers(0, self.block_size, n_spans)
        else:
            offsets = np.full(n_spans, int(self.block_offset))
        return order, offsets

    def _plan(self, epoch):
        """batch_tokens mode: the epoch's micro-batches, each a list of rows of sample ids."""
        if epoch not in self._plans:
            order, offsets = self._epoch_plan(epoch)
            lengths = np.minimum(example_lengths(self.samples, self.block_size, offsets),
                                 self.row_length)
            self._plans = {epoch: plan_budget(lengths, order, self.rows, self.row_length)}
        return self._plans[epoch]

    def next(self):
        """The micro-batches of this rank for the next optimizer step: a list of micro_steps
        collated dicts."""
        per_rank = self.micro_steps if self.batch_tokens else self.batch_size * self.micro_steps
        limit = len(self._plan(self.epoch)) if self.batch_tokens else len(self.samples)
        if self.consumed + self.global_batch > limit:
            self.epoch, self.consumed = self.epoch + 1, 0
        order, offsets = self._epoch_plan(self.epoch)
        if self.batch_tokens:
            step = self._plan(self.epoch)[self.consumed:self.consumed + self.global_batch]
            self.step_samples = [i for mb in step for row in mb for i in row]
            micro_rows = step[self.rank * per_rank:(self.rank + 1) * per_rank]
        else:
            step = order[self.consumed:self.consumed + self.global_batch]
            self.step_samples = step.tolist()
            mine = step[self.rank * per_rank:(self.rank + 1) * per_rank]
            micro_rows = [[mine[k * self.batch_size:(k + 1) * self.batch_size].tolist()]
                          for k in range(self.micro_steps)]
        self.consumed += self.global_batch
        micro = []
        for mb in micro_rows:
            examples = [self.example(i, offsets) for row in mb for i in row]
            if self.batch_tokens:  # the planned rows, each row_length long
                bounds = np.cumsum([0] + [len(row) for row in mb])
                rows = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
                micro.append(collate(examples, self.row_length, None, self.pad_id, rows))
            else:
                micro.append(collate(examples, self.max_length, self.pad_multiple, self.pad_id))
        return micro

    def example(self, i, offsets):
        ids, spans = self.samples[i]
        first = self.first_offset[i]
        return build_example(ids, spans, self.block_size, self.mask_token_id, self.layout,
                             offsets[first:first + len(spans)].tolist())

    def padding(self, epoch=0):
        """The fraction of row tokens that are padding over the epoch's micro-batches (before
        truncation)."""
        order, offsets = self._epoch_plan(epoch)
        lengths = example_lengths(self.samples, self.block_size, offsets)
        if self.batch_tokens:
            plan = self._plan(epoch)
            real = sum(min(lengths[i], self.row_length) for mb in plan for row in mb for i in row)
            return 1 - real / max(1, len(plan) * self.rows * self.row_length)
        real = total = 0
        for s in range(self.steps_per_epoch * self.micro_steps * self.world_size):
            chunk = np.minimum(lengths[order[s * self.batch_size:(s + 1) * self.batch_size]],
                               self.max_length).tolist()
            fill = [sum(chunk[i] for i in row) for row in first_fit(chunk, self.max_length)]
            real += sum(fill)
            total += len(fill) * row_length(max(fill), self.max_length, self.pad_multiple)
        return 1 - real / max(1, total)

    def state_dict(self):
        state = {"epoch": self.epoch, "consumed": self.consumed}
        if self.batch_tokens:
            state.update(unit="micro_batches", batch_tokens=self.batch_tokens,
                         max_length=self.max_length)
        return state

    def load_state_dict(self, state):
        unit = state.get("unit", "samples")
        mine = (self.batch_tokens, self.max_length)
        if unit != ("micro_batches" if self.batch_tokens else "samples") or \
                self.batch_tokens and (state["batch_tokens"], state["max_length"]) != mine:
            was = (f"batch_tokens={state['batch_tokens']}, max_length={state['max_length']}"
                   if unit == "micro_batches" else "batch_size (a count of samples)")
            raise UserError(f"the checkpoint's data position counts micro-batches of {was}; this "
                            f"run has batch_tokens={self.batch_tokens}, max_length="
                            f"{self.max_length}: resume with the same settings, or start over with "
                            "--resume=disable")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def eval_batches(samples, batch_size, max_length, block_size, mask_token_id, layout="split", rank=0,
                 world_size=1, pad_multiple=None, pad_id=0):
    """Every sample once, in order, block_offset 0, sharded over ranks; every rank gets the same
    number of micro-batches (padding-only ones where it runs out), so that collective forwards
    (FSDP) never hang."""
    samples = as_store(samples)
    n = len(samples)
    chunks = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    for k in range(ceil_to(len(chunks), world_size) // world_size):
        j = k * world_size + rank
        part = chunks[j] if j < len(chunks) else []
        examples = [build_example(*samples[i], block_size, mask_token_id, layout, 0) for i in part]
        yield collate(examples, max_length, pad_multiple, pad_id)


if __name__ == "__main__":
    from mask import draw
    P, n, B = 3, 6, 3
    print(f"One sample: prompt p0..p{P - 1}, response r0..r{n - 1}, block_size {B}, block offset "
          "0: blocks r0-r2 and r3-r5.\nMask mK stands at the position of r(K-1) and predicts rK, "
          "seeing the clean tokens before its block\nand the masks of its block before it. Row = "
          "query, column = key, # = may attend.\n")
    for layout in ("split", "interleaved"):
        ex = build_example(list(range(P + n)), [(P, P + n)], B, -1, layout)
        batch = collate([ex], len(ex["input_ids"]))
        pos, masked = batch["position_ids"][0].tolist(), batch["is_mask"][0].tolist()
        names = [f"m{p - P + 1}" if m else (f"p{p}" if p < P else f"r{p - P}")
                 for p, m in zip(pos, masked)]
        print(f"layout {layout!r}:")
        print(draw(batch, names), end="\n\n")
