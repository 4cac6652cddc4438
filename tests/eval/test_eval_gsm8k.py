"""GSM8K answer extraction, normalisation and exact match, on hand-written hard cases."""

from __future__ import annotations

import pytest
import torch

from lit_prune.eval import (
    GSM8K_INSTRUCTION,
    GSM8KExactMatch,
    extract_last_boxed,
    is_exact_match,
    normalize_answer,
    reference_answer,
)

# (generation, expected content of the last complete box)
BOXES = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),
    ("$\\boxed{\\dfrac{\\sqrt{3}}{2}}$", "\\dfrac{\\sqrt{3}}{2}"),
    ("no box at all, the answer is 12", None),
    ("unbalanced \\boxed{12", None),
    ("complete \\boxed{7} then cut off \\boxed{8", "7"),
    ("\\fbox{15}", "15"),
    ("\\boxed {16}", "16"),
    ("\\boxed 9$ is it", "9"),
    ("put your answer within \\boxed{} ... so \\boxed{5}", "5"),
    ("only an echo: within \\boxed{}", None),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\boxed{6}}", "6"),
    ("\\boxed{  18 dollars  }", "18 dollars"),
    ("\\boxed{\\text{18 dollars}} and \\fbox{19}", "19"),
    ("\\boxedx{3} is another command", None),
    ("", None),
]


@pytest.mark.parametrize(("generation", "expected"), BOXES)
def test_extract_last_boxed(generation, expected):
    assert extract_last_boxed(generation) == expected


# (answer as written, canonical form)
NORMALIZED = [
    ("42", "42"),
    ("$1,234.00", "1234"),
    ("1,234,567", "1234567"),
    ("1{,}234", "1234"),
    ("1\\,234", "1234"),
    ("\\$18", "18"),
    ("\\$1,234.50", "1234.5"),
    ("18 dollars", "18"),
    ("5 apples", "5"),
    ("12cm", "12"),
    ("3 m^2", "3"),
    ("40 km/h", "40"),
    ("18\\text{ dollars}", "18"),
    ("\\text{18 apples}", "18"),
    ("\\textbf{7}", "7"),
    ("50\\%", "50"),
    ("50%", "50"),
    ("25 percent", "25"),
    ("5.00", "5"),
    ("5.0", "5"),
    ("0.50", "0.5"),
    (".5", "0.5"),
    ("-2.250", "-2.25"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{6}{3}", "2"),
    ("\\tfrac12", "0.5"),
    ("\\frac{2}{6}", "1/3"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\frac{-3}{4}", "-0.75"),
    ("2\\frac{1}{2}", "2.5"),
    ("7/8", "0.875"),
    ("\u22125", "-5"),
    ("- 7", "-7"),
    ("\\!1,000", "1000"),
    ("x = 5", "5"),
    ("90^\\circ", "90"),
    ("{5}", "5"),
    ("5.", "5"),
    ("  $ 12 $  ", "12"),
    ("1e3", "1000"),
    ("-0.0", "0"),
    ("\\left(12\\right)", "(12)"),
    ("12,34", "12,34"),
    ("hello world", "helloworld"),
]


@pytest.mark.parametrize(("answer", "expected"), NORMALIZED)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


def test_normalize_answer_none_and_type():
    assert normalize_answer(None) is None
    with pytest.raises(TypeError, match="`text` must be a str or None; got int"):
        normalize_answer(5)


def test_decimal_fraction_and_integer_forms_agree():
    assert normalize_answer("0.5") == normalize_answer("0.50") == normalize_answer("\\frac{1}{2}") == "0.5"
    assert normalize_answer("\\frac{10}{5}") == normalize_answer("2.00") == normalize_answer("2")


MATCHES = [
    ("So Tom has \\boxed{19} apples.", "#### 19", True),
    ("\\boxed{\\$1,234.00}", "1234", True),
    ("\\boxed{18 \\text{ dollars}}", "The total is 18.\n#### 18", True),
    ("\\boxed{0.50}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{12}{4}}", "3", True),
    ("\\boxed{\u221212}", "-12", True),
    ("\\boxed{75\\%}", "75", True),
    ("first \\boxed{3} then corrected \\boxed{4}", "3", False),
    ("first \\boxed{3} then corrected \\boxed{4}", "4", True),
    ("the answer is 19", "19", False),
    ("\\boxed{19", "19", False),
    ("\\boxed{190}", "19", False),
    ("\\boxed{1.9}", "19", False),
    ("\\boxed{-19}", "19", False),
    ("\\boxed{1,000}", "#### 1,000", True),
]


@pytest.mark.parametrize(("generation", "reference", "expected"), MATCHES)
def test_is_exact_match(generation, reference, expected):
    assert is_exact_match(generation, reference) is expected


def test_reference_answer():
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert reference_answer("a #### b #### 1,000 ") == "1,000"


@pytest.mark.parametrize("bad", ["no marker here", "#### ", "reasoning\n####"])
def test_reference_answer_errors_name_the_value(bad):
    with pytest.raises(ValueError, match="`answer_field`") as info:
        reference_answer(bad)
    assert repr(bad) in str(info.value)


def test_type_errors():
    with pytest.raises(TypeError, match="`text` must be a str; got NoneType"):
        extract_last_boxed(None)
    with pytest.raises(TypeError, match="`answer_field` must be a str"):
        reference_answer(72)
    with pytest.raises(TypeError, match="`generation` must be a str"):
        is_exact_match(None, "1")
    with pytest.raises(ValueError, match="`reference` must be a non-empty answer"):
        is_exact_match("\\boxed{1}", "  ")


def test_instruction_is_the_papers():
    assert GSM8K_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


def test_metric_accumulates_and_resets():
    metric = GSM8KExactMatch()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert float(metric.compute()) == 0.0  # nothing scored yet
    metric.update(["\\boxed{1}", "\\boxed{2}", "none"], ["#### 1", "#### 3", "#### 4"])
    metric.update(["\\boxed{5}"], ["5"])
    assert metric.correct.item() == 2 and metric.total.item() == 4
    result = metric.compute()
    assert isinstance(result, torch.Tensor) and float(result) == pytest.approx(0.5)
    metric.reset()
    assert metric.total.item() == 0


def test_metric_states_sum_across_processes():
    rank0, rank1 = GSM8KExactMatch(), GSM8KExactMatch()
    rank0.update(["\\boxed{1}", "\\boxed{2}"], ["1", "3"])
    rank1.update(["\\boxed{7}", "\\boxed{8}", "\\boxed{9}"], ["7", "8", "0"])
    rank0.merge_state(rank1)  # the same sum reduction DDP applies to the states
    assert float(rank0.compute()) == pytest.approx(3 / 5)


def test_metric_length_mismatch():
    with pytest.raises(ValueError, match="same length; got 2 and 1"):
        GSM8KExactMatch().update(["a", "b"], ["1"])
