"""Repetition-loop detection and trap classification on hand-made token sequences."""

from __future__ import annotations

import random

import pytest
import torch

from lit_prune.eval import LoopInfo, TrapRate, classify_trap, find_repetition_loop


def _varied(length: int, seed: int = 0) -> list[int]:
    """Text-like tokens with no periodic tail: no token repeats within any window of 64."""
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < length:
        token = rng.randrange(1000, 50_000)
        if token not in tokens[-64:]:
            tokens.append(token)
    return tokens


@pytest.mark.parametrize(("period", "repeats"), [(1, 30), (2, 12), (3, 8), (5, 6), (17, 4)])
def test_loop_at_the_tail_is_found(period, repeats):
    unit = list(range(100, 100 + period))
    prefix = _varied(40)
    tokens = prefix + unit * repeats
    loop = find_repetition_loop(tokens)
    assert loop == LoopInfo(start=len(prefix), period=period, repeats=repeats, num_tokens=period * repeats)


def test_loop_cut_off_mid_unit():
    unit = [7, 8, 9, 10, 11]
    tokens = _varied(10) + unit * 6 + unit[:3]
    loop = find_repetition_loop(tokens)
    assert loop is not None and loop.period == 5 and loop.repeats == 6 and loop.num_tokens == 33
    assert loop.start == 10


def test_smallest_period_is_reported():
    # "ab" * 20 is also periodic with period 4, 6, ...; the unit is 2.
    assert find_repetition_loop(_varied(5) + [1, 2] * 20).period == 2


def test_long_varied_generation_is_not_a_loop():
    assert find_repetition_loop(_varied(1024)) is None


def test_short_repetition_is_not_a_loop():
    assert find_repetition_loop(_varied(30) + [5] * 19) is None  # 19 < min_loop_tokens
    assert find_repetition_loop(_varied(30) + [1, 2, 3] * 3) is None  # 3 repeats < min_repeats
    assert find_repetition_loop([5] * 19) is None


def test_loop_in_the_middle_but_not_the_tail():
    tokens = _varied(20, seed=1) + [9, 8, 7] * 20 + _varied(40, seed=2)
    assert find_repetition_loop(tokens) is None


def test_period_above_max_period_is_ignored():
    unit = _varied(70, seed=3)
    assert find_repetition_loop(unit * 4) is None
    assert find_repetition_loop(unit * 4, max_period=70).period == 70


def test_accepts_a_tensor():
    assert find_repetition_loop(torch.tensor(_varied(10) + [3] * 25)).period == 1
    with pytest.raises(ValueError, match=r"`token_ids` must be 1-D; got a tensor of shape \(2, 3\)"):
        find_repetition_loop(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_period": 0}, "`min_period` must be an int >= 1; got 0"),
        ({"max_period": 0}, r"`max_period` must be an int >= `min_period` \(1\); got 0"),
        ({"min_repeats": 1}, "`min_repeats` must be an int >= 2"),
        ({"min_loop_tokens": 0}, "`min_loop_tokens` must be an int >= 1; got 0"),
    ],
)
def test_bad_loop_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_repetition_loop([1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match=message):
        TrapRate(**kwargs)


LOOPING = _varied(50) + [11, 12] * 20
VARIED = _varied(90, seed=5)


@pytest.mark.parametrize(
    ("token_ids", "eos", "complete", "expected"),
    [
        (LOOPING, False, True, "type1"),  # answer, then no EOS and a loop
        (LOOPING, False, False, "type2"),  # loop without an answer
        (LOOPING + [2], True, True, "none"),  # EOS present: never a trap
        (LOOPING, True, False, "none"),
        (VARIED, False, False, "none"),  # hit max_new_tokens without looping
        (VARIED, False, True, "none"),  # e.g. stopped right after the boxed answer
    ],
)
def test_classify_trap(token_ids, eos, complete, expected):
    assert classify_trap(token_ids, eos, complete) == expected


def test_trap_rate():
    metric = TrapRate()
    metric.update([LOOPING, LOOPING, VARIED, LOOPING], [False, False, False, True], [True, False, False, True])
    metric.update([LOOPING], [False], [False])
    rates = metric.compute()
    assert float(rates["type1"]) == pytest.approx(1 / 5)
    assert float(rates["type2"]) == pytest.approx(2 / 5)
    assert float(rates["total"]) == pytest.approx(3 / 5)
    assert (metric.type1.item(), metric.type2.item(), metric.total.item()) == (1, 2, 5)

    other = TrapRate()
    other.update([LOOPING], [False], [True])
    metric.reset()
    metric.update([VARIED], [False], [False])
    metric.merge_state(other)  # DDP-style sum of the counts
    assert {key: float(value) for key, value in metric.compute().items()} == pytest.approx(
        {"type1": 0.5, "type2": 0.0, "total": 0.5}
    )


def test_trap_rate_empty_and_mismatch():
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert {key: float(value) for key, value in TrapRate().compute().items()} == {
            "type1": 0.0,
            "type2": 0.0,
            "total": 0.0,
        }
    with pytest.raises(ValueError, match="same length; got 2, 1 and 2"):
        TrapRate().update([[1], [2]], [True], [False, True])


def test_trap_rate_uses_its_loop_settings():
    strict = TrapRate(min_loop_tokens=100)
    strict.update([LOOPING], [False], [False])
    assert float(strict.compute()["total"]) == 0.0
