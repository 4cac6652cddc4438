"""NSA analyses: semantic coverage, the calibration study's statistics (Jaccard, correlation with p-values) and neuron
semantic attribution, each against an independent reference; the documented errors; a slow smoke test of both
entry points on the toy model."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_prune.analysis.attribution import (
    PREDICATES,
    TokenPredicate,
    attribution_after,
    attribution_batches,
    mean_activation,
    neuron_relevance,
    relevant_token_mask,
    top_neurons,
)
from lit_prune.analysis.calibration import (
    calibration_study,
    correlation,
    jaccard,
    kept_mask,
    random_jaccard,
)
from lit_prune.analysis.coverage import coverage_from_embeddings, semantic_coverage
from lit_prune.data.sources import Example
from lit_prune.pruning import ActivationRecorder, PruneSpec, find_swiglu_mlps, make_plan
from tests.conftest import ROOT, make_tiny_qwen2

TOY = ROOT / "checkpoints" / "toy-math"
TEXTS = [
    "Tom has 12 apples and buys 7 more. 12 + 7 = 19. \\boxed{19}",
    "Hello, how are you today? I am fine, thank you.",
    "The Eiffel Tower is in Paris. Where is it? Paris.",
    "Anna has 5 pears. She eats 2. 5 - 2 = 3. The answer is \\boxed{3}.",
]


def _pairwise_coverage(embeddings: np.ndarray) -> float:
    """The definition, pair by pair."""
    cosines = [float(embeddings[i] @ embeddings[j] / np.linalg.norm(embeddings[i]) / np.linalg.norm(embeddings[j]))
               for i, j in itertools.permutations(range(len(embeddings)), 2)]
    return 1.0 - sum(cosines) / len(cosines)


# ---------------------------------------------------------------------------------------------------- coverage
def test_coverage_matches_pairwise_loop():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(7, 12, generator=generator) + 0.5  # not unit norm: normalised inside
    assert coverage_from_embeddings(embeddings) == pytest.approx(_pairwise_coverage(embeddings.double().numpy()), abs=1e-12)
    same = torch.ones(3, 4)
    assert coverage_from_embeddings(same) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("texts", [[], ["only one text"]])
def test_coverage_undefined_for_fewer_than_two_texts(texts):
    with pytest.raises(ValueError, match="at least 2 texts"):
        semantic_coverage(texts)
    with pytest.raises(ValueError, match="at least 2 texts"):
        coverage_from_embeddings(torch.ones(len(texts), 4))


def test_coverage_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="norm 0"):
        coverage_from_embeddings(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        coverage_from_embeddings(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        coverage_from_embeddings(torch.ones(3))
    with pytest.raises(ValueError, match="list of strings"):
        semantic_coverage("a single string")


@pytest.mark.slow
def test_semantic_coverage_with_packaged_minilm():
    """The packaged model, offline, against the pairwise definition on embeddings from sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer

    from lit_prune.eval.similarity import default_sbert_path

    reference = SentenceTransformer(default_sbert_path(), device="cpu").encode(TEXTS)
    value = semantic_coverage(TEXTS, device="cpu")
    assert value == pytest.approx(_pairwise_coverage(np.asarray(reference, dtype=np.float64)), abs=1e-5)
    assert semantic_coverage(TEXTS[:1] * 3, device="cpu") == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- statistics
def test_jaccard_known_values_and_errors():
    first = torch.tensor([True, True, False, False])
    second = torch.tensor([True, False, True, False])
    assert jaccard(first, second) == pytest.approx(1 / 3)
    assert jaccard(first, first) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        jaccard(first, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="undefined"):
        jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        jaccard(first.int(), second)
    # k / (2 - k) is the large-N mean of random subsets of the same size
    rng = np.random.default_rng(0)
    n, keep = 20_000, 5_000

    def subset():
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, keep, replace=False)] = True
        return torch.from_numpy(mask)

    values = [jaccard(subset(), subset()) for _ in range(20)]
    assert float(np.mean(values)) == pytest.approx(random_jaccard(keep / n), abs=2e-3)
    with pytest.raises(ValueError, match="kept_fraction"):
        random_jaccard(0.0)


def test_kept_mask():
    mask = kept_mask([[0, 2], [1, 3]], 4)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, True]]
    with pytest.raises(ValueError, match="outside"):
        kept_mask([[0, 4]], 4)


def test_correlation_against_references():
    from scipy import stats

    x = [0.2, 0.5, 0.4, 0.9, 0.7]
    y = [1.0, 1.6, 1.1, 2.5, 2.4]
    pearson = correlation(x, y, "pearson")
    r = float(np.corrcoef(x, y)[0, 1])
    assert pearson.r == pytest.approx(r)
    t = r * math.sqrt((len(x) - 2) / (1 - r * r))
    assert pearson.p_value == pytest.approx(2 * stats.t.sf(abs(t), len(x) - 2))
    assert pearson.n == 5 and pearson.exact and pearson.permutations == 120
    brute = sum(abs(np.corrcoef(x, list(p))[0, 1]) >= abs(r) - 1e-12 for p in itertools.permutations(y)) / 120
    assert pearson.p_permutation == pytest.approx(brute)
    spearman = correlation(x, y, "spearman")
    ranks = lambda v: np.argsort(np.argsort(v))
    assert spearman.r == pytest.approx(float(np.corrcoef(ranks(x), ranks(y))[0, 1]))
    # a perfect ordering of 4: only it and its reverse reach |r| = 1, so p = 2 / 4!
    perfect = correlation([1, 2, 3, 4], [10, 20, 30, 40], "spearman")
    assert perfect.r == pytest.approx(1.0) and perfect.p_permutation == pytest.approx(2 / 24)


def test_correlation_errors_and_undefined():
    constant = correlation([1, 1, 1], [1, 2, 3])
    assert constant.r is None and constant.p_value is None and constant.p_permutation is None
    with pytest.raises(ValueError, match="method"):
        correlation([1, 2, 3], [1, 2, 3], "kendall")
    with pytest.raises(ValueError, match="same length"):
        correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        correlation([1, 2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        correlation([1, 2, float("nan")], [1, 2, 3])


def test_study_rejects_bad_sets_and_criteria(tiny_tokenizer):
    model = make_tiny_qwen2()
    example = Example("What is 1 + 1?", "2", "math")
    width = [PruneSpec(0.5, "wanda_sp", multiple_of=32)]
    with pytest.raises(ValueError, match="at least 3 sets"):
        calibration_study(model, tiny_tokenizer, {"a": [example] * 2, "b": [example] * 2}, [example], width)
    with pytest.raises(ValueError, match="coverage needs at least 2"):
        calibration_study(model, tiny_tokenizer, {"a": [example] * 2, "b": [example] * 2, "c": [example]},
                          [example], width)
    with pytest.raises(ValueError, match="criterion"):
        PruneSpec(0.5, "no-such-criterion")
    from lit_prune.analysis.calibration import main

    with pytest.raises(ValueError, match="criterion"):  # before any model is loaded
        main(["--criteria", "no-such-criterion", "--out", "unused"])


# ---------------------------------------------------------------------------------------------------- attribution
def test_token_predicates(tiny_tokenizer):
    text = "Tom has 12 apples. 12 + 7 = 19. \\boxed{19}"
    _, relevant = relevant_token_mask(tiny_tokenizer, text, PREDICATES["math"])
    offsets = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    pieces = [text[s:e] for s, e in offsets]
    marked = "".join(p for p, r in zip(pieces, relevant) if r).replace(" ", "")
    assert marked == "1212+7=19\\boxed{19}"  # the digits, the operators and the whole boxed answer
    words = TokenPredicate.from_words(["apples", "TOM"])
    by_words = "".join(p for p, r in zip(pieces, relevant_token_mask(tiny_tokenizer, text, words)[1]) if r)
    assert by_words.replace(" ", "") == "Tomapples"
    with pytest.raises(ValueError, match="regular expression"):
        TokenPredicate("bad", "(")
    with pytest.raises(ValueError, match="empty string"):
        TokenPredicate("empty", "x*")
    with pytest.raises(ValueError, match="words"):
        TokenPredicate.from_words([])


def test_predicate_that_marks_nothing_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="marks no token"):
        attribution_batches(tiny_tokenizer, TEXTS, TokenPredicate("never", r"zzzqqq"))


def _naive_relevance(model, tokenizer, texts, predicate):
    """One text at a time, token by token: sum |h| over relevant and over all tokens at every down_proj input."""
    blocks = find_swiglu_mlps(model)
    relevant_sum = torch.zeros(len(blocks), blocks[0].width, dtype=torch.float64)
    total_sum = torch.zeros_like(relevant_sum)
    captured = {}
    handles = [b.down_proj.register_forward_pre_hook(
        lambda module, args, i=b.layer_index: captured.__setitem__(i, args[0][0].detach().double()))
        for b in blocks]
    try:
        for text in texts:
            ids, relevant = relevant_token_mask(tokenizer, text, predicate)
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]), use_cache=False)
            for layer in range(len(blocks)):
                for t, is_relevant in enumerate(relevant):
                    total_sum[layer] += captured[layer][t].abs()
                    if is_relevant:
                        relevant_sum[layer] += captured[layer][t].abs()
    finally:
        for handle in handles:
            handle.remove()
    return relevant_sum / total_sum, total_sum


def test_relevance_matches_naive_per_token_loop(tiny_tokenizer):
    model = make_tiny_qwen2(seed=3)
    batches = attribution_batches(tiny_tokenizer, TEXTS, PREDICATES["math"], batch_size=3)  # padded batches
    attribution = neuron_relevance(model, batches)
    reference, total = _naive_relevance(model, tiny_tokenizer, TEXTS, PREDICATES["math"])
    torch.testing.assert_close(attribution.relevance, reference, rtol=1e-4, atol=1e-6)
    tokens = sum(len(relevant_token_mask(tiny_tokenizer, t, PREDICATES["math"])[0]) for t in TEXTS)
    assert attribution.tokens == tokens
    torch.testing.assert_close(attribution.mean_abs, total / tokens, rtol=1e-4, atol=1e-7)
    top = top_neurons(attribution.relevance, 5)
    assert top.shape == (2, 5)
    assert torch.all(attribution.relevance.gather(1, top)[:, 0] == attribution.relevance.max(dim=1).values)
    with pytest.raises(ValueError, match="`k`"):
        top_neurons(attribution.relevance, 0)


def test_token_mask_equal_to_attention_mask_changes_nothing(tiny_tokenizer):
    model = make_tiny_qwen2(seed=1)
    batches = attribution_batches(tiny_tokenizer, TEXTS, PREDICATES["math"], batch_size=4)
    plain, masked = ActivationRecorder(model), ActivationRecorder(model)
    with plain.recording():
        for ids, mask, _ in batches:
            plain.observe(model, ids, mask, "target")
    with masked.recording():
        for ids, mask, _ in batches:
            masked.observe(model, ids, mask, "target", token_mask=mask)
    for key, value in plain.finalize().state.items():
        torch.testing.assert_close(masked.stats.state[key], value)
    with pytest.raises(ValueError, match="token_mask"):
        masked.observe(model, batches[0][0], batches[0][1], "target", token_mask=batches[0][1][:, :1])


def test_attribution_after_width_pruning(tiny_tokenizer):
    model = make_tiny_qwen2(seed=2)
    batches = attribution_batches(tiny_tokenizer, TEXTS, PREDICATES["math"])
    attribution = neuron_relevance(model, batches)
    neurons = top_neurons(attribution.relevance, 8)
    recorder = ActivationRecorder(model)
    with recorder.recording():
        for ids, mask, _ in batches:
            recorder.observe(model, ids, mask, "target")
    result = make_plan(model, recorder.finalize(), PruneSpec(0.5, "magnitude", multiple_of=32))
    pruned = result.apply(make_tiny_qwen2(seed=2))
    after = mean_activation(pruned, batches)
    report = attribution_after(attribution, neurons, after, result.plan.kept_indices)
    for layer, kept in enumerate(result.plan.kept_indices):
        for j, neuron in enumerate(neurons[layer].tolist()):
            assert report["removed"][layer][j] == (neuron not in kept)
            expected = 0.0 if neuron not in kept else float(after[layer, kept.index(neuron)])
            assert report["after"][layer][j] == pytest.approx(expected)
            assert report["survival"][layer][j] == pytest.approx(expected / report["before"][layer][j])
    assert report["all_removed_fraction"] == pytest.approx(0.5)
    assert report["top_removed_fraction"] == pytest.approx(float(np.mean(report["removed"])))
    # the dense model itself: everything survives
    same = attribution_after(attribution, neurons, mean_activation(model, batches))
    assert same["top_mean_survival"] == pytest.approx(1.0) and same["top_removed_fraction"] == 0.0


# ---------------------------------------------------------------------------------------------------- entry points
@pytest.mark.slow
def test_entry_points_smoke(tmp_path):
    from lit_prune.analysis import attribution, calibration

    study = calibration.main(["--model", str(TOY), "--out", str(tmp_path), "--samples", "4", "--eval-samples", "8",
                              "--ratios", "0.5", "--sparsities", "0.5", "--criteria", "wanda_sp",
                              "--threads", "1"])
    assert set(study["sets"]) >= {"toy-math", "toy-qna"}
    column = next(iter(study["columns"].values()))
    assert all(math.isfinite(v) for v in column["nll"].values())
    assert column["correlation"]["pearson"]["n"] == len(study["sets"])
    payload = attribution.main(["--model", str(TOY), "--out", str(tmp_path), "--samples", "8",
                                "--calibration-samples", "4", "--criteria", "wanda_sp", "--top-k", "4",
                                "--threads", "1"])
    assert len(payload["layers"]) == 4 and len(payload["prunings"]) == 4
    for name in ("calibration.json", "attribution.json", "report.md", "calibration_nll.png", "calibration_jaccard.png",
                 "attribution_heatmap.png", "attribution_tokens.png"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert "## Calibration data" in report and "## Neuron semantic attribution" in report
    assert "nan" not in json.dumps(json.loads((tmp_path / "calibration.json").read_text())).lower()
    assert Path(tmp_path / "calibration.md").read_text().count("|") > 10
