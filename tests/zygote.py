"""A Python process with axolotl's training stack already imported, which
forks one child per command: ``python -m MODULE ARGS``, ``python -c CODE`` or
``python SCRIPT ARGS`` as a fresh interpreter would run them, without paying
the imports again.

Importing what ``axolotl.cli.train`` needs (axolotl.train, transformers'
model registry, trl, peft, datasets) takes about 10 s of CPU, more than a tiny
model's whole training; the suite runs dozens of them. The child is the
forked interpreter: it gets the command's working directory and arguments,
its stdout and stderr go to files, and it exits with the command's exit code
(``SystemExit``'s code, 1 after an uncaught exception, ``-signal`` when
killed), after the exit handlers a normal interpreter runs.

What a fork cannot give is a different environment at import time: modules
read some variables when they are imported (``HF_HUB_CACHE``, for one). The
caller (``conftest.run_python``) therefore sends a command here only when its
environment is exactly the one this process started with, and starts another
zygote for another environment.

Several children can start from one request: the ranks of a multi-process
run (``tests/test_multiproc.py``), each with its own environment (``RANK``,
``LOCAL_RANK``, ...), as ``torchrun`` would start them. Once one of them fails,
the others get ``monitor_s`` seconds to end on their own, then SIGTERM (and
SIGKILL 30 s later), as torchrun's agent stops a failed run's workers.

Protocol, one JSON object per line: the request on stdin
``{"argv": [...], "cwd": ..., "children": [{"env": {...}, "stdout": path, "stderr": path}, ...], "monitor_s": S}``,
where argv is ``["-m", module, *args]``, ``["-c", code, *args]`` or
``[script, *args]``; this process answers on stdout ``{"pids": [...]}`` when
the children start and ``{"returncodes": [...]}`` when all have ended (whatever
else it prints goes to stderr). End of input ends it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def preload() -> None:
    # Not axolotl.cli.train itself: runpy runs that module as __main__.
    import axolotl.cli.config  # noqa: F401
    import axolotl.train  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401
    import trl  # noqa: F401

    import axolotl_ila.plugin  # noqa: F401


# jemalloc (which pyarrow brings) keeps a background thread; its fork handlers
# make a fork safe, as they do for datasets' own forked workers.
FORK_SAFE_THREADS = {"jemalloc_bg_thd"}


def other_threads() -> list[str]:
    """The names of this process's threads besides the main one."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return names


def run_child(argv: list[str], cwd: str, child: dict) -> None:
    """In the forked child: become the command, never return."""
    import atexit
    import logging
    import runpy
    import traceback

    code = 0
    try:
        os.setsid()  # its own process group, as a subprocess started with start_new_session
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(child["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, child["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, child["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        flag, *rest = argv
        if flag == "-m":
            target, *args = rest
            sys.path[0] = os.getcwd()  # as `python -m` sets it
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif flag == "-c":
            target, *args = rest
            sys.path[0] = ""  # as `python -c` sets it
            sys.argv = ["-c", *args]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif not flag.startswith("-"):
            script = os.path.abspath(flag)
            sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it
            sys.argv = [flag, *rest]
            runpy.run_path(script, run_name="__main__")
        else:
            raise ValueError(f"zygote: unknown command form {flag!r}")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the interpreter prints any uncaught exception and exits 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def signal_groups(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signum)  # each child leads its own process group (setsid)
        except ProcessLookupError:
            pass


def wait_all(pids: list[int], monitor_s: float) -> list[int]:
    """Every child's exit code. After the first failure the others have
    ``monitor_s`` to end on their own, then SIGTERM, then SIGKILL 30 s on."""
    codes: dict[int, int] = {}
    failed_at = terminated_at = None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        now = time.monotonic()
        if pid:
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and failed_at is None:
                failed_at = now
            continue
        running = [p for p in pids if p not in codes]
        if failed_at is not None and terminated_at is None and now - failed_at > monitor_s:
            signal_groups(running, signal.SIGTERM)
            terminated_at = now
        elif terminated_at is not None and now - terminated_at > 30:
            signal_groups(running, signal.SIGKILL)
        time.sleep(0.05)
    return [codes[pid] for pid in pids]


def main() -> None:
    # The answers go to the original stdout; anything printed (by an import,
    # by logging) goes to stderr instead, so it cannot garble them.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def answer(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    preload()
    unsafe = [name for name in other_threads() if name not in FORK_SAFE_THREADS]
    if threading.active_count() != 1 or unsafe:
        # A fork copies only the forking thread; a lock another thread holds would stay held.
        answer({"error": f"zygote: threads {unsafe} run after the imports; forking is unsafe"})
        sys.exit(1)
    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for child in request["children"]:
            pid = os.fork()
            if pid == 0:
                answers.close()
                run_child(request["argv"], request["cwd"], child)
            pids.append(pid)
        answer({"pids": pids})
        answer({"returncodes": wait_all(pids, request.get("monitor_s", 0))})


if __name__ == "__main__":
    main()
