"""
Configuration, nanoGPT style: each script defines its defaults as plain module-level variables,
then calls configure(globals()). Overrides come from, in order:
  1. config files given as positional arguments:  python train.py config/gutenberg.py
  2. --key=value arguments:                        python train.py config/gutenberg.py --batch_size=8
A config file is ordinary Python that assigns some of the same names. Every value is checked
against its default's type, and an unknown key is an error that suggests the closest names.
Errors are one line on stderr (SystemExit), raised before any real work starts.
"""

import ast
import difflib
import sys

SIMPLE_TYPES = (bool, int, float, str, type(None))


def config_keys(namespace: dict) -> list[str]:
    """The configurable names of a script: public module-level variables of simple types."""
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, SIMPLE_TYPES)]


def _unknown(key: str, known: dict, where: str) -> SystemExit:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help to list the keys"
    return SystemExit(f"error: unknown config key {key!r} ({where}){hint}")


def _check_type(key: str, value, default, where: str):
    """The value, converted where it is safe (an int where a float is expected), or a clear error."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    want, got = type(default).__name__, type(value).__name__
    raise SystemExit(f"error: {key} must be a {want} (default {default!r}), got {value!r} of type {got} ({where})")


def _parse_value(key: str, raw: str, default):
    if isinstance(default, str):  # strings need no quotes on the command line: --device=cuda
        try:
            value = ast.literal_eval(raw)
            return value if isinstance(value, str) else raw
        except (ValueError, SyntaxError):
            return raw
    if isinstance(default, bool):  # accept the usual spellings of booleans
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a string where a number was expected: _check_type says so


def configure(namespace: dict, argv: list[str] | None = None) -> dict:
    """Resolves the config of a script whose defaults are in namespace (its globals());
    returns {key: value} for every configurable key. argv defaults to sys.argv[1:]."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: namespace[k] for k in config_keys(namespace)}
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("config keys and their defaults (override with a config file or --key=value):")
            for k, v in defaults.items():
                print(f"  --{k}={v!r}")
            raise SystemExit(0)
        if not arg.startswith("--"):  # a config file
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise SystemExit(f"error: cannot read config file {arg}: {e.strerror}") from None
            file_ns: dict = {"__file__": arg}  # so that a config can build on another beside it
            try:
                exec(compile(source, arg, "exec"), file_ns)
            except Exception as e:
                line = getattr(e, "lineno", None) or (e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?")
                raise SystemExit(f"error: config file {arg}, line {line}: {type(e).__name__}: {e}") from None
            for k in config_keys(file_ns):
                if k not in defaults:
                    raise _unknown(k, defaults, f"in {arg}")
                config[k] = _check_type(k, file_ns[k], defaults[k], f"in {arg}")
        else:
            key, eq, raw = arg[2:].partition("=")
            if key not in defaults:
                raise _unknown(key, defaults, f"from {arg!r}")
            if not eq:
                if not isinstance(defaults[key], bool):
                    raise SystemExit(f"error: {arg!r} needs a value: --{key}=VALUE")
                raw = "True"  # --compile alone means --compile=True
            value = _parse_value(key, raw, defaults[key])
            config[key] = _check_type(key, value, defaults[key], f"from {arg!r}")
    return config
