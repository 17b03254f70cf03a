"""
Poor man's configurator, nanoGPT style, with its sharp edges filed off. In train.py / sample.py /
bench.py / data.py, right after the config block:

    config = configure(globals())   # python train.py config/x.py --batch_size=4 --min_lr=0

Every module-level name of a simple type (int, float, bool, str, None, list, tuple, dict) defined
before the call is a config key. Each positional argument is a config file, exec'd in the caller's
globals (plain assignments, helper names start with '_'); each --key=value overrides one key. A
value is read with ast.literal_eval and checked against the default's type, the same way for config
files and the command line:
  - split on the first '=' only (--prompt_format=Q={prompt} keeps 'Q={prompt}')
  - an int may stand for a float (--learning_rate=1 gives 1.0); True/False (or true/false)
    parse as bools
  - a key whose default is None takes any value; a str key keeps the text as written
    (--out_dir=007), or takes None (--val_files=None) or a list (several paths)
  - an unknown key fails with the closest valid names; a type mismatch names the key, the expected
    type and the value
Printing happens on rank 0 only. User mistakes raise UserError, which every entry script prints as
one line (and Ctrl-C as one line too): never a traceback for a mistake.

The checks below (one_of, at_least, between) are what each script calls on its settings before
anything slow happens, so a typo costs nothing.
"""

import ast
import difflib
import json
import os
import re
import signal
import sys
import time
import traceback

CONFIG_TYPES = (int, float, bool, str, type(None), list, tuple, dict)
SCENARIOS = ("ar", "tf", "block", "block_tf", "adaptive", "lossless")  # sample.py's, in its order
WORKER_GRACE_S = 20  # how long a torchrun worker's mistake waits for rank 0 to end the job


class UserError(ValueError):
    """A mistake in the user's input (config, data, paths):
    printed as one line, never as a traceback."""


def first_line(error):
    """An exception's message, its first line only (or its type when it has none):
    for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _print_user_errors(kind, value, tb):
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)  # the shell's code for Ctrl-C, without the interpreter's shutdown noise
    if not issubclass(kind, UserError):
        sys.__excepthook__(kind, value, tb)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # a torchrun worker: no teardown
            sys.stderr.flush()
            os._exit(1)
        return
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        print(f"error: {value}", file=sys.stderr, flush=True)
        return
    _worker_error(value)


def _worker_error(value):
    """A torchrun worker's mistake. torchrun stops every rank the moment one exits, so a rank that
    left at once would take rank 0 down before its line is out, and then torchrun's own traceback
    is all the user reads. Rank 0 prints its line and leaves it in torchrun's error file (its
    report quotes it last, as the root cause); the other ranks wait for rank 0, which meets the
    same mistake, to end the job, and print theirs only if it does not (a mistake of their own)."""
    rank, line = int(os.environ.get("RANK", 0)), f"error: {value}"
    if rank:
        time.sleep(WORKER_GRACE_S)
        line = f"error (rank {rank}): {value}"
    print(line, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {  # torchrun's own shape
                    "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass  # the line is out on stderr already
    os._exit(1)  # no teardown (compute_cleanup): the others are stopped by torchrun


sys.excepthook = _print_user_errors  # from the first import on: Ctrl-C while torch loads: a line


def _interrupted(signum, frame):
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


# One of this project's scripts (python train.py ...): Ctrl-C before the script takes SIGINT over
# (train.py: a save at the end of the step) ends it at once with one line. A KeyboardInterrupt raised
# inside a library's import can be swallowed there and resurface later as another error.
if sys.argv[0].endswith(".py") and \
        os.path.dirname(os.path.abspath(sys.argv[0])) == os.path.dirname(os.path.abspath(__file__)):
    signal.signal(signal.SIGINT, _interrupted)


def config_keys(g):
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)]


def closest(word, words, cutoff=0.6):
    """' (did you mean x?)' for the nearest of words, or '' when none is near."""
    close = difflib.get_close_matches(str(word), [str(w) for w in words], n=3, cutoff=cutoff)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _unknown_key(key, keys):
    return f"unknown config key {key!r}{_hint(key, keys)}"


def _hint(key, keys):
    return closest(key, keys) or (f" (no key is close: the keys are the config block of "
                                  f"{os.path.basename(sys.argv[0])})")


def check_type(key, value, default, where):
    """value as the key's type (an int becomes a float for a float key),
    or a UserError naming where."""
    if default is None or value is None and isinstance(default, str):
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, (str, list, tuple))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:  # list or tuple: one value is a list of one (--decode_batches=8)
        value = value if isinstance(value, (list, tuple, dict)) else (value,)
        ok = isinstance(value, (list, tuple))
    if not ok:
        raise UserError(f"{where}: expected {type(default).__name__}, got {value!r} "
                        f"({type(value).__name__})")
    return value


def parse_value(key, text, default):
    """Parse the text of --key=text against the type of the key's default."""
    if text in ("true", "false"):
        text = text.capitalize()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = text  # a bare word such as cuda or out/run1 is a string
    if isinstance(default, str) and not isinstance(value, (str, list, tuple, type(None))):
        return text  # a str key keeps what was typed (--out_dir=007)
    return check_type(key, value, default, f"--{key}")


def _run_config_file(path, g, keys):
    before = {k: g[k] for k in keys}
    try:
        with open(path) as f:
            source = f.read()
        exec(compile(source, path, "exec"), g)
    except SyntaxError as e:
        raise UserError(f"{path} line {e.lineno}: {e.msg}") from None
    except OSError as e:
        raise UserError(f"config file {path!r}: {e.strerror}") from None
    except SystemExit as e:  # sys.exit(3) or exit() in the file: say where, keep its code
        line = next((f.lineno for f in traceback.extract_tb(e.__traceback__)
                     if f.filename == path), "?")
        print(f"error: {path} line {line}: the config file called sys.exit({e.code!r})",
              file=sys.stderr, flush=True)
        raise
    except Exception as e:  # a NameError, a ZeroDivisionError, ... in the file's own code
        line = next((f.lineno for f in traceback.extract_tb(e.__traceback__)
                     if f.filename == path), "?")
        raise UserError(f"{path} line {line}: {type(e).__name__}: {e}") from None
    for name in [k for k in g if k not in before and not k.startswith("_")]:
        if isinstance(g[name], CONFIG_TYPES) and name not in keys:
            raise UserError(f"{path} sets unknown key {name!r}{_hint(name, keys)}; helper "
                            "variables in config files start with '_'")
    for key in keys:
        if g[key] is not before[key]:
            g[key] = check_type(key, g[key], before[key], f"{path}: {key}")


def configure(g, argv=None):
    """Apply config files and --key=value overrides (argv, default sys.argv[1:]) to the
    globals dict g. Returns the config: {key: value}."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(g)
    master = int(os.environ.get("RANK", 0)) == 0
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg!r} not found (arguments are config files "
                                "or --key=value)")
            if master:
                print(f"config: {arg}")
            _run_config_file(arg, g, keys)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise UserError(f"{arg!r}: overrides are written --key=value")
        if key not in keys:
            raise UserError(_unknown_key(key, keys))
        g[key] = parse_value(key, text, g[key])
        if master:
            print(f"config: {key} = {g[key]!r}")
    return {k: g[k] for k in keys}


# -------------------------------------------------------------------------------------------------
# checks a script runs on its settings, before anything slow

def one_of(key, value, choices):
    """value, if it is one of choices; else one line with the closest valid value."""
    if value not in choices:
        hint = closest(value, choices) if isinstance(value, str) else ""
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(repr, choices))}{hint}")
    return value


def at_least(key, value, low):
    if value < low:
        raise UserError(f"{key}={value!r}: must be >= {low}")
    return value


def between(key, value, low, high):
    if not low <= value <= high:
        raise UserError(f"{key}={value!r}: must be between {low} and {high}")
    return value


def check_train(c, world):
    """Every setting of train.py (c: its config), checked before anything slow happens."""
    one_of("resume", c["resume"], ("auto", "disable"))
    one_of("layout", c["layout"], ("split", "interleaved"))
    one_of("dtype", c["dtype"], ("auto", "float32", "bfloat16"))
    one_of("device", c["device"].split(":")[0], ("auto", "cpu", "cuda"))
    one_of("attention", c["attention"], ("auto", "flex", "sdpa"))
    one_of("parallel", c["parallel"], ("fsdp", "ddp"))
    one_of("special_text", c["special_text"], ("keep", "drop"))
    one_of("data_format", c["data_format"], ("auto", "prompt_target", "messages", "sharegpt"))
    one_of("finetune", c["finetune"], ("full", "gated_lora"))
    at_least("lora_rank", c["lora_rank"], 1)
    between("lora_alpha", c["lora_alpha"], 1e-6, 1e6)
    for key in ("save_every", "keep_last", "eval_every", "max_steps", "mask_loss_weight",
                "weight_decay", "grad_clip", "min_lr", "seed", "batch_tokens", "data_workers"):
        at_least(key, c[key], 0)
    for key in ("log_every", "batch_size", "gradient_accumulation_steps", "epochs", "n_layer",
                "n_embd", "n_head", "max_nonfinite"):
        at_least(key, c[key], 1)
    at_least("max_length", c["max_length"], 2)
    between("block_size", c["block_size"], 1, c["max_length"] - 1)
    between("warmup_ratio", c["warmup_ratio"], 0.0, 1.0)
    if not c["learning_rate"] > 0:
        raise UserError(f"learning_rate={c['learning_rate']!r}: must be > 0")
    between("min_lr", c["min_lr"], 0.0, c["learning_rate"])
    if c["block_offset"] != "random":
        try:
            offset = int(c["block_offset"])
        except ValueError:
            raise UserError(f"block_offset={c['block_offset']!r}: expected 'random' or an "
                            "int") from None
        between("block_offset", offset, 0, c["block_size"] - 1)
    tp = at_least("tensor_parallel", c["tensor_parallel"], 1)
    if world % tp:
        raise UserError(f"tensor_parallel={tp} must divide the {world} ranks (world = data "
                        "parallel x tensor parallel)")
    if tp > 1 and c["parallel"] == "ddp":
        raise UserError(f"tensor_parallel={tp} needs parallel='fsdp' (DDP keeps whole copies of "
                        "the weights)")
    dp = world // tp
    if c["gradient_accumulation_steps"] % dp:
        ranks = f"{dp} data-parallel ranks" if tp > 1 else f"{world} ranks"
        raise UserError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be "
                        f"divisible by the {ranks} (it counts micro-batches over all of them)")
    if c["init_from"] == "demo" and (c["n_embd"] % c["n_head"] or (c["n_embd"] // c["n_head"]) % 2):
        raise UserError(f"n_embd={c['n_embd']} / n_head={c['n_head']}: the head size must be an "
                        "even whole number (RoPE)")
    if c["init_from"] != "demo" and not os.path.isdir(c["init_from"]):
        raise UserError(f"init_from={c['init_from']!r} is not a folder (a local Hugging Face "
                        "model, or 'demo'; nothing is downloaded)")
    check_prompt_format(c["prompt_format"])
    if c["batch_tokens"] and c["batch_tokens"] < c["block_size"] + 1:
        raise UserError(f"batch_tokens={c['batch_tokens']}: a micro-batch must hold a prompt and a "
                        "block")


def check_prompt_format(prompt_format):
    if prompt_format is not None and "{prompt}" not in str(prompt_format):
        raise UserError(f"prompt_format={prompt_format!r}: expected a str with a {{prompt}} field")


def check_sample(c, world):
    """The settings of sample.py (c: its config) that need no model, checked before anything slow
    (the sampling values and drafts, which the checkpoint completes, are checked next to it)."""
    for s in ([c["scenario"]] if c["scenario"] == "all" else c["scenario"].split(",")):
        one_of("scenario", s.strip(), ("all",) + SCENARIOS)
    for key, low in (("num_samples", 0), ("max_new_tokens", 1), ("batch_size", 1),
                     ("block_size", 0), ("samples_per_prompt", 1), ("tensor_parallel", 1)):
        at_least(key, c[key], low)
    between("threshold", c["threshold"], 0.0, 1.0)
    one_of("dtype", c["dtype"], ("float32", "bfloat16"))
    given = any(a.startswith("--prompt=") for a in sys.argv[1:])  # '' is also the default: none
    if (given or c["prompt"]) and not str(c["prompt"]).strip():
        raise UserError(f"prompt={c['prompt']!r} is empty: give the text to decode, or leave "
                        "--prompt out to decode the rows of data_files")
    one_of("color", c["color"], (None, True, False))
    if c["chat_template_kwargs"] is not None and not isinstance(c["chat_template_kwargs"], dict):
        raise UserError(f"chat_template_kwargs={c['chat_template_kwargs']!r}: expected a dict of "
                        "template options, e.g. \"{'enable_thinking': True}\"")
    check_prompt_format(c["prompt_format"])
    try:
        groups = re.compile(c["answer_regex"]).groups
    except re.error as e:
        raise UserError(f"answer_regex={c['answer_regex']!r} is not a regular expression "
                        f"({e})") from None
    if c["answer_regex"] and groups < 1:
        raise UserError(f"answer_regex={c['answer_regex']!r} needs a group: the answer is group 1")
    if world % c["tensor_parallel"]:
        raise UserError(f"tensor_parallel={c['tensor_parallel']} must divide the {world} ranks "
                        "(torchrun --nproc_per_node)")
    for key in ("summary_json", "write_parquet"):
        check_output(key, c[key])


def check_output(key, path):
    """A file a script writes at its end, checked before it starts: its folder exists, it is not a
    folder, and a file can be created there."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"{key}={path!r} is a folder: give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"{key}={path!r}: its folder does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
        if not existed:
            os.remove(path)
    except OSError as e:
        raise UserError(f"{key}={path!r} cannot be written: {e.strerror}") from None
