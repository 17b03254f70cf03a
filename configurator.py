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
  - an int may stand for a float (--learning_rate=1 gives 1.0); True/False (or true/false) parse as
    bools
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
import os
import sys
import traceback

CONFIG_TYPES = (int, float, bool, str, type(None), list, tuple, dict)


class UserError(ValueError):
    """A mistake in the user's input (config, data, paths): printed as one line, never as a
    traceback."""


def _print_user_errors(kind, value, tb):
    if issubclass(kind, UserError):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {value}", file=sys.stderr, flush=True)
    elif issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)  # the shell's code for Ctrl-C, without the interpreter's shutdown noise
    else:
        sys.__excepthook__(kind, value, tb)


def config_keys(g):
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)]


def closest(word, words, cutoff=0.6):
    """' (did you mean x?)' for the nearest of words, or '' when none is near."""
    close = difflib.get_close_matches(str(word), [str(w) for w in words], n=3, cutoff=cutoff)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _unknown_key(key, keys):
    return f"unknown config key {key!r}{_hint(key, keys)}"


def _hint(key, keys):
    return (
        closest(key, keys)
        or f" (no key is close: the keys are the config block of {os.path.basename(sys.argv[0])})"
    )


def check_type(key, value, default, where):
    """value as the key's type (an int becomes a float for a float key), or a UserError naming
    where."""
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
        raise UserError(
            f"{where}: expected {type(default).__name__}, got {value!r} ({type(value).__name__})"
        )
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
    except Exception as e:  # a NameError, a ZeroDivisionError, ... in the file's own code
        line = next(
            (f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path), "?"
        )
        raise UserError(f"{path} line {line}: {type(e).__name__}: {e}") from None
    for name in [k for k in g if k not in before and not k.startswith("_")]:
        if isinstance(g[name], CONFIG_TYPES) and name not in keys:
            raise UserError(
                f"{path} sets unknown key {name!r}{_hint(name, keys)}; helper variables in config "
                "files start with '_'"
            )
    for key in keys:
        if g[key] is not before[key]:
            g[key] = check_type(key, g[key], before[key], f"{path}: {key}")


def configure(g, argv=None):
    """Apply config files and --key=value overrides (argv, default sys.argv[1:]) to the globals dict
    g. Returns the config: {key: value}."""
    sys.excepthook = _print_user_errors
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(g)
    master = int(os.environ.get("RANK", 0)) == 0
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(
                    f"config file {arg!r} not found (arguments are config files or --key=value)"
                )
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


def script_defaults(path):
    """The config block of an entry script (its top-level literal assignments), without running it:
    what data.py reads from train.py so that the same config files and overrides work for both."""
    defaults = {}
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return {
        k: v for k, v in defaults.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)
    }
