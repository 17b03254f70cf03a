"""Run many short `python script.py args` in a row without paying torch's and transformers' import
each time: this process imports them once, then forks a child per request, which runs the script
as `python script.py` would (its own argv, environment, sys.path and exit code; this project's
modules imported fresh). Requests on stdin, one JSON line each: {"script", "args", "env" (set on
top of this process's), "out", "err" (files for the child's stdout and stderr), "timeout"}; one
line back per request: its exit code (-9: killed at the timeout).

Only for tests of what a script prints and returns: a child shares this process's imported
third-party modules, so a test of start-up itself (imports, signals during them) runs a real
process."""

import atexit
import json
import os
import runpy
import signal
import sys
import time
import traceback

import numpy  # noqa: F401  (the slow imports, done once)
import pyarrow  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(request):
    """In the forked process: become `python script args`, then exit with its code."""
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    os.environ.update(request["env"])
    os.chdir(ROOT)
    sys.argv, sys.path[0] = [request["script"], *request["args"]], ROOT
    code = 0
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        try:
            sys.excepthook(*sys.exc_info())
        except BaseException:
            traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    deadline = time.time() + request.get("timeout", 600)
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.time() > deadline:  # as subprocess.run's timeout would: the test fails, not hangs
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    print(os.waitstatus_to_exitcode(done[1]), flush=True)
