"""Activation-guided masked-L2 pruning (NSA Sec. 3.4): channel selection and penalty against independent references,
the fine-tune's effect, the 2:4 masks of both readings, the documented errors, and the study end to end on the tiny
random model."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from lit_prune.analysis.calibration import calibration_texts
from lit_prune.analysis.masked_l2 import (
    MaskedL2Spec,
    apply_reading,
    channel_activations,
    finetune_with_penalty,
    low_activation_channels,
    magnitude_masks,
    main,
    mask_statistics,
    masked_l2_penalty,
    masked_l2_study,
    write_masked_l2_report,
)
from lit_prune.data.batching import labelled_batches
from lit_prune.data.sources import Example
from lit_prune.pruning import ActivationRecorder
from lit_prune.pruning.sparsity import decoder_layers, measure_sparsity, target_linears
from lit_prune.tiny import make_tiny_model

EXAMPLES = [
    Example("Tom has 12 apples and buys 7 more. How many apples does Tom have?", "12 + 7 = 19. \\boxed{19}", "math",
            "19"),
    Example("Anna has 5 pears. She eats 2. How many are left?", "5 - 2 = 3. The answer is \\boxed{3}.", "math", "3"),
    Example("Sara has 9 stickers and gives 4 away. How many does she have?", "9 - 4 = 5. \\boxed{5}", "math", "5"),
    Example("Omar has 2 cats and gets 1 more. How many cats?", "2 + 1 = 3. \\boxed{3}", "math", "3"),
]


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Qwen2 (2 layers, hidden 64, d_ff 256) and its local tokenizer, as ``lit_prune.tiny`` builds
    them."""
    return make_tiny_model(seed=0)


def _batches(tokenizer, batch_size=3):
    return labelled_batches(tokenizer, calibration_texts(tokenizer, EXAMPLES), "response", 128, batch_size)[0]


# ---------------------------------------------------------------------------------------------------- channels
def test_low_activation_channels_by_hand():
    activations = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 1.0], dtype=torch.float64)
    assert low_activation_channels(activations, 0.2).nonzero().flatten().tolist() == [1, 5]  # 0.1 and 0.2
    assert low_activation_channels(activations, 0.25).nonzero().flatten().tolist() == [1, 3, 5]  # 2.5 rounds up
    ties = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0])
    assert low_activation_channels(ties, 0.4).nonzero().flatten().tolist() == [1, 2]  # lower index first


def _reference_activations(model, tokenizer):
    """Mean |x| per input channel from each text run alone (no padding), with the MLP inputs recomputed from the
    post-attention norm's output: x for gate/up, act(gate(x)) * up(x) for down."""
    sums, tokens = {}, 0
    for prompt, response in calibration_texts(tokenizer, EXAMPLES):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids += tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        normed = {}
        handles = [layer.post_attention_layernorm.register_forward_hook(
            lambda module, args, output, index=index, store=normed: store.__setitem__(index, output.detach()))
            for index, layer in enumerate(decoder_layers(model))]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
        finally:
            for handle in handles:
                handle.remove()
        tokens += len(ids)
        for index, layer in enumerate(decoder_layers(model)):
            mlp, x = layer.mlp, normed[index][0].double()
            h = mlp.act_fn(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
            prefix = f"model.layers.{index}.mlp."
            for name, value in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
                sums[prefix + name] = sums.get(prefix + name, 0) + value.abs().sum(dim=0)
    return {name: total / tokens for name, total in sums.items()}


def test_channel_activations_against_reference(tiny):
    model, tokenizer = tiny
    batches = _batches(tokenizer, batch_size=3)  # padded batches
    assert any(bool((mask == 0).any()) for _, mask, _ in batches)
    activations = channel_activations(model, batches)
    reference = _reference_activations(model, tokenizer)
    assert sorted(activations) == sorted(reference)
    for name, values in activations.items():
        torch.testing.assert_close(values, reference[name], rtol=1e-4, atol=1e-6)
        expected = set(reference[name].argsort()[:round(0.2 * len(values))].tolist())
        assert set(low_activation_channels(values, 0.2).nonzero().flatten().tolist()) == expected
    # down_proj's input is the neuron activation h: the same number as ActivationRecorder's token mean of |h|
    recorder = ActivationRecorder(model)
    with recorder.recording():
        for input_ids, mask, _ in batches:
            recorder.observe(model, input_ids, mask, "target")
    stats = recorder.finalize()
    for layer in range(2):
        torch.testing.assert_close(activations[f"model.layers.{layer}.mlp.down_proj"],
                                   stats["target.abs_sum"][layer] / stats["target.tokens"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- penalty
def test_penalty_matches_independent_sum(tiny):
    model, _ = tiny
    linears = target_linears(model, ("gate_proj", "up_proj", "down_proj"))
    generator = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(linear.in_features, generator=generator) < 0.3 for name, linear in linears.items()}
    rho = 0.37
    expected = 0.0
    for name, linear in linears.items():
        weight = linear.weight.detach().double()
        for column in masks[name].nonzero().flatten().tolist():
            expected += sum(float(v) ** 2 for v in weight[:, column])
    expected *= rho / 2
    penalty = masked_l2_penalty(linears, masks, rho)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    # its gradient is rho * W on M's weights and zero elsewhere
    name = next(iter(linears))
    weight = linears[name].weight
    (grad,) = torch.autograd.grad(penalty, [weight])
    torch.testing.assert_close(grad, rho * weight.detach() * masks[name][None, :].float())
    assert float(masked_l2_penalty(linears, masks, 0.0).detach()) == 0.0


def test_large_rho_shrinks_the_penalised_weights(tiny):
    original, tokenizer = tiny
    model = copy.deepcopy(original)
    batches = _batches(tokenizer)
    spec = MaskedL2Spec(rho=50.0, steps=6, learning_rate=1e-2)
    activations = channel_activations(model, batches, spec.targets)
    low = {name: low_activation_channels(values, spec.fraction) for name, values in activations.items()}
    history = finetune_with_penalty(model, batches, low, spec)
    assert len(history["lm_loss"]) == 6 and history["penalty"][-1] < history["penalty"][0]
    before, after = target_linears(original, spec.targets), target_linears(model, spec.targets)
    for name, mask in low.items():
        kept_low = after[name].weight.detach()[:, mask].norm() / before[name].weight.detach()[:, mask].norm()
        kept_other = after[name].weight.detach()[:, ~mask].norm() / before[name].weight.detach()[:, ~mask].norm()
        assert float(kept_low) < float(kept_other) - 0.05, name
    # only the targeted weights move; every parameter's requires_grad is restored
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight,
                               original.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- masks
def test_masks_are_2_4_and_each_reading_prunes_its_weights(tiny):
    original, tokenizer = tiny
    spec = MaskedL2Spec(rho=1.0, steps=3, learning_rate=1e-2)
    batches = _batches(tokenizer)
    low = {n: low_activation_channels(v, spec.fraction) for n, v in channel_activations(original, batches).items()}
    finetuned = copy.deepcopy(original)
    finetune_with_penalty(finetuned, batches, low, spec)
    masks = magnitude_masks(finetuned, spec)
    tuned_linears = target_linears(finetuned, spec.targets)
    for name, keep in masks.items():  # in each group of 4 the 2 largest |W_finetuned| are kept
        groups = tuned_linears[name].weight.detach().abs().reshape(keep.shape[0], -1, 4)
        top = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
        assert torch.equal(keep, top.reshape(keep.shape))
    pruned = {reading: apply_reading(original, finetuned, masks, spec, reading) for reading in ("original",
                                                                                                 "finetuned")}
    for reading, model in pruned.items():
        measured = measure_sparsity(model, spec.targets, spec.n_m)
        assert measured["n_m_violations"] == 0 and measured["overall"] == pytest.approx(0.5)
        source = target_linears(original if reading == "original" else finetuned, spec.targets)
        for name, linear in target_linears(model, spec.targets).items():
            torch.testing.assert_close(linear.weight, source[name].weight * masks[name], rtol=0, atol=0)
    first = next(iter(masks))
    assert not torch.equal(target_linears(pruned["original"], spec.targets)[first].weight,
                           target_linears(pruned["finetuned"], spec.targets)[first].weight)
    assert magnitude_masks(original, spec).keys() == masks.keys()  # the inputs were not modified by the copies
    stats = mask_statistics(masks, low, magnitude_masks(original, spec))
    assert 0 <= stats["pruned_in_low"] <= 1 and 0 <= stats["low_pruned"] <= 1 and 0 < stats["changed"] < 1
    with pytest.raises(ValueError, match="`reading` must be one of"):
        apply_reading(original, finetuned, masks, spec, "both")


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rho", [-1e-3, -1, float("nan"), float("inf"), "0.1", True])
def test_bad_rho_is_a_clear_error(tiny, rho):
    with pytest.raises(ValueError, match=r"`rho` .* must be a finite number >= 0 .*; got"):
        MaskedL2Spec(rho=rho)
    model, _ = tiny
    linears = target_linears(model, ("down_proj",))
    masks = {n: torch.zeros(linear.in_features, dtype=torch.bool) for n, linear in linears.items()}
    with pytest.raises(ValueError, match=r"`rho`"):
        masked_l2_penalty(linears, masks, rho)


def test_negative_rho_fails_before_any_work(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"`rho` .*got -0\.01"):
        masked_l2_study(model, tokenizer, EXAMPLES, EXAMPLES, rhos=[0.1, -0.01])
    with pytest.raises(ValueError, match=r"`rho` .*got -1"):
        main(["--rhos", "1e-3,-1", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, 1.5, -0.2, float("nan")])
def test_fraction_outside_open_interval_is_an_error(fraction, tmp_path):
    with pytest.raises(ValueError, match=r"`fraction` .* must be in \(0, 1\); got"):
        MaskedL2Spec(fraction=fraction)
    with pytest.raises(ValueError, match=r"`fraction` .* must be in \(0, 1\); got"):
        low_activation_channels(torch.ones(8), fraction)
    if not math.isnan(fraction):
        with pytest.raises(ValueError, match=r"`fraction`"):
            main(["--fraction", str(fraction), "--out", str(tmp_path)])


def test_other_bad_settings():
    with pytest.raises(ValueError, match="`steps`"):
        MaskedL2Spec(steps=0)
    with pytest.raises(ValueError, match="`learning_rate`"):
        MaskedL2Spec(learning_rate=0)
    with pytest.raises(ValueError, match="N:M pattern"):
        MaskedL2Spec(pattern="unstructured")
    with pytest.raises(ValueError, match="`pattern`"):
        MaskedL2Spec(pattern="4:2")


def test_empty_calibration_set_is_an_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="calibration set is empty"):
        channel_activations(model, [])
    empty = (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), torch.full((2, 5), -100))
    with pytest.raises(ValueError, match="no calibration tokens"):
        channel_activations(model, [empty])
    with pytest.raises(ValueError, match="calibration set is empty"):
        masked_l2_study(model, tokenizer, [], EXAMPLES)
    with pytest.raises(ValueError, match="labelled"):
        finetune_with_penalty(copy.deepcopy(model), [empty], {}, MaskedL2Spec())


# ---------------------------------------------------------------------------------------------------- the study
def test_study_and_report_on_the_tiny_model(tiny, tmp_path):
    model, tokenizer = tiny
    dense = copy.deepcopy(model.state_dict())
    spec = MaskedL2Spec(steps=2, learning_rate=1e-3)
    study = masked_l2_study(model, tokenizer, EXAMPLES, EXAMPLES[:2], rhos=[1e-1, 0.0], spec=spec, max_length=128,
                            max_new_tokens=4)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # the input model is untouched
    assert [run["rho"] for run in study["runs"]] == [0.1, 0.0]
    for run in study["runs"]:
        assert set(run["readings"]) == {"original", "finetuned"}
        for scores in run["readings"].values():
            assert scores["n_m_violations"] == 0 and scores["sparsity"] >= 0.5
            assert 0 <= scores["exact_match"] <= 1 and math.isfinite(scores["nll"])
    assert study["magnitude"]["n_m_violations"] == 0
    first, control = (run["readings"]["original"] for run in study["runs"])
    assert control["vs_control"] is None and first["vs_control"]["gained"] + first["vs_control"]["lost"] <= 2
    assert "_correct" not in study["dense"] and "_correct" not in first
    assert set(study["best"]) == {"original", "finetuned"}
    settings = {"model": "tiny", "calibration": "inline", "target": "inline", "samples": 4, "eval_samples": 2,
                "batch_size": 8, "max_new_tokens": 4, "spec": spec.to_dict(), "threads": 1, "wall_s": 1.0}
    written = write_masked_l2_report(study, settings, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig_masked_l2.png", "masked_l2.json", "masked_l2.md"]
    text = written["markdown"].read_text()
    assert not re.search(r"\bnan\b|\binf\b", text, re.IGNORECASE) and "reading **A**" in text

    def no_constant(name):
        raise AssertionError(f"masked_l2.json holds {name}")

    payload = json.loads(written["json"].read_text(), parse_constant=no_constant)
    assert payload["runs"][0]["readings"]["original"]["n_m_violations"] == 0
