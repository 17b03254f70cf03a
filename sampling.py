"""
How a token is chosen from logits: greedy, or a draw from Hugging Face's filtered distribution
(temperature, top-k, top-p, min-p, in its order) whose randomness depends on (the answer's seed,
the position, the token) only. That is what makes sampled decoding exact: a row's answer does not
depend on its batch, its neighbours, the step it was drawn in or the mode (lossless verifies drafts
drawn with the very noise ar would use), so `lossless` samples exactly `ar`'s tokens.

    s = check_sampling(0.6, top_k=20, top_p=0.95, min_p=0.0)   # or sampling_from(folder, ...)
    tokens = choose(logits, positions, seeds, s)                # logits [n, P, V]
"""

import json
import math
import os
from typing import NamedTuple

import torch

from configurator import UserError


class Sampling(NamedTuple):
    """How a token is chosen from logits: temperature 0 is greedy; else Hugging Face's filters, in
    its order (temperature, top-k, top-p, min-p), then a draw."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


GREEDY = Sampling()


def check_sampling(temperature, top_k, top_p, min_p, where=""):
    """The Sampling of these settings, or one line naming the one out of range (where: a prefix for
    that line, e.g. the request field). nan and inf are refused: neither is a distribution."""
    def number(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            return None
        return value

    t = number(temperature)
    if t is None or t < 0:
        raise UserError(f"{where}temperature={temperature!r}: must be a number >= 0 (0: greedy; "
                        "not inf or nan)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"{where}top_k={top_k!r}: must be an int >= 0 (0: off)")
    p = number(top_p)
    if p is None or not 0 < p <= 1:
        raise UserError(f"{where}top_p={top_p!r}: must be in (0, 1] (1: off)")
    m = number(min_p)
    if m is None or not 0 <= m < 1:
        raise UserError(f"{where}min_p={min_p!r}: must be in [0, 1) (0: off)")
    return Sampling(float(t), top_k, float(p), float(m))


def generation_defaults(folder):
    """The sampling a checkpoint's generation_config.json asks for where a caller says nothing (as
    HF generate: its temperature, top_k, top_p, min_p apply when do_sample is set), as a dict of
    the settings it gives; {} (greedy) without one."""
    try:
        with open(os.path.join(folder, "generation_config.json")) as f:
            gen = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(gen, dict) or not gen.get("do_sample"):
        return {}
    out = {"temperature": gen.get("temperature") or 1.0}
    out.update({k: gen[k] for k in ("top_k", "top_p", "min_p") if gen.get(k) is not None})
    return out


def sampling_from(defaults, temperature="auto", top_k=None, top_p=None, min_p=None, where=""):
    """The Sampling the settings mean: 'auto' (temperature) and None take the checkpoint's
    defaults (generation_defaults), greedy without them; a string temperature is read as a
    number."""
    if temperature == "auto" or temperature is None:
        temperature = defaults.get("temperature", 0.0)
    elif isinstance(temperature, str):
        try:
            temperature = float(temperature)
        except ValueError:
            raise UserError(f"{where}temperature={temperature!r}: expected 'auto' or a "
                            "number") from None
    chosen = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
    for key, value in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        chosen[key] = value if value is not None else defaults.get(key, chosen[key])
    return check_sampling(temperature, **chosen, where=where)


# -------------------------------------------------------------------------------------------------
# the noise: a counter-based hash of (seed, position, token)

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


# -------------------------------------------------------------------------------------------------
# choosing

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


def choose_rows(logits, positions, seeds, settings, with_prob=False):
    """choose() for rows that each have their own Sampling (settings: one per row): rows that share
    settings are chosen together, so a row's token is what choose() gives it alone."""
    kinds = set(settings)
    if len(kinds) == 1:
        return choose(logits, positions, seeds, settings[0], with_prob)
    tokens = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
    probs = torch.empty(logits.shape[:-1], device=logits.device)
    for s in kinds:
        at = torch.tensor([i for i, x in enumerate(settings) if x == s], device=logits.device)
        tokens[at], probs[at] = choose(logits[at], positions[at], seeds[at], s, with_prob=True)
    return (tokens, probs) if with_prob else tokens


# -------------------------------------------------------------------------------------------------
# what an answer may write, and what ends it

def never_written(conversation, mask_id, stops):
    """The token ids no answer may write: the mask token, and the special tokens the chat template
    writes as structure (role headers, BOS, pad, unk) that are not stop tokens."""
    ids = {conversation.tok.convert_tokens_to_ids(t) for t in conversation.guarded} - {None}
    return sorted((ids | ({mask_id} if mask_id is not None else set())) - set(stops))


def stop_ids(conversation, folder):
    """The tokens that end an answer: the template's closer and EOS, and the eos_token_id of the
    checkpoint's generation_config.json (as HF generate stops)."""
    stops = set(conversation.stop_ids())
    try:
        with open(os.path.join(folder, "generation_config.json")) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        eos = None
    stops |= {eos} if isinstance(eos, int) else {e for e in eos or [] if isinstance(e, int)}
    return sorted(stops)
