"""Activation-guided masked-L2 pruning (NSA Sec. 3.4): a short fine-tune that pushes the weights of the least active
input channels towards zero, then a 2:4 mask from the fine-tuned magnitudes.

"Revisiting Large Language Model Pruning using Neuron Semantic Attribution" (NSA; Ding, Sun, Fu and Hu, arXiv
2503.01542) steers a magnitude mask with a penalty on the weights that a calibration set barely uses. Built from
issue 16's description (item 4; the paper itself was not available offline), with this reading:

* **Channels.** For every targeted linear (by default the MLP projections ``gate_proj``, ``up_proj`` and
  ``down_proj``) the channels are its *input* channels, and a channel's activation is the mean ``|x_j|`` of the
  linear's input over every valid (non-padding) calibration token, prompt and response (:func:`channel_activations`).
  For ``down_proj`` that is the MLP neuron activation ``h`` (the same number as
  :class:`lit_prune.pruning.ActivationRecorder`'s ``abs_sum / tokens``); for ``gate_proj`` / ``up_proj`` it is the
  post-attention-norm hidden state. ``M`` marks every weight of the ``round(fraction * in_features)`` channels with
  the lowest activation (``fraction = 0.2``; :func:`low_activation_channels`).
* **Fine-tune.** ``steps`` AdamW steps (no weight decay: a uniform decay is an unmasked L2 that would blur the
  comparison) on the calibration texts, minimising the causal-LM loss on the response tokens plus
  ``(rho / 2) * sum_l ||M_l * W_l||^2`` over the targeted linears (:func:`masked_l2_penalty`); only the targeted
  weights are trainable. A plain torch loop, as the other analyses (:mod:`lit_prune.analysis.calibration`): a
  30-step steering run needs no checkpoints, loggers or devices, and :class:`lit_prune.module.PrunableCausalLM`
  trains LoRA adapters, not the base weights this penalty is on.
* **Mask.** In every output row, of each group of 4 consecutive input weights the 2 with the smallest ``|W|`` of
  the *fine-tuned* weights are removed (:func:`lit_prune.pruning.sparsity.select_mask`, as ``SparsitySpec(
  "magnitude", "2:4")``). The issue states that Algorithm 1 applies that mask to the *original* weights (the fine-tune
  only chooses the mask) while the text can be read as pruning the fine-tuned weights. Both are built and reported,
  one row each per ``rho``, so the ambiguity is measured rather than argued: reading **A** (``original``, Algorithm
  1, the default reading) and reading **B** (``finetuned``).
* **Controls.** ``rho = 0`` is the same fine-tune without the penalty (the mask moves through the LM loss only);
  plain magnitude 2:4 on the original weights (no fine-tune) and the dense model are the references.

Every variant is scored on the same held-out set: greedy exact match on the last ``\\boxed{}``
(:func:`lit_prune.toy.train.exact_match`) and teacher-forced NLL per response token
(:func:`lit_prune.analysis.calibration.target_nll`); each mask's share of pruned weights that lie in ``M`` (a random
2:4 mask: ``fraction``) and its 2:4 validity (:func:`lit_prune.pruning.sparsity.measure_sparsity`).

Entry point (about a minute on two CPU cores with the toy model)::

    python -m lit_prune.analysis.masked_l2 --model checkpoints/toy-math --out docs/nsa-toy
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from lit_prune.analysis._report import fmt, load_for_analysis, markdown_table, save_figure
from lit_prune.analysis.calibration import calibration_texts, target_nll
from lit_prune.data.batching import labelled_batches
from lit_prune.data.sources import Example, load_examples
from lit_prune.eval.report import write_json
from lit_prune.io import atomic_write_text
from lit_prune.pruning.sparsity import (
    SparsityResult,
    SparsitySpec,
    magnitude_scores,
    measure_sparsity,
    select_mask,
    target_linears,
)

__all__ = [
    "DEFAULT_RHOS",
    "DEFAULT_TARGETS",
    "READINGS",
    "MaskedL2Spec",
    "apply_reading",
    "channel_activations",
    "finetune_with_penalty",
    "low_activation_channels",
    "magnitude_masks",
    "main",
    "mask_statistics",
    "masked_l2_penalty",
    "masked_l2_study",
    "write_masked_l2_report",
]

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_RHOS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 0.0)
# Which weights the fine-tuned mask is applied to: Algorithm 1's reading (A) and the text's other reading (B).
READINGS = {"original": "A: mask on the original weights (Algorithm 1)",
            "finetuned": "B: mask on the fine-tuned weights"}
_READING_LETTERS = {"original": "A", "finetuned": "B"}


# ---------------------------------------------------------------------------------------------------- specification
def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))


def _check_rho(rho) -> float:
    if not _is_number(rho) or float(rho) < 0:
        raise ValueError(f"`rho` (the weight of the masked-L2 penalty (rho/2)*||M*W||^2) must be a finite number "
                         f">= 0 (0: the fine-tune without the penalty); got {rho!r}")
    return float(rho)


def _check_fraction(fraction) -> float:
    if not _is_number(fraction) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"`fraction` (share of each linear's input channels with the lowest mean |x| that the "
                         f"penalty covers) must be in (0, 1); got {fraction!r}")
    return float(fraction)


@dataclass(frozen=True)
class MaskedL2Spec:
    """One masked-L2 run, checked when built.

    Attributes:
        rho: Weight of the penalty ``(rho / 2) * ||M * W||^2``, ``>= 0`` (0: the fine-tune alone, the control).
        fraction: Share of each targeted linear's input channels, lowest mean ``|x|`` first, that ``M`` covers, in
            (0, 1).
        steps: Optimizer steps of the fine-tune, ``>= 1``.
        learning_rate: AdamW learning rate, ``> 0`` (no weight decay).
        pattern: The N:M mask chosen afterwards (``2:4``).
        targets: Linears inside the decoder layers that are penalised, fine-tuned and masked (names as
            :attr:`lit_prune.pruning.sparsity.SparsitySpec.targets`).
        seed: Seed of the order in which the fine-tune visits the calibration batches.

    Raises:
        ValueError: For ``rho`` < 0 or not finite, ``fraction`` outside (0, 1), ``steps`` < 1, a learning rate that
            is not a positive number, a pattern that is not N:M, or targets that ``SparsitySpec`` rejects.
    """

    rho: float = 1e-3
    fraction: float = 0.2
    steps: int = 30
    learning_rate: float = 1e-4
    pattern: str = "2:4"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _check_rho(self.rho))
        object.__setattr__(self, "fraction", _check_fraction(self.fraction))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"`steps` (optimizer steps of the fine-tune) must be an integer >= 1; got {self.steps!r}")
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be a number > 0; got {self.learning_rate!r}")
        mask_spec = SparsitySpec("magnitude", self.pattern, targets=self.targets)
        if mask_spec.n_m is None:
            raise ValueError(f"`pattern` must be an N:M pattern such as '2:4' (the method chooses N:M masks); got "
                             f"{self.pattern!r}")
        object.__setattr__(self, "pattern", mask_spec.pattern)
        object.__setattr__(self, "targets", mask_spec.targets)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer; got {self.seed!r}")

    @property
    def mask_spec(self) -> SparsitySpec:
        """The mask as the sparsity module states it: magnitude, :attr:`pattern`, :attr:`targets`."""
        return SparsitySpec("magnitude", self.pattern, targets=self.targets)

    @property
    def n_m(self) -> tuple[int, int]:
        return self.mask_spec.n_m

    def check_model(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The targeted linears by qualified name (see :meth:`SparsitySpec.check_model`).

        Raises:
            ValueError: If a target matches no linear or M does not divide a targeted input width.
        """
        return self.mask_spec.check_model(model)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["targets"] = list(self.targets)
        return data


# ---------------------------------------------------------------------------------------------------- channels
@contextmanager
def _abs_input_hooks(linears: dict[str, nn.Linear], sums: dict[str, torch.Tensor], current: dict):
    """Forward pre-hooks adding, per input channel, ``sum |x|`` over the tokens ``current["mask"]`` marks."""
    last: dict = {}

    def hook(name: str):
        def read(module: nn.Module, args: tuple) -> None:
            inputs, mask = args[0].detach(), current["mask"]
            if last.get("inputs") is not inputs:  # gate_proj and up_proj read the same tensor: sum it once
                weights = mask.to(device=inputs.device, dtype=torch.float32)
                last.update(inputs=inputs, sums=torch.einsum("bt,btd->d", weights, inputs.float().abs()))
            sums[name].add_(last["sums"].to(sums[name].device, torch.float64))

        return read

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in linears.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        last.clear()


@torch.no_grad()
def channel_activations(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]],
                        targets: Sequence[str] | None = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """Mean ``|x_j|`` of each targeted linear's input channel ``j`` over the valid tokens of ``batches``.

    Hand-written rather than :class:`lit_prune.pruning.sparsity.InputRecorder` (which sums ``x^2``, Wanda's norm)
    or :class:`lit_prune.pruning.ActivationRecorder` (``|h|``, the input of ``down_proj`` only): the penalty needs
    the mean absolute input of every targeted linear, ``gate_proj`` and ``up_proj`` too.

    Args:
        model: A Hugging Face causal LM (not modified).
        batches: ``(input_ids, attention_mask, ...)`` tuples (:func:`lit_prune.data.labelled_batches` output);
            padding (attention mask 0) never enters a sum, and rows without a valid token are skipped.
        targets: Linears inside the decoder layers (None: every one).

    Returns:
        ``{qualified linear name: (in_features,) float64 CPU tensor}``.

    Raises:
        ValueError: If a target matches no linear or the batches hold no valid token (an empty calibration set).
    """
    linears = target_linears(model, targets)
    sums = {name: torch.zeros(linear.in_features, dtype=torch.float64) for name, linear in linears.items()}
    forward_kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # the logits are never read
    device = next(iter(linears.values())).weight.device
    tokens, current = 0, {}
    was_training = model.training
    model.eval()
    try:
        with _abs_input_hooks(linears, sums, current):
            for input_ids, attention_mask, *_ in batches:
                rows = attention_mask.sum(dim=1) > 0  # a fully masked row can turn attention into NaN
                if not bool(rows.any()):
                    continue
                input_ids, attention_mask = input_ids[rows].to(device), attention_mask[rows].to(device)
                current["mask"] = attention_mask
                model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
                tokens += int(attention_mask.sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration tokens: the calibration set is empty (or every text has no token)")
    return {name: total / tokens for name, total in sums.items()}


def low_activation_channels(activations: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Boolean ``(in_features,)`` mask, True at the ``round(fraction * in_features)`` channels (halves up) with the
    lowest activation; ties go to the lower index.

    Raises:
        ValueError: If ``fraction`` is not in (0, 1) or ``activations`` is not a 1-D tensor.
    """
    fraction = _check_fraction(fraction)
    if not torch.is_tensor(activations) or activations.dim() != 1:
        raise ValueError(f"`activations` must be a 1-D tensor (one value per input channel); got "
                         f"{tuple(activations.shape) if torch.is_tensor(activations) else type(activations).__name__}")
    count = math.floor(fraction * activations.numel() + 0.5)
    low = torch.zeros(activations.numel(), dtype=torch.bool)
    low[activations.detach().cpu().argsort(stable=True)[:count]] = True
    return low


def masked_l2_penalty(linears: dict[str, nn.Linear], channel_masks: dict[str, torch.Tensor],
                      rho: float) -> torch.Tensor:
    """``(rho / 2) * sum_l ||M_l * W_l||^2``, with ``M_l`` every weight of the masked input channels of linear ``l``
    (differentiable in the weights).

    Args:
        linears: The penalised linears by name.
        channel_masks: ``{name: (in_features,) bool}``, True on the channels ``M`` covers.
        rho: The penalty weight, ``>= 0``.

    Raises:
        ValueError: For ``rho`` < 0, or a mask missing or of the wrong width.
    """
    rho = _check_rho(rho)
    total = None
    for name, linear in linears.items():
        mask = channel_masks.get(name)
        if mask is None or tuple(mask.shape) != (linear.in_features,):
            raise ValueError(f"`channel_masks` must hold a ({linear.in_features},) mask for {name!r}; got "
                             f"{None if mask is None else tuple(mask.shape)}")
        term = (linear.weight * mask.to(linear.weight.device, linear.weight.dtype)[None, :]).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("`linears` is empty: there is no weight to penalise")
    return 0.5 * rho * total


# ---------------------------------------------------------------------------------------------------- fine-tune
def finetune_with_penalty(model: nn.Module, batches: Sequence[Sequence[torch.Tensor]],
                          channel_masks: dict[str, torch.Tensor], spec: MaskedL2Spec) -> dict:
    """Fine-tune ``model``'s targeted weights in place on LM loss + :func:`masked_l2_penalty`.

    Every other parameter is frozen for the run (its ``requires_grad`` is restored afterwards). The batches are
    visited in a seeded random order, epoch after epoch, until ``spec.steps`` steps are done; the LM loss is the mean
    cross-entropy over the labelled (response) tokens of a batch, transformers' causal-LM loss.

    Args:
        model: A Hugging Face causal LM.
        batches: ``(input_ids, attention_mask, labels)`` tuples (labels ``-100`` where not scored).
        channel_masks: ``{qualified linear name: (in_features,) bool}`` (:func:`low_activation_channels`).
        spec: The run (``rho``, ``steps``, ``learning_rate``, ``targets``, ``seed``).

    Returns:
        ``{"lm_loss": [...], "penalty": [...]}`` per step (the penalty with ``rho``), and ``seconds``.

    Raises:
        ValueError: If there is no batch with a labelled token, or a mask is missing.
        FloatingPointError: If the loss becomes NaN or infinite (lower the learning rate).
    """
    linears = spec.check_model(model)
    usable = [batch for batch in batches if bool((batch[2][:, 1:] != -100).any())]
    if not usable:
        raise ValueError("no calibration batch holds a labelled (response) token to fine-tune on")
    started = time.perf_counter()
    device = next(iter(linears.values())).weight.device
    weights = [linear.weight for linear in linears.values()]
    trainable = {id(w) for w in weights}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(weights, lr=spec.learning_rate, weight_decay=0.0)
    history = {"lm_loss": [], "penalty": []}
    was_training = model.training
    order: list[int] = []
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(id(parameter) in trainable)
        model.train()
        for step in range(spec.steps):
            if not order:
                order = torch.randperm(len(usable), generator=generator).tolist()
            input_ids, attention_mask, labels = (t.to(device) for t in usable[order.pop(0)][:3])
            lm_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
            penalty = masked_l2_penalty(linears, channel_masks, spec.rho)
            loss = lm_loss + penalty
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"the masked-L2 fine-tune diverged at step {step} (rho={spec.rho:g}, "
                                         f"learning_rate={spec.learning_rate:g}): loss {float(loss)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history["lm_loss"].append(float(lm_loss.detach()))
            history["penalty"].append(float(penalty.detach()))
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    history["seconds"] = time.perf_counter() - started
    return history


# ---------------------------------------------------------------------------------------------------- masks
@torch.no_grad()
def magnitude_masks(model: nn.Module, spec: MaskedL2Spec) -> dict[str, torch.Tensor]:
    """Keep masks (True = kept, CPU) of the N:M pattern from ``|W|`` of ``model``'s targeted weights, as
    ``SparsitySpec("magnitude", spec.pattern)`` chooses them (:func:`lit_prune.pruning.sparsity.select_mask`)."""
    mask_spec = spec.mask_spec
    return {name: select_mask(magnitude_scores(linear.weight), mask_spec.sparsity, "layer", mask_spec.n_m).cpu()
            for name, linear in spec.check_model(model).items()}


def mask_statistics(masks: dict[str, torch.Tensor], channel_masks: dict[str, torch.Tensor],
                    reference: dict[str, torch.Tensor] | None = None) -> dict:
    """Where a mask prunes, relative to ``M``.

    Args:
        masks: Keep masks ``{name: (out, in) bool}``.
        channel_masks: ``{name: (in,) bool}``, the channels ``M`` covers.
        reference: Other keep masks of the same shapes (plain magnitude), to count changed decisions.

    Returns:
        ``pruned_in_low``: share of the pruned weights that lie in ``M`` (a random N:M mask: the share of ``M``);
        ``low_pruned``: share of ``M``'s weights that are pruned (random: N/M); ``changed``: share of weights
        whose keep decision differs from ``reference`` (None without one). None where a count is zero.
    """
    pruned_total = pruned_low = low_total = changed = weights = 0
    for name, keep in masks.items():
        low = channel_masks[name].to(keep.device)[None, :].expand_as(keep)
        pruned = ~keep
        pruned_total += int(pruned.sum())
        pruned_low += int((pruned & low).sum())
        low_total += int(low.sum())
        weights += keep.numel()
        if reference is not None:
            changed += int((keep != reference[name].to(keep.device)).sum())
    return {"pruned_in_low": pruned_low / pruned_total if pruned_total else None,
            "low_pruned": pruned_low / low_total if low_total else None,
            "changed": changed / weights if reference is not None and weights else None}


def apply_reading(original: nn.Module, finetuned: nn.Module, masks: dict[str, torch.Tensor], spec: MaskedL2Spec,
                  reading: str = "original") -> nn.Module:
    """The pruned model of one reading: a copy of the ``original`` (reading A, Algorithm 1) or of the ``finetuned``
    (reading B) weights with ``masks`` applied; neither input is modified.

    Args:
        original: The model before the fine-tune.
        finetuned: The fine-tuned model whose ``|W|`` chose ``masks`` (:func:`magnitude_masks`).
        masks: Keep masks by qualified linear name.
        spec: The run (its pattern and targets).
        reading: One of :data:`READINGS`.

    Raises:
        ValueError: For another reading, or masks that do not fit the model.
    """
    if reading not in READINGS:
        raise ValueError(f"`reading` must be one of {sorted(READINGS)}; got {reading!r}")
    pruned = copy.deepcopy(original if reading == "original" else finetuned)
    SparsityResult(spec.mask_spec, masks).apply(pruned)
    return pruned


def _validity(model: nn.Module, spec: MaskedL2Spec) -> dict:
    """The measured sparsity and N:M violations of ``model``'s targeted weights."""
    measured = measure_sparsity(model, spec.targets, spec.n_m)
    return {"sparsity": measured["overall"], "n_m_violations": measured["n_m_violations"]}


@torch.no_grad()
def _norm_kept(original: dict[str, nn.Linear], finetuned: dict[str, nn.Linear],
               channel_masks: dict[str, torch.Tensor]) -> dict:
    """``||W_ft||_F / ||W_orig||_F`` over ``M``'s weights and over the others, all targeted linears together."""
    sums = {"low": [0.0, 0.0], "other": [0.0, 0.0]}
    for name, linear in original.items():
        low = channel_masks[name].to(linear.weight.device)
        for key, columns in (("low", low), ("other", ~low)):
            sums[key][0] += float(finetuned[name].weight[:, columns].double().pow(2).sum())
            sums[key][1] += float(linear.weight[:, columns].double().pow(2).sum())
    return {key: math.sqrt(after / before) if before > 0 else None for key, (after, before) in sums.items()}


# ---------------------------------------------------------------------------------------------------- the study
def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _evaluate(model: nn.Module, tokenizer, target: Sequence[Example], max_length: int,
              max_new_tokens: int) -> dict:
    from lit_prune.toy.train import exact_match

    records = [{"prompt": e.prompt, "answer": e.answer} for e in target]
    accuracy, rows = exact_match(model, tokenizer, records, max_new_tokens=max_new_tokens)
    scored = target_nll(model, tokenizer, target, max_length)
    return {"exact_match": accuracy, "n": len(rows), "nll": _finite(scored["nll"]), "tokens": scored["tokens"],
            "_correct": [bool(row["correct"]) for row in rows]}


def _paired(correct: Sequence[bool], reference: Sequence[bool]) -> dict:
    """Problems solved here but not by the reference (``gained``) and the reverse (``lost``), with the exact
    two-sided sign-test p-value of that split (1.0 when no problem differs)."""
    from scipy import stats

    gained = sum(a and not b for a, b in zip(correct, reference))
    lost = sum(b and not a for a, b in zip(correct, reference))
    p_value = float(stats.binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0
    return {"gained": gained, "lost": lost, "p_sign": p_value}


def _better(first: dict, second: dict) -> bool:
    """Whether ``first`` scores better than ``second``: higher exact match, then lower NLL (undefined: worst)."""
    nll = (first["nll"] if first["nll"] is not None else math.inf, second["nll"] if second["nll"] is not None
           else math.inf)
    return first["exact_match"] > second["exact_match"] or (first["exact_match"] == second["exact_match"]
                                                           and nll[0] < nll[1])


def masked_l2_study(model: nn.Module, tokenizer, calibration: Sequence[Example], target: Sequence[Example],
                    rhos: Sequence[float] = DEFAULT_RHOS, spec: MaskedL2Spec | None = None, max_length: int = 256,
                    batch_size: int = 8, max_new_tokens: int = 64, console: Console | None = None) -> dict:
    """Prune ``model`` with masked-L2-steered 2:4 masks for every ``rho`` (both readings) and score every variant.

    Args:
        model: The dense causal LM (not modified: every variant is a deep copy).
        tokenizer: Its tokenizer, with a pad token.
        calibration: Calibration examples with responses: the channel activations (prompt + response tokens) and
            the fine-tune (LM loss on the responses).
        target: Held-out examples; those with a response and an answer are scored (exact match and NLL).
        rhos: Penalty weights, each ``>= 0`` (0: the control).
        spec: Everything but ``rho`` (None: :class:`MaskedL2Spec` defaults).
        max_length: Tokens per calibration text (longer ones are cut) and per target row (longer ones dropped).
        batch_size: Calibration texts per batch (fine-tune and activations).
        max_new_tokens: Greedy tokens per exact-match answer.
        console: Where the progress bar goes.

    Returns:
        Plain data: ``dense``, ``magnitude`` and one entry per ``rho`` in ``runs`` (``fine-tune`` facts and the
        two readings), ``best`` (per reading), ``calibration`` (tokens, cut texts, channels in ``M``) and
        ``seconds``.

    Raises:
        ValueError: For an empty ``calibration`` or ``target``, no ``rhos``, a ``rho`` < 0, or a spec that does not
            fit the model.
    """
    spec = spec or MaskedL2Spec()
    specs = [replace(spec, rho=rho) for rho in rhos]  # each rho checked here, where it enters
    if not specs:
        raise ValueError("`rhos` is empty: give at least one penalty weight (0 is the control)")
    if not calibration:
        raise ValueError("the calibration set is empty: the channel activations and the fine-tune need examples")
    target = [e for e in target if e.response and e.answer]
    if not target:
        raise ValueError("`target` holds no example with a response and an answer to score")
    originals = spec.check_model(model)
    console = console or Console()
    started = time.perf_counter()
    batches, cut = labelled_batches(tokenizer, calibration_texts(tokenizer, calibration), "response", max_length,
                                    batch_size)
    activations = channel_activations(model, batches, spec.targets)
    channel_masks = {name: low_activation_channels(values, spec.fraction) for name, values in activations.items()}
    study = {"calibration": {"examples": len(calibration), "cut": cut,
                             "tokens": sum(int(mask.sum()) for _, mask, _ in batches),
                             "low_channels": {name: int(mask.sum()) for name, mask in channel_masks.items()},
                             "weights_in_low": sum(int(m.sum()) * originals[n].out_features
                                                   for n, m in channel_masks.items()),
                             "weights": sum(linear.weight.numel() for linear in originals.values())}}
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("dense and magnitude 2:4", total=2 + len(specs))
        begin = time.perf_counter()
        study["dense"] = {**_evaluate(model, tokenizer, target, max(max_length, 512), max_new_tokens),
                          "seconds": time.perf_counter() - begin}
        progress.advance(task)
        begin = time.perf_counter()
        reference = magnitude_masks(model, spec)
        pruned = apply_reading(model, model, reference, spec)
        validity = _validity(pruned, spec)
        study["magnitude"] = {**_evaluate(pruned, tokenizer, target, max(max_length, 512), max_new_tokens),
                              **validity, **mask_statistics(reference, channel_masks),
                              "seconds": time.perf_counter() - begin}
        del pruned
        progress.advance(task)
        runs = []
        for run_spec in specs:
            progress.update(task, description=f"rho = {run_spec.rho:g}")
            begin = time.perf_counter()
            finetuned = copy.deepcopy(model)
            history = finetune_with_penalty(finetuned, batches, channel_masks, run_spec)
            masks = magnitude_masks(finetuned, run_spec)
            run = {"rho": run_spec.rho, "finetune_s": history["seconds"],
                   "lm_loss_first": history["lm_loss"][0], "lm_loss_last": history["lm_loss"][-1],
                   "penalty_first": history["penalty"][0], "penalty_last": history["penalty"][-1],
                   "norm_kept": _norm_kept(originals, run_spec.check_model(finetuned), channel_masks),
                   "finetuned_dense_nll": _finite(target_nll(finetuned, tokenizer, target,
                                                             max(max_length, 512))["nll"]),
                   **mask_statistics(masks, channel_masks, reference), "readings": {}}
            for reading in READINGS:
                variant = apply_reading(model, finetuned, masks, run_spec, reading)
                scores = _evaluate(variant, tokenizer, target, max(max_length, 512), max_new_tokens)
                scores["vs_magnitude"] = _paired(scores["_correct"], study["magnitude"]["_correct"])
                run["readings"][reading] = {**scores, **_validity(variant, run_spec)}
                del variant
            del finetuned
            run["seconds"] = time.perf_counter() - begin
            runs.append(run)
            progress.advance(task)
    control = next((run for run in runs if run["rho"] == 0), None)
    for run in runs:
        for reading, scores in run["readings"].items():
            scores["vs_control"] = (None if control is None or run is control else
                                    _paired(scores["_correct"], control["readings"][reading]["_correct"]))
    for scores in [study["dense"], study["magnitude"], *(s for run in runs for s in run["readings"].values())]:
        scores.pop("_correct")  # per-problem results: only their paired counts are kept
    study["runs"] = runs
    study["best"] = {}
    for reading in READINGS:
        best = None
        for run in runs:
            if best is None or _better(run["readings"][reading], best["readings"][reading]):
                best = run
        scores = best["readings"][reading]
        study["best"][reading] = {"rho": best["rho"], "exact_match": scores["exact_match"], "nll": scores["nll"],
                                  **scores["vs_magnitude"], "beats_magnitude": _better(scores, study["magnitude"]),
                                  "vs_control": scores["vs_control"],
                                  "beats_control": None if control is None else _better(scores,
                                                                                       control["readings"][reading])}
    study["seconds"] = time.perf_counter() - started
    return study


# ---------------------------------------------------------------------------------------------------- the report
def _rows(study: dict) -> list[list[str]]:
    dense, magnitude = study["dense"], study["magnitude"]
    rows = [["dense", "-", "-", fmt(dense["exact_match"], ".1%"), "-", "-", fmt(dense["nll"], ".4f"), "-", "-", "-"],
            ["magnitude 2:4 (no fine-tune)", "-", "-", fmt(magnitude["exact_match"], ".1%"), "reference", "-",
             fmt(magnitude["nll"], ".4f"), fmt(magnitude["pruned_in_low"], ".3f"), fmt(magnitude["low_pruned"], ".3f"),
             str(magnitude["n_m_violations"])]]
    for run in study["runs"]:
        for reading, scores in run["readings"].items():
            paired, control = scores["vs_magnitude"], scores["vs_control"]
            rows.append(["masked-L2 2:4", f"{run['rho']:g}", READINGS[reading].split(":")[0] + f" ({reading})",
                         fmt(scores["exact_match"], ".1%"),
                         f"+{paired['gained']} / -{paired['lost']} (p {paired['p_sign']:.2f})",
                         ("control" if run["rho"] == 0 else "-") if control is None else
                         f"+{control['gained']} / -{control['lost']} (p {control['p_sign']:.2f})",
                         fmt(scores["nll"], ".4f"), fmt(run["pruned_in_low"], ".3f"),
                         fmt(run["low_pruned"], ".3f"), str(scores["n_m_violations"])])
    return rows


_COLUMNS = ["variant", "rho", "reading", "exact match", "vs magnitude: + / - (sign test)",
            "vs rho = 0: + / - (sign test)", "NLL", "pruned in M", "M pruned", "2:4 violations"]
_RUN_COLUMNS = ["rho", "LM loss first -> last", "penalty first -> last", "norm kept in M", "norm kept elsewhere",
                "mask changed vs magnitude", "fine-tuned dense NLL", "fine-tune s"]


def _run_rows(study: dict) -> list[list[str]]:
    return [[f"{run['rho']:g}", f"{fmt(run['lm_loss_first'], '.4f')} -> {fmt(run['lm_loss_last'], '.4f')}",
             f"{fmt(run['penalty_first'], '.3g')} -> {fmt(run['penalty_last'], '.3g')}",
             fmt(run["norm_kept"]["low"], ".3f"), fmt(run["norm_kept"]["other"], ".3f"), fmt(run["changed"], ".2%"),
             fmt(run["finetuned_dense_nll"], ".4f"), f"{run['finetune_s']:.1f}"] for run in study["runs"]]


def _figure(study: dict, out: Path, model_name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [run for run in study["runs"] if run["rho"] > 0]
    zero = [run for run in study["runs"] if run["rho"] == 0]
    fig, axes = plt.subplots(1, 5, figsize=(12, 4.2), dpi=110, sharey=False,
                             gridspec_kw={"width_ratios": [1, 5, 1.2, 1, 5], "wspace": 0.08})
    axes[2].axis("off")  # a spacer between the two metrics
    axes = [axes[0], axes[1], axes[3], axes[4]]
    colours = {"original": "tab:blue", "finetuned": "tab:orange"}
    metrics = (("exact_match", "exact match (greedy)", 100.0), ("nll", "target NLL (nats / token)", 1.0))
    for index, (key, label, scale) in enumerate(metrics):
        ax_zero, ax_log = axes[2 * index], axes[2 * index + 1]
        values = [v for run in study["runs"] for v in (run["readings"][r][key] for r in READINGS) if v is not None]
        values += [study["magnitude"][key]] if study["magnitude"][key] is not None else []  # dense: in the title
        for reading in READINGS:
            name = READINGS[reading]
            points = [(run["rho"], run["readings"][reading][key]) for run in sorted(positive, key=lambda r: r["rho"])
                      if run["readings"][reading][key] is not None]
            if points:
                ax_log.plot([x for x, _ in points], [scale * y for _, y in points], marker="o",
                            color=colours[reading], label=name)
            for run in zero:
                if run["readings"][reading][key] is not None:
                    ax_zero.scatter([0], [scale * run["readings"][reading][key]], color=colours[reading], marker="s")
        for ax in (ax_zero, ax_log):
            if study["magnitude"][key] is not None:
                ax.axhline(scale * study["magnitude"][key], color="black", linestyle="--",
                           label="magnitude 2:4 (no fine-tune)" if ax is ax_log else None)
            ax.grid(alpha=0.3)
        if values:
            low, high = scale * min(values), scale * max(values)
            pad = 0.08 * (high - low) or 0.05 * max(abs(high), 1e-3)
            for ax in (ax_zero, ax_log):
                ax.set_ylim(low - pad, high + pad)
        ax_zero.set_xticks([0], ["0"])
        ax_zero.set_xlim(-1, 1)
        ax_zero.set_xlabel("rho = 0\n(control)")
        ax_zero.set_ylabel(label + (" (%)" if key == "exact_match" else ""))
        ax_log.set_xscale("log")
        ax_log.set_xlabel("rho (log scale)")
        ax_log.tick_params(axis="y", labelleft=False)
        dense = study["dense"][key]
        unit = "%" if key == "exact_match" else ""
        ax_log.set_title(f"{label}; dense: {fmt(None if dense is None else scale * dense, '.4g')}{unit}",
                         fontsize=10)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{model_name}: masked-L2 fine-tune, then 2:4 from |W| (MLP projections)", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.86)
    return save_figure(fig, out / "fig_masked_l2.png")


def _best_sentence(study: dict) -> str:
    magnitude = study["magnitude"]
    parts = []
    for reading, best in study["best"].items():
        letter = _READING_LETTERS[reading]
        verdict = ("beats plain magnitude 2:4" if best["beats_magnitude"] else
                   "does **not** beat plain magnitude 2:4")
        parts.append(f"Reading {letter} ({reading}): best rho = {best['rho']:g} (exact match "
                     f"{fmt(best['exact_match'], '.1%')}, NLL {fmt(best['nll'], '.4f')}; +{best['gained']} / "
                     f"-{best['lost']} problems, sign test p = {best['p_sign']:.2f}), which {verdict} (exact match "
                     f"{fmt(magnitude['exact_match'], '.1%')}, NLL {fmt(magnitude['nll'], '.4f')}).")
        control = best.get("vs_control")
        if control is not None:
            zero = next(run for run in study["runs"] if run["rho"] == 0)["readings"][reading]
            parts.append(f"Against the rho = 0 control of the same reading (the fine-tune without the penalty: "
                         f"exact match {fmt(zero['exact_match'], '.1%')}, NLL {fmt(zero['nll'], '.4f')}) it solves "
                         f"+{control['gained']} / -{control['lost']} problems (sign test p = "
                         f"{control['p_sign']:.2f}).")
        elif best["rho"] == 0:
            parts.append("The best value is the control itself: the penalty adds nothing here.")
    return " ".join(parts)


def _markdown(study: dict, settings: dict, figure: str) -> str:
    calibration = study["calibration"]
    spec = settings["spec"]
    lines = ["## Activation-guided masked-L2 pruning (NSA Sec. 3.4)", "",
             f"Model `{settings['model']}`. Built from issue 16's description of NSA's method (the paper was not "
             "available offline). For each of the MLP projections "
             f"({', '.join(f'`{t}`' for t in spec['targets'])}) of every layer, `M` covers the weights of the "
             f"{spec['fraction']:.0%} input channels with the lowest mean |x| over {calibration['tokens']} calibration "
             f"tokens ({settings['samples']} examples of `{settings['calibration']}`, prompt + response; "
             f"{calibration['weights_in_low']:,} of {calibration['weights']:,} targeted weights). The fine-tune: "
             f"{spec['steps']} AdamW steps (lr {spec['learning_rate']:g}, no weight decay, batches of "
             f"{settings['batch_size']}) of LM loss on the calibration responses + (rho/2)·||M ⊙ W||², only the "
             "targeted weights trainable. Then a 2:4 mask from |W_finetuned| (2 of every 4 consecutive input "
             "weights of a row removed).", "",
             "**The ambiguity.** As the issue states it, Algorithm 1 applies the mask to the *original* weights (the "
             "fine-tune only chooses the mask), while the text can be read as pruning the *fine-tuned* weights. Both "
             "are reported, one row each per rho: reading **A** (`original`, Algorithm 1, the module's default "
             "reading) and reading **B** (`finetuned`). rho = 0 is the same fine-tune without the penalty.", "",
             f"Scored on {settings['eval_samples']} held-out problems of `{settings['target']}`: greedy exact match "
             f"of the last `\\boxed{{}}` ({settings['max_new_tokens']} new tokens) and teacher-forced NLL per response "
             f"token ({study['dense']['tokens']:,} tokens). *pruned in M*: share of the pruned weights that "
             f"lie in `M` (a random 2:4 mask: {spec['fraction']:.2f}); *M pruned*: share of `M`'s weights pruned "
             "(random: 0.50). *vs magnitude*: held-out problems this variant solves and plain magnitude 2:4 does not "
             "(+), the reverse (-), and the exact two-sided sign-test p-value of that split (paired, same problems); "
             "*vs rho = 0*: the same against the control of the same reading. "
             "Every mask was measured with `measure_sparsity`: the violations column counts 2:4 groups with fewer "
             "than 2 zeros.", "",
             markdown_table(_COLUMNS, _rows(study)), "",
             "### The fine-tunes", "",
             "*norm kept*: ||W_finetuned|| / ||W_original|| over `M`'s weights and over the others; *mask changed*: "
             "share of targeted weights whose keep decision differs from plain magnitude 2:4; *fine-tuned dense "
             "NLL*: the fine-tuned model before masking.", "",
             markdown_table(_RUN_COLUMNS, _run_rows(study)), "",
             "### What works", "",
             _best_sentence(study), "",
             _verdict(study), "",
             f"Wall time of this run: {settings['wall_s']:.0f} s ({settings['threads']} torch thread(s), 2-core CPU): "
             f"{sum(r['finetune_s'] for r in study['runs']):.0f} s of fine-tuning for {len(study['runs'])} values of "
             "rho, the rest evaluation (generation dominates).", "",
             "Caveats: one seed of one toy model; Adam normalises each weight's step, so once the penalty's gradient "
             "dominates the (tiny) LM gradient of a low-activation weight, that weight shrinks by about lr per step "
             "whatever rho is: rho matters only while it is comparable to the LM gradient.", "",
             f"![masked-L2 vs rho]({figure})", "",
             "Reproduce: `python -m lit_prune.analysis.masked_l2 --model checkpoints/toy-math --out docs/nsa-toy`.", ""]
    return "\n".join(lines)


def _verdict(study: dict) -> str:
    magnitude = study["magnitude"]
    a = [run["readings"]["original"] for run in study["runs"]]
    b = [run["readings"]["finetuned"] for run in study["runs"]]
    beat_a = sum(_better(s, magnitude) for s in a)
    beat_b = sum(_better(s, magnitude) for s in b)
    b_over_a = sum(_better(sb, sa) for sa, sb in zip(a, b))
    return (f"Of {len(a)} values of rho, {beat_a} beat plain magnitude 2:4 under reading A and {beat_b} under "
            f"reading B (higher exact match, then lower NLL); reading B scores better than reading A for {b_over_a} "
            f"of them. {2 * len(a)} variants were compared with one reference on the same {study['dense']['n']} "
            "problems, so a single p-value near 0.05 is weak evidence after that many looks.")


def write_masked_l2_report(study: dict, settings: dict, out: str | Path, console: Console | None = None) -> dict:
    """Print the rich tables and write ``masked_l2.json``, ``masked_l2.md`` and ``fig_masked_l2.png``.

    ``masked_l2.md`` is written on its own (not through ``report.md``'s index of sections).

    Args:
        study: :func:`masked_l2_study` output.
        settings: Plain data describing the run (model, calibration, target, samples, eval_samples, batch_size,
            max_new_tokens, spec, threads, wall_s).
        out: Output folder (created).
        console: Where the tables go.

    Returns:
        ``{name: path}`` of the files written.
    """
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for title, columns, rows in (("Masked-L2 2:4 vs magnitude 2:4 (held-out toy math)", _COLUMNS, _rows(study)),
                                 ("The fine-tunes", _RUN_COLUMNS, _run_rows(study))):
        table = Table(title=title)
        for index, column in enumerate(columns):
            table.add_column(column, justify="left" if index == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(_best_sentence(study))
    figure = _figure(study, out, Path(settings["model"]).name)
    written = {"json": write_json({"settings": settings, **study, "figure": figure}, out / "masked_l2.json"),
               "markdown": atomic_write_text(out / "masked_l2.md", _markdown(study, settings, figure)),
               "figure": out / figure}
    return written


# ---------------------------------------------------------------------------------------------------- entry point
def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.analysis.masked_l2",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/toy-math", help="model folder (default: the toy)")
    parser.add_argument("--out", type=Path, default=Path("docs/nsa-toy"), help="output folder")
    parser.add_argument("--calibration", default=None,
                        help="calibration examples (default: <model>/math_capture.jsonl)")
    parser.add_argument("--target", default=None, help="held-out target examples (default: <model>/math_eval.jsonl)")
    parser.add_argument("--rhos", type=_floats, default=list(DEFAULT_RHOS),
                        help="penalty weights, comma-separated, each >= 0 (default: 1e-1,1e-2,1e-3,1e-4,1e-5,0)")
    parser.add_argument("--steps", type=int, default=30, help="fine-tune steps per rho")
    parser.add_argument("--lr", type=float, default=MaskedL2Spec.learning_rate, help="AdamW learning rate")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of lowest-activation input channels in M")
    parser.add_argument("--samples", type=int, default=64, help="calibration examples")
    parser.add_argument("--eval-samples", type=int, default=200, help="held-out examples scored")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per exact-match answer")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42, help="seed of the subsamples and the fine-tune order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study from the command line (see ``--help``) and write the report.

    Returns:
        The study (as :func:`masked_l2_study`) with ``settings``.

    Raises:
        ValueError: For bad arguments (a rho < 0, a fraction outside (0, 1), steps < 1, counts < 1), checked before
            the model is loaded.
    """

    args = _parser().parse_args(argv)
    started = time.perf_counter()
    spec = MaskedL2Spec(fraction=args.fraction, steps=args.steps, learning_rate=args.lr, seed=args.seed)
    if not args.rhos:
        raise ValueError("`--rhos` is empty: give at least one penalty weight (0 is the control)")
    for rho in args.rhos:
        replace(spec, rho=rho)  # fail before loading anything
    for name in ("samples", "eval_samples", "max_new_tokens", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1; got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    calibration_path = args.calibration or str(Path(args.model) / "math_capture.jsonl")
    target_path = args.target or str(Path(args.model) / "math_eval.jsonl")
    model, tokenizer, console = load_for_analysis(args.model)
    spec.check_model(model)
    calibration = load_examples(calibration_path, limit=args.samples, seed=args.seed)
    target = load_examples(target_path, split="test", limit=args.eval_samples, seed=args.seed)
    study = masked_l2_study(model, tokenizer, calibration, target, args.rhos, spec, args.max_length, args.batch_size,
                            args.max_new_tokens, console)
    settings = {"model": args.model, "calibration": calibration_path, "target": target_path,
                "samples": len(calibration), "eval_samples": len(target), "max_length": args.max_length,
                "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "rhos": list(args.rhos), "spec": spec.to_dict(), "threads": torch.get_num_threads(),
                "wall_s": time.perf_counter() - started}
    write_masked_l2_report(study, settings, args.out, console)
    console.print(f"wrote {args.out}/masked_l2.json, masked_l2.md, fig_masked_l2.png ({settings['wall_s']:.0f} s)")
    return {"settings": settings, **study}


if __name__ == "__main__":
    main()
