"""GSM8K exact match on the last ``\\boxed{...}`` answer.

The paper ("Exploring the Limits of Pruning", arXiv 2604.27115, Sec. 3.5 and Appendix E.1) asks the math
model to "put your final answer within \\boxed{}" and scores exact match between the boxed answer and the
number after ``####`` in the GSM8K reference. This module extracts the last complete box (balanced, nested
braces), normalises both sides to a canonical number (thousands separators, currency, units, LaTeX
fractions, ``0.50 == 0.5``, simple LaTeX arithmetic such as ``2^3`` or ``5 \\times 3`` ...) and wraps the
comparison in a :class:`torchmetrics.Metric`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction

import torch
from torchmetrics import MeanMetric

__all__ = [
    "GSM8K_INSTRUCTION",
    "GSM8KExactMatch",
    "extract_last_boxed",
    "is_exact_match",
    "normalize_answer",
    "reference_answer",
]

log = logging.getLogger(__name__)

# The paper's Appendix E.1 instruction (the sentence about the regex is the paper's note, not the prompt).
GSM8K_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Commands whose argument is kept as plain text: \text{ dollars} -> " dollars".
_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# LaTeX spacing and sizing commands that carry no value.
_DROPPED_COMMANDS = re.compile(r"\\(?:left|right|displaystyle|[!,;:>]|quad|qquad)")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMERIC = re.compile(rf"^({_NUMBER})(?:/({_NUMBER}))?$")
_MIXED_NUMBER = re.compile(r"^([-+]?\d+)\s+(\d+)/(\d+)$")
# A number followed by unit words ("18 dollars", "12cm", "5 sq ft", "3 m^2", "40 km/h").
_NUMBER_WITH_UNIT = re.compile(
    rf"^({_NUMBER}(?:/{_NUMBER})?)\s*([A-Za-z][A-Za-z\s.'/\-]*(?:\^\s*\{{?\d\}}?)?)\.?$"
)
_PERCENT = re.compile(r"\s*(?:%|\\%|percent|per\s*cent)\s*$", re.IGNORECASE)
_DECIMAL_EXPONENT = re.compile(r"[eE]([-+]?\d+)$")
# One token of LaTeX arithmetic: a number, or an operator or bracket (with the commands that spell them).
_ARITHMETIC_TOKEN = re.compile(
    r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\\times|\\cdot|\\div|\\ast|[-+*/^(){}\[\]\u00d7\u00b7\u00f7]))"
)
_OPERATORS = {"\\times": "*", "\\cdot": "*", "\\ast": "*", "\u00d7": "*", "\u00b7": "*", "\\div": "/", "\u00f7": "/"}
_CLOSING = {"(": ")", "{": "}", "[": "]"}
# Limits that keep a hostile box cheap: refused (compared as text) rather than computed.
_MAX_EXPRESSION_CHARS = 256
_MAX_NESTING = 32
# Every intermediate numerator and denominator; 4096 bits is about 1233 digits, below Python's int-to-str limit.
_MAX_VALUE_BITS = 4096
# Digits plus decimal exponent of a literal number ("1e999999999" would take minutes to expand).
_MAX_NUMBER_DIGITS = 1000


def _match_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``open_index``; escaped braces (``\\{``) do not count."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def _box_contents(text: str) -> list[tuple[int, str]]:
    """All complete boxes in ``text`` as ``(start index, content)``, in order of their start."""
    boxes: list[tuple[int, str]] = []
    for command in _BOX_COMMANDS:
        start = text.find(command)
        while start != -1:
            after = start + len(command)
            # `\boxedx` is another command, not a box.
            if after < len(text) and (text[after].isalpha()):
                start = text.find(command, after)
                continue
            cursor = after
            while cursor < len(text) and text[cursor] in " \t":
                cursor += 1
            if cursor < len(text) and text[cursor] == "{":
                close = _match_brace(text, cursor)
                if close is not None:
                    boxes.append((start, text[cursor + 1 : close]))
            elif cursor > after:
                # `\boxed 5` (a single argument token without braces) is valid LaTeX.
                match = re.match(r"[^\s$]+", text[cursor:])
                if match:
                    boxes.append((start, match.group(0)))
            start = text.find(command, after)
    boxes.sort(key=lambda box: box[0])
    return boxes


def extract_last_boxed(text: str) -> str | None:
    """Return the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``) and escaped braces (``\\{``) do not count.
    A box that never closes (a generation cut off by ``max_new_tokens``) is not an answer; the last box that
    does close is returned instead. Empty boxes, as in an echoed instruction "within \\boxed{}", are ignored.
    For nested boxes the innermost-last one wins (``\\boxed{\\boxed{5}}`` gives ``5``).

    Args:
        text: A model generation.

    Returns:
        The box content with surrounding whitespace removed, or ``None`` if there is no complete, non-empty box.

    Raises:
        TypeError: If ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}")
    for _, content in reversed(_box_contents(text)):
        if content.strip():
            return content.strip()
    return None


def _replace_fractions(text: str) -> str:
    """Rewrite ``\\frac{a}{b}`` (and ``\\dfrac``, ``\\tfrac``, ``\\frac12``) as ``a/b``.

    The innermost (last) fraction goes first, and an argument that is arithmetic rather than one number is
    bracketed, so ``\\frac{1+2}{3}`` gives ``(1+2)/3`` and ``\\frac{3}{\\frac{1}{2}}`` gives ``3/(1/2)``.
    """
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    while True:
        start = text.rfind("\\frac")
        if start == -1:
            return text
        cursor = start + len("\\frac")
        parts: list[str] = []
        for _ in range(2):
            while cursor < len(text) and text[cursor] == " ":
                cursor += 1
            if cursor >= len(text):
                return text
            if text[cursor] == "{":
                close = _match_brace(text, cursor)
                if close is None:
                    return text
                parts.append(text[cursor + 1 : close].strip())
                cursor = close + 1
            else:
                # `\frac12`: each argument is a single character.
                parts.append(text[cursor])
                cursor += 1
        numerator, denominator = (f"({part})" if len(_arithmetic_tokens(part) or ()) > 1 else part for part in parts)
        # `2\frac{1}{2}` is the mixed number 2 1/2, not 21/2.
        separator = " " if start > 0 and text[start - 1].isdigit() else ""
        text = f"{text[:start]}{separator}{numerator}/{denominator}{text[cursor:]}"


def _to_fraction(text: str) -> Fraction | None:
    """Parse ``a``, ``a/b`` or the mixed number ``a b/c`` into a Fraction; ``None`` if it is not numeric."""
    mixed = _MIXED_NUMBER.match(text) if len(text) <= _MAX_NUMBER_DIGITS else None
    if mixed:
        whole, numerator, denominator = (int(group) for group in mixed.groups())
        if denominator == 0:
            return None
        sign = -1 if mixed.group(1).startswith("-") else 1
        return whole + sign * Fraction(numerator, denominator)
    match = _NUMERIC.match(text)
    if not match or not all(_is_small_number(group) for group in match.groups() if group is not None):
        return None
    value = Fraction(match.group(1))
    if match.group(2) is not None:
        denominator = Fraction(match.group(2))
        if denominator == 0:
            return None
        value /= denominator
    return value


def _is_small_number(text: str) -> bool:
    """Whether a literal number has at most ``_MAX_NUMBER_DIGITS`` digits once its decimal exponent is expanded."""
    exponent = _DECIMAL_EXPONENT.search(text)
    mantissa = text[: exponent.start()] if exponent else text
    if exponent and len(exponent.group(1).lstrip("+-")) > len(str(_MAX_NUMBER_DIGITS)):
        return False
    expanded = abs(int(exponent.group(1))) if exponent else 0
    return sum(char.isdigit() for char in mantissa) + expanded <= _MAX_NUMBER_DIGITS


def _arithmetic_tokens(text: str) -> list[str] | None:
    """``text`` as arithmetic tokens (numbers, ``+ - * / ^`` and brackets); ``None`` if anything else is in it."""
    if len(text) > _MAX_EXPRESSION_CHARS:
        return None
    tokens: list[str] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _ARITHMETIC_TOKEN.match(text, position)
        if match is None:
            return None
        number, operator = match.groups()
        tokens.append(number if number is not None else _OPERATORS.get(operator, operator))
        position = match.end()
    return tokens


class _Refused(Exception):
    """The text is not simple arithmetic, or evaluating it would exceed a limit."""


class _ArithmeticParser:
    """Exact evaluation of numbers with ``+ - * / ^``, unary signs and ``()``/``{}``/``[]`` groups.

    Grammar (``^`` binds tighter than a sign and is right-associative, so ``-2^2 = -4`` and ``2^3^2 = 512``)::

        sum     := product (("+" | "-") product)*
        product := signed (("*" | "/") signed)*
        signed  := ("+" | "-") signed | power
        power   := atom ("^" signed)?
        atom    := number | "(" sum ")" | "{" sum "}" | "[" sum "]"

    A recursive-descent parser rather than ``eval`` or an ``ast`` walk: it accepts only this grammar, and it
    checks the limits (nesting, exponent and value size) before each step, so no input makes it slow.
    """

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = tokens
        self._position = 0
        self._depth = 0

    def evaluate(self) -> Fraction:
        value = self._sum()
        if self._position != len(self._tokens):
            raise _Refused(f"unexpected {self._tokens[self._position]!r}")
        return value

    def _peek(self) -> str | None:
        return self._tokens[self._position] if self._position < len(self._tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise _Refused("the expression ends too early")
        self._position += 1
        return token

    def _sum(self) -> Fraction:
        value = self._product()
        while self._peek() in ("+", "-"):
            operator = self._take()
            value = _bounded(value + self._product() if operator == "+" else value - self._product())
        return value

    def _product(self) -> Fraction:
        value = self._signed()
        while self._peek() in ("*", "/"):
            operator = self._take()
            operand = self._signed()
            if operator == "/" and operand == 0:
                raise _Refused("division by zero")
            value = _bounded(value * operand if operator == "*" else value / operand)
        return value

    def _signed(self) -> Fraction:
        if self._peek() in ("+", "-"):
            operator = self._take()
            with self._nested():
                operand = self._signed()
            return -operand if operator == "-" else operand
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() != "^":
            return base
        self._take()
        with self._nested():
            exponent = self._signed()
        if exponent.denominator != 1:
            raise _Refused(f"a fractional exponent ({exponent}) has no exact value in general")
        if base == 0 and exponent < 0:
            raise _Refused("division by zero")
        # log2 of the larger of numerator and denominator, times the exponent: the bits of the result.
        if abs(base) not in (0, 1):
            size = math.log2(max(abs(base.numerator), base.denominator))
            if abs(exponent) > _MAX_VALUE_BITS or size * int(abs(exponent)) > _MAX_VALUE_BITS:
                raise _Refused(f"the power is too large to compute (exponent {exponent})")
        return _bounded(base ** int(exponent))

    def _atom(self) -> Fraction:
        token = self._take()
        if token in _CLOSING:
            with self._nested():
                value = self._sum()
            if self._take() != _CLOSING[token]:
                raise _Refused(f"unbalanced {token!r}")
            return value
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        raise _Refused(f"unexpected {token!r}")

    @contextlib.contextmanager
    def _nested(self) -> Iterator[None]:
        """Count one level of recursion; refuse beyond ``_MAX_NESTING``."""
        self._depth += 1
        try:
            if self._depth > _MAX_NESTING:
                raise _Refused(f"nested deeper than {_MAX_NESTING}")
            yield
        finally:
            self._depth -= 1


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_VALUE_BITS:
        raise _Refused(f"an intermediate value has more than {_MAX_VALUE_BITS} bits")
    return value


def _evaluate_arithmetic(text: str) -> Fraction | None:
    """The exact value of simple arithmetic in ``text`` (``2^3``, ``(5 \\times 3)``, ``10^{3}``, ``-6/2``).

    Returns ``None`` for anything else (letters, commands other than ``\\times``/``\\cdot``/``\\div``/``\\ast``,
    a lone number that :func:`_to_fraction` already handles) and for input over the limits: more than
    ``_MAX_EXPRESSION_CHARS`` characters, nesting deeper than ``_MAX_NESTING``, a literal number longer than
    ``_MAX_NUMBER_DIGITS``, a fractional exponent, or any value (a power is checked before it is computed)
    over ``_MAX_VALUE_BITS`` bits.
    """
    tokens = _arithmetic_tokens(text)
    if not tokens or not all(_is_small_number(token) for token in tokens if token[0].isdigit() or token[0] == "."):
        return None
    try:
        return _ArithmeticParser(tokens).evaluate()
    except _Refused as refusal:
        log.debug("not evaluated as arithmetic: %r (%s)", text, refusal)
        return None


def _canonical(value: Fraction) -> str:
    """``"42"`` for integers, ``"0.5"`` for terminating decimals, ``"1/3"`` for other rationals (all exact)."""
    if value.denominator == 1:
        return str(value.numerator)
    twos = (value.denominator & -value.denominator).bit_length() - 1
    remainder, fives = value.denominator >> twos, 0
    while remainder % 5 == 0:
        remainder //= 5
        fives += 1
    if remainder == 1:
        # value * 10^places is an integer: print it with the point shifted (Decimal would round at 28 digits).
        places = max(twos, fives)
        digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
        sign = "-" if value < 0 else ""
        return f"{sign}{digits[:-places]}.{digits[-places:]}"
    return f"{value.numerator}/{value.denominator}"


def normalize_answer(text: str | None) -> str | None:
    """Bring an answer to a canonical form so that equal numbers compare equal as strings.

    Handles ``$`` and ``\\$``, thousands separators (``1,234``, ``1{,}234``, ``1\\,234``), ``%``, trailing unit
    words (``18 dollars``, ``12cm``, ``\\text{ apples}``), trailing zeros (``5.00``), LaTeX fractions
    (``\\frac``, ``\\dfrac``, ``\\tfrac``, ``\\frac12``, mixed numbers ``2\\frac{1}{2}``), spacing commands
    (``\\!``, ``\\,``), the Unicode minus ``−``, degrees, and ``x = 5`` (the right-hand side is kept).

    Simple LaTeX arithmetic is evaluated exactly: numbers with ``+ - * / ^``, ``\\times``, ``\\cdot``,
    ``\\div``, fractions, unary signs and ``()``/``{}``/``[]`` groups (``2^3``, ``10^{3}``, ``5 \\times 3``,
    ``\\frac{1+2}{3}``, ``(12)``), by a small parser, never ``eval``. A box over its limits (256 characters,
    nesting 32, literal numbers of 1000 digits, values of 4096 bits, checked before a power is computed) is
    compared as text instead, so no box can make this slow.

    Numbers are parsed exactly with :class:`fractions.Fraction` and printed canonically: integers as ``"42"``,
    terminating decimals as ``"0.5"`` (``0.50``, ``.5`` and ``\\frac{1}{2}`` all give ``"0.5"``; ``\\frac{6}{3}``
    and ``2.00`` give ``"2"``), other rationals as a reduced ``"p/q"`` (``\\frac{2}{6}`` gives ``"1/3"``).
    Text that is not a number is returned with LaTeX noise and all whitespace removed.

    Args:
        text: An answer string, or ``None`` (no answer).

    Returns:
        The canonical string, or ``None`` if ``text`` is ``None``.

    Raises:
        TypeError: If ``text`` is neither a string nor ``None``.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str or None; got {type(text).__name__}")
    cleaned = text.strip()
    previous = None
    while previous != cleaned:
        previous = cleaned
        cleaned = _TEXT_COMMANDS.sub(r"\1", cleaned)
    cleaned = cleaned.replace("{,}", ",").replace("\\ ", " ")
    cleaned = _DROPPED_COMMANDS.sub("", cleaned)
    cleaned = cleaned.replace("\\$", "$").replace("\\%", "%")
    cleaned = cleaned.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-")
    cleaned = cleaned.replace("$", "")
    cleaned = _DEGREES.sub("", cleaned)
    cleaned = _replace_fractions(cleaned)
    if "=" in cleaned:
        cleaned = cleaned.rsplit("=", 1)[1]
    cleaned = cleaned.strip().rstrip(".").strip()
    cleaned = _THOUSANDS_COMMA.sub("", cleaned)
    cleaned = _PERCENT.sub("", cleaned)
    # Braces left around a plain value: "{5}" -> "5".
    while cleaned.startswith("{") and _match_brace(cleaned, 0) == len(cleaned) - 1:
        cleaned = cleaned[1:-1].strip()
    # "- 5" -> "-5"; "-\frac..." already became "-a/b".
    cleaned = re.sub(r"^([-+])\s+(?=[\d.])", r"\1", cleaned)
    value = _to_fraction(cleaned)
    if value is None:
        value = _evaluate_arithmetic(cleaned)
    if value is None:
        with_unit = _NUMBER_WITH_UNIT.match(cleaned)
        if with_unit:
            value = _to_fraction(with_unit.group(1))
    if value is not None:
        return _canonical(value)
    return re.sub(r"\s+", "", cleaned)


def reference_answer(answer_field: str) -> str:
    """Return the final answer of a GSM8K ``answer`` field: the text after the last ``####``.

    Args:
        answer_field: The GSM8K ``answer`` string (reasoning, then ``#### 42``).

    Returns:
        The answer text after ``####``, stripped (e.g. ``"42"`` or ``"1,000"``).

    Raises:
        TypeError: If ``answer_field`` is not a string.
        ValueError: If ``answer_field`` has no ``####`` or nothing follows it.
    """
    if not isinstance(answer_field, str):
        raise TypeError(f"`answer_field` must be a str; got {type(answer_field).__name__}")
    if "####" not in answer_field:
        raise ValueError(f"`answer_field` must contain '#### <answer>' (GSM8K format); got {answer_field!r}")
    answer = answer_field.rsplit("####", 1)[1].strip()
    if not answer:
        raise ValueError(f"`answer_field` has nothing after '####'; got {answer_field!r}")
    return answer


def is_exact_match(generation: str, reference: str) -> bool:
    """Whether the last boxed answer of ``generation`` equals ``reference`` after normalisation.

    A generation without a complete box is wrong (the paper scores the boxed answer only; there is no
    fallback to "the last number in the text").

    Args:
        generation: The model output.
        reference: The reference answer, either a bare answer (``"42"``) or a full GSM8K ``answer`` field
            containing ``#### 42``.

    Returns:
        ``True`` if both sides normalise to the same canonical string.

    Raises:
        TypeError: If either argument is not a string.
        ValueError: If ``reference`` is empty.
    """
    if not isinstance(generation, str):
        raise TypeError(f"`generation` must be a str; got {type(generation).__name__}")
    if not isinstance(reference, str):
        raise TypeError(f"`reference` must be a str; got {type(reference).__name__}")
    if "####" in reference:
        reference = reference_answer(reference)
    if not reference.strip():
        raise ValueError(f"`reference` must be a non-empty answer; got {reference!r}")
    predicted = normalize_answer(extract_last_boxed(generation))
    return predicted is not None and predicted == normalize_answer(reference)


class GSM8KExactMatch(MeanMetric):
    """Fraction of generations whose last ``\\boxed{}`` answer matches the GSM8K reference.

    A torchmetrics ``MeanMetric`` of 0/1 hits: its sum and count are summed across processes, so the metric is
    exact under DDP. :meth:`compute` returns ``0.0`` when nothing was scored (``MeanMetric`` would return NaN).

    Example:
        >>> metric = GSM8KExactMatch()
        >>> metric.update(["so \\\\boxed{1,000}"], ["#### 1000"])
        >>> float(metric.compute())
        1.0
    """

    higher_is_better = True

    def update(self, generations: Sequence[str], references: Sequence[str]) -> None:
        """Score a batch.

        Args:
            generations: Model outputs.
            references: Reference answers (bare or full GSM8K ``answer`` fields), same length.

        Raises:
            ValueError: If the two lists differ in length.
        """
        if len(generations) != len(references):
            raise ValueError(
                "`generations` and `references` must have the same length; "
                f"got {len(generations)} and {len(references)}"
            )
        if generations:
            super().update(torch.tensor([float(is_exact_match(g, r)) for g, r in zip(generations, references)]))

    def compute(self) -> torch.Tensor:
        """Return the fraction of hits as a float tensor; ``0.0`` when nothing was scored."""
        return torch.tensor(0.0) if self.weight == 0 else super().compute()
