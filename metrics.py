"""
The server's numbers in Prometheus' text format (GET /metrics): answers running and waiting,
tokens, forwards, tokens per forward, lossless steps per draft shape, finish reasons, errors, and
histograms of the time to the first token and of the time per token after it.
"""

import threading
from collections import Counter

PREFIX = "nextblock_"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value, times=1):
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += times
        self.sum += value * times
        self.count += times

    def lines(self, name):
        out = [f'{name}_bucket{{le="{le:g}"}} {c}' for le, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Counted by the engine thread as answers decode and finish, read by GET /metrics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.prompt_tokens = self.generation_tokens = self.forwards = self.engine_errors = 0
        self.shapes, self.finishes, self.request_errors = Counter(), Counter(), Counter()
        self.ttft, self.per_token = Histogram(TTFT_BUCKETS), Histogram(TOKEN_BUCKETS)

    def tokens(self, new, since, now, first):
        """An answer's tokens of one forward arrived at `now`; since: its request's arrival (for
        its first tokens) or its previous tokens."""
        with self.lock:
            if first:
                self.ttft.observe(now - since)
            else:
                self.per_token.observe((now - since) / len(new), len(new))

    def finished(self, row):
        with self.lock:
            self.prompt_tokens += len(row.prompt)
            self.generation_tokens += len(row.out)
            self.forwards += row.forwards
            self.shapes.update(row.shapes)
            self.finishes[row.finish] += 1

    def text(self, running, waiting):
        def block(name, kind, help, samples):
            return [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} {kind}"] + \
                [f"{PREFIX}{name}{labels} {value}" for labels, value in samples]

        with self.lock:
            tpf = self.generation_tokens / self.forwards if self.forwards else 0.0
            lines = (
                block("requests_running", "gauge", "Answers decoding now.", [("", running)])
                + block("requests_waiting", "gauge", "Answers waiting for a row.", [("", waiting)])
                + block("prompt_tokens_total", "counter", "Prompt tokens of finished answers.",
                        [("", self.prompt_tokens)])
                + block("generation_tokens_total", "counter", "Tokens written by finished answers.",
                        [("", self.generation_tokens)])
                + block("forwards_total", "counter", "Forwards finished answers took part in.",
                        [("", self.forwards)])
                + block("tokens_per_forward", "gauge", "generation_tokens_total / forwards_total.",
                        [("", f"{tpf:.4f}")])
                + block("steps_total", "counter", "Lossless steps per draft shape (k drafts, m "
                        "masks per group; k,m,g: g groups, fewer than k+1).",
                        [(f'{{shape="{s}"}}', n) for s, n in sorted(self.shapes.items())])
                + block("finished_total", "counter", "Finished answers per finish reason.",
                        [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finishes.items())])
                + block("request_errors_total", "counter", "Requests answered with an error, per "
                        "HTTP status.", [(f'{{status="{s}"}}', n)
                                         for s, n in sorted(self.request_errors.items())])
                + block("engine_errors_total", "counter", "Steps that failed inside the engine.",
                        [("", self.engine_errors)])
                + [f"# HELP {PREFIX}time_to_first_token_seconds From a request's arrival to its "
                   "first token.", f"# TYPE {PREFIX}time_to_first_token_seconds histogram"]
                + self.ttft.lines(f"{PREFIX}time_to_first_token_seconds")
                + [f"# HELP {PREFIX}time_per_output_token_seconds After the first token: the "
                   "time between an answer's forwards over the tokens they wrote, per token.",
                   f"# TYPE {PREFIX}time_per_output_token_seconds histogram"]
                + self.per_token.lines(f"{PREFIX}time_per_output_token_seconds"))
        return "\n".join(lines) + "\n"
