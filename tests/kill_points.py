"""Run a Python program and SIGKILL it at a chosen call: a crash at a known point, not after a sleep.

Usage (the program's arguments follow ``--``, as after ``python``)::

    python tests/kill_points.py TARGET ACTION N [GLOB] -- -m lightning_safety.cli fit --config ...
    python tests/kill_points.py TARGET ACTION N [GLOB] -- -c "code" [args...]

* ``TARGET``: the function to watch, ``module:attribute.path`` (``torch:save``, ``os:replace``,
  ``torch.optim:AdamW.step``). It is wrapped before the program starts, so the program's own
  code calls the wrapper; the real function still does the work.
* ``N``: the N-th call (from 1) whose path arguments match ``GLOB`` (``fnmatch`` on base names;
  an int argument counts as a file descriptor), or the N-th call of all when no ``GLOB`` is given.
* ``ACTION``, what happens at that call before the SIGKILL:

  - ``before``: nothing: the call never runs;
  - ``after``: the call completes;
  - ``torn``: the call completes, then what it added to its file (the first matching argument:
    a path, a descriptor or a file object) is cut to half: a write that was under way;
  - ``cut``: the matching file is cut to half its size and the call never runs (for renames:
    the temporary file about to be published was half written).

A program that ends without reaching the call exits normally (tests then see no -9 exit code).
POSIX only (SIGKILL, ``/proc/self/fd``).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import Any

ACTIONS = ("before", "after", "torn", "cut")


def _names(value: Any, by_descriptor: bool) -> list[str]:
    """Base names the value refers to as a file: a path, a file object, or (if asked) a descriptor."""
    if isinstance(value, (str, os.PathLike)):
        return [os.path.basename(os.fspath(value))]
    if isinstance(value, int) and not isinstance(value, bool) and by_descriptor:
        try:
            return [os.path.basename(os.readlink(f"/proc/self/fd/{value}"))]
        except OSError:
            return []
    name = getattr(value, "name", None)
    return [os.path.basename(name)] if isinstance(name, str) and hasattr(value, "write") else []


def _size(file: Any) -> int:
    if isinstance(file, int):
        return os.fstat(file).st_size
    if hasattr(file, "flush"):
        file.flush()
        return os.fstat(file.fileno()).st_size
    return os.path.getsize(file) if os.path.exists(file) else 0


def _truncate(file: Any, size: int) -> None:
    if isinstance(file, int):
        os.ftruncate(file, size)
    elif hasattr(file, "flush"):
        file.flush()
        os.ftruncate(file.fileno(), size)
    else:
        os.truncate(file, size)


def _die(message: str) -> None:
    sys.stderr.write(f"kill point reached: {message}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(target: str, action: str, call: int, pattern: str | None = None) -> None:
    """Wrap ``target`` so that its ``call``-th matching call ends the process with SIGKILL."""
    if action not in ACTIONS:
        raise SystemExit(f"kill_points: action must be one of {', '.join(ACTIONS)}, got {action!r}")
    module_name, _, attribute = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original: Callable[..., Any] = getattr(owner, name)
    seen = 0

    def matching_file(args: tuple, kwargs: dict) -> Any:
        for value in (*args, *kwargs.values()):
            names = _names(value, by_descriptor=pattern is not None)
            if names and (pattern is None or any(fnmatch.fnmatch(n, pattern) for n in names)):
                return value
        return None

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        file = matching_file(args, kwargs)
        if pattern is not None and file is None:
            return original(*args, **kwargs)
        seen += 1
        if seen != call:
            return original(*args, **kwargs)
        where = f"{target} call {call} ({action})"
        if action in ("torn", "cut") and file is None:
            raise SystemExit(f"kill_points: {where} has no file argument to tear")
        if action == "before":
            _die(where)
        if action == "cut":
            _truncate(file, _size(file) // 2)
            _die(f"{where}, {_names(file, True)} cut to half")
        before = _size(file) if action == "torn" else 0
        result = original(*args, **kwargs)
        if action == "torn":
            after = _size(file)
            if after <= before:
                raise SystemExit(f"kill_points: {where} wrote nothing to tear")
            _truncate(file, before + (after - before) // 2)
            where += f", {after - before} bytes written, {(after - before) // 2} kept"
        _die(where)
        return result

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    spec, program = argv[:split], argv[split + 1 :]
    if len(spec) not in (3, 4) or not program:
        raise SystemExit(__doc__)
    install(spec[0], spec[1], int(spec[2]), spec[3] if len(spec) == 4 else None)
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    elif program[0] == "-c":
        sys.argv = ["-c", *program[2:]]
        exec(compile(program[1], "<kill_points -c>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = program
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
