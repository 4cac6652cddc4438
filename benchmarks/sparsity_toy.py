"""Which weight sparsity method keeps the shipped toy model best: target loss at 50% unstructured and 2:4.

The toy model ``checkpoints/toy-math`` (Qwen2, 4 layers, hidden 256, d_ff 1,024; trained on arithmetic word
problems) is sparsified on every linear of its decoder layers with each method, calibrated on the 200 target
capture texts ``math_capture.jsonl`` (prompt + reference response, as ``WeightSparsityCallback`` does by default),
then scored without any recovery by the teacher-forced loss per response token (EOS included) on the held-out
``math_eval.jsonl`` (target) and ``qna_eval.jsonl`` (a distractor), and by greedy exact match on the first
``--exact-match`` math problems. Reference: NSA (arXiv 2604.27115) and the Wanda/SparseGPT/RIA papers find SparseGPT
strongest, Wanda and RIA close behind, magnitude far behind at 50% and 2:4 on real LLMs.

    python benchmarks/sparsity_toy.py                       # about 3 min on one core
    python benchmarks/sparsity_toy.py --sparsity 0.7 --patterns unstructured,4:8 --out benchmarks/results/sparsity_toy_70.json
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as common  # noqa: E402
from lit_prune.callbacks.sparsity import calibration_batches  # noqa: E402
from lit_prune.data import PruneDataModule  # noqa: E402
from lit_prune.pruning.sparsity import METHODS, SparsitySpec, measure_sparsity, prune_model  # noqa: E402
from lit_prune.toy import tasks  # noqa: E402
from lit_prune.toy.train import exact_match, task_losses  # noqa: E402

NAME = "sparsity_toy"


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=common.REPO_ROOT / "checkpoints" / "toy-math")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.5, help="sparsity of the unstructured pattern")
    parser.add_argument("--calibration", choices=["target", "distractor", "both"], default="target")
    parser.add_argument("--exact-match", type=int, default=200, help="math problems for greedy exact match (0: off)")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.patterns = [p for p in args.patterns.split(",") if p]
    return args


def _scores(model, tokenizer, held_out: dict, exact: int) -> dict:
    scores = {"nll_math": task_losses(model, tokenizer, held_out["math_eval"]),
              "nll_qna": task_losses(model, tokenizer, held_out["qna_eval"])}
    if exact:
        scores["math_exact_match"] = exact_match(model, tokenizer, held_out["math_eval"][:exact])[0]
    return scores


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    held_out = {name: list(tasks.read_jsonl(args.model / f"{name}.jsonl")) for name in ("math_eval", "qna_eval")}
    data = PruneDataModule(target=str(args.model / "math_capture.jsonl"),
                           distractors=[str(args.model / "qna_capture.jsonl")], capture_samples=200)
    texts = data.capture_texts(tokenizer)
    groups = ("target", "distractor") if args.calibration == "both" else (args.calibration,)
    batches = calibration_batches(tokenizer, [t for g in groups for t in texts[g]], "response", 512, 8)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    common.console.print(f"{args.model.name}: {len(batches)} calibration batches, {tokens} tokens ({args.calibration})")
    results = [{"method": "dense", "pattern": None, **_scores(dense, tokenizer, held_out, args.exact_match)}]
    for pattern in args.patterns:
        for method in args.methods:
            spec = SparsitySpec(method, pattern, args.sparsity if pattern == "unstructured" else None)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_model(model, batches, spec)
            seconds = time.perf_counter() - start
            results.append({"method": method, "pattern": spec.pattern, "seconds": seconds,
                            "sparsity": measure_sparsity(model, None, spec.n_m)["overall"],
                            **_scores(model, tokenizer, held_out, args.exact_match)})
            common.console.print(f"{spec.label}: {results[-1]}")
    rows = [(r["method"], r["pattern"] or "-", f"{r.get('sparsity', 0):.3f}", f"{r['nll_math']:.4f}",
             f"{r['nll_qna']:.4f}", f"{100 * r['math_exact_match']:.1f}" if "math_exact_match" in r else "-")
            for r in results]
    info = common.machine_info()
    ordering = {pattern: [r["method"] for r in sorted((r for r in results if r["pattern"] == SparsitySpec(
        pattern=pattern).pattern), key=lambda r: r["nll_math"])] for pattern in args.patterns}
    payload = {"benchmark": NAME, "machine": info,
               "settings": {"model": str(args.model), "calibration": args.calibration, "calibration_tokens": tokens,
                            "unstructured_sparsity": args.sparsity, "capture": "response", "exact_match_problems": args.exact_match, "threads": threads,
                            "targets": "q,k,v,o,gate,up,down of every layer", "recovery": None},
               "results": results, "ordering_by_target_nll": ordering}
    common.print_table(f"{args.model.name}: weight sparsity without recovery ({args.calibration} calibration)",
                       ["method", "pattern", "zeros", "NLL math (target)", "NLL qna", "math EM %"], rows,
                       caption="ordering by target NLL: " + "; ".join(f"{p}: {' < '.join(o)}"
                                                                      for p, o in ordering.items())
                       + "\n" + common.machine_line(info))
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
