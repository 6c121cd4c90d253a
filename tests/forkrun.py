"""Runs many ``python train.py ...`` / ``python evaluate.py ...`` command lines for the price of one
interpreter start.

``python tests/forkrun.py jobs.json`` imports the heavy libraries (torch, transformers, datasets, Hydra,
accelerate and the project) once, then forks one child process per job. The child runs the entry script
as ``__main__`` exactly as ``python <script> <args>`` would: its own ``sys.argv``, environment, working
directory (the repository root, or the job's ``cwd``), stdout and stderr files and exit status. An
uncaught exception goes through ``sys.excepthook`` (the traceback a user would see) and exits 1, as the
interpreter does; ``SystemExit`` exits with its code. The parent itself never computes anything, so no
thread pool exists yet when it forks.

Each job is ``{"script", "args", "env", "cwd", "stdout", "stderr", "timeout"}`` (``env`` and ``cwd``
optional); the exit statuses (negative: killed by that signal) are printed as one JSON list on stdout.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def preload() -> None:
    # What both entry scripts import; each costs seconds, which is the point of sharing them.
    sys.path.insert(0, str(ROOT))
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import hydra  # noqa: F401
    import torch  # noqa: F401

    import hydra_entry  # noqa: F401
    import ptuning.data  # noqa: F401
    import ptuning.evaluation.run  # noqa: F401
    import ptuning.training.loop  # noqa: F401
    import ptuning.training.tracking  # noqa: F401


def child(job: dict) -> int:
    """Runs in the forked child: the entry script as ``__main__``; returns the exit status."""
    os.chdir(job.get("cwd", ROOT))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.update(job.get("env", {}))
    sys.argv = [job["script"], *job["args"]]
    # Ctrl-C behaves as in an interactive ``python``, also when the suite runs in the background of a shell
    # (which starts background jobs with SIGINT ignored, and Python then keeps it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.alarm(int(job.get("timeout", 300)))  # a hung case dies (SIGALRM) instead of hanging the suite
    try:
        runpy.run_path(str(ROOT / job["script"]), run_name="__main__")
        return 0
    except SystemExit as exit_:
        if exit_.code is None:
            return 0
        if isinstance(exit_.code, int):
            return exit_.code
        print(exit_.code, file=sys.stderr)  # sys.exit("message"), as the interpreter prints it
        return 1
    except BaseException:  # noqa: BLE001 - reported exactly as the interpreter reports it
        sys.excepthook(*sys.exc_info())
        return 1


def run_job(job: dict) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(job)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    preload()
    print(json.dumps([run_job(job) for job in jobs]))


if __name__ == "__main__":
    main()
