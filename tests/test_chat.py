"""chat.py: reading rows, and what a conversation becomes under the real chat templates of many
families (tests/fixtures/templates, rendered with a byte-level tokenizer, and the real Qwen
tokenizers when present): the learned spans, the closers, the think rules, tool conversations, and
text that cannot forge special tokens.
"""

import json

import pytest

import chat
from conftest import byte_tokenizer, shared_tokenizer, write_parquet
from configurator import UserError
from chat import MASK_TOKEN, add_mask_token
from demo import demo_tokenizer

USER = [{"role": "user", "content": "What is 2+2?"}]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"]}}}]


def encode(tok, prompt, target, **options):
    """(prompt ids, learned ids, notes) of a prompt/target row."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids, spans, notes = chat.Chat(tok, **options).encode(
        messages + [{"role": "assistant", "content": target}], len(messages))
    (s, e), = spans
    assert e == len(ids)
    return ids[:s], ids[s:], notes


def text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


# ---------------- reading rows and bad input

def test_read_strings_and_chat_lists(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", [{"prompt": "hi", "target": "yo"}])
    b = write_parquet(
        tmp_path / "b.parquet",
        [{"prompt": USER, "target": [{"role": "assistant", "content": "4"}]}])
    rows = chat.read_rows([a, b])
    assert [(m, first) for m, first, _, _ in rows] == [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], 1),
        (USER + [{"role": "assistant", "content": "4"}], 1)]
    assert rows[0][3] == f"{a} row 0" and rows[0][2] is None


def test_custom_keys_and_prompts_only(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", [{"instruction": "hi", "output": "yo"}])
    assert chat.read_rows([path], "instruction", "output")[0][0][-1] == {
        "role": "assistant",
        "content": "yo"}
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "hi"}])
    messages, first, _, _ = chat.read_rows([path], require_target=False)[0]
    assert first == 1 and chat.split_for_decoding(messages, first) == (messages, None)
    with pytest.raises(UserError, match="p.parquet: missing column 'target'"):
        chat.read_rows([path])


@pytest.mark.parametrize(
    "row,message",
    [
        ({"question": "hi", "target": "yo"}, "missing column 'prompt'"),
        ({"prompt": "  ", "target": "yo"}, "row 1: column 'prompt' message 0 has empty content"),
        ({"prompt": "hi", "target": ""}, "row 1: column 'target' is empty"),
        (
            {
                "prompt": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
                "target": "yo"},
            "row 1: column 'prompt' message 1 has unknown role 'robot'"),
        (
            {"prompt": "hi", "target": [{"role": "user", "content": "x"}]},
            "row 1: column 'target' has no assistant"),
        (
            {"prompt": None, "target": "yo"},
            "row 1: column 'prompt' must be a string or a list .* got NoneType"),
        ({"prompt": [], "target": "yo"}, "row 1: column 'prompt' must be .* got an empty list"),
        (
            {"messages": [{"role": "user", "content": "a"}], "x": 1},
            "row 1: column 'messages' has no assistant"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}],
                "tools": "{bad"},
            "row 1: column 'tools' is not valid JSON")])
def test_bad_rows_name_file_row_and_problem(tmp_path, row, message):
    # a parquet column holds one type: the good first row is of the same kind as the bad one
    good = {
        k: (
            USER
            if isinstance(v, list) and k == "prompt"
            else (
                [{"role": "assistant", "content": "ok"}]
                if isinstance(v, list) and k == "target"
                else (
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]
                    if k == "messages"
                    else "[]" if k == "tools" else 1 if k == "x" else "ok")))
        for k, v in row.items()}
    rows = [row, row] if "question" in row else [good, row]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(UserError, match=message) as e:
        chat.read_rows([path])
    assert "bad.parquet" in str(e.value) and "\n" not in str(e.value)


def test_non_string_content(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    msgs = pa.array(
        [[{"role": "user", "content": 3}]],
        pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())])))
    pq.write_table(pa.table({"prompt": msgs, "target": ["x"]}), tmp_path / "n.parquet")
    with pytest.raises(
        UserError, match="row 0: column 'prompt' message 0 content must be a string, got int"):
        chat.read_rows([str(tmp_path / "n.parquet")])


def test_corrupt_file(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(UserError, match="junk.parquet: cannot read parquet"):
        chat.read_rows([str(tmp_path / "junk.parquet")])


def test_openai_style_tool_conversation_reads(tmp_path):
    """Assistant messages with empty (or no) content and tool_calls, a tools column as JSON text:
    accepted; parquet's missing struct fields (None) do not reach the template."""
    messages = [
        {"role": "user", "content": "2+2?", "tool_calls": None, "tool_call_id": None},
        {
            "role": "assistant",
            "content": None,
            "tool_call_id": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
        {"role": "tool", "content": "4", "tool_calls": None, "tool_call_id": "c1"},
        {"role": "assistant", "content": "4.", "tool_calls": None, "tool_call_id": None}]
    path = write_parquet(
        tmp_path / "t.parquet", [{"messages": messages, "tools": json.dumps(TOOLS)}])
    (read, first, tools, _), = chat.read_rows([path])
    assert first == 0 and tools == TOOLS
    # no None keys, no content
    assert read[1] == {"role": "assistant", "tool_calls": messages[1]["tool_calls"],}
    assert read[2] == {"role": "tool", "content": "4", "tool_call_id": "c1"}


# ---------------- one turn: the template's own framing

def test_demo_template_think_overlap_and_near_miss():
    tok = demo_tokenizer()  # its generation prompt ends with <think>\n, like the R1 distills
    p, r, notes = encode(tok, "What is 2+2?", "<think>\nLet me add.</think>The answer is 4.")
    assert text(tok, p).endswith("<|assistant|>\n<think>\n") and not notes
    assert text(tok, r) == "Let me add.</think>The answer is 4.<|end|>"
    for near in (
        "<think>Let me add.</think>4",
        " <think>\nLet me add.</think>4",
        "<think>\r\nLet me.</think>4"):
        # almost the prompt's <think>\n: kept whole, and said
        p, r, notes = encode(tok, "What is 2+2?", near)
        # the demo has no \r: its unknown token, noted too
        unknown = {"unknown_token"} if "\r" in near else set()
        assert notes == {"near_miss"} | unknown and text(tok, r).startswith(near[:7]), near
    # no think at all: nothing to remove
    p, r, notes = encode(tok, "What is 2+2?", "The answer is 4.")
    assert text(tok, r) == "The answer is 4.<|end|>"


def test_chatml_keeps_target_whole_and_plain_text_overlap():
    tok = demo_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    # "nt\n": plain text
    for target in ("<think>\nhm</think>The answer is 4.", "The answer is 4.", "nt\nHi"):
        p, r, notes = encode(tok, USER, target)
        assert (
            text(tok, p).endswith("<|im_start|>assistant\n")
            and text(tok, r) == target + "<|im_end|>")


def test_prompt_format_without_chat_template():
    tok = demo_tokenizer()
    tok.chat_template = None
    with pytest.raises(UserError, match="has no chat template: set prompt_format"):
        chat.Chat(tok)
    p, r, _ = encode(tok, USER, "4", prompt_format="Q: {prompt}\nA: ")
    assert text(tok, p) == "Q: What is 2+2?\nA: " and r == tok("4").input_ids + [tok.eos_token_id]
    assert chat.Chat(tok, prompt_format="Q: {prompt}\nA: ").stop_ids() == {tok.eos_token_id}


def test_stop_ids_are_the_closer_and_eos():
    tok = demo_tokenizer()
    assert chat.Chat(tok).stop_ids() == {tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id}


# what each family's assistant turn must be (learned text after the prompt), and where the prompt
# ends; R1 distills: the template itself drops the reasoning from the turn; the target keeps it, the
# prompt's <think>\n opening not repeated (docs/design.md, "Chat data")
TARGET = "<think>\nadd them\n</think>\n\nThe answer is 4."
EXPECTED = {
    "qwen2.5": ("<|im_start|>assistant\n", TARGET + "<|im_end|>"),
    "qwen3": ("<|im_start|>assistant\n", TARGET + "<|im_end|>"),
    "qwq": ("<|im_start|>assistant\n<think>\n", TARGET[len("<think>\n") :] + "<|im_end|>"),
    "deepseek-r1-distill-qwen": (
        "<｜Assistant｜><think>\n",
        TARGET[len("<think>\n") :] + "<｜end▁of▁sentence｜>"),
    "llama-3.1": ("<|start_header_id|>assistant<|end_header_id|>\n\n", TARGET + "<|eot_id|>"),
    "gemma-2": ("<start_of_turn>model\n", TARGET + "<end_of_turn>"),
    "mistral-nemo": ("[/INST]", TARGET + "</s>"),
    "phi-3.5-mini": ("<|assistant|>\n", TARGET + "<|end|>\n<|endoftext|>"),
    "command-r7b": (
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        "<|START_RESPONSE|>" + TARGET + "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
    "gpt-oss": ("<|start|>assistant", "<|channel|>final<|message|>" + TARGET + "<|return|>"),
    "apriel-1.5": ("<|assistant|>\n", TARGET + "\n<|end|>\n</s>")}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_learns_its_own_turn_and_closer(family):
    tok = byte_tokenizer(family)
    conversation = USER + [{"role": "assistant", "content": TARGET}]
    p, r, notes = encode(tok, USER, TARGET)
    prompt_end, turn = EXPECTED[family]
    assert text(tok, p).endswith(prompt_end) and text(tok, r) == turn and not notes
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    # these drop or reshape the reasoning themselves
    if family not in ("deepseek-r1-distill-qwen", "qwq"):
        assert rendered.startswith(text(tok, p + r))  # the template's own text, up to the closer
        assert rendered[len(text(tok, p + r)) :].strip() in (
            "",
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    # the family's own stop tokens are learned,
    closer = [t for t in r[-3:] if t in set(tok.all_special_ids)]
    stops = chat.Chat(tok).stop_ids()  # and decoding stops on them
    assert closer and set(closer) <= stops and tok.eos_token_id in stops


def test_template_options_reach_every_render():
    tok = byte_tokenizer("qwen3")
    p, r, _ = encode(tok, USER, "The answer is 4.", options={"enable_thinking": False})
    assert text(tok, p).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text(tok, r) == "The answer is 4.<|im_end|>"
    # a closed, empty think block by default: a <think> target is said
    tok = byte_tokenizer("deepseek-v3.1")
    p, r, notes = encode(tok, USER, TARGET)
    assert text(tok, p).endswith("<｜Assistant｜></think>") and notes == {"closed_think"}
    p, r, notes = encode(tok, USER, TARGET, options={"thinking": True})
    assert text(tok, p).endswith("<｜Assistant｜><think>") and not notes
    assert text(tok, r) == TARGET[len("<think>"):] + "<｜end▁of▁sentence｜>"


def test_qwen_real_tokenizers():
    for name in ("qwen2.5-instruct", "qwen3"):
        tok = shared_tokenizer(name)
        p, r, _ = encode(tok, "What is 2+2?", TARGET)
        assert (
            tok.decode(p).endswith("<|im_start|>assistant\n")
            and tok.decode(r) == TARGET + "<|im_end|>")
        assert chat.Chat(tok).stop_ids() == {tok.convert_tokens_to_ids("<|im_end|>")}
    tok.chat_template = tok.chat_template.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    p, r, _ = encode(tok, "What is 2+2?", TARGET)  # an R1-style generation prompt: the overlap goes
    assert (
        tok.decode(p).endswith("<|im_start|>assistant\n<think>\n")
        and tok.decode(r) == TARGET[8:] + "<|im_end|>")


def test_gpt2_without_template():
    tok = shared_tokenizer("gpt2")
    with pytest.raises(UserError, match="no chat template"):
        chat.Chat(tok)
    p, r, _ = encode(tok, "hi", " there", prompt_format="Q: {prompt}\nA:")
    assert r[-1] == tok.eos_token_id and tok.decode(p) == "Q: hi\nA:"


# ---------------- conversations with tools

def conversation(tool_content=""):
    return [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": tool_content,
            "tool_calls": [
                {
                    "id": "call12345",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
        {"role": "tool", "content": "RESULT-4", "tool_call_id": "call12345"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": TARGET}]


def assistant_turns(rendered, opener, closer):
    """The assistant turns of a rendering, cut by the family's own markers: the independent
    reference."""
    turns, at = [], 0
    while (start := rendered.find(opener, at)) >= 0:
        end = rendered.index(closer, start) + len(closer)
        turns.append(rendered[start + len(opener):end])
        at = end
    return turns


@pytest.mark.parametrize("family,opener,closer", [
    ("qwen3", "<|im_start|>assistant\n", "<|im_end|>"),
    ("qwen2.5", "<|im_start|>assistant\n", "<|im_end|>"),
    ("llama-3.1", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ("apriel-1.5", "<|assistant|>\n", "</s>")])
def test_a_tool_conversation_learns_exactly_the_assistant_turns(family, opener, closer):
    tok = byte_tokenizer(family)
    messages = conversation()
    ids, spans, notes = chat.Chat(tok).encode(messages, 0, TOOLS)
    rendered = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    # the template's text; the system prompt, tools
    assert text(tok, ids) == rendered[: len(text(tok, ids))]
    learned = [text(tok, ids[s:e]) for s, e in spans]  # and tool output included, only as context
    assert learned == assistant_turns(rendered, opener, closer) and len(learned) == 3 and not notes
    # token by token: nothing else is learned
    labels = set(i for s, e in spans for i in range(s, e))
    assert all(text(tok, ids[i:i + 1]) in rendered for i in labels)
    # the tool's output: context
    assert "RESULT-4" in text(tok, ids) and "RESULT-4" not in "".join(learned)


def test_a_tool_conversation_in_other_families():
    """Families that render tool calls their own way: each learned turn is the call or the answer,
    with the family's closer; the tool's output is never learned."""
    expect = {
        "gpt-oss": [
            ' to=functions.add<|channel|>commentary json<|message|>"{\\"a\\": 2, \\"b\\": 2}"<|call|>',
            "<|channel|>final<|message|>It is 4.<|end|>",
            "<|channel|>final<|message|>" + TARGET + "<|return|>"],
        "mistral-nemo": [
            '[TOOL_CALLS][{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 2}", "id": "call12345"}]</s>',
            "It is 4.</s>",
            TARGET + "</s>"],
        "deepseek-v3.1": [
            '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 2, "b": 2}<｜tool▁call▁end｜>'
            "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>",
            "It is 4.<｜end▁of▁sentence｜>",
            TARGET + "<｜end▁of▁sentence｜>"]}
    for family, turns in expect.items():
        tok = byte_tokenizer(family)
        ids, spans, notes = chat.Chat(tok).encode(conversation(), 0, TOOLS)
        assert [text(tok, ids[s:e]) for s, e in spans] == turns, family


def test_a_template_that_refuses_a_row():
    tok = byte_tokenizer("gemma-2")
    with pytest.raises(chat.TemplateError, match="System role not supported"):
        chat.Chat(tok).encode(conversation(), 0)


def test_a_target_list_with_a_tool_turn_keeps_the_tool_output(tmp_path):
    """target = [assistant (call), tool, assistant]: both assistant turns learned, the tool output
    in between as context (it used to be dropped)."""
    target = conversation()[2:5]
    rows = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "target": target}]
    path = write_parquet(tmp_path / "t.parquet", rows)
    (messages, first, tools, _), = chat.read_rows([path])
    tok = byte_tokenizer("qwen3")
    ids, spans, _ = chat.Chat(tok).encode(messages, first, TOOLS)
    assert [
        text(tok, ids[s:e]) for s, e in spans
    ] == [  # Qwen3 renders a last turn with its (empty) think
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is 4.<|im_end|>"]
    assert "<tool_response>\nRESULT-4\n</tool_response>" in text(tok, ids[spans[0][1]:spans[1][0]])


# ---------------- text that must not become special tokens

@pytest.mark.parametrize("family", ["qwen3", "llama-3.1", "gpt-oss", "command-r7b"])
def test_special_token_text_in_messages_never_forges_ids(family):
    tok = byte_tokenizer(family)
    mask_id, _ = add_mask_token(tok)
    c = chat.Chat(tok)
    forged = c.guarded
    # every structural token, the end of turn and the mask token among them
    planted = " ".join(forged)
    assert MASK_TOKEN in forged and tok.eos_token in forged
    messages = [
        {"role": "user", "content": "Say " + planted},
        {"role": "assistant", "content": "Ok: " + planted}]
    ids, spans, notes = c.encode(messages, 1)
    clean = c.encode(
        [{"role": "user", "content": "Say x"}, {"role": "assistant", "content": "Ok: x"}], 1
    )[0]
    specials = set(tok.all_special_ids)
    # zero forged
    assert sorted(i for i in ids if i in specials) == sorted(i for i in clean if i in specials)
    assert mask_id not in ids and notes == {"special_text"}
    assert planted in text(tok, ids)  # kept as text
    assert c.prompt_ids(messages[:1]).count(mask_id) == 0
    dropped = chat.Chat(tok, special_text="drop").encode(messages, 1)
    assert dropped[:2] == (None, None)
