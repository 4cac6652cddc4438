"""Resource measurements and the paper's relative metrics.

Parameters, peak memory and throughput (prefill and batch-1 greedy decoding) of dense and pruned models,
and the relative numbers of "Exploring the Limits of Pruning" (arXiv 2604.27115): relative accuracy loss
(Eq. 3) and relative gain after fine-tuning (Eq. 4), plus compression ratio and performance retention as
commonly reported in pruning studies (e.g. "From LLMs to LRMs: Rethinking Pruning for Reasoning-Centric
Models"; definitions stated below).
"""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

import psutil
import torch

if TYPE_CHECKING:  # annotations only: importing transformers' modeling code costs seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PeakMemory",
    "compression_ratio",
    "count_parameters",
    "decode_throughput",
    "performance_retention",
    "prefill_throughput",
    "relative_accuracy_loss",
    "relative_gain",
]

log = logging.getLogger(__name__)

_METHOD_CUDA = "cuda_max_allocated"
_METHOD_CPU = "cpu_peak_rss"


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``, each stored tensor counted once.

    Tied weights (``lm_head.weight`` sharing ``embed_tokens.weight``) count once, whether they are the same
    ``Parameter`` object or distinct parameters viewing the same storage.

    Args:
        model: Any module.

    Returns:
        The number of unique parameter elements.

    Raises:
        TypeError: If ``model`` is not a :class:`torch.nn.Module`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
    seen: set[tuple] = set()
    total = 0
    for _, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.device.type == "meta":
            key: tuple = ("meta", id(parameter))
        else:
            key = (parameter.untyped_storage().data_ptr(), parameter.storage_offset(), tuple(parameter.shape))
        if key in seen:
            continue
        seen.add(key)
        total += parameter.numel()
    return total


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it.

    On CUDA it resets and reads ``torch.cuda.max_memory_allocated`` (method ``"cuda_max_allocated"``: tensors
    allocated by PyTorch on that device). On CPU it samples the process RSS with ``psutil`` in a background
    thread every ``interval_s`` seconds, plus once on entry and once on exit (method ``"cpu_peak_rss"``:
    whole-process resident memory, so allocations shorter than the interval can be missed).

    Attributes:
        method: ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``.
        start_bytes: Memory at entry.
        peak_bytes: Highest memory seen.
        growth_bytes: ``peak_bytes - start_bytes`` (the peak added by the block).
        num_samples: Number of readings taken (CPU only; 2 on CUDA).

    Example:
        >>> with PeakMemory("cpu") as memory:
        ...     block = torch.ones(1_000_000)
        >>> memory.method
        'cpu_peak_rss'

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a :class:`torch.device`; ``None`` picks CUDA when
            available.
        interval_s: CPU sampling period in seconds, ``> 0``.

    Raises:
        ValueError: If ``device`` is not a CPU or CUDA device, CUDA is requested but unavailable, or
            ``interval_s <= 0``.
    """

    def __init__(self, device: str | torch.device | None = None, interval_s: float = 0.005) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"`device` must be a CPU or CUDA device; got {str(self.device)!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`device`={str(self.device)!r} but CUDA is not available")
        if not isinstance(interval_s, (int, float)) or not interval_s > 0:
            raise ValueError(f"`interval_s` must be a number of seconds > 0; got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.method = _METHOD_CUDA if self.device.type == "cuda" else _METHOD_CPU
        self.start_bytes = 0
        self.peak_bytes = 0
        self.num_samples = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def growth_bytes(self) -> int:
        """Peak over the memory at entry, in bytes (never negative)."""
        return max(self.peak_bytes - self.start_bytes, 0)

    def sample(self) -> int:
        """Take one RSS reading now (CPU), update the peak and return the reading in bytes."""
        rss = self._process.memory_info().rss
        with self._lock:
            self.peak_bytes = max(self.peak_bytes, rss)
            self.num_samples += 1
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakMemory:
        if self.method == _METHOD_CUDA:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.peak_bytes = self.start_bytes
            return self
        self.peak_bytes = 0
        self.num_samples = 0
        self.start_bytes = self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.method == _METHOD_CUDA:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device), self.start_bytes)
            self.num_samples = 2
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def as_dict(self) -> dict[str, int | str]:
        """The measurement as plain data: ``method``, ``start_bytes``, ``peak_bytes``, ``growth_bytes``."""
        return {
            "method": self.method,
            "start_bytes": self.start_bytes,
            "peak_bytes": self.peak_bytes,
            "growth_bytes": self.growth_bytes,
        }


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}")


@torch.inference_mode()
def decode_throughput(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    new_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 3,
) -> float:
    """Greedy decoding speed at batch size 1, in new tokens per second (median over ``repeats``).

    Each run generates exactly ``new_tokens`` tokens (``min_new_tokens = max_new_tokens = new_tokens``, so
    EOS cannot end it early) with the KV cache. The time includes the prefill of ``prompt``; keep the prompt
    short for a decode-dominated number. ``warmup`` untimed runs come first.

    Args:
        model: A Hugging Face causal LM (put in eval mode for the call, then restored).
        tokenizer: Its tokenizer (the prompt is tokenized as plain text).
        prompt: The prompt, non-empty.
        new_tokens: Tokens to generate per run, ``>= 1``.
        warmup: Untimed runs, ``>= 0``.
        repeats: Timed runs, ``>= 1``.

    Returns:
        ``new_tokens / seconds``, median over the timed runs.

    Raises:
        ValueError: If ``prompt`` is empty or a count is out of range.
        RuntimeError: If a run did not produce exactly ``new_tokens`` tokens.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"`prompt` must be a non-empty str; got {prompt!r}")
    _check_count("new_tokens", new_tokens, 1)
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    device = _device_of(model)
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    prompt_length = encoded["input_ids"].shape[1]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        rates = []
        for run in range(warmup + repeats):
            _synchronize(device)
            started = time.perf_counter()
            output = model.generate(
                **encoded,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_token_id,
            )
            _synchronize(device)
            elapsed = time.perf_counter() - started
            generated = output.shape[1] - prompt_length
            if generated != new_tokens:
                raise RuntimeError(f"decode_throughput generated {generated} tokens; expected exactly {new_tokens}")
            if run >= warmup:
                rates.append(new_tokens / elapsed)
    finally:
        model.train(was_training)
    return float(statistics.median(rates))


@torch.inference_mode()
def prefill_throughput(
    model: PreTrainedModel,
    batch_size: int,
    seq_len: int,
    repeats: int = 3,
    *,
    warmup: int = 1,
    seed: int = 0,
) -> float:
    """Prefill speed: prompt tokens processed per second by one forward pass (median over ``repeats``).

    The input is ``batch_size x seq_len`` random token ids (seeded), without padding and without a KV cache;
    only the last position's logits are computed when the model supports ``logits_to_keep``.

    Args:
        model: A Hugging Face causal LM (put in eval mode for the call, then restored).
        batch_size: Sequences per forward pass, ``>= 1``.
        seq_len: Tokens per sequence, ``>= 1``.
        repeats: Timed passes, ``>= 1``.
        warmup: Untimed passes, ``>= 0``.
        seed: Seed of the random token ids.

    Returns:
        ``batch_size * seq_len / seconds``, median over the timed passes.

    Raises:
        ValueError: If a count is out of range.
    """
    _check_count("batch_size", batch_size, 1)
    _check_count("seq_len", seq_len, 1)
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    device = _device_of(model)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    was_training = model.training
    model.eval()
    try:
        rates = []
        for run in range(warmup + repeats):
            _synchronize(device)
            started = time.perf_counter()
            model(input_ids=input_ids, **kwargs)
            _synchronize(device)
            elapsed = time.perf_counter() - started
            if run >= warmup:
                rates.append(batch_size * seq_len / elapsed)
    finally:
        model.train(was_training)
    return float(statistics.median(rates))


def _check_score(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}")
    return float(value)


def relative_accuracy_loss(base: float, pruned: float) -> float:
    """Relative accuracy loss in percent, the paper's Eq. 3.

    ``loss = (A_original - A_pruned) / A_original * 100``. Negative when the pruned model is better. The
    scores may be fractions or percentages, as long as both use the same scale.

    Args:
        base: Accuracy of the original (dense) model, ``> 0``.
        pruned: Accuracy of the pruned model, ``>= 0``.

    Returns:
        The loss in percent.

    Raises:
        ValueError: If a score is negative or not finite, or ``base == 0`` (the relative loss is undefined).
    """
    base = _check_score("base", base)
    pruned = _check_score("pruned", pruned)
    if base == 0:
        raise ValueError("`base` must be > 0: the relative accuracy loss of a model with accuracy 0 is undefined")
    return (base - pruned) / base * 100.0


def relative_gain(pruned: float, finetuned: float) -> float:
    """Relative gain from recovery fine-tuning in percent, the paper's Eq. 4.

    ``gain = (A_after - A_before) / A_before * 100`` with ``A_before`` the pruned model's accuracy and
    ``A_after`` the accuracy after LoRA fine-tuning.

    Args:
        pruned: Accuracy before fine-tuning (pruned model), ``> 0``.
        finetuned: Accuracy after fine-tuning, ``>= 0``.

    Returns:
        The gain in percent.

    Raises:
        ValueError: If a score is negative or not finite, or ``pruned == 0`` (the gain is unbounded).
    """
    pruned = _check_score("pruned", pruned)
    finetuned = _check_score("finetuned", finetuned)
    if pruned == 0:
        raise ValueError("`pruned` must be > 0: the relative gain over an accuracy of 0 is undefined")
    return (finetuned - pruned) / pruned * 100.0


def compression_ratio(dense_params: int, pruned_params: int) -> float:
    """Fraction of the parameters removed: ``1 - pruned_params / dense_params``.

    ``0.0`` for an unpruned model, ``0.25`` when a quarter of the parameters is gone. (Some papers call
    ``dense / pruned`` the compression ratio, e.g. "1.33x"; that is ``1 / (1 - compression_ratio(...))``.)

    Args:
        dense_params: Parameters of the dense model, ``> 0`` (see :func:`count_parameters`).
        pruned_params: Parameters of the pruned model, in ``[0, dense_params]``.

    Returns:
        The removed fraction, in ``[0, 1]``.

    Raises:
        ValueError: If a count is not an int, ``dense_params <= 0`` or ``pruned_params`` is outside
            ``[0, dense_params]`` (a larger "pruned" model usually means unmerged adapters were counted).
    """
    _check_count("dense_params", dense_params, 1)
    _check_count("pruned_params", pruned_params, 0)
    if pruned_params > dense_params:
        raise ValueError(
            f"`pruned_params` must be <= `dense_params` ({dense_params}); got {pruned_params} "
            "(were unmerged LoRA adapters counted?)"
        )
    return 1.0 - pruned_params / dense_params


def performance_retention(dense_score: float, pruned_score: float) -> float:
    """Share of the dense model's score that the pruned model keeps, in percent.

    ``retention = pruned_score / dense_score * 100``, so ``performance_retention(d, p) ==
    100 - relative_accuracy_loss(d, p)``. Above 100 when pruning improved the score.

    Args:
        dense_score: Score of the dense model, ``> 0``.
        pruned_score: Score of the pruned model, ``>= 0``, same scale.

    Returns:
        The retention in percent.

    Raises:
        ValueError: If a score is negative or not finite, or ``dense_score == 0``.
    """
    dense_score = _check_score("dense_score", dense_score)
    pruned_score = _check_score("pruned_score", pruned_score)
    if dense_score == 0:
        raise ValueError("`dense_score` must be > 0: retention relative to a score of 0 is undefined")
    return pruned_score / dense_score * 100.0
