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
    ("\\left(12\\right)", "12"),  # brackets around one number are arithmetic grouping
    ("12,34", "12,34"),
    ("hello world", "helloworld"),
]


@pytest.mark.parametrize(("answer", "expected"), NORMALIZED)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


# (LaTeX arithmetic as a model boxes it, its value)
ARITHMETIC = [
    ("2^3", "8"),
    ("10^{3}", "1000"),
    ("10^3", "1000"),
    ("5 \\times 3", "15"),
    ("5\\times3", "15"),
    ("5 \u00d7 3", "15"),
    ("\\frac{6}{2}", "3"),
    ("\\frac{1+2}{3}", "1"),
    ("\\frac{3}{\\frac{1}{2}}", "6"),
    ("3 \\times \\frac{1}{2}", "1.5"),
    ("4 \\cdot 2.5", "10"),
    ("12 \\div 4", "3"),
    ("(2 + 3) \\times 4", "20"),
    ("\\left(2 + 3\\right) \\cdot 4", "20"),
    ("[2 + 3] * 4", "20"),
    ("2 + 3 \\times 4", "14"),  # precedence
    ("10 - 4 - 3", "3"),  # left-associative
    ("2^3^2", "512"),  # right-associative power
    ("-2^2", "-4"),  # the sign applies after the power
    ("(-2)^2", "4"),
    ("-(3 + 4)", "-7"),
    ("--5", "5"),
    ("2^{-1}", "0.5"),
    ("\\frac{1}{3} + \\frac{1}{6}", "0.5"),
    ("\\$5 \\times 3", "15"),
    ("1,000 \\times 2", "2000"),
    ("x = 2 \\times 21", "42"),
    ("\\frac{2^{10}}{4}", "256"),
]


@pytest.mark.parametrize(("answer", "expected"), ARITHMETIC)
def test_latex_arithmetic_is_evaluated(answer, expected):
    assert normalize_answer(answer) == expected
    assert is_exact_match(f"so the answer is \\boxed{{{answer}}}.", f"#### {expected}")


# Not simple arithmetic, or over a limit: compared as text, exactly as before.
NOT_EVALUATED = [
    ("\\sqrt{3}/2", "\\sqrt{3}/2"),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
    ("\\frac{a+b}{c}", "a+b/c"),
    ("2x + 3", "2x+3"),
    ("5 x 3", "5x3"),
    ("4^{1/2}", "4^{1/2}"),  # fractional exponents have no exact value in general
    ("1/0", "1/0"),
    ("0^{-1}", "0^{-1}"),
    ("(2 + 3", "(2+3"),
    ("2 3", "23"),  # no implicit multiplication
    ("12,34", "12,34"),
]


@pytest.mark.parametrize(("answer", "expected"), NOT_EVALUATED)
def test_other_boxes_compare_as_text(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    "hostile",
    [
        "9^{9^{9}}",  # 9^387420489: hours and gigabytes if computed
        "2^{10000}",  # over the value limit
        "2^{2^{2000}}",  # an exponent too large even to convert to a float
        "(1/2)^{5000}",  # a denominator over the value limit
        "10^{3000} \\times 10^{3000}",  # each power fits, the product does not
        "(((((((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))))))",  # nested deeper than 32
        "1+" * 200 + "1",  # longer than 256 characters
        "1e999999999",  # a literal number that would take minutes to expand
        "1e5000",
        "7" * 5000,  # more digits than Python prints by default
        "7" * 5000 + " 1/2",  # a mixed number just as long
    ],
    ids=["tower", "big-power", "huge-exponent", "tiny-power", "big-product", "deep", "long", "exponent", "big-literal",
         "digits", "mixed-digits"],
)
def test_hostile_arithmetic_is_refused_not_computed(hostile):
    assert normalize_answer(hostile) == hostile.replace(" ", "")  # the text itself, nothing evaluated
    assert not is_exact_match(f"\\boxed{{{hostile}}}", "#### 1")


def test_limits_leave_room_for_real_answers():
    assert normalize_answer("2^{4000}") == str(2**4000)
    assert normalize_answer("9" * 1000) == "9" * 1000
    assert normalize_answer("((((((((((1))))))))))") == "1"


def test_long_decimals_stay_exact():
    assert normalize_answer("0.1234567890123456789012345678901") == "0.1234567890123456789012345678901"
    assert normalize_answer("0.12345678901234567890123456789012") != normalize_answer("0.1234567890123456789012345678901")
    assert normalize_answer("1e-30") == "0." + "0" * 29 + "1"
    assert normalize_answer("-\\frac{1}{1024}") == "-0.0009765625"


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
    assert metric.mean_value.item() == 2 and metric.weight.item() == 4  # MeanMetric: sum of hits, count
    result = metric.compute()
    assert isinstance(result, torch.Tensor) and float(result) == pytest.approx(0.5)
    metric.reset()
    assert metric.weight.item() == 0


def test_metric_states_sum_across_processes():
    rank0, rank1 = GSM8KExactMatch(), GSM8KExactMatch()
    rank0.update(["\\boxed{1}", "\\boxed{2}"], ["1", "3"])
    rank1.update(["\\boxed{7}", "\\boxed{8}", "\\boxed{9}"], ["7", "8", "0"])
    rank0.merge_state(rank1)  # the same sum reduction DDP applies to the states
    assert float(rank0.compute()) == pytest.approx(3 / 5)


def test_metric_length_mismatch():
    with pytest.raises(ValueError, match="same length; got 2 and 1"):
        GSM8KExactMatch().update(["a", "b"], ["1"])
