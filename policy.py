"""
How many drafts a lossless step verifies (drafts='auto'): a price per step shape, measured on the
device, weighed against the acceptance measured as decoding goes. sample.py's Decoder asks
`best(rows)` before each step, reports the step's time with `observe`, and scores every draft
against the tokens finally written with `score`; it calibrates a batch size the first time one
appears (`calibrated`, then `calibrate`).
"""

import time
import weakref
from collections import Counter

import torch

from cache import every_group, feed_uniform


def queries(k, m, after=None):
    """Queries per row of a lossless step with k drafts and a group of m masks after each
    acceptance count in `after` (default: every one, 0..k; see cache.step_shape)."""
    return 1 + k + (k + 1 if after is None else len(after)) * m


class DraftPolicy:
    """The k of each lossless step (all rows alike; m = k masks per group, so that the next step
    has k drafts), chosen to maximise expected tokens per second.

    Tokens: 1 + sum_j prod_{i<=j} a_i, with a_i the measured rate at which draft i is right given
    the ones before it (`rates`; every draft is scored against the tokens finally written,
    verified or not).
    Seconds: per batch size (rows rounded up to a power of two), a line seconds = base + slope x
    queries, fitted by least squares through the measured time of each step shape (a moving
    average per shape, weighted by how often it was measured, one step moving it at most 2x) and,
    until two shapes are measured, the calibration (a forward of k = 0, 1 and B - 1 with two
    groups, timed on the device when a batch larger than any calibrated appears, times what
    measured steps cost over their forwards; smaller batches start from the next larger one's
    line, per query scaled by rows). One line through every shape keeps a price left behind by
    a noisy moment from deciding alone. Each k places groups of masks after none and all of its
    drafts, then after the likeliest partial acceptances as many as pay (`groups`). Every 32
    steps of a batch size, two steps take a neighbouring k (best + 1, best - 1 and, when it is
    close behind, every draft, in turn) so that the line and the rates stay true where decisions
    are made (a local best with a dip after it: B=16 sampled at 8 drafts where 15 paid 1.2x);
    every 256 steps only when the neighbour is far behind (it would cost more than it tells: at
    a large batch on a CPU only ar steps pay). Every 128 steps one is an ar step: the price every
    draft count is weighed against, measured, not drawn from a line through large shapes."""

    def __init__(self, D):
        self.D, self.right, self.tried = D, [0] * D, [0] * D
        self.forward = {}  # batch size -> {queries: seconds of a calibration forward}
        self.steps = {}  # batch size -> {queries: [moving average of a step's seconds, count]}
        self.taken = Counter()  # steps chosen per batch size
        self.far = {}  # batch size -> [(queries, seconds)]: the largest shape its line is drawn from,
        #                then the larger calibrated ones, as steps cost

    @staticmethod
    def size(n):
        return 1 << (n - 1).bit_length()

    def rates(self):
        """a_i, the rate at which draft i is right given the ones before it: the measured ones
        with a prior of two drafts at the rate of all drafts before it, pooled (and one right
        of two: 0.5 for the first). A draft seldom tried is taken to be about as good as those before it, not a coin
        (where never-tried ones are priced at 0.5, a policy settles on a small k and never learns
        that far drafts pay: B=16 stayed at 8 drafts where 15 gave 1.2x the tokens/s), nor as bad
        as one weak offset before it (one early miss at offset 8 held B=16 at 8 drafts for a
        tenth of its steps)."""
        out, right_before, tried_before = [], 1.0, 2.0  # the first prior: 0.5, two drafts' worth
        for right, tried in zip(self.right, self.tried):
            out.append((right + 2 * right_before / tried_before) / (tried + 2))
            right_before, tried_before = right_before + right, tried_before + tried
        return out

    def expected(self, k, after=None, rates=None):
        """Tokens a step of k drafts writes, on average, per step it costs. Where no group follows
        the drafts it accepts (0 < accepted < k, not in `after`) the next step drafts from the
        later masks of the last group before (fewer drafts, then fillers), and counts too. rates:
        `rates()`, when known."""
        tokens, stops = self.stops(k, rates or self.rates())
        missed = [(p, later) for _, p, i, later in stops if after is not None and i not in after]
        return (tokens + sum(p * later for p, later in missed)) / (1 + sum(p for p, _ in missed))

    @staticmethod
    def stops(k, rates):
        """(tokens a step of k drafts writes on average, [(what a group after i accepted drafts
        brings, P(accepted = i), i, tokens the next step writes without it) for 0 < i < k]): the
        next step without it has the drafts after i of the first group (at least: a later group
        before i drafts them from more context), taken to be right at the rates of the drafts
        after i."""
        p, tokens, stops, later = 1.0, 1.0, [], [0.0] * (k + 1)
        for i in range(k - 1, -1, -1):
            later[i] = rates[i] * (1 + later[i + 1])  # tokens the drafts from i on write
        for i in range(k):
            if i:
                stops.append((p * (1 - rates[i]), i, 1 + later[i]))
            p *= rates[i]
            tokens += p
        # no better than a group after i would draft (those drafts saw less, and a wrong one)
        return tokens, [(q * (tokens - min(after, tokens)), q, i, min(after, tokens))
                        for q, i, after in stops]

    def price(self, b, q, line=None):
        """Seconds of a step of q queries per row at batch size b: on the line, and past the largest
        shape the line is drawn from no less than the path from it through the calibration's larger
        forwards (as steps cost over forwards), past those its time scaled by queries. A line
        through small shapes can be near flat where compute binds at large ones; a price scaled
        by queries from a small shape is far too high where a forward's base cost dominates (B=16
        at batch 1 on a CPU: 46 queries cost 1.07x 25, not 1.8x), and a k never taken is never
        measured."""
        base, slope = line or self.line(b)
        on_line = base + slope * q
        (q0, t0), *above = self.far.get(b, [(0, 0.0)])
        if not q0 or q <= q0:
            return on_line
        for q1, t1 in above:
            if q <= q1:
                return max(on_line, t0 + (t1 - t0) * (q - q0) / (q1 - q0))
            q0, t0 = q1, t1
        return max(on_line, t0 * q / q0)

    def groups(self, n, k, line=None, rates=None):
        """After which acceptance counts a step of n rows with k drafts places a group of masks:
        after none and after all, then after the counts where steps most often stop part-way, as
        many as pay for their queries (every one where queries are nearly free; two groups for a
        large block where compute binds). line, rates: this batch size's (base, slope) and
        `rates()`, when known."""
        b = self.size(n)
        return self.choice(b, k, line or self.line(b), rates or self.rates())[1]

    def choice(self, b, k, line, rates):
        """(expected tokens per second, groups) of the best groups for k drafts at batch size b."""
        if k < 2:
            return self.expected(k, None, rates) / self.price(b, queries(k, k), line), \
                every_group(k)
        tokens, stops = self.stops(k, rates)
        stops.sort(reverse=True)  # the groups that bring most first
        missed = sum(p for _, p, _, _ in stops)
        written = tokens + sum(p * later for _, p, _, later in stops)
        best, chosen = None, 0
        for extra in range(k):  # after none and all, then after the `extra` stops that bring most
            if extra:
                gain, p, _, later = stops[extra - 1]
                if gain < 1e-3 * tokens:  # nor any after it: not worth a price
                    break
                missed, written = missed - p, written - p * later
            speed = written / (1 + max(missed, 0.0)) / self.price(b, 1 + k + (2 + extra) * k, line)
            if best is None or speed > best:
                best, chosen = speed, extra
        return best, tuple(sorted([0, k] + [i for _, _, i, _ in stops[:chosen]]))

    def calibrated(self, n):
        """Whether steps of n rows have prices: a batch size this large or larger calibrated."""
        return any(b >= self.size(n) for b in self.forward)

    def line(self, b):
        """(base, slope) of seconds = base + slope x queries at batch size b."""
        measured, calibration = self.steps.get(b, {}), self.forward.get(b, {})
        both = [q for q in calibration if q in measured]  # a step costs more than its forward
        ratio = sum(measured[q][0] / calibration[q] for q in both) / len(both) if both else 1.0
        # two measured shapes draw the line: the calibration's slope is the forward's, not a step's
        points = [] if len(measured) >= 2 else [(q, t * ratio, 1.0) for q, t in calibration.items()
                                                if q not in measured]
        points += [(q, t, min(c, 8.0)) for q, (t, c) in measured.items()]
        if not self.forward.get(b):  # not calibrated here: the next larger one's, scaled
            above = min((c for c in self.forward if c > b), default=None)
            if above is not None:
                base, slope = self.line(above)
                points += [(q, base + slope * q * b / above, 1.0) for q in
                           (queries(0, 0), queries(self.D, self.D))]
        w = sum(p[2] for p in points)
        if not w:
            return 1.0, 0.0
        top = max(points)[:2]
        self.far[b] = [top] + sorted((q, t * ratio) for q, t in calibration.items() if q > top[0])
        mx, my = (sum(p[i] * p[2] for p in points) / w for i in (0, 1))
        var = sum(p[2] * (p[0] - mx) ** 2 for p in points)
        slope = max(sum(p[2] * (p[0] - mx) * (p[1] - my) for p in points) / var, 0.0) \
            if var > 0 else 0.0
        return max(my - slope * mx, 1e-9), slope

    def seconds(self, n, k, m=None, after=None):
        return self.price(self.size(n), queries(k, k if m is None else m, after))

    def best(self, n):
        """The k of the next step of n rows (its groups: `groups`)."""
        b = self.size(n)
        line, rates = self.line(b), self.rates()  # once here: a least-squares fit
        speed = [self.choice(b, k, line, rates)[0] for k in range(self.D + 1)]
        best = max(range(self.D + 1), key=lambda k: (speed[k], -k))
        self.taken[b] += 1
        t = self.taken[b]
        if best > 1 and t % 128 == 127:  # an ar step keeps the price drafts are weighed against
            return 0
        near = [k for k in (best + 1, best - 1) if 0 <= k <= self.D]
        if best < self.D - 1 and speed[self.D] >= 0.8 * speed[best]:  # every draft, close behind:
            near.append(self.D)  # one noisy price of it, or rates seldom measured, keep it no more
        if not near:
            return best
        other = near[t // 32 % len(near)]
        period = 32 if speed[other] >= 0.8 * speed[best] else 256
        return other if t % period >= period - 2 else best  # two steps: drafts, then measured

    def observe(self, n, k, m, seconds, after=None):
        """A step of n rows with k drafts and groups of m masks after `after` took `seconds`."""
        shapes = self.steps.setdefault(self.size(n), {})
        q = queries(k, m, after)
        old = shapes.get(q)
        if old is None:
            shapes[q] = [seconds, 1]
        else:  # one step of a noisy moment (a page fault, another process) moves it at most 2x
            seconds = min(max(seconds, old[0] / 2), 2 * old[0])
            shapes[q] = [0.7 * old[0] + 0.3 * seconds, old[1] + 1]

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
    """Time a forward of k = 0, 1 and D drafts (two groups; also every group where n rows of it
    are at most 4096 queries) on the rows at cache slots `slots` with `lengths`
    cached tokens (the best of two after a warm-up run, which also compiles it): the first points
    of the policy's line at this batch size. f: the decoder's Forward; shape(k, m, after): a step
    shape. These forwards write nothing that counts: every slot they fill lies past its row's
    length, overwritten by its next step."""
    n, dev = len(slots), f.cache.slots.device
    at, cached = torch.tensor(slots, device=dev), torch.tensor(lengths, device=dev)
    points = {}
    D = policy.D
    shapes = {(0, (0,)), (min(1, D), every_group(min(1, D))), (D, tuple(sorted({0, D})))}
    if n * queries(D, D) <= 4096:  # every group too, where it costs no more than a long prefill
        shapes.add((D, every_group(D)))
    for k, after in sorted(shapes):
        tokens = torch.full((n, queries(k, k, after)), mask_id, device=dev)
        times = []
        for _ in range(3):  # a warm-up (and compilation), then the best of two
            t0 = time.perf_counter()
            feed_uniform(f, at, cached, max(lengths), tokens, shape(k, k, after))[0, 0, 0].item()
            times.append(time.perf_counter() - t0)
        points[queries(k, k, after)] = min(times[1:])
    policy.forward[policy.size(n)] = points
