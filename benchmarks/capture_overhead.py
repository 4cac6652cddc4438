"""Throughput cost of activation capture: plain forward vs forward with the recorder's hooks.

A randomly initialised Qwen2.5 model with the real shapes (0.5B by default, ``--model 1.5b``) runs the
same padded prompt batches (1) as a plain ``torch.no_grad`` forward with ``use_cache=False`` and (2)
through ``ActivationRecorder.observe`` (hooks on every ``down_proj`` input; every forward statistic a width
criterion needs: masked sums of |h|, h and h^2 over tokens and of the per-prompt means and their squares,
streamed into float64). ``capture_gram`` also accumulates the target Gram matrix ``sum h h^T`` of every layer
(what ``compensated`` and ``refit`` need), reported separately. The variants are interleaved and repeated; the
headline is ``capture_forward / plain`` throughput, the median over rounds of the paired ratio (target >= 0.9),
on the CPU clock with ``--threads 1`` (robust on
a shared machine) and the wall clock otherwise; both are in the JSON. A second estimate times the hook
arithmetic alone and adds it to the plain forward.

``--last-logit-variant`` adds a plain forward with ``logits_to_keep=1``: ``observe`` computes the logits of
every position although capture never reads them, and with the real vocabulary (``--vocab 0``) that LM
head is a large share of a capture's time and memory.

The vocabulary is cut to ``--vocab`` (4,096 by default) because the LM head is not hooked: a smaller
head makes the plain forward cheaper, so the measured overhead is an upper bound of the overhead with
the real 151,936-token head. ``--vocab 0`` keeps the real vocabulary.

    python benchmarks/capture_overhead.py                 # 0.5B shapes, 24 layers
    python benchmarks/capture_overhead.py --layers 2 --repeats 2 --batches 1   # seconds
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as common  # noqa: E402
from lit_prune.pruning import ActivationRecorder  # noqa: E402

NAME = "capture_overhead"
TARGET = 0.9
VARIANTS = {"forward": {}, "gram": {"gram": True}}


def hook_seconds(model, batches, variant: str, repeats: int = 7) -> float | None:
    """Seconds the recorder's hook arithmetic takes for one run over ``batches`` (all layers), measured alone.

    A low-noise cross-check of the interleaved end-to-end ratio on a busy machine: the hook is called on a
    random ``h`` of each batch's shape, outside any forward. It reaches the hook through the recorder's
    private ``_hook`` factory; if that changes, the estimate is skipped (None).
    """
    recorder = ActivationRecorder(model, **VARIANTS[variant])  # a throw-away recorder: the calls add to it
    hook = getattr(recorder, "_hook", None)
    if hook is None:
        return None
    hook = hook(0)
    width, layers = recorder.blocks[0].width, len(recorder.blocks)
    total = 0.0
    try:
        for input_ids, mask in batches:
            h = torch.rand(*input_ids.shape, width)
            recorder._mask, recorder._group = mask, "target"
            hook(None, (h,))
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                hook(None, (h,))
                times.append(time.perf_counter() - started)
            total += common.median(times) * layers
    finally:
        recorder._mask, recorder._group = None, None
    return total


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["0.5b", "1.5b"], default="0.5b", help="Qwen2.5 shapes to build")
    parser.add_argument("--layers", type=common.positive, default=None, help="cut the depth (default: real)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size; 0 = the real one")
    parser.add_argument("--batches", type=common.positive, default=2, help="prompt batches per timed run")
    parser.add_argument("--batch-size", type=common.positive, default=4)
    parser.add_argument("--min-tokens", type=common.positive, default=64)
    parser.add_argument("--max-tokens", type=common.positive, default=128)
    parser.add_argument("--variants", default="forward,gram", help=f"comma list of recorder variants {list(VARIANTS)}")
    parser.add_argument("--last-logit-variant", action="store_true",
                        help="also time a plain forward with logits_to_keep=1 (what capture would cost without "
                             "the full-vocabulary logits; meaningful with --vocab 0)")
    parser.add_argument("--repeats", type=common.positive, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens ({args.min_tokens}) must be <= --max-tokens ({args.max_tokens})")
    args.variants = [a for a in args.variants.split(",") if a]
    unknown = [a for a in args.variants if a not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    config = common.qwen25_config(args.model, args.layers, args.vocab or None)
    common.console.print(f"building Qwen2.5-{args.model} shapes: {config.num_hidden_layers} layers, hidden "
                         f"{config.hidden_size}, d_ff {config.intermediate_size}, vocab {config.vocab_size}, "
                         f"{threads} threads")
    model = common.build_model(config)
    batches = common.padded_batches(args.batches * args.batch_size, args.batch_size, args.min_tokens,
                                    args.max_tokens, config.vocab_size, seed=0)
    padded_tokens = sum(ids.numel() for ids, _ in batches)
    valid_tokens = int(sum(mask.sum() for _, mask in batches))

    @torch.no_grad()
    def plain() -> None:
        for input_ids, mask in batches:
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)

    recorders = {a: ActivationRecorder(model, **VARIANTS[a]) for a in args.variants}

    def capture(variant: str):
        def run() -> None:
            recorder = recorders[variant]
            with recorder.recording():
                for index, (input_ids, mask) in enumerate(batches):
                    recorder.observe(model, input_ids, mask, "target" if index % 2 == 0 else "distractor")
        return run

    @torch.no_grad()
    def plain_last_logit() -> None:
        for input_ids, mask in batches:
            model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    runs = {"plain": plain, **{f"capture_{a}": capture(a) for a in args.variants}}
    if args.last_logit_variant:
        runs["plain_logits_to_keep_1"] = plain_last_logit
    times = common.interleaved(runs, args.repeats, args.warmup)
    finalize_started = time.perf_counter()
    stats = recorders[args.variants[0]].finalize() if args.variants else None
    finalize_s = time.perf_counter() - finalize_started

    clock = common.headline_clock(threads)
    hook_only = {a: hook_seconds(model, batches, a) for a in args.variants}
    variants = {}
    for name in runs:
        variants[name] = {}
        for clock_name, clock_times in times.items():
            seconds, plain_seconds = clock_times[name], clock_times["plain"]
            variants[name][clock_name] = {
                "seconds": seconds,
                "median_s": common.median(seconds),
                "spread": common.spread(seconds),
                "padded_tokens_per_s": padded_tokens / common.median(seconds),
                "valid_tokens_per_s": valid_tokens / common.median(seconds),
                "throughput_vs_plain": common.median([p / s for p, s in zip(plain_seconds, seconds)]),
                "ratio_of_medians": common.median(plain_seconds) / common.median(seconds),
            }
        variant = name.removeprefix("capture_")
        if hook_only.get(variant) is not None:
            plain_median = common.median(times[clock]["plain"])
            variants[name]["hook_only_s"] = hook_only[variant]
            variants[name]["hook_only_estimate"] = plain_median / (plain_median + hook_only[variant])
    headline_name = "capture_forward" if "capture_forward" in variants else next(iter(variants))
    headline = variants[headline_name][clock]["throughput_vs_plain"]
    info = common.machine_info()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "model": f"Qwen2.5-{args.model} shapes, random weights, float32",
            "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "vocab_note": "vocabulary cut (LM head not hooked): overhead is an upper bound" if args.vocab else
                          "real vocabulary",
            "batches": args.batches, "batch_size": args.batch_size, "prompt_tokens": [args.min_tokens, args.max_tokens],
            "padded_tokens_per_run": padded_tokens, "valid_tokens_per_run": valid_tokens,
            "repeats": args.repeats, "warmup": args.warmup, "threads": threads,
        },
        "variants": variants,
        "finalize_s": finalize_s,
        "stats_bytes": sum(t.nbytes for t in stats.tensors()) if stats is not None else None,
        "headline_clock": clock,
        "capture_over_plain": headline,
        "target": TARGET,
        "meets_target": headline >= TARGET,
    }
    other = "wall" if clock == "cpu" else "cpu"
    rows = [(name, f"{v[clock]['median_s']:.3f}", f"{v[clock]['spread']:.1%}",
             f"{v[clock]['padded_tokens_per_s']:,.0f}",
             f"{v[clock]['throughput_vs_plain']:.3f}", f"{v[other]['throughput_vs_plain']:.3f}",
             f"{v['hook_only_s'] * 1e3:.1f} ms -> {v['hook_only_estimate']:.3f}" if "hook_only_s" in v else "")
            for name, v in variants.items()]
    common.print_table(
        f"Capture overhead, Qwen2.5-{args.model} shapes ({config.num_hidden_layers} layers, vocab {config.vocab_size})",
        ["variant", f"median s/run ({clock})", "spread", "padded tok/s", f"vs plain ({clock})", f"vs plain ({other})",
         "hook arithmetic alone -> estimate"], rows,
        caption=f"{args.repeats} interleaved rounds of {args.batches} x {args.batch_size} prompts "
                f"({padded_tokens} padded tokens); ratios are medians of per-round ratios; headline clock: {clock} "
                f"time; target capture/plain >= {TARGET}; finalize {finalize_s * 1e3:.1f} ms\n"
                + common.machine_line(info),
    )
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
