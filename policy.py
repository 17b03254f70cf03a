"""
How many drafts a lossless step verifies (drafts='auto'): a price per step shape, measured on the
device, weighed against the acceptance measured as decoding goes. sample.py's Decoder asks
`best(rows)` before each step, reports the step's time with `observe`, and scores every draft
against the tokens finally written with `score`; it calibrates a batch size the first time one
appears (`calibrated`, then `forward[batch size] = seconds per k`).
"""

import time
import weakref
from collections import Counter

import torch

from cache import feed_uniform


def queries(k, m):
    """Queries per row of a lossless step with k drafts and m masks per group."""
    return 1 + k + (k + 1) * m


class DraftPolicy:
    """The k of each lossless step (all rows alike; m = k masks per group, so that the next step
    has k drafts), chosen to maximise expected tokens per second. Expected tokens = 1 + sum_j
    prod_{i<=j} a_i, with a_i the measured rate at which draft i is right given the ones before it
    (every draft is scored against the tokens finally written, verified or not). Seconds, per batch
    size (rows rounded up to a power of two) and k: the measured time of such steps, a moving
    average; a k not yet measured is priced by a calibration (a forward of each k, timed on the
    device when a batch larger than any calibrated appears; smaller ones are read off a line
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


def draft_policy(model, D, compiled, kind):
    """The model's DraftPolicy for steps of this kind (compiled or not, its dtype) and a kind of
    sampling (it changes how often drafts are right), kept across calls."""
    per_model = _POLICIES.setdefault(model, {})
    key = (D, compiled, next(model.parameters()).dtype, kind)
    return per_model.setdefault(key, DraftPolicy(D))


def calibrate(policy, f, slots, lengths, mask_id, shape):
    """Time a forward of each k on the rows at cache slots `slots` with `lengths` cached tokens
    (the best of three after a warm-up run, which also compiles it): the policy's prices at this
    batch size. f: the decoder's Forward; shape(k, m): a step shape. These forwards write nothing
    that counts: every slot they fill lies past its row's length, overwritten by its next step."""
    n, dev = len(slots), f.cache.slots.device
    at, cached = torch.tensor(slots, device=dev), torch.tensor(lengths, device=dev)
    seconds = []
    for k in range(policy.D + 1):
        tokens = torch.full((n, queries(k, k)), mask_id, device=dev)
        times = []
        for _ in range(4):  # a warm-up (and compilation), then the best of three
            t0 = time.perf_counter()
            feed_uniform(f, at, cached, max(lengths), tokens, shape(k, k))[0, 0, 0].item()
            times.append(time.perf_counter() - t0)
        seconds.append(min(times[1:]))
    policy.forward[policy.size(n)] = seconds
