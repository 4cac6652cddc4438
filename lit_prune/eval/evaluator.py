"""Evaluate any LightningModule that holds a Hugging Face causal LM, inside ``trainer.test``.

A module owns an :class:`Evaluator` (``self.evaluator = Evaluator(settings)``) and calls it from three hooks::

    def on_test_start(self):
        self.evaluator.start(self)

    def test_step(self, batch, batch_idx):
        self.evaluator.step(self, batch)

    def on_test_epoch_end(self):
        self.evaluator.finish(self)

The module needs ``self.model`` (a causal LM, optionally peft-wrapped) and ``self.tokenizer``; the batches come
from :class:`~lit_prune.data.PruneDataModule`'s test loader. :func:`evaluate` runs ``trainer.test`` and returns the
results. A module may say what it is (its name in reports, the model it was pruned from) with an
``evaluation_subject()`` method returning a :class:`Subject`; without one it is named after its source model and
counts as unmodified (its own distractor outputs are the reference ones).

Why an evaluator called from ``test_step`` rather than a callback: Lightning runs ``test_step`` inside the
precision plugin's autocast and the strategy's wrapping, so generation runs exactly as the model's own forward
does (bf16-mixed included); callback hooks run outside them. The evaluator is an ``nn.Module`` (a child of the
LightningModule), so Lightning moves its torchmetrics to the device, and they sum over ranks when computed.

Per evaluation it writes ``<output_dir>/<label>.json`` (the results) and ``<label>.jsonl`` (one record per
example), where the label names what was evaluated (``dense``, ``<criterion>-<ratio>``, ``+lora`` after
recovery), and caches an unmodified model's distractor outputs as the reference later pruned variants of the same
weights are compared with (:class:`~lit_prune.eval.similarity.OutputCache`, keyed by model, weights fingerprint,
task and budget).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_prune.data.prompts import PROMPT_FORMAT
from lit_prune.eval.perplexity import nll_standard_error, per_text_nll
from lit_prune.eval.resources import PeakMemory, count_parameters, decode_throughput
from lit_prune.eval.suite import EvalSettings, EvaluationSuite
from lit_prune.pruning.sparsity import measure_sparsity
from lit_prune.pruning.stats import model_fingerprint

__all__ = ["Evaluator", "Subject", "evaluate", "result_stem"]

LOGGED = ("exact_match", "pass_at_1", "trap_total", "sss", "nll_target", "nll_distractor", "nll_general")


@dataclass(frozen=True)
class Subject:
    """What an evaluation measures: its name, and the model its distractor outputs are compared with.

    Attributes:
        label: Name in reports and of the result files.
        source: A spelling that loads the evaluated model's source weights (recorded in the results).
        modified: Whether the weights differ from ``reference_model``'s (pruned, masked, blocks removed). An
            unmodified model is its own reference: its distractor outputs are cached for later variants.
        reference_model: The model the distractor similarity compares with (default: ``source``).
        reference_fingerprint: Fingerprint of the reference weights (default: of the evaluated model's, which is
            only right when it is unmodified).
        details: Extra entries for the results (the prune plan, the modifications).
    """

    label: str
    source: str
    modified: bool = False
    reference_model: str | None = None
    reference_fingerprint: str | None = None
    details: dict = field(default_factory=dict)

    @classmethod
    def of(cls, module: L.LightningModule, settings: EvalSettings) -> Subject:
        """The module's own ``evaluation_subject()``, else one named after its model's source."""
        if hasattr(module, "evaluation_subject"):
            return module.evaluation_subject()
        source = str(getattr(_base(module.model).config, "name_or_path", "") or "model")
        return cls(label=settings.label or Path(source).name or "model", source=source)


def _base(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def result_stem(label: str) -> str:
    """The file name (without suffix) of an evaluation's results: the label with ``%`` spelled out."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label.replace("%", "pct"))


class Evaluator(nn.Module):
    """Generation metrics, traps, distractor similarity, perplexity and resources of one ``trainer.test`` run.

    Args:
        settings: What to measure and where to write it (defaults when None).
    """

    def __init__(self, settings: EvalSettings | None = None) -> None:
        super().__init__()
        self.suite = EvaluationSuite(settings or EvalSettings())
        self.results: dict | None = None  # of the last finished evaluation
        self._subject: Subject | None = None
        self._fingerprints: dict[int, str] = {}  # id(model) -> fingerprint of an unmodified model's weights

    @property
    def settings(self) -> EvalSettings:
        return self.suite.settings

    @settings.setter
    def settings(self, value: EvalSettings) -> None:
        self.suite.settings = value

    # ------------------------------------------------------------------ the three hooks
    def start(self, module: L.LightningModule) -> None:
        """Reset the metrics and fetch (or generate once and cache) the reference model's distractor outputs."""
        self.suite.reset()
        self.suite.references = {}
        self.results = None
        self._subject = Subject.of(module, self.settings)
        device = module.device
        self._memory = PeakMemory(device if device.type in ("cpu", "cuda") else None).__enter__()
        if not self._subject.modified:
            return  # the model is its own reference; its outputs are cached at the end
        cache, trainer, generator = self._cache(module), module.trainer, None
        for task, pairs in self._distractor_prompts(trainer).items():
            prompts = [p for _, p in pairs]
            if trainer.is_global_zero:
                def outputs_of(todo, task=task):
                    nonlocal generator
                    generator = generator or self._reference_lm(module)
                    return self._generate(generator, module, task, todo)

                cache.get_or_compute(self.reference_key(module, task), prompts, outputs_of)
            trainer.strategy.barrier("lit_prune_reference_outputs")
            outputs = cache.get(self.reference_key(module, task), prompts)
            self.suite.references.update({pid: out for (pid, _), out in zip(pairs, outputs)})
        del generator  # free the reference model before evaluating

    def step(self, module: L.LightningModule, batch: dict) -> None:
        """Evaluate one test batch (one task, or one perplexity set)."""
        self.suite.step(module.model, module.tokenizer, batch)

    def finish(self, module: L.LightningModule) -> dict:
        """Compute, write (rank 0) and return the results; they are also logged as ``test/<metric>``."""
        subject, trainer = self._subject, module.trainer
        results = self.suite.compute()
        self._memory.__exit__(None, None, None)
        records = _gather(self.suite.records)
        model = _base(module.model)
        results.update(label=subject.label, model=subject.source, parameters=count_parameters(model),
                       mlp_width=int(getattr(model.config, "intermediate_size", 0)) or None,
                       peak_memory_mb=self._memory.peak_bytes / 2**20,
                       weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                       peak_memory_method=self._memory.method, examples=len(records), **subject.details)
        texts = per_text_nll(records)  # for sampling errors, and paired comparisons between variants
        for name, scored in texts.items():
            results[f"nll_{name}_se"] = nll_standard_error(scored)
        if texts:
            results["nll_texts"] = texts
        zeros = measure_sparsity(model)  # a zero counts as removed (dense kernels still multiply it)
        results["zero_parameters"] = zeros["zeros"]
        if zeros["zeros"]:
            results["sparsity"] = {k: zeros[k] for k in ("overall", "zeros", "weights", "per_layer")}
        if trainer.is_global_zero:
            from lit_prune.eval.report import print_comparison, write_json, write_jsonl

            results["decode_tokens_per_s"] = decode_throughput(
                model, module.tokenizer, "Tom has 3 apples.", new_tokens=self.settings.throughput_new_tokens,
                warmup=1, repeats=3)
            if not subject.modified:
                self._cache_own_outputs(module, records)
            out = self.output_dir(trainer)
            stem = result_stem(subject.label)
            write_json(results, out / f"{stem}.json")
            write_jsonl(records, out / f"{stem}.jsonl")
            print_comparison([results], title=f"lit_prune evaluation: {subject.label}")
            rank_zero_info(f"wrote {out / (stem + '.json')} and per-example records ({stem}.jsonl)")
            results["report_path"] = str(out / f"{stem}.json")
        for key in LOGGED:
            if results.get(key) is not None:
                module.log(f"test/{key}", float(results[key]), rank_zero_only=True)
        self.results = results
        return results

    # ------------------------------------------------------------------ reference outputs
    def output_dir(self, trainer: L.Trainer) -> Path:
        """Where the result files go: ``settings.output_dir``, else ``<trainer.default_root_dir>/eval``."""
        return Path(self.settings.output_dir or Path(trainer.default_root_dir) / "eval")

    def _cache(self, module: L.LightningModule):
        from lit_prune.eval.similarity import OutputCache

        path = self.settings.reference_outputs or self.output_dir(module.trainer).parent / "reference_outputs.json"
        return OutputCache(path)

    def _distractor_prompts(self, trainer: L.Trainer) -> dict[str, list[tuple[str, str]]]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "eval_batches") or not self.settings.generation:
            return {}
        prompts: dict[str, list[tuple[str, str]]] = {}
        for batch in datamodule.eval_batches():
            if batch["task"] in ("qna", "dialogue"):
                prompts.setdefault(batch["task"], []).extend(zip(batch["id"], batch["prompt"]))
        return prompts

    def reference_key(self, module: L.LightningModule, task: str) -> dict:
        """What the reference outputs of ``task`` are cached under: the reference model, its weights' fingerprint,
        the task and the generation budget."""
        subject = Subject.of(module, self.settings)
        fingerprint = subject.reference_fingerprint
        if fingerprint is None and not subject.modified:  # its own reference: fingerprint its weights, once per model
            model = _base(module.model)
            if id(model) not in self._fingerprints:
                self._fingerprints[id(model)] = model_fingerprint(model)
            fingerprint = self._fingerprints[id(model)]
        return {"model": subject.reference_model or subject.source, "weights": fingerprint, "task": task,
                "greedy": True, "max_new_tokens": self.settings.budget(task), "prompt_format": PROMPT_FORMAT}

    def _reference_lm(self, module: L.LightningModule) -> nn.Module:
        from lit_prune.loading import load_causal_lm

        name = self._subject.reference_model or self._subject.source
        rank_zero_info(f"generating reference distractor outputs with the original model {name}")
        return load_causal_lm(name, dtype=_base(module.model).dtype,
                              argument="the prune plan's provenance `model`").to(module.device)

    def _generate(self, reference: nn.Module, module: L.LightningModule, task: str, prompts: list[str]) -> list[str]:
        from lit_prune.eval.generation import generate

        records = generate(reference, module.tokenizer, prompts, max_new_tokens=self.settings.budget(task),
                           batch_size=self.settings.batch_size, progress=False)
        return [r.text for r in records]

    def _cache_own_outputs(self, module: L.LightningModule, records: list[dict]) -> None:
        cache = self._cache(module)
        by_id = {r["id"]: r["output"] for r in records if "output" in r}  # perplexity records have none
        for task, pairs in self._distractor_prompts(module.trainer).items():
            if all(pid in by_id for pid, _ in pairs):
                cache.get_or_compute(self.reference_key(module, task), [p for _, p in pairs],
                                     lambda todo, pairs=pairs: [by_id[pid] for pid, _ in pairs])


def _gather(records: list[dict]) -> list[dict]:
    """Every rank's records, on every rank (one process: the records themselves)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def evaluate(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> dict:
    """Run ``trainer.test`` on ``module`` (which owns an :class:`Evaluator` as ``module.evaluator``) and return its
    results.

    Raises:
        ValueError: If the module has no ``evaluator``.
        RuntimeError: If ``trainer.test`` finished without an evaluation.
    """
    evaluator = getattr(module, "evaluator", None)
    if not isinstance(evaluator, Evaluator):
        raise ValueError(f"`evaluate` needs a module with an `evaluator` (lit_prune.eval.Evaluator); "
                         f"{type(module).__name__} has {type(evaluator).__name__}")
    evaluator.results = None  # never hand back an earlier evaluation's results
    trainer.test(module, datamodule=datamodule, verbose=False)
    if evaluator.results is None:
        raise RuntimeError("`trainer.test` ran no evaluation (is `trainer.limit_test_batches` 0, or does the module "
                           "not call its evaluator's `start` / `step` / `finish`?)")
    return evaluator.results
