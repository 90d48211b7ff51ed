"""
Configuration, nanoGPT style: each script defines its defaults as plain module-level variables,
then calls configure(globals()). Overrides come from, in this order whatever the order typed:
  1. config files given as positional arguments:  python train.py config/gutenberg.py
  2. --key=value arguments, over the files:        python train.py --batch_size=8 config/gutenberg.py
A config file is ordinary Python (a .py file) that assigns some of the same names. Every public name it defines
(modules, functions and classes aside; a helper's name starts with _) must be a key, of its default's
type: an unknown key is an error that suggests the closest names. A script's UPPER_CASE names are
constants, not keys. Errors are one line on stderr (SystemExit), raised before any real work starts.
resolve() also says which keys a file or a flag set, so that a resumed run can tell a setting typed
from a default left alone.
"""

import difflib
import os
import re
import sys
import types

SIMPLE_TYPES = (bool, int, float, str, type(None))


def config_keys(namespace: dict) -> list[str]:
    """The configurable names of a script: public module-level variables of simple types. UPPER_CASE
    names are constants (PEP 8's convention: GENERATE_BATCH, imported from plumbing), not settings."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, SIMPLE_TYPES)]


def declared_comments(namespace: dict) -> dict[str, str]:
    """Each setting's one-line comment, where it is declared: `name = value  # comment` in the script,
    or `name: type = value  # comment` in a dataclass of a project module it imported (model.py's
    configs). The script's own block of settings (before it calls resolve or configure) comes first."""
    script = namespace.get("__file__") or ""
    root = os.path.dirname(os.path.abspath(script)) if script else ""
    modules = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    files = [script, *sorted(f for f in modules if root and os.path.dirname(f) == root)]
    comments: dict[str, str] = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError:
            continue
        if path == script:  # its settings: module-level assignments before the call that reads them
            block = next((i for i, line in enumerate(lines) if "(globals()" in line), len(lines))
            found = [re.match(r"(\w+) = [^#]*#\s*(.+)$", line) for line in lines[:block]]
        else:  # the fields of its dataclasses
            found = [re.match(r"    (\w+): [\w| .]+ = [^#]*#\s*(.+)$", line) for line in lines]
        for m in filter(None, found):
            comments.setdefault(m.group(1), m.group(2).strip())
    return comments


def _unknown(key: str, known: dict, where: str) -> SystemExit:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help to list the keys"
    return SystemExit(f"error: unknown config key {key!r} ({where}){hint}")


BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def file_names(path: str) -> dict:
    """The public names a config file defines, {name: value}."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise SystemExit(f"error: cannot read config file {path}: {e.strerror}") from None
    file_ns: dict = {"__file__": path}  # so that a config can build on another beside it
    try:
        exec(compile(source, path, "exec"), file_ns)
    except Exception as e:
        line = getattr(e, "lineno", None) or (
            e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?")
        raise SystemExit(f"error: config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in file_ns.items() if not k.startswith("_")}


def _check_type(key: str, value, default, where: str):
    """The value, converted where it is safe (an int where a float is expected), or a clear error.
    A default of None marks a switch the script decides when left unset: True, False or None."""
    if default is None:
        if value is None or type(value) is bool:
            return value
        raise SystemExit(f"error: {key} must be True, False or None (the script decides), "
                         f"got {value!r} ({where})")
    if type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    want, got = type(default).__name__, type(value).__name__
    raise SystemExit(f"error: {key} must be a{'n' * (want == 'int')} {want} (default {default!r}), "
                     f"got {value!r} of type {got} ({where})")


def _parse_value(key: str, raw: str, default, where: str):
    """A command-line string as the type of the key's default. No Python evaluation: a string key
    keeps the text as typed (any length), numbers go through int() and float()."""
    if isinstance(default, str):  # strings need no quotes on the command line: --device=cuda
        return raw
    if isinstance(default, bool) or default is None:
        if default is None and raw.lower() in ("none", "auto"):
            return None
        if raw.lower() in BOOLEANS:
            return BOOLEANS[raw.lower()]
        raise SystemExit(f"error: {key} takes true or false (or 1 or 0), got {raw[:50]!r} ({where})")
    try:
        return int(raw) if isinstance(default, int) else float(raw)
    except ValueError:
        want = type(default).__name__
        raise SystemExit(f"error: {key} must be a{'n' * (want == 'int')} {want} (default {default!r}), "
                         f"got {raw[:50]!r} ({where})") from None


def configure(namespace: dict, argv: list[str] | None = None) -> dict:
    """Resolves the config of a script whose defaults are in namespace (its globals());
    returns {key: value} for every configurable key. argv defaults to sys.argv[1:]."""
    return resolve(namespace, argv)[0]


def resolve(namespace: dict, argv: list[str] | None = None) -> tuple[dict, set[str]]:
    """configure()'s config, and the keys a config file or a flag set (to a default's value or not)."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: namespace[k] for k in config_keys(namespace)}
    config, given = dict(defaults), set()
    flags = [a for a in argv if a.startswith("--") or a == "-h"]
    for i, a in enumerate(argv):  # anything else is a config file, which is run: only a .py file
        if a in flags or a.endswith(".py"):
            continue
        before = argv[i - 1] if i else ""
        if before.startswith("--") and "=" not in before:  # --out_dir out-new: the value taken for a file
            raise SystemExit(f"error: '{before} {a}': a setting takes '=': {before}={a}")
        hint = f"--{a}" if "=" in a else "--key=value, or a config file (.py)"
        raise SystemExit(f"error: {a!r} is neither a setting nor a config file: did you mean {hint}?")
    for path in [a for a in argv if a not in flags]:  # the files first: a flag always wins
        for k, v in file_names(path).items():
            if k not in defaults:  # an import or a helper (module, function, class) is no setting
                if isinstance(v, types.ModuleType) or callable(v):
                    continue
                raise _unknown(k, defaults, f"in {path}")
            config[k] = _check_type(k, v, defaults[k], f"in {path}")
            given.add(k)
    if "-h" in flags or "--help" in flags:
        try:
            print("config keys and their defaults (config files are applied first, then --key=value flags, "
                  "whatever their order):")
            comments = declared_comments(namespace)
            for k, v in defaults.items():
                print(f"  --{k}={v!r}" + (f"  # {comments[k]}" if k in comments else ""))
            sys.stdout.flush()
        except BrokenPipeError:  # --help | head: the reader closed the pipe, having read what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet
        raise SystemExit(0)
    for arg in flags:
        key, eq, raw = arg[2:].partition("=")
        if key not in defaults:
            raise _unknown(key, defaults, "on the command line")
        if not eq:
            if not (isinstance(defaults[key], bool) or defaults[key] is None):
                raise SystemExit(f"error: {arg!r} needs a value: --{key}=VALUE")
            raw = "True"  # --compile alone means --compile=True
        config[key] = _parse_value(key, raw, defaults[key], f"from --{key}")
        given.add(key)
    return config, given
