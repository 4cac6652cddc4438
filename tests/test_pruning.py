"""The method in plain torch: slicing, streaming statistics against the paper's formula, plans."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lit_prune.pruning import (
    ActivationRecorder,
    NeuronStats,
    NotSwiGLUError,
    PrunePlan,
    find_swiglu_mlps,
    kept_width,
    PruneSpec,
    StatsFileError,
    make_plan,
    selectivity,
    slice_model,
)
from lit_prune.pruning import stats as stats_module


def _plan(model, stats, ratio, criterion="selective", **settings):
    """The one pruning path, as the callbacks and the sweep call it."""
    settings.setdefault("aggregation", "prompt")
    return make_plan(model, stats, PruneSpec(ratio, criterion, **settings)).plan

# The paper's Table 2: nominal ratio -> exact ratio (%) for Qwen 7B (d_ff 18,944) and 1.5B (d_ff 8,960).
TABLE_2 = {
    0.05: (5.41, 5.71),
    0.10: (10.14, 10.00),
    0.15: (15.54, 15.71),
    0.20: (20.27, 20.00),
    0.25: (25.00, 25.71),
    0.30: (30.41, 30.00),
    0.35: (35.14, 35.71),
}


@pytest.mark.parametrize("ratio", sorted(TABLE_2))
def test_kept_width_reproduces_table_2(ratio):
    for width, expected in zip((18944, 8960), TABLE_2[ratio]):
        kept = kept_width(width, ratio)
        assert kept % 128 == 0
        assert round(100 * (1 - kept / width), 2) == expected


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.2, True, "0.5"])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match=r"`ratio`.*\(0, 1\)"):
        kept_width(256, ratio)


def test_kept_width_rounding_to_zero_or_full():
    with pytest.raises(ValueError, match="keeps 0 of 256"):
        kept_width(256, 0.9, multiple_of=128)
    with pytest.raises(ValueError, match="keeps all 256"):
        kept_width(256, 1e-12, multiple_of=1)
    assert kept_width(256, 0.1, multiple_of=1) == 230


@pytest.mark.parametrize("multiple_of", [0, -4, 257, 2.5])
def test_bad_multiple_of(multiple_of):
    with pytest.raises(ValueError, match="`multiple_of`"):
        kept_width(256, 0.25, multiple_of=multiple_of)


def test_find_swiglu_in_qwen_and_llama():
    for model in (make_tiny_qwen2(), make_tiny_llama()):
        blocks = find_swiglu_mlps(model)
        assert [b.layer_index for b in blocks] == [0, 1]
        assert all(b.width == 256 for b in blocks)
        assert blocks[0].name == "model.layers.0.mlp"


def test_model_without_swiglu_is_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotSwiGLUError, match=r"transformer\.h\.0\.mlp"):
        find_swiglu_mlps(gpt2)
    with pytest.raises(NotSwiGLUError, match="no list of decoder layers"):
        find_swiglu_mlps(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("factory", [make_tiny_qwen2, make_tiny_llama], ids=["qwen2", "llama-bias"])
def test_slicing_zero_columns_keeps_logits(factory):
    model = factory()
    blocks = find_swiglu_mlps(model)
    generator = torch.Generator().manual_seed(1)
    kept = [torch.randperm(256, generator=generator)[:160].sort().values for _ in blocks]
    with torch.no_grad():
        for block, k in zip(blocks, kept):
            dropped = torch.ones(256, dtype=torch.bool)
            dropped[k] = False
            block.down_proj.weight[:, dropped] = 0.0
    input_ids = torch.randint(3, 300, (2, 12), generator=generator)
    with torch.no_grad():
        before = model(input_ids).logits
        slice_model(model, kept)
        after = model(input_ids).logits
    assert model.config.intermediate_size == 160
    assert all(b.width == 160 and b.gate_proj.out_features == 160 for b in find_swiglu_mlps(model))
    if blocks[0].gate_proj.bias is not None:
        assert blocks[0].gate_proj.bias.shape == (160,)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_slice_rejects_bad_indices(tiny_qwen2):
    with pytest.raises(ValueError, match="strictly increasing"):
        slice_model(tiny_qwen2, [[3, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        slice_model(tiny_qwen2, [[0, 256], [0, 1]])
    with pytest.raises(ValueError, match="same number"):
        slice_model(tiny_qwen2, [[0, 1], [0]])


def _batches(seed: int, count: int, vocab: int = 300):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        input_ids = torch.randint(3, vocab, (3, 10), generator=generator)
        lengths = torch.randint(1, 11, (3,), generator=generator)
        mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
        yield input_ids, mask


def _stored_activations(model, batches):
    """The paper's way: keep the N x L x d_ff tensor of per-prompt masked means."""
    rows = []
    captured = {}
    handles = [b.down_proj.register_forward_pre_hook(lambda m, a, i=b.layer_index: captured.__setitem__(i, a[0]))
               for b in find_swiglu_mlps(model)]
    try:
        for input_ids, mask in batches:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=mask)
            per_layer = [(captured[i].abs() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                         for i in range(len(captured))]
            rows.append(torch.stack(per_layer, dim=1).double())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


def test_streaming_selectivity_matches_paper_formula(tiny_qwen2):
    target, distractor = list(_batches(0, 4)), list(_batches(1, 3))
    recorder = ActivationRecorder(tiny_qwen2)
    with recorder.recording():
        for input_ids, mask in target:
            recorder.observe(tiny_qwen2, input_ids, mask, "target")
        for input_ids, mask in distractor:
            recorder.observe(tiny_qwen2, input_ids, mask, "distractor")
    stats = recorder.finalize()
    a_target, a_distractor = _stored_activations(tiny_qwen2, target), _stored_activations(tiny_qwen2, distractor)
    pooled = torch.cat([a_target, a_distractor])
    expected = (a_target.mean(0) - a_distractor.mean(0)) / (pooled.std(0, unbiased=True) + 1e-6)
    assert int(stats.count("target")) == 12 and int(stats.count("distractor")) == 9
    assert (selectivity(stats, "prompt") - expected).abs().max() < 1e-6
    # Hooks are gone afterwards.
    assert all(not b.down_proj._forward_pre_hooks for b in find_swiglu_mlps(tiny_qwen2))


def test_one_capture_counts_prompts_and_tokens(tiny_qwen2):
    recorder = ActivationRecorder(tiny_qwen2)
    input_ids, mask = next(_batches(0, 1))
    with recorder.recording():
        recorder.observe(tiny_qwen2, input_ids, mask, "target")
    assert int(recorder.stats.count("target", "token")) == int(mask.sum())
    assert int(recorder.stats.count("target", "prompt")) == 3


@pytest.mark.parametrize("gram", [False, True])
def test_capture_in_sequence_slices_equals_one_slice(tiny_qwen2, monkeypatch, gram):
    def capture():
        recorder = ActivationRecorder(tiny_qwen2, gram=gram)
        with recorder.recording():
            for group, seed in (("target", 0), ("distractor", 1)):
                for input_ids, mask in _batches(seed, 2):
                    recorder.observe(tiny_qwen2, input_ids, mask, group)
        return recorder.finalize()

    whole = capture()
    # 3 prompts x width 256: a budget of 3 * 256 * 3 elements sums each layer's input in 3-token slices.
    monkeypatch.setattr(stats_module, "HOOK_CHUNK_ELEMENTS", 3 * 256 * 3)
    sliced = capture()
    for expected, got in zip(whole.tensors(), sliced.tensors()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_all_zero_mask_prompt_is_skipped_without_nan(tiny_qwen2):
    input_ids = torch.randint(3, 300, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1] = 0
    recorder = ActivationRecorder(tiny_qwen2)
    with recorder.recording(), pytest.warns(UserWarning, match="all zeros"):
        recorder.observe(tiny_qwen2, input_ids, mask, "target")
        recorder.observe(tiny_qwen2, input_ids, mask, "distractor")
    stats = recorder.finalize()
    assert int(stats.count("target")) == 2 and recorder.skipped_prompts == 2
    assert torch.isfinite(selectivity(stats)).all()


def test_non_finite_activations_name_the_layer(tiny_qwen2):
    with torch.no_grad():
        tiny_qwen2.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    recorder = ActivationRecorder(tiny_qwen2)
    with recorder.recording():
        recorder.observe(tiny_qwen2, torch.randint(3, 300, (2, 6)), torch.ones(2, 6, dtype=torch.long), "target")
    with pytest.raises(FloatingPointError, match=r"layer\(s\) \[1\]"):
        recorder.finalize()


def test_empty_group_is_an_error(tiny_qwen2):
    recorder = ActivationRecorder(tiny_qwen2)
    with recorder.recording():
        recorder.observe(tiny_qwen2, torch.randint(3, 300, (2, 6)), torch.ones(2, 6, dtype=torch.long), "target")
    with pytest.raises(ValueError, match="no distractor prompts were captured"):
        _plan(tiny_qwen2, recorder.stats, 0.25, multiple_of=8)


def test_unknown_criterion_and_group(tiny_qwen2):
    with pytest.raises(ValueError, match="`criterion` must be one of"):
        PruneSpec(0.25, "magic", multiple_of=8)
    recorder = ActivationRecorder(tiny_qwen2)
    with pytest.raises(ValueError, match="`group`"):
        recorder.observe(tiny_qwen2, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), "other")
    with pytest.raises(ValueError, match="`aggregation`"):
        PruneSpec(0.25, "selective", aggregation="layer")


def _captured_stats(model):
    recorder = ActivationRecorder(model)
    with recorder.recording():
        for (input_ids, mask), group in zip(_batches(0, 4), ["target", "target", "distractor", "distractor"]):
            recorder.observe(model, input_ids, mask, group)
    return recorder.finalize()


def test_stats_save_load_and_shape_mismatch(tmp_path, tiny_qwen2):
    stats = _captured_stats(tiny_qwen2)
    stats.metadata["model"] = "tiny-qwen2"
    path = stats.save(tmp_path / "stats.pt")
    loaded = NeuronStats.load(path)
    torch.testing.assert_close(selectivity(loaded), selectivity(stats))
    assert loaded.metadata["model"] == "tiny-qwen2"
    other = make_tiny_qwen2(intermediate_size=128)
    with pytest.raises(ValueError, match=r"\(2, 256\).*tiny-qwen2.*\(2, 128\)"):
        loaded.check_compatible(other)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        NeuronStats.load(tmp_path / "missing.pt")
    # A torn or empty file names itself instead of a bare EOFError.
    torn = tmp_path / "torn.pt"
    torn.write_bytes(path.read_bytes()[:100])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("torn.pt", "empty.pt"):
        with pytest.raises(StatsFileError, match=name):
            NeuronStats.load(tmp_path / name)


def test_stats_merge_by_addition(tiny_qwen2):
    whole = _captured_stats(tiny_qwen2)
    parts = []
    for chunk in ([0, 2], [1, 3]):
        recorder = ActivationRecorder(tiny_qwen2)
        batches = list(_batches(0, 4))
        with recorder.recording():
            for i in chunk:
                recorder.observe(tiny_qwen2, *batches[i], ["target", "target", "distractor", "distractor"][i])
        parts.append(recorder.finalize())
    merged = parts[0].merge_(parts[1])
    torch.testing.assert_close(selectivity(merged), selectivity(whole))


@pytest.mark.parametrize("mode", ["selective", "reverse", "random", "target_mean", "magnitude", "wanda_sp", "flap",
                                  "minitron", "energy"])
def test_plan_criteria_and_round_trip(tmp_path, tiny_qwen2, mode):
    stats = _captured_stats(tiny_qwen2)
    plan = make_plan(tiny_qwen2, stats, PruneSpec(0.3, mode, multiple_of=16, seed=33),
                     provenance={"model": "tiny"}).plan
    assert plan.kept_width == 176 and plan.exact_ratio == pytest.approx(0.3125)
    assert all(k == sorted(set(k)) for k in plan.kept_indices)
    again = PrunePlan.load(plan.save(tmp_path))
    assert again.kept_indices == plan.kept_indices and again.criterion == mode and again.provenance["model"] == "tiny"
    if mode == "random":
        assert _plan(tiny_qwen2, stats, 0.3, mode, multiple_of=16, seed=33).kept_indices == plan.kept_indices
        assert _plan(tiny_qwen2, stats, 0.3, mode, multiple_of=16, seed=42).kept_indices != plan.kept_indices


def test_selective_and_reverse_are_complementary_extremes(tiny_qwen2):
    stats = _captured_stats(tiny_qwen2)
    scores = selectivity(stats)
    selective = _plan(tiny_qwen2, stats, 0.5, "selective", multiple_of=1)
    reverse = _plan(tiny_qwen2, stats, 0.5, "reverse", multiple_of=1)
    for layer in range(2):
        kept_scores = scores[layer, selective.kept_indices[layer]]
        dropped = torch.ones(256, dtype=torch.bool)
        dropped[selective.kept_indices[layer]] = False
        assert kept_scores.min() >= scores[layer, dropped].max()
        assert set(reverse.kept_indices[layer]).isdisjoint(selective.kept_indices[layer])


def test_plan_rejects_wrong_model(tiny_qwen2):
    plan = make_plan(tiny_qwen2, _captured_stats(tiny_qwen2), PruneSpec(0.25, "selective", multiple_of=8),
                     provenance={"model": "tiny-a"}).plan
    with pytest.raises(ValueError, match=r"tiny-a.*2 layers x d_ff 256.*3 layers x d_ff 256"):
        plan.apply(make_tiny_qwen2(num_hidden_layers=3))


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, tiny_qwen2):
    plan = _plan(tiny_qwen2, _captured_stats(tiny_qwen2), 0.25, multiple_of=8)
    plan.apply(tiny_qwen2)
    tiny_qwen2.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == plan.kept_width == 192
    input_ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, tiny_qwen2(input_ids).logits, rtol=0, atol=0)
