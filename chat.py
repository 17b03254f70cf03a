"""
chat.py: rows of data -> the token ids of one conversation and the spans the model learns, rendered
by the tokenizer's own chat template (docs/design.md, "Chat data").

Two shapes of row, one conversation each (formats.py reads them from parquet, Arrow, JSON lines
and JSON files, OpenAI messages or ShareGPT conversations):
  prompt / target    prompt: a string or {role, content} messages; target: a string or messages
                     (its assistant turns, with any tool messages between them). Only the target's
                     assistant turns are learned.
  messages (+ tools) the whole conversation: system / user / assistant / tool messages,
                     assistant ones with tool_calls where present; an optional tools column is
                     handed to the template. Every assistant turn is learned.

An assistant turn's reasoning_content is rendered as the template renders reasoning, in the field
it takes (Qwen3's reasoning_content, gpt-oss's thinking); for a template that takes none it goes
into the content as Qwen3 writes it (`<think>\\n...\\n</think>\\n\\n` before the answer), noted:
reasoning in the data is never dropped in silence.

What is learned for an assistant turn is what the template renders for it after the
generation prompt: its wrapper (e.g. gpt-oss's `<|channel|>final<|message|>`), the content,
and the closer (the first special token after the content, and EOS when it follows), so the
model learns to stop the way the family stops. The last turn's content goes in verbatim (a
template that drops reasoning from history, as the R1 distills do, would otherwise erase what
the model is meant to learn); when the generation prompt already opens the turn (the
`<think>\\n` of the R1 distills) that opening is not repeated. Earlier turns are learned as
the template renders them in the history the model sees at the last turn.

Text inside messages never forges special tokens: a special token's text
typed into a message is tokenized as plain text (special_text='keep'),
or the row is dropped and counted (special_text='drop').
"""

import json
import os
import re

import numpy as np
from tokenizers import AddedToken
from transformers import AutoTokenizer

import formats
from configurator import UserError, first_line
from demo import demo_tokenizer

MASK_TOKEN = "<|mask|>"
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model"}
# private-use characters: never in data, never changed by a template
SENTINEL = "\ue000SENTINEL\ue000"
PROTECTED = re.compile("\ue001(\\d+)\ue002")


class TemplateError(ValueError):
    """The chat template refused a conversation (its own message)."""


# -------------------------------------------------------------------------------------------------
# the tokenizer

def load_tokenizer(path):
    """The tokenizer saved in a model folder, or one clear error."""
    # transformers quietly builds an empty tokenizer for a folder without one: look for its files
    if not TOKENIZER_FILES & set(os.listdir(path)):
        raise UserError(f"{path}: no tokenizer in the model folder (none of "
                        f"{', '.join(sorted(TOKENIZER_FILES))}): save the tokenizer "
                        "beside the model")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot load its tokenizer ({first_line(e)})") from None


def add_mask_token(tokenizer):
    """(mask token id, added?): the dedicated mask token (never EOS), added to the tokenizer unless
    it has it already (a checkpoint of ours)."""
    if MASK_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(MASK_TOKEN), False
    tokenizer.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)],
                         special_tokens=True)
    return tokenizer.convert_tokens_to_ids(MASK_TOKEN), True


def training_tokenizer(init_from):
    """(tokenizer, mask token id, mask token new?) of a local model folder or 'demo'."""
    if init_from == "demo":
        tokenizer = demo_tokenizer()
    else:
        if not os.path.exists(os.path.join(init_from, "config.json")):
            raise UserError(f"{init_from}: no config.json, not a Hugging Face model folder")
        tokenizer = load_tokenizer(init_from)
    return (tokenizer, *add_mask_token(tokenizer))


# -------------------------------------------------------------------------------------------------
# reading rows: formats.py reads every file format; these names are what sample.py and serve.py use

check_messages = formats.check_messages


def read_rows(paths, prompt_key="prompt", response_key="target", messages_key="messages",
              tools_key="tools", require_target=True, data_format="auto"):
    """Every row of the data files as a formats.Row (messages, first, tools, where): the
    conversation, the index of its first learned message (its assistant turns from there on are
    learned), tool schemas or None, and where it came from ("file row N", "file line N"). A file
    with a messages_key (or ShareGPT 'conversations') column holds whole conversations; otherwise
    prompt_key and response_key (optional when decoding: first is then len(messages), nothing to
    learn)."""
    return formats.read_rows(paths, prompt_key, response_key, messages_key, tools_key,
                             require_target, data_format)


def split_for_decoding(messages, first):
    """(prompt messages, target text or None) for sample.py: the conversation up to its last
    assistant turn, and that turn's content (the reference answer)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first),
               default=None)
    if last is None:
        return messages, None
    return messages[:last], messages[last].get("content") or ""


# -------------------------------------------------------------------------------------------------
# rendering and tokenizing

class Chat:
    """A tokenizer with its chat template and options: renders conversations and tokenizes them.

    options: the keyword arguments every apply_chat_template call gets (chat_template_kwargs:
    e.g. {"enable_thinking": True}). prompt_format: for tokenizers without a template, e.g.
    'Q: {prompt}\\nA: '. special_text: 'keep' (special-token text in messages stays text) or
    'drop' (such rows are dropped).
    """

    def __init__(self, tokenizer, options=None, prompt_format=None, special_text="keep"):
        self.tok, self.options, self.prompt_format = tokenizer, dict(options or {}), prompt_format
        self.special_text = special_text
        if prompt_format is None and not tokenizer.chat_template:
            raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: set "
                            "prompt_format, e.g. prompt_format = 'Question: {prompt}\\nAnswer: ' "
                            "in a config file")
        added = tokenizer.added_tokens_decoder.values()
        self.specials = sorted({t for t in tokenizer.all_special_tokens if t} |
                               {t.content for t in added if t.special}, key=len, reverse=True)
        self.added_re = (re.compile("|".join(map(re.escape, sorted(
            {t.content for t in added} | set(self.specials), key=len, reverse=True))))
            if added else None)
        self.special_re = (re.compile("|".join(map(re.escape, self.specials)))
                           if self.specials else None)
        self.eos = tokenizer.eos_token
        # the special tokens that structure a conversation (roles, closers, BOS/EOS, the mask):
        # their text inside a message must not become them. Reasoning markers a tokenizer may call
        # special (<think>) are content.
        structural = {t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token,
                                  tokenizer.pad_token, MASK_TOKEN) if t}
        if prompt_format is None:
            structural |= self._structure()
        self.guarded = sorted(set(self.specials) & structural | {MASK_TOKEN}, key=len, reverse=True)
        self.guard_re = re.compile("|".join(map(re.escape, self.guarded)))
        self.generation, self.header = (self._generation_prompt() if prompt_format is None
                                        else ("", ""))
        if self.eos is None and prompt_format is not None:
            raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: with "
                            "prompt_format the model could not learn to stop")
        self.reasoning = self._reasoning_field() if prompt_format is None else None
        unk = tokenizer.unk_token_id  # GPT-2's is its EOS, which every sample ends with
        self.unk = unk if unk not in (tokenizer.eos_token_id, tokenizer.bos_token_id,
                                      tokenizer.pad_token_id) else None

    def _structure(self):
        """The special tokens the template writes around system and user messages, as the
        assistant's header, and as its closer; not what it opens inside the assistant's turn (a
        `<think>` the prompt ends with)."""
        found = set()
        for asked in ([{"role": "user", "content": SENTINEL}],
                      [{"role": "system", "content": SENTINEL},
                       {"role": "user", "content": SENTINEL}]):
            try:
                before, prompt = self.render(asked), self.render(asked, generation=True)
                full = self.render(asked + [{"role": "assistant", "content": SENTINEL}])
            except TemplateError:  # e.g. Gemma refuses a system message
                continue
            header = prompt[len(before):max(len(before), _common_prefix(prompt, full))]
            after = full.split(SENTINEL)[-1]
            closer = after[:self._closer_end(after, 0) or 0]
            found |= (set(self.special_re.findall(before + header + closer)) if self.special_re
                      else set())
        return found

    def _reasoning_field(self):
        """The message field the template renders an assistant turn's reasoning from
        (reasoning_content: Qwen3; thinking: gpt-oss), or None when it renders none."""
        for field in ("reasoning_content", "thinking", "reasoning"):
            try:
                text = self.render([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "ok", field: SENTINEL}])
            except TemplateError:
                continue
            if SENTINEL in text:
                return field
        return None

    def with_reasoning(self, messages, notes=None):
        """messages with each assistant turn's reasoning_content in the field the template
        renders reasoning from, or, for a template that takes none, in the content as Qwen3's
        template writes it (noted 'reasoning_in_content' in notes)."""
        if not any("reasoning_content" in m for m in messages):
            return messages
        out = []
        for m in messages:
            if "reasoning_content" in m:
                m = dict(m)
                reasoning = m.pop("reasoning_content")
                if self.reasoning:
                    m[self.reasoning] = reasoning
                else:
                    m["content"] = (f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                                    f"{(m.get('content') or '').lstrip(chr(10))}")
                    if notes is not None:
                        notes.add("reasoning_in_content")
            out.append(m)
        return out

    def _generation_prompt(self):
        """(the generation prompt, its header): what add_generation_prompt appends
        (`<|im_start|>assistant\\n`, `<｜Assistant｜><think>\\n`), and the part of it that an
        assistant turn's own rendering begins with too (`<｜Assistant｜>`); the rest is what the
        prompt opens for the model (`<think>\\n`)."""
        asked = [{"role": "user", "content": "hi"}]
        try:
            before, prompt = self.render(asked), self.render(asked, generation=True)
            probe = self.render(asked + [{"role": "assistant", "content": SENTINEL}])
        except TemplateError:
            return "", ""
        generation = prompt[len(before):] if prompt.startswith(before) else ""
        opened = prompt[max(len(before), self._snap(prompt, _common_prefix(prompt, probe))):]
        return generation, generation[:len(generation) - len(opened)]

    def _snap(self, text, at):
        """at, moved back to the start of an added token it would cut (`<think>` against `</think>`
        agree on their first character only)."""
        for m in self.added_re.finditer(text, max(0, at - 64), at + 64) if self.added_re else ():
            if m.start() < at < m.end():
                return m.start()
        return at

    # -- text --------------------------------------------------------------------------------------

    def render(self, messages, tools=None, generation=False):
        """The template's text for messages (add_generation_prompt=generation). TemplateError if it
        refuses. With prompt_format (no template) only prompts are rendered:
        their contents joined by blank lines."""
        if self.prompt_format is not None:
            return self.prompt_format.format(
                prompt="\n\n".join(m.get("content") or "" for m in messages))
        kwargs = dict(self.options, tools=tools) if tools else self.options
        try:
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=generation, **kwargs)
        except Exception as e:
            # jinja's own errors (raise_exception, undefined fields, type errors)
            raise TemplateError(str(e).strip().splitlines()[0] if str(e).strip()
                                else type(e).__name__) from None

    def protect(self, messages, tools=None):
        """Messages (and tool schemas) with every special token's text replaced by a placeholder,
        and the texts replaced. The template then renders its own structure with real special
        tokens, and the placeholders go back in as plain text (tokenize)."""
        table = []

        def swap(match):
            table.append(match.group(0))
            return f"\ue001{len(table) - 1}\ue002"

        def walk(value, key=None):
            if isinstance(value, str) and key not in ("role", "type"):
                return self.guard_re.sub(swap, value)
            if isinstance(value, dict):
                return {k: walk(v, k) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            return value

        return walk(messages), walk(tools), table

    def tokenize(self, texts, tables, offsets=False):
        """Token ids of rendered texts (and each token's start in its text), in two batched
        tokenizer calls: special tokens the template wrote become their ids; placeholders become
        their original text, tokenized as plain text."""
        pieces = [list(_pieces(text, table)) for text, table in zip(texts, tables)]
        plain = [p for row in pieces for p, _, escaped in row if not escaped]
        escaped = [p for row in pieces for p, _, escaped in row if escaped]
        enc = (self.tok(plain, add_special_tokens=False, return_offsets_mapping=offsets)
               if plain else None)
        esc = (self.tok(escaped, add_special_tokens=False, split_special_tokens=True).input_ids
               if escaped else [])
        plain_ids, plain_offsets = (iter(enc.input_ids if enc else []),
                                    iter(enc.offset_mapping if offsets and enc else []))
        escaped_ids, out = iter(esc), []
        for row in pieces:
            ids, starts = [], []
            for piece, start, is_escaped in row:
                part = next(escaped_ids) if is_escaped else next(plain_ids)
                ids += part
                if offsets:
                    starts += ([start] * len(part) if is_escaped
                               else [start + a for a, _ in next(plain_offsets)])
            out.append((ids, starts) if offsets else ids)
        return out

    def prompt_ids(self, messages, tools=None):
        """What the model is prompted with before its next turn (sample.py): the messages rendered
        with the generation prompt."""
        messages = self.with_reasoning(messages)
        if self.prompt_format is not None:
            # the tokenizer adds BOS if it uses one
            return self.tok(self.render(messages)).input_ids
        safe, safe_tools, table = self.protect(messages, tools)
        return self.tokenize([self.render(safe, safe_tools, generation=True)], [table])[0]

    def encode(self, messages, first=0, tools=None):
        """One conversation -> (ids, spans, notes). spans: [start, end) of every learned assistant
        turn in ids. notes: what start-up should report about this row (see NOTES). ids and spans
        are None for a row that special_text='drop' drops. Raises TemplateError."""
        result = self.encode_many([(messages, first, tools)])[0]
        if isinstance(result, TemplateError):
            raise result
        return result

    def encode_many(self, rows):
        """encode() for many (messages, first, tools) rows, tokenizing them together; a row the
        template refuses gives its TemplateError instead of a result."""
        if self.prompt_format is not None:
            notes = [set() for _ in rows]
            rows = [(self.with_reasoning(m, n), first, tools)
                    for (m, first, tools), n in zip(rows, notes)]
            prompts = self.tok([self.render(m[:first]) for m, first, _ in rows]).input_ids
            replies = self.tok(["".join(x.get("content") or "" for x in m[first:]
                                        if x["role"] == "assistant") for m, first, _ in rows],
                               add_special_tokens=False).input_ids
            return self._note_unknown(
                [(p + r + [self.tok.eos_token_id], [(len(p), len(p) + len(r) + 1)], n)
                 for p, r, n in zip(prompts, replies, notes)])
        plans, results = [], [None] * len(rows)
        for i, (messages, first, tools) in enumerate(rows):
            try:
                plan = self._plan(messages, first, tools)
            except TemplateError as e:
                results[i] = e
                continue
            if plan[0] is None:
                results[i] = (None, None, plan[-1])
            else:
                plans.append((i, plan))
        prompts = self.tokenize([p[0] for _, p in plans], [p[4] for _, p in plans], offsets=True)
        turns = self.tokenize([p[2] for _, p in plans], [p[4] for _, p in plans])
        for (i, (text, spans, _, closed, _, notes)), (ids, starts), turn_ids in \
                zip(plans, prompts, turns):
            starts = starts + [len(text)]
            # a token belongs to the part of the text it starts in
            token_spans = [(int(np.searchsorted(starts, s)), int(np.searchsorted(starts, e)))
                           for s, e in spans]
            turn_ids = turn_ids + ([] if closed else [self.tok.eos_token_id])
            token_spans.append((len(ids), len(ids) + len(turn_ids)))
            results[i] = (ids + turn_ids, [(s, e) for s, e in token_spans if e > s], notes)
        return self._note_unknown(results)

    def _note_unknown(self, results):
        """Notes 'unknown_token' on results whose ids hold the tokenizer's unknown token: text it
        has no token for (a NUL byte, an emoji, right-to-left text in a character vocabulary)."""
        for result in results if self.unk is not None else ():
            if isinstance(result, tuple) and result[0] is not None and self.unk in result[0]:
                result[2].add("unknown_token")
        return results

    def _plan(self, messages, first, tools):
        """(prompt text, [start, end) of earlier learned turns in it, last turn's text, closed,
        placeholder table, notes): the text of one conversation before tokenizing."""
        notes = set()
        messages = self.with_reasoning(messages, notes)
        learned = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
        last = learned[-1]
        if any(self.guard_re.search(t) for t in _strings(messages[:last + 1])) or \
                tools and self.guard_re.search(json.dumps(tools, ensure_ascii=False)):
            notes.add("special_text")
            if self.special_text == "drop":
                return None, None, None, None, None, notes
        safe, tools, table = self.protect(messages[:last + 1], tools)
        prompt = self.render(safe[:last], tools, generation=True)
        turn, closed = self._last_turn(safe, last, prompt, tools, notes)
        spans = [self._history_turn(safe, j, prompt, tools, notes) for j in learned[:-1]]
        return prompt, [s for s in spans if s[0] is not None], turn, closed, table, notes

    def _last_turn(self, safe, last, prompt, tools, notes):
        """(text, closed): what the model learns after the generation prompt for the last learned
        turn, and whether it ends in a special token. The template's own rendering when it
        follows the prompt and keeps the content (whitespace aside), else the wrapper + verbatim
        content + closer."""
        message, content = safe[last], safe[last].get("content") or ""
        if prompt.rstrip().endswith("</think>") and content.lstrip().startswith("<think>"):
            notes.add("closed_think")
        full = self.render(safe[:last + 1], tools)
        probe = self.render(safe[:last] + [self._sentinel(message)], tools)
        if SENTINEL not in probe:
            raise TemplateError("the template does not render the assistant's turn")
        start, end = _changed(full, probe)
        turn = full[(len(prompt) - len(self.generation) if prompt.endswith(self.generation)
                     else len(prompt)):end]
        if full.startswith(prompt) and _squash(content) in _squash(turn):
            closer = self._closer_end(full, end)  # the template's own turn: kept, whitespace aside
            return full[len(prompt):closer or len(full[:end].rstrip())], closer is not None
        # the template rewrites the turn (drops reasoning), renders history differently when the
        # turn follows (Mistral moves the system message), or its generation prompt already opened
        # the turn (`<think>\n`)
        opened = self.generation[len(self.header):] if prompt.endswith(self.generation) else ""
        if content:
            before, after = probe.split(SENTINEL, 1)
            at = before.rfind(self.header) if self.header else len(before)
            text = (before[at + len(self.header):] if at >= 0 else "") + content
        else:  # a tool call only: the template's rendering of it, after the header
            at = full.rfind(self.header, 0, start) if self.header else -1
            text, after = (full[at + len(self.header) if at >= 0
                                else _common_prefix(prompt, full):end],
                           full[end:])
        if opened and text.startswith(opened):
            text = text[len(opened):]
        elif opened and content.startswith(opened):
            # the prompt opens the turn its own way (DeepSeek V3.1's thinking mode opens <think>
            # where a rendered turn has </think>)
            text = content[len(opened):]
        elif opened and _squash(text.replace("\r\n", "\n")).startswith(_squash(opened)):
            notes.add("near_miss")
        elif opened and "closed_think" not in notes:
            notes.add("not_after_prompt")
        closer = self._closer_end(after, 0)
        return text + after[:closer or 0], closer is not None

    @staticmethod
    def _sentinel(message):
        """The message with a sentinel where its content is, or, for a tool call without content,
        where the first call's arguments are (Llama 3.1 renders only the call)."""
        if (message.get("content") or "").strip() or not message.get("tool_calls"):
            return dict(message, content=SENTINEL)
        call = dict(message["tool_calls"][0])
        call["function"] = dict(call.get("function", {}), arguments=SENTINEL)
        return dict(message, tool_calls=[call] + message["tool_calls"][1:])

    def _locate(self, safe, i, prompt, tools):
        """[start, end) of message i's content (or first tool call's arguments) in the last turn's
        prompt, found by rendering the history with a sentinel there; None when the template
        shows neither."""
        probe = self.render(safe[:i] + [self._sentinel(safe[i])] + safe[i + 1:len(safe) - 1], tools,
                            generation=True)
        return _changed(prompt, probe) if SENTINEL in probe else None

    def _history_turn(self, safe, j, prompt, tools, notes):
        """(start, end) of earlier turn j in the last turn's prompt, as the template renders it in
        history: from the end of the generation prompt's header (or of the message before, for a
        template without one) to the end of its closer. (None, None) when it cannot be found."""
        found = self._locate(safe, j, prompt, tools)
        closer = self._closer_end(prompt, found[1]) if found else None
        if closer is None:
            notes.add("history_not_found")
            return None, None
        before = self._locate(safe, j - 1, prompt, tools) if j > 0 else None
        previous_end = before[1] if before else 0
        # the turn starts after its header; no header since the message before: at its content
        if self.header:
            at = prompt.rfind(self.header, previous_end, found[0])
            start = at + len(self.header) if at >= 0 else found[0]
        else:  # after the message before, its closer, and what the generation prompt would write
            previous = self._closer_end(prompt, previous_end) if before else 0
            start = max(previous or 0,
                        _common_prefix(prompt, self.render(safe[:j], tools, generation=True)))
        return min(start, found[0]), closer

    def _closer_end(self, text, at):
        """Where a turn's closer ends in text, its content ending at `at`: after the first special
        token, and after EOS too when only whitespace lies between them (Command-R's
        `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`, Apriel's `\\n<|end|>\\n</s>`). None when no special
        token follows (a template closing with text)."""
        match = self.special_re.search(text, at) if self.special_re else None
        if match is None:
            return None
        end = match.end()
        if self.eos and match.group(0) != self.eos:
            rest = text[end:]
            if rest.lstrip().startswith(self.eos):
                end += len(rest) - len(rest.lstrip()) + len(self.eos)
        return end

    def stop_ids(self):
        """The tokens that end a generated turn: the closer's special tokens and EOS."""
        stops = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        if self.prompt_format is None:
            try:
                probe = self.render([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": SENTINEL}])
            except TemplateError:
                return stops
            after = probe.split(SENTINEL, 1)[1] if SENTINEL in probe else ""
            closer = after[:self._closer_end(after, 0) or 0]
            stops |= {t for t in self.tok(closer, add_special_tokens=False).input_ids
                      if self.tok.convert_ids_to_tokens(t) in self.specials}
        return stops


NOTES = {  # what a row's notes mean, said once at start-up with a count and the first row
    "special_text": "special-token text inside messages (e.g. '<|im_end|>' typed into a prompt) "
                    "kept as plain text",
    "no_closer": "the template closes turns with plain text: EOS is appended so that the model "
                 "learns to stop",
    "near_miss": "the target almost repeats what the generation prompt opened (e.g. ' <think>' or "
                 "'<think>\\r\\n' after a prompt ending '<think>\\n'): kept whole, so the think "
                 "block opens twice",
    "closed_think": "the generation prompt closes the think block ('</think>') yet the target "
                    "starts with <think>: set chat_template_kwargs (e.g. {'thinking': True} or "
                    "{'enable_thinking': True})",
    "not_after_prompt": "the template renders this turn differently from its generation prompt: "
                        "kept as the target says, after the prompt",
    "history_not_found": "an earlier assistant turn could not be found in the rendered history: "
                         "trained as context only",
    "reasoning_in_content": "reasoning_content written into the assistant's content as "
                            "'<think>\\n...\\n</think>\\n\\n' (the chat template renders no "
                            "reasoning field)",
    "unknown_token": "text the tokenizer has no token for (NUL bytes, emoji, right-to-left text, "
                     "...) became its unknown token: the model cannot read or write it; check the "
                     "data or the tokenizer"}


def _strings(messages):
    out = []
    for m in messages:
        for k, v in m.items():
            if k != "role":
                out.append(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
    return out


def _pieces(text, table):
    """(piece, its start in text, escaped?) for the parts of text between placeholders, and the
    placeholders (as their original text)."""
    at = 0
    for m in PROTECTED.finditer(text):
        yield text[at:m.start()], at, False
        yield table[int(m.group(1))], m.start(), True
        at = m.end()
    yield text[at:], at, False


def _common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _changed(text, probe):
    """[start, end) of the part of text that differs from probe
    (where the sentinel stands in probe)."""
    start = _common_prefix(text, probe)
    end = len(text) - _common_prefix(text[start:][::-1], probe[start:][::-1])
    return start, max(start, end)


def _squash(text):
    return "".join(text.split())
