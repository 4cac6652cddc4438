"""Depth pruning: every criterion against an independent reference, physical removal (KV cache, config, export and
reload, peft), the plan through checkpoints and resume, every documented error before any forward pass, width and
depth in one run, the CLI config and the speed benchmark's depth variant."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoModelForCausalLM

from lit_prune.callbacks import (
    ActivationCaptureCallback,
    DepthPruneCallback,
    SelectivityPruneCallback,
    WeightSparsityCallback,
)
from lit_prune.cli import cli_main
from lit_prune.data import PruneDataModule
from lit_prune.data.batching import labelled_batches
from lit_prune.eval.resources import count_parameters
from lit_prune.module import LoraSettings, PrunableCausalLM
from lit_prune.pruning import (
    DEPTH_CRITERIA,
    DepthPlan,
    DepthSpec,
    PrunePlan,
    blocks_for_param_ratio,
    depth_scores,
    find_swiglu_mlps,
    make_depth_plan,
    read_checkpoint_depth_plan,
    remove_blocks,
    width_param_fraction,
)
from lit_prune.tiny import save_tiny_model

from conftest import DIALOG, GSM8K, ROOT, SQUAD
from conftest import make_trainer as _trainer

LAYERS = 4
TARGET_PROMPTS = ["What is 2 plus 3?", "Tom has 4 apples and eats 1.", "How many legs do 3 cats have?"]
TARGET_RESPONSES = ["\\boxed{5}", "He has 3 left. \\boxed{3}", "3 x 4 = 12. \\boxed{12}"]


@pytest.fixture(scope="module")
def texts():
    """Unpadded calibration texts of ragged lengths: ``(input_ids, labels)``; some label only a response."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for length, prompt in ((11, 4), (7, 0), (3, 0), (9, 5), (6, 2)):
        ids = torch.randint(3, 380, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100  # a prompt of `prompt` tokens, labels on the response only
        out.append((ids, labels))
    return out


def _padded(texts, batch_size: int = 3):
    """The texts right-padded into batches of ``(input_ids, attention_mask, labels)`` (padding id 0)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (ids, row_labels) in enumerate(chunk):
            input_ids[i, : len(ids)], mask[i, : len(ids)], labels[i, : len(ids)] = ids, 1, row_labels
        batches.append((input_ids, mask, labels))
    return batches


# ---------------------------------------------------------------------------------------------------- references
@torch.no_grad()
def _reference_block_influence(model, texts) -> list[float]:
    """ShortGPT's BI from ``output_hidden_states``, one unpadded text and one token at a time."""
    last_output = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: last_output.update(x=args[0]))
    cosines, tokens = [0.0] * LAYERS, 0
    try:
        for ids, _ in texts:
            hidden = model(ids[None], output_hidden_states=True, use_cache=False).hidden_states
            # hidden_states[l] enters block l; the last entry is after the final norm, so take the norm's input.
            states = [h[0].double() for h in hidden[:-1]] + [last_output["x"][0].double()]
            for layer in range(LAYERS):
                for t in range(len(ids)):
                    x, y = states[layer][t], states[layer + 1][t]
                    cosines[layer] += float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y)))
            tokens += len(ids)
    finally:
        handle.remove()
    return [1.0 - c / tokens for c in cosines]


def _text_nll(model, ids, labels) -> torch.Tensor:
    logits = model(ids[None], use_cache=False).logits[0].double()
    log_probs = logits[:-1].log_softmax(-1)
    picked = [-log_probs[t, labels[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != -100]
    return torch.stack(picked).sum() if picked else logits.new_zeros(())


def _label_count(texts) -> int:
    return sum(int((labels[1:] != -100).sum()) for _, labels in texts)


@torch.no_grad()
def _reference_ppl(model, texts) -> list[float]:
    """Shortened LLaMA's PPL: a deep copy with block l deleted, one unpadded text at a time."""
    scores = []
    for layer in range(LAYERS):
        shallower = copy.deepcopy(model)
        del shallower.model.layers[layer]
        shallower.config.num_hidden_layers = LAYERS - 1
        if getattr(shallower.config, "layer_types", None):
            shallower.config.layer_types = shallower.config.layer_types[: LAYERS - 1]
        total = sum(float(_text_nll(shallower, ids, labels)) for ids, labels in texts)
        scores.append(math.exp(total / _label_count(texts)))
    return scores


def _reference_taylor(model, texts) -> list[float]:
    """sum over each block's weight tensors of |w * dL/dw| (element-wise), L the mean label NLL, by plain
    ``backward`` per text (gradients accumulate over the texts, as in the Shortened LLaMA code)."""
    copy_ = copy.deepcopy(model)
    count = _label_count(texts)
    for ids, labels in texts:
        (_text_nll(copy_, ids, labels) / count).backward()
    return [sum(float((p.detach().double() * p.grad.double()).abs().sum())
                for name, p in block.named_parameters() if name.endswith("weight") and p.grad is not None)
            for block in copy_.model.layers]


_REFERENCES = {"block_influence": _reference_block_influence, "ppl": _reference_ppl,
               "taylor_block": _reference_taylor}


@pytest.mark.parametrize("make", [make_tiny_qwen2, make_tiny_llama], ids=["qwen2", "llama"])
@pytest.mark.parametrize("criterion", DEPTH_CRITERIA)
def test_criteria_match_an_independent_reference(texts, criterion, make):
    model = make(num_hidden_layers=LAYERS)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = depth_scores(model, _padded(texts), criterion)
    reference = torch.tensor(_REFERENCES[criterion](model, texts), dtype=torch.float64)
    assert scores.dtype == torch.float64 and scores.shape == (LAYERS,)
    torch.testing.assert_close(scores, reference, rtol=2e-5, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    assert all(p.grad is None for p in model.parameters())  # the Taylor pass leaves no .grad behind


@pytest.mark.parametrize("criterion", DEPTH_CRITERIA)
def test_streamed_sums_add_up_across_ranks(texts, criterion):
    """Two "ranks" with disjoint shards, their float64 sums added by `reduce`, give the one-process scores."""
    model = make_tiny_qwen2(num_hidden_layers=LAYERS)
    batches = _padded(texts, batch_size=2)
    alone = depth_scores(model, batches, criterion)
    sent = []
    depth_scores(model, batches[1:], criterion, reduce=lambda t: sent.append(t.clone()) or t)
    received = iter(sent)
    summed = depth_scores(model, batches[:1], criterion, reduce=lambda t: t + next(received))
    # taylor_block sums its per-weight salience in float32 (a model-sized buffer), so only the order differs
    tolerance = 1e-6 if criterion == "taylor_block" else 1e-12
    torch.testing.assert_close(summed, alone, rtol=tolerance, atol=1e-12)


def test_padding_never_counts(texts):
    model = make_tiny_qwen2(num_hidden_layers=LAYERS)
    batches = _padded(texts)
    garbage = [(ids.masked_fill(mask == 0, 7), mask, labels) for ids, mask, labels in batches]  # other pad ids
    for criterion in ("block_influence", "ppl"):
        torch.testing.assert_close(depth_scores(model, garbage, criterion), depth_scores(model, batches, criterion),
                                   rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- the plan
def test_plan_removes_the_lowest_scoring_candidates_and_measures_the_exact_ratio(texts):
    model = make_tiny_qwen2(num_hidden_layers=LAYERS)
    dense = count_parameters(model)
    batches = _padded(texts)
    scores = depth_scores(model, batches, "block_influence").tolist()
    free = make_depth_plan(model, batches, DepthSpec(num_blocks=1, keep_first=False, keep_last=False))
    assert free.removed_blocks == [min(range(LAYERS), key=lambda i: scores[i])]
    assert free.provenance["order"] == sorted(range(LAYERS), key=lambda i: scores[i])
    kept = make_depth_plan(model, batches, DepthSpec(num_blocks=1))  # default: first and last stay
    assert kept.removed_blocks == [min((1, 2), key=lambda i: scores[i])] and kept.provenance["order"][0] in (1, 2)
    assert kept.scores == pytest.approx(scores)
    kept.apply(model)
    assert kept.param_ratio * dense == pytest.approx(dense - count_parameters(model), rel=1e-12)  # exact count
    assert kept.is_applied(model) and kept.num_layers == LAYERS - 1
    assert DepthPlan.from_dict(json.loads(json.dumps(kept.to_dict()))) == kept


def test_ratio_maps_to_blocks_and_width_fraction_is_exact():
    model = make_tiny_llama(num_hidden_layers=LAYERS)  # MLP biases: every removed neuron also takes two biases
    share = count_parameters(model.model.layers[0]) / count_parameters(model)
    assert blocks_for_param_ratio(model, 1.4 * share) == 1 and blocks_for_param_ratio(model, 2.6 * share) == 3
    fraction = width_param_fraction(model, 0.25, multiple_of=32)
    dense = count_parameters(model)
    widths = find_swiglu_mlps(model)[0].width
    PrunePlan([list(range(192))] * LAYERS, widths, "random", 0.25, 32).apply(model)
    assert fraction * dense == pytest.approx(dense - count_parameters(model), rel=1e-12)
    # The equal-size depth run: the block count whose parameters come nearest to the width plan's.
    assert blocks_for_param_ratio(make_tiny_llama(num_hidden_layers=LAYERS), fraction) == round(fraction / share)


# ---------------------------------------------------------------------------------------------------- removal
def _identity_forward(hidden_states, *args, **kwargs):
    return hidden_states


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("make", [make_tiny_qwen2, make_tiny_llama], ids=["qwen2", "llama"])
def test_removal_renumbers_the_cache_index_and_trims_the_config(make, wrap):
    model = make(num_hidden_layers=LAYERS)
    skipped = copy.deepcopy(model)
    skipped.model.layers[1].forward = _identity_forward  # the dense model with block 1 passing its input through
    input_ids = torch.randint(3, 300, (2, 10))
    if wrap:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    kept_layers = [model.get_submodule("base_model.model.model.layers" if wrap else "model.layers")[i]
                   for i in (0, 2, 3)]
    remove_blocks(model, [1])
    base = model.get_base_model() if wrap else model
    assert list(base.model.layers) == kept_layers  # the same modules, in order
    assert [layer.self_attn.layer_idx for layer in base.model.layers] == [0, 1, 2]
    assert base.config.num_hidden_layers == 3
    if hasattr(base.config, "layer_types"):
        assert base.config.layer_types == ["full_attention"] * 3
    assert [k.split(".")[2 if not wrap else 4] for k in model.state_dict() if ".layers." in k][-1] == "2"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, skipped(input_ids, use_cache=False).logits,
                                   rtol=0, atol=1e-6)


def test_sliding_window_layers_keep_their_attention_type(tmp_path):
    model = make_tiny_qwen2(num_hidden_layers=LAYERS, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    windows = [model.model.layers[i].self_attn.sliding_window for i in (0, 2, 3)]
    remove_blocks(model, [1])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 1  # the first max_window_layers layers are the full-attention ones
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [layer.self_attn.sliding_window for layer in reloaded.model.layers] == windows == [None, 4, 4]
    input_ids = torch.randint(3, 300, (1, 12))  # longer than the window
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
        assert torch.equal(reloaded.generate(input_ids, max_new_tokens=8, do_sample=False, use_cache=True),
                           reloaded.generate(input_ids, max_new_tokens=8, do_sample=False, use_cache=False))


@pytest.fixture(scope="module")
def tiny4_dir(tmp_path_factory):
    """The tiny model and tokenizer with 4 decoder blocks."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny4") / "model", num_hidden_layers=LAYERS))


@pytest.fixture(scope="module")
def depth_export(tiny4_dir, tmp_path_factory):
    """The tiny 4-block model with its middle block 1 removed by the callback, exported by the module."""
    module = PrunableCausalLM(tiny4_dir)
    callback = DepthPruneCallback(blocks=[1], plan_path=str(tmp_path_factory.mktemp("plan") / "depth.json"))
    trainer = _trainer([callback], tmp_path_factory.mktemp("run"))
    trainer.strategy.connect(module)
    callback.prune(trainer, module)
    export = module.export(tmp_path_factory.mktemp("export") / "model")
    return module, callback, export


def test_export_reloads_with_the_same_logits_and_the_same_greedy_text_with_or_without_cache(depth_export):
    module, callback, export = depth_export
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    assert reloaded.config.num_hidden_layers == 3 and len(reloaded.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1, 2]
    prompt = module.tokenizer("Tom has 12 apples and buys 7 more.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, module.model(prompt).logits, rtol=0, atol=0)
        cached = reloaded.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=True)
        uncached = reloaded.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=False)
    assert cached.shape[1] == prompt.shape[1] + 16 and torch.equal(cached, uncached)
    card = json.loads((export / "lit_prune.json").read_text())
    assert card["depth"]["removed_blocks"] == [1] and card["depth"]["criterion"] == "explicit"
    assert card["depth"]["num_layers"] == 3 and card["pruning"] is None
    assert DepthPlan.from_dict(json.loads(Path(callback.plan_path).read_text())) == callback.plan
    assert module.label == "explicit-1of4" and module.is_modified  # evaluated against the dense source


def test_a_depth_export_keeps_its_plan_and_is_not_pruned_again(depth_export, tmp_path):
    _, callback, export = depth_export
    reloaded = PrunableCausalLM(str(export))
    assert reloaded.depth_plan == callback.plan and reloaded.is_modified
    again = DepthPruneCallback(num_blocks=1, target_prompts=TARGET_PROMPTS)
    trainer = _trainer([again], tmp_path)
    trainer.strategy.connect(reloaded)
    with pytest.raises(ValueError, match=r"already depth-pruned \(explicit-1of4, blocks \[1\] removed\)"):
        again.prune(trainer, reloaded)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_blocks": -1}, r"`num_blocks` \(decoder blocks to remove\) must be an integer >= 1; got -1"),
    ({"num_blocks": 0}, r"`num_blocks` .* must be an integer >= 1; got 0"),
    ({"num_blocks": True}, r"`num_blocks` .* must be an integer >= 1; got True"),
    ({"ratio": 0.0}, r"`ratio` \(fraction of the model's parameters to remove\) must be in \(0, 1\); got 0.0"),
    ({"ratio": 1.5}, r"`ratio` .* must be in \(0, 1\); got 1.5"),
    ({}, r"give exactly one of `num_blocks`, `ratio` or `blocks`; got none"),
    ({"num_blocks": 1, "ratio": 0.2}, r"give exactly one of .*; got \['num_blocks', 'ratio'\]"),
    ({"blocks": [1, 1]}, r"`blocks` must be a non-empty list of distinct block indices >= 0; got \[1, 1\]"),
    ({"blocks": [-1]}, r"`blocks` must be .* >= 0; got \[-1\]"),
    ({"blocks": []}, r"`blocks` must be a non-empty list"),
    ({"blocks": [0, 2]}, r"`blocks`=\[0, 2\] removes block 0 but `keep_first` is true"),
    ({"num_blocks": 1, "criterion": "magnitude"},
     r"`criterion` must be one of \('block_influence', 'ppl', 'taylor_block'\); got 'magnitude'"),
    ({"num_blocks": 1, "calibration": "all"}, r"`calibration` must be one of \('target', 'distractor', 'both'\)"),
    ({"num_blocks": 1, "capture": "tokens"}, r"`capture` must be one of \('prompt', 'response'\); got 'tokens'"),
    ({"num_blocks": 1, "keep_last": "yes"}, r"`keep_last` must be true or false; got 'yes'"),
    ({"num_blocks": 1, "batch_size": 0}, r"`batch_size` must be an integer >= 1; got 0"),
    ({"num_blocks": 1, "target_prompts": "What is 2 plus 3?"}, r"`target_prompts` must be a list of strings"),
    ({"num_blocks": 1, "target_prompts": ["a"], "target_responses": ["x", "y"]}, "one response per"),
])
def test_bad_arguments_fail_when_the_callback_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthPruneCallback(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"blocks": [1, 7]}, r"`blocks`=\[1, 7\] names block\(s\) \[7\] but the model has 4 blocks; allowed: indices 0-3"),
    ({"blocks": [0, 1, 2, 3], "keep_first": False, "keep_last": False},
     r"`blocks`=\[0, 1, 2, 3\] removes all 4 blocks of the model; at least one block must remain"),
    ({"blocks": [3]}, r"`blocks`=\[3\] removes the last block \(3\) but `keep_last` is true"),
    ({"num_blocks": 4, "keep_first": False, "keep_last": False},
     r"`num_blocks`=4 removes all 4 blocks of the model; at least one block must remain \(allowed: 1-3\)"),
    ({"num_blocks": 3}, r"`num_blocks`=3 exceeds the 2 candidate block\(s\) of 4 that `keep_first` and `keep_last` "
                        r"leave \(allowed: at most 2\)"),
    ({"ratio": 0.01}, r"`ratio`=0.01 of the parameters rounds to 0 blocks \(one of the model's 4 blocks is 20.84% "
                      r"of its 296,000 parameters\); allowed: a ratio of at least 0.1042, or `num_blocks`"),
    ({"ratio": 0.95, "keep_first": False, "keep_last": False},
     r"`ratio`=0.95 of the parameters rounds to 5 blocks, but the model has 4 and at least one must remain "
     r"\(allowed: a ratio below 0.7295\)"),
])
def test_model_dependent_errors_fail_before_any_forward_pass(tmp_path, tiny4_dir, kwargs, match):
    module = PrunableCausalLM(tiny4_dir)
    callback = DepthPruneCallback(target_prompts=TARGET_PROMPTS, **kwargs)
    trainer = _trainer([callback], tmp_path)
    trainer.strategy.connect(module)
    calls = []
    module.model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=match):
        callback.prune(trainer, module)
    assert not calls and callback.plan is None and len(module.model.model.layers) == LAYERS


def test_depth_after_the_width_callbacks_is_refused_before_capture(tmp_path, tiny4_dir):
    module = PrunableCausalLM(tiny4_dir)
    capture = ActivationCaptureCallback(target_prompts=TARGET_PROMPTS, distractor_prompts=["Hello, how are you?"])
    depth = DepthPruneCallback(num_blocks=1, target_prompts=TARGET_PROMPTS)
    trainer = _trainer([capture, SelectivityPruneCallback(0.25, "selective", multiple_of=32), depth], tmp_path)
    trainer.strategy.connect(module)
    with pytest.raises(ValueError, match=r"a DepthPruneCallback comes after the width callbacks .* list "
                                         r"DepthPruneCallback before ActivationCaptureCallback"):
        capture.ensure_stats(trainer, module)
    assert capture.stats is None
    with pytest.raises(ValueError, match=r"DepthPruneCallback comes after \['ActivationCaptureCallback', "
                                         r"'SelectivityPruneCallback'\] in `trainer.callbacks`"):
        depth.prune(trainer, module)
    sparsity = _trainer([WeightSparsityCallback(target_prompts=TARGET_PROMPTS), depth], tmp_path)
    sparsity.strategy.connect(module)
    with pytest.raises(ValueError, match=r"comes after \['WeightSparsityCallback'\]"):
        depth.prune(sparsity, module)


# ---------------------------------------------------------------------------------------------------- callback
def test_callback_scores_the_calibration_texts_it_is_given(tmp_path, tiny4_dir):
    module = PrunableCausalLM(tiny4_dir)
    callback = DepthPruneCallback(num_blocks=1, criterion="ppl", calibration="both", target_prompts=TARGET_PROMPTS,
                                  target_responses=TARGET_RESPONSES, distractor_prompts=["Hello, how are you?"],
                                  batch_size=2)
    trainer = _trainer([callback], tmp_path)
    trainer.strategy.connect(module)
    reference = copy.deepcopy(module.model)
    plan = callback.prune(trainer, module)
    # The same texts through the callbacks' batcher, scored by the library: the callback adds nothing.
    texts = list(zip(TARGET_PROMPTS, TARGET_RESPONSES))
    batches = (labelled_batches(module.tokenizer, texts, "response", 512, 2)[0]
               + labelled_batches(module.tokenizer, [("Hello, how are you?", None)], "response", 512, 2)[0])
    assert plan.scores == pytest.approx(depth_scores(reference, batches, "ppl").tolist(), rel=1e-9)
    assert plan.removed_blocks == [min((1, 2), key=lambda i: plan.scores[i])]
    assert plan.provenance["texts"] == {"target": 3, "distractor": 1} and plan.provenance["dense_ppl"] > 0
    assert module.depth_plan is plan and len(module.model.model.layers) == 3
    assert callback.prune(trainer, module) is plan  # applied once


def test_resume_replays_the_checkpoints_plan_without_scoring(tmp_path, tiny4_dir, monkeypatch):
    plan = DepthPlan([2], LAYERS, "ppl", scores=[4.0, 3.0, 1.0, 5.0], param_ratio=0.2)
    path = tmp_path / "last.ckpt"
    torch.save({"lit_prune": {"depth": plan.to_dict()}}, path)
    import lit_prune.callbacks.depth as depth_module

    def no_scoring(*args, **kwargs):
        raise AssertionError("a resumed run must not score the blocks again")

    monkeypatch.setattr(depth_module, "make_depth_plan", no_scoring)
    module = PrunableCausalLM(tiny4_dir)
    callback = DepthPruneCallback(num_blocks=1, criterion="ppl")  # no texts at all: none are needed
    trainer = _trainer([callback], tmp_path)
    trainer.strategy.connect(module)
    trainer.ckpt_path = str(path)
    assert callback.prune(trainer, module) == plan
    assert len(module.model.model.layers) == 3 and module.depth_plan == plan
    saved = {}
    callback.on_save_checkpoint(trainer, module, saved)
    assert read_checkpoint_depth_plan(saved) == plan
    module.on_load_checkpoint(saved)  # the module accepts the checkpoint of its own shapes
    other = {"lit_prune": {"depth": DepthPlan([1], LAYERS, "ppl").to_dict()}}
    with pytest.raises(ValueError, match=r"depth plan \(ppl-1of4, blocks \[1\]\) differs from the one this run made"):
        callback.on_load_checkpoint(trainer, module, other)
    with pytest.raises(ValueError, match=r"written by a depth-pruned model \(ppl-1of4, blocks \[1\] removed of 4\)"):
        module.on_load_checkpoint(other)


# ---------------------------------------------------------------------------------------------------- Lightning
def _datamodule(**overrides):
    kwargs = dict(target=GSM8K, distractors=[SQUAD, DIALOG], capture_samples=8, finetune=GSM8K, finetune_samples=16,
                  val_samples=0, max_length=256, batch_size=4)
    kwargs.update(overrides)
    return PruneDataModule(**kwargs)


class ShapeProbe(Callback):
    """Listed last: what the model computes when training starts (LoRA's B is zero, so it is the pruned base)."""

    def __init__(self, input_ids):
        self.input_ids = input_ids

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            self.logits = pl_module.model(self.input_ids, use_cache=False).logits.clone()


def _combined_callbacks(**capture):
    return [DepthPruneCallback(num_blocks=1, criterion="taylor_block", batch_size=4, max_length=512),
            ActivationCaptureCallback(progress=False, max_length=128, **capture),
            SelectivityPruneCallback(0.25, "wanda_sp", multiple_of=32)]


@pytest.mark.slow
def test_width_and_depth_in_one_run_export_a_loadable_model(tmp_path, tiny4_dir):
    export = tmp_path / "export"
    module = PrunableCausalLM(tiny4_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2,
                              export_dir=str(export))
    input_ids = torch.randint(3, 300, (2, 12))
    probe = ShapeProbe(input_ids)
    depth, capture, _ = callbacks = _combined_callbacks()
    trainer = _trainer([*callbacks, probe], tmp_path, max_steps=2)
    trainer.fit(module, datamodule=_datamodule())
    # Width captured and planned on the 3 blocks that remain; replaying both plans on the dense model reproduces it.
    assert capture.stats.num_layers == 3 and module.prune_plan.num_layers == 3
    rebuilt = AutoModelForCausalLM.from_pretrained(tiny4_dir).eval()
    depth.plan.apply(rebuilt)
    module.prune_plan.apply(rebuilt)
    with torch.no_grad():
        torch.testing.assert_close(probe.logits, rebuilt(input_ids).logits, rtol=0, atol=1e-6)
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    assert (reloaded.config.num_hidden_layers, reloaded.config.intermediate_size) == (3, 192)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, module.model(input_ids).logits, rtol=0, atol=0)
        assert torch.equal(reloaded.generate(input_ids[:1], max_new_tokens=8, do_sample=False, use_cache=True),
                           reloaded.generate(input_ids[:1], max_new_tokens=8, do_sample=False, use_cache=False))
    card = json.loads((export / "lit_prune.json").read_text())
    assert card["depth"]["removed_blocks"] == depth.plan.removed_blocks and card["pruning"]["kept_width"] == 192
    assert card["global_step"] == 2 and PrunePlan.load(export).num_layers == 3


def _resume_run(tmp_path, tiny4_dir, max_steps, ckpt_path=None):
    module = PrunableCausalLM(tiny4_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2)
    callbacks = [*_combined_callbacks(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                         every_n_train_steps=1)]
    trainer = _trainer(callbacks, tmp_path, max_steps=max_steps, enable_checkpointing=True)
    if ckpt_path:
        trainer.ckpt_path = ckpt_path
    trainer.fit(module, datamodule=_datamodule())
    return module, callbacks, trainer


@pytest.mark.slow
def test_resume_after_a_depth_prune_replays_both_plans_without_capturing(tmp_path, tiny4_dir, monkeypatch):
    first, (first_depth, _, _, _), _ = _resume_run(tmp_path, tiny4_dir, max_steps=2)
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert set(checkpoint["lit_prune"]) == {"plan", "depth"}
    assert read_checkpoint_depth_plan(checkpoint) == first_depth.plan
    import lit_prune.callbacks.depth as depth_module

    def no_scoring(*args, **kwargs):
        raise AssertionError("a resumed run must not score the blocks again")

    monkeypatch.setattr(depth_module, "make_depth_plan", no_scoring)
    resumed, (depth, capture, _, _), trainer = _resume_run(tmp_path, tiny4_dir, max_steps=4, ckpt_path=str(last))
    assert capture.stats is None and trainer.global_step == 4
    assert depth.plan == first_depth.plan and resumed.depth_plan == first_depth.plan
    assert resumed.prune_plan.kept_indices == first.prune_plan.kept_indices
    assert len(resumed.model.get_base_model().model.layers) == 3


@pytest.mark.slow
def test_cli_config_prunes_one_block_then_recovers_it(tmp_path, tiny_dir):
    common = [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              f"--data.target={GSM8K}", f"--data.distractors=[{SQUAD}, {DIALOG}]"]
    pruned = tmp_path / "pruned"
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config",
                    str(ROOT / "configs" / "prune-depth-tiny.yaml"), f"--model.model_name_or_path={tiny_dir}",
                    f"--model.export_dir={pruned}", *common])
    plan = cli.model.depth_plan
    assert plan.criterion == "block_influence" and len(plan.removed_blocks) == 1 and plan.original_num_layers == 2
    reloaded = AutoModelForCausalLM.from_pretrained(pruned)
    assert reloaded.config.num_hidden_layers == 1 and reloaded.config.intermediate_size == 256
    recovered = tmp_path / "recovered"
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={pruned}",
                    "--trainer.callbacks=null", f"--model.export_dir={recovered}", f"--data.finetune={GSM8K}",
                    *common])
    assert cli.trainer.global_step == 4
    card = json.loads((recovered / "lit_prune.json").read_text())
    assert card["depth"]["removed_blocks"] == plan.removed_blocks and card["lora"]["r"] == 4  # provenance survives
    assert AutoModelForCausalLM.from_pretrained(recovered).config.num_hidden_layers == 1


@pytest.mark.slow
def test_ddp_spawn_sums_the_scores_and_hands_the_shallower_model_to_the_parent(tmp_path, tiny4_dir):
    """Two ranks, each scoring half the texts, plan what one process plans; the parent ends with 3 blocks."""
    plans, modules = {}, {}
    for devices in (1, 2):
        module = PrunableCausalLM(tiny4_dir, export_dir=str(tmp_path / f"export{devices}"))
        callback = DepthPruneCallback(num_blocks=1, criterion="ppl", calibration="both", batch_size=3,
                                      max_length=512)
        trainer = _trainer([callback], tmp_path / str(devices), devices=devices, max_steps=0,
                           strategy="ddp_spawn" if devices > 1 else "auto")
        trainer.fit(module, datamodule=_datamodule())
        modules[devices] = module
        plans[devices] = DepthPlan.from_dict(
            json.loads((tmp_path / f"export{devices}" / "lit_prune.json").read_text())["depth"])
    assert plans[2].provenance["world_size"] == 2 and plans[2].provenance["tokens"] == plans[1].provenance["tokens"]
    assert plans[2].removed_blocks == plans[1].removed_blocks
    assert plans[2].scores == pytest.approx(plans[1].scores, rel=1e-5)
    parent = modules[2]  # rank 0's plan and weights, adopted by the process that called fit
    assert parent.depth_plan == plans[2] and len(parent.model.model.layers) == 3
    assert parent.is_modified and parent.label == plans[2].label  # evaluated against the dense source
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export2")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, parent.model.state_dict()[name]), name


# ---------------------------------------------------------------------------------------------------- benchmark
@pytest.fixture
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.mark.slow
def test_speed_benchmark_depth_variant(tmp_path, _restore_torch_threads):
    spec = importlib.util.spec_from_file_location("_benchmark_pruned_speed", ROOT / "benchmarks" / "pruned_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "speed.json"
    payload = script.main(["--layers", "2", "--vocab", "512", "--ratios", "0.35", "--depth", "--new-tokens", "2",
                           "--repeats", "1", "--warmup", "0", "--prefill-batch", "1", "--prefill-len", "8",
                           "--prefill-repeats", "1", "--threads", "1", "--out", str(out)])
    models = payload["models"]
    assert list(models) == ["dense", "pruned_35", "depth_35"]
    width, depth = models["pruned_35"], models["depth_35"]
    assert (depth["num_layers"], depth["kept_width"], width["num_layers"]) == (1, 4864, 2)
    # Equal size: the block count nearest to the width plan's parameter fraction (here one of two blocks).
    assert depth["param_fraction"] == pytest.approx(1 - depth["parameters"] / models["dense"]["parameters"])
    assert width["param_fraction"] == pytest.approx(1 - width["parameters"] / models["dense"]["parameters"])
    assert depth["decode_limit"] > width["decode_limit"] > 1.0
    for entry in models.values():
        assert math.isfinite(entry["generate"]["cpu"]["median_tokens_per_s"])
        assert math.isfinite(entry["loop"]["cpu"]["median_tokens_per_s"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
