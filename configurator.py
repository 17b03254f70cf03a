"""
Poor man's configurator, nanoGPT style, with its sharp edges filed off. In train.py / sample.py / bench.py:

    from configurator import configure
    configure(globals())          # python train.py config/x.py --batch_size=4 --learning_rate=3e-5

Every module-level name of a simple type (int, float, bool, str, None, list, tuple) defined before the call is
a config key. Each positional argument is a config file, exec'd in the caller's globals (plain assignments,
helper names start with '_'); each --key=value overrides one key. The value is read with ast.literal_eval
and checked against the default's type:
  - split on the first '=' only (--prompt_format=Q={prompt} keeps 'Q={prompt}')
  - an int may override a float (--learning_rate=1 gives 1.0); True/False (or true/false) parse as bools
  - a key whose default is None takes any value; a str key keeps the text as written (--out_dir=007),
    or takes None (--val_files=None)
  - an unknown key fails with the closest valid names; a type mismatch names key, expected type and value
Printing happens on rank 0 only. User mistakes raise UserError, which every entry script prints as one line.
"""
import ast
import difflib
import os
import sys

CONFIG_TYPES = (int, float, bool, str, type(None), list, tuple)


class UserError(ValueError):
    """A mistake in the user's input (config, data, paths): printed as one line, never as a traceback."""


def _print_user_errors(kind, value, tb):
    if issubclass(kind, UserError):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def config_keys(g):
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)]


def _closest(key, keys):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else f" (valid keys: {', '.join(sorted(keys))})"


def parse_value(key, text, default):
    """Parse the text of --key=text against the type of the key's default."""
    if text in ("true", "false"):
        text = text.capitalize()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as cuda or out/run1 is a string
    if default is None:
        return value
    if isinstance(default, str):
        # a str key keeps what was typed, unless it was quoted, a list (several paths) or None (unset)
        return value if value is None or isinstance(value, (str, list, tuple)) else text
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # list or tuple
        ok = isinstance(value, (list, tuple))
    if not ok:
        raise UserError(f"--{key}: expected {type(default).__name__}, got {value!r} ({type(value).__name__})")
    return value


def configure(g, argv=None):
    """Apply config files and --key=value overrides (argv, default sys.argv[1:]) to the globals dict g."""
    sys.excepthook = _print_user_errors
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(g)
    master = int(os.environ.get("RANK", 0)) == 0
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg!r} not found (arguments are config files or --key=value)")
            if master:
                print(f"config: {arg}")
            before = set(g)
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), g)
            for name in sorted(set(g) - before):
                if not name.startswith("_") and isinstance(g[name], CONFIG_TYPES):
                    raise UserError(f"{arg} sets unknown key {name!r}{_closest(name, keys)}; "
                                    "helper variables in config files start with '_'")
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise UserError(f"{arg!r}: overrides are written --key=value")
        if key not in keys:
            raise UserError(f"unknown config key {key!r}{_closest(key, keys)}")
        g[key] = parse_value(key, text, g[key])
        if master:
            print(f"config: {key} = {g[key]!r}")
    return {k: g[k] for k in keys}
