"""Greedy batched generation, the boxed-answer stopping criterion, and traps end to end.

A tiny Qwen2 is first overfitted (a few seconds on CPU) on three chat-formatted examples so that its greedy
outputs are known: a boxed answer followed by more text and EOS, a short answer with EOS, and a boxed answer
followed by a loop without EOS.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lit_prune.eval import (
    BoxedAnswerStoppingCriteria,
    GSM8K_INSTRUCTION,
    classify_trap,
    extract_last_boxed,
    find_repetition_loop,
    generate,
    is_exact_match,
)
from lit_prune.eval.generation import _render_prompts

from conftest import make_tiny_qwen2

MATH = "Tom has 12 apples and buys 7 more. How many apples does Tom have?"
MATH_ANSWER = "12 + 7 = 19. \\boxed{19} Hello, how are you today?"
PLACE = "Where is the Eiffel Tower?"
PLACE_ANSWER = "Paris."
LOOP = "Shall we go to the park?"
LOOP_ANSWER = "\\boxed{5}" + " =" * 40


@pytest.fixture(scope="module")
def memorized(tiny_tokenizer):
    """A tiny Qwen2 that greedily reproduces three memorised answers."""
    model = make_tiny_qwen2(seed=1)
    rows = []
    for prompt, answer, eos in ((MATH, MATH_ANSWER, True), (PLACE, PLACE_ANSWER, True), (LOOP, LOOP_ANSWER, False)):
        rendered = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        answer_ids = tiny_tokenizer(answer + ("<|im_end|>" if eos else ""), add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([target + [-100] * (width - len(target)) for _, target in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    model.train()
    try:
        for _ in range(150):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def test_greedy_outputs_and_eos_bookkeeping(memorized, tiny_tokenizer):
    math, place = generate(memorized, tiny_tokenizer, [MATH, PLACE], max_new_tokens=40, progress=False)
    assert math.prompt == MATH and math.text == MATH_ANSWER
    assert place.text == PLACE_ANSWER
    for record in (math, place):
        assert record.ended_with_eos and not record.hit_max_new_tokens and not record.stopped_at_boxed
        # EOS kept once at the end, and none of the padding the shorter answer got while the batch went on.
        assert record.token_ids[-1] == tiny_tokenizer.eos_token_id
        assert record.token_ids.count(tiny_tokenizer.eos_token_id) == 1
        assert record.num_new_tokens == len(record.token_ids)
        assert tiny_tokenizer.pad_token_id not in record.token_ids
    assert is_exact_match(math.text, "#### 19")


def test_stop_at_boxed_stops_each_sequence_at_its_answer(memorized, tiny_tokenizer):
    math, place, loop = generate(
        memorized, tiny_tokenizer, [MATH, PLACE, LOOP], max_new_tokens=40, stop_at_boxed=True, progress=False
    )
    assert math.text == "12 + 7 = 19. \\boxed{19}"
    assert math.stopped_at_boxed and not math.ended_with_eos and not math.hit_max_new_tokens
    assert tiny_tokenizer.decode(math.token_ids) == math.text  # nothing after the box, no padding
    assert place.text == PLACE_ANSWER and place.ended_with_eos and not place.stopped_at_boxed
    assert loop.text == "\\boxed{5}" and loop.stopped_at_boxed


def test_loop_without_eos_is_a_type1_trap_and_the_criterion_mitigates_it(memorized, tiny_tokenizer):
    (unconstrained,) = generate(memorized, tiny_tokenizer, [LOOP], max_new_tokens=30, progress=False)
    assert unconstrained.hit_max_new_tokens and not unconstrained.ended_with_eos
    assert unconstrained.num_new_tokens == 30
    assert find_repetition_loop(unconstrained.token_ids) is not None
    complete = extract_last_boxed(unconstrained.text) is not None
    assert classify_trap(unconstrained.token_ids, unconstrained.ended_with_eos, complete) == "type1"

    (mitigated,) = generate(memorized, tiny_tokenizer, [LOOP], max_new_tokens=30, stop_at_boxed=True, progress=False)
    assert classify_trap(mitigated.token_ids, mitigated.ended_with_eos, True) == "none"


def test_random_model_degenerates_into_a_type2_trap(tiny_qwen2, tiny_tokenizer):
    (record,) = generate(tiny_qwen2, tiny_tokenizer, ["Hello"], max_new_tokens=48, progress=False)
    assert not record.ended_with_eos and record.hit_max_new_tokens
    complete = extract_last_boxed(record.text) is not None
    assert classify_trap(record.token_ids, record.ended_with_eos, complete) == "type2"


def test_batched_equals_one_by_one_with_left_padding(tiny_qwen2, tiny_tokenizer):
    prompts = ["Hello", "Tom has 12 apples and buys 7 more. How many apples?", "x", "def add(a, b):"]
    batched = generate(tiny_qwen2, tiny_tokenizer, prompts, max_new_tokens=10, batch_size=3, progress=False)
    single = [generate(tiny_qwen2, tiny_tokenizer, [p], max_new_tokens=10, progress=False)[0] for p in prompts]
    assert [r.prompt for r in batched] == prompts
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.num_new_tokens == 10 and r.hit_max_new_tokens for r in batched)


def test_tokenizer_and_model_state_are_restored(memorized, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.padding_side = "right"
    tokenizer.pad_token = None  # generation borrows EOS as pad
    memorized.train()
    try:
        records = generate(memorized, tokenizer, [MATH, PLACE], max_new_tokens=40, progress=False)
        assert [r.text for r in records] == [MATH_ANSWER, PLACE_ANSWER]
        assert tokenizer.padding_side == "right" and tokenizer.pad_token is None
        assert memorized.training
    finally:
        memorized.eval()


def test_without_a_chat_template_prompts_are_rendered_as_fine_tuning_renders_them(tiny_qwen2, tiny_tokenizer):
    from lit_prune.data import Example
    from lit_prune.data.prompts import MATH_INSTRUCTION, format_prompt

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    (rendered,), special = _render_prompts(tokenizer, ["2+2?"], True, MATH_INSTRUCTION)
    assert not special and rendered == format_prompt(tokenizer, Example("2+2?", "4", "math"))  # the training text
    assert rendered == MATH_INSTRUCTION + "\n\n2+2?\n"
    no_template = generate(tiny_qwen2, tokenizer, ["Hello"], max_new_tokens=5, progress=False)
    as_given = generate(tiny_qwen2, tiny_tokenizer, ["Hello\n"], max_new_tokens=5, apply_chat_template=False,
                        progress=False)
    assert no_template[0].token_ids == as_given[0].token_ids


def test_system_prompt_goes_into_the_chat_template(tiny_tokenizer):
    (rendered,), special = _render_prompts(tiny_tokenizer, ["2+2?"], True, GSM8K_INSTRUCTION)
    assert special and rendered.startswith("<|im_start|>system\n" + GSM8K_INSTRUCTION)
    assert rendered.endswith("<|im_start|>assistant\n")
    (plain,), special = _render_prompts(tiny_tokenizer, ["2+2?"], False, "SYS")
    assert not special and plain == "SYS\n\n2+2?"


def test_progress_bar_runs(tiny_qwen2, tiny_tokenizer):
    assert len(generate(tiny_qwen2, tiny_tokenizer, ["a", "b"], max_new_tokens=2, batch_size=1, progress=True)) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "`prompts` must hold at least one prompt; got an empty list"),
        ({"prompts": "Hello"}, "`prompts` must be a list of strings; got str"),
        ({"prompts": ["a", 3]}, r"`prompts\[1\]` must be a str; got int"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be an int >= 1; got 0"),
        ({"batch_size": 0}, "`batch_size` must be an int >= 1; got 0"),
    ],
)
def test_bad_arguments(tiny_qwen2, tiny_tokenizer, kwargs, message):
    arguments = {"prompts": ["Hello"], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tiny_qwen2, tiny_tokenizer, arguments.pop("prompts"), **arguments)


def test_stopping_criterion_decodes_only_new_tokens(tiny_tokenizer):
    prompt = tiny_tokenizer("Please put your final answer within \\boxed{1}.")["input_ids"]
    answer = tiny_tokenizer("so \\boxed{19} and more")["input_ids"]
    criterion = BoxedAnswerStoppingCriteria(tiny_tokenizer, prompt_length=len(prompt))
    fired = []
    for step in range(1, len(answer) + 1):
        ids = torch.tensor([prompt + answer[:step], prompt + [0] * step])
        done = criterion(ids, None)
        assert done.dtype == torch.bool and done.shape == (2,)
        fired.append(bool(done[0]))
        assert not done[1]  # the box in the prompt never counts
    first = fired.index(True)
    assert tiny_tokenizer.decode(answer[: first + 1]).endswith("}")
    assert extract_last_boxed(tiny_tokenizer.decode(answer[:first])) is None
    assert all(fired[first:])
    assert criterion.stopped_at == {0: first + 1}
    with pytest.raises(ValueError, match="`prompt_length` must be an int >= 0; got -1"):
        BoxedAnswerStoppingCriteria(tiny_tokenizer, prompt_length=-1)
