"""Memory of activation capture: flat in the number of prompts N, next to the paper's N x L x d_ff tensor.

Every measurement runs in a fresh child process (so the allocator's cached pages of one run cannot hide
the next run's growth): build a shallow Qwen2.5 model with the real hidden size and d_ff (1.5B shapes by
default, ``--layers 1``), make N random prompts padded to one fixed shape, then sample the process RSS
(``lit_prune.eval.resources.PeakMemory``) while (a) a plain forward and (b) ``ActivationRecorder.observe``
run over all N prompts. Reported: peak RSS growth over the loaded model for each N (must be flat), the
capture's extra over the plain forward, and the exact bytes of the ``NeuronStats`` tensors.

Next to it, the memory of the paper's approach (one float32 vector per prompt and layer, an
N x L x d_ff tensor) for N = 3,200 at the 1.5B (28 x 8,960) and 7B (28 x 18,944) shapes, against ours:
the persistent statistics (3 float64 L x d_ff tensors) and, separately, the transient per-batch hook
temporaries (one float32 |h| copy per layer call, freed before the next layer; at most
``HOOK_CHUNK_ELEMENTS`` elements, since the hook sums long batches in slices of the sequence).

``--logits-check`` (on by default) adds one run with the real 151,936-token vocabulary: a plain forward
computes B x T x V float32 logits, while ``observe`` asks for the last position's only (``logits_to_keep=1``).

    python benchmarks/stats_memory.py
    python benchmarks/stats_memory.py --prompts 8,16 --tokens 8 --no-logits-check   # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as common  # noqa: E402
from lit_prune.pruning.stats import HOOK_CHUNK_ELEMENTS  # noqa: E402

NAME = "stats_memory"
PAPER_PROMPTS = 3200
MiB = 2**20


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["0.5b", "1.5b", "7b"], default="1.5b",
                        help="hidden size and d_ff of this Qwen2.5 model")
    parser.add_argument("--layers", type=common.positive, default=1, help="depth of the measured model")
    parser.add_argument("--vocab", type=common.positive, default=4096, help="vocabulary of the measured model")
    parser.add_argument("--prompts", default="64,256,1024", help="comma list of prompt counts N")
    parser.add_argument("--tokens", type=common.positive, default=16, help="every batch is padded to this length")
    parser.add_argument("--batch-size", type=common.positive, default=16)
    parser.add_argument("--hook-chunk-elements", type=common.positive, default=None,
                        help="override lit_prune's HOOK_CHUNK_ELEMENTS (slice size of the hook's |h| copy) "
                             "to compare sliced and whole-sequence capture")
    parser.add_argument("--repeats", type=common.positive, default=1, help="child runs per (N, mode)")
    parser.add_argument("--modes", default="plain,capture",
                        help="comma list of child runs per N: plain (control forward) and/or capture")
    parser.add_argument("--logits-check", action=argparse.BooleanOptionalAction, default=True,
                        help="one extra capture run with the real vocabulary (logits memory)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.prompts = [int(n) for n in str(args.prompts).split(",") if n]
    args.modes = [m for m in args.modes.split(",") if m]
    if "capture" not in args.modes or not set(args.modes) <= {"plain", "capture"}:
        parser.error(f"--modes must list capture and optionally plain; got {args.modes}")
    if not args.prompts or min(args.prompts) < 1:
        parser.error(f"--prompts must be positive integers; got {args.prompts}")
    return args


def _child(args) -> dict:
    """One measurement: ``args.child`` is ``"plain:N"`` or ``"capture:N"``; returns a JSON-able dict."""
    from lit_prune.eval.resources import PeakMemory
    from lit_prune.pruning import ActivationRecorder

    mode, count = args.child.split(":")
    count = int(count)
    if args.hook_chunk_elements:
        from lit_prune.pruning import stats

        stats.HOOK_CHUNK_ELEMENTS = args.hook_chunk_elements
    common.set_threads(args.threads)
    config = common.qwen25_config(args.model, args.layers, args.vocab)
    model = common.build_model(config)
    batches = common.padded_batches(count, args.batch_size, max(1, args.tokens // 2), args.tokens,
                                    config.vocab_size, seed=0, pad_to=args.tokens)
    recorder = ActivationRecorder(model) if mode == "capture" else None
    gc.collect()
    started = time.perf_counter()
    with PeakMemory("cpu", interval_s=0.002) as memory:
        if recorder is None:
            with torch.no_grad():
                for input_ids, mask in batches:
                    model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        else:
            with recorder.recording():
                for index, (input_ids, mask) in enumerate(batches):
                    recorder.observe(model, input_ids, mask, "target" if index % 2 == 0 else "distractor")
            recorder.finalize()
    seconds = time.perf_counter() - started
    result = {"mode": mode, "prompts": count, "vocab_size": config.vocab_size, "seconds": seconds,
              **memory.as_dict(), "num_samples": memory.num_samples}
    if recorder is not None:
        result["stats_bytes"] = sum(t.nbytes for t in recorder.stats.tensors())
        result["samples_counted"] = float(recorder.stats.count("target") + recorder.stats.count("distractor"))
    return result


def _run_child(args, spec: str, vocab: int | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--model", args.model,
               "--layers", str(args.layers), "--vocab", str(vocab or args.vocab), "--tokens", str(args.tokens),
               "--batch-size", str(args.batch_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.hook_chunk_elements:
        command += ["--hook-chunk-elements", str(args.hook_chunk_elements)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {spec} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stats_bytes(layers: int, width: int) -> int:
    """Bytes of the forward ``NeuronStats`` (Gram and gradients off): per group (target, distractor) five float64
    (L, d_ff) sums and two float64 counters."""
    return 10 * layers * width * 8 + 4 * 8


def _hook_slice_tokens(batch_size: int, tokens: int, width: int, chunk_elements: int = HOOK_CHUNK_ELEMENTS) -> int:
    """Tokens per slice of the hook's float32 |h| copy (freed after each layer call)."""
    return max(1, min(tokens, chunk_elements // (batch_size * width)))


def paper_comparison(prompts: int, batch_size: int, tokens: int) -> list[dict]:
    """The paper's N x L x d_ff float32 tensor vs our statistics (+ the transient per-batch hook copy)."""
    rows = []
    for name in ("1.5b", "7b"):
        shape = common.QWEN25_SHAPES[name]
        layers, width = shape["num_hidden_layers"], shape["intermediate_size"]
        paper = prompts * layers * width * 4
        ours = _stats_bytes(layers, width)
        slice_tokens = _hook_slice_tokens(batch_size, tokens, width)
        transient = batch_size * slice_tokens * width * 4
        rows.append({
            "model": f"Qwen2.5-{name}", "layers": layers, "d_ff": width, "prompts": prompts,
            "paper_bytes": paper, "ours_stats_bytes": ours, "ours_transient_bytes": transient,
            "transient_batch": [batch_size, tokens], "transient_slice_tokens": slice_tokens,
            "paper_over_ours_stats": paper / ours,
            "paper_over_ours_stats_plus_transient": paper / (ours + transient),
        })
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return {}
    threads = common.set_threads(args.threads)
    args.threads = threads
    runs: list[dict] = []
    for repeat in range(args.repeats):
        order = args.prompts if repeat % 2 == 0 else list(reversed(args.prompts))
        for count in order:
            for mode in args.modes:
                common.console.print(f"child run {repeat + 1}/{args.repeats}: {mode} N={count}")
                runs.append(_run_child(args, f"{mode}:{count}"))
    logits_runs = []
    if args.logits_check:
        real_vocab = common.QWEN25_SHAPES[args.model]["vocab_size"]
        for mode in ("plain", "capture"):
            common.console.print(f"child run: {mode} N={args.prompts[0]} with the real vocabulary {real_vocab}")
            logits_runs.append(_run_child(args, f"{mode}:{args.prompts[0]}", vocab=real_vocab))

    per_n = []
    for count in args.prompts:
        plain = [r["growth_bytes"] for r in runs if r["prompts"] == count and r["mode"] == "plain"]
        capture = [r for r in runs if r["prompts"] == count and r["mode"] == "capture"]
        capture_growth = common.median([r["growth_bytes"] for r in capture])
        plain_growth = common.median(plain) if plain else None
        per_n.append({
            "prompts": count,
            "plain_growth_bytes": plain_growth,
            "capture_growth_bytes": capture_growth,
            "capture_extra_bytes": capture_growth - plain_growth if plain else None,
            "stats_bytes": capture[0]["stats_bytes"],
            "capture_seconds": common.median([r["seconds"] for r in capture]),
        })
    growths = [row["capture_growth_bytes"] for row in per_n]
    flatness = max(growths) / max(min(growths), 1)
    config = common.qwen25_config(args.model, args.layers, args.vocab)
    width = config.intermediate_size
    transient = args.batch_size * width * 4 * _hook_slice_tokens(args.batch_size, args.tokens, width,
                                                                   args.hook_chunk_elements or HOOK_CHUNK_ELEMENTS)
    paper = paper_comparison(PAPER_PROMPTS, 8, 512)
    info = common.machine_info()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "model": f"Qwen2.5-{args.model} hidden/d_ff, {args.layers} layer(s), vocab {args.vocab}, random "
                     "weights, float32",
            "num_layers": args.layers, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "tokens_per_prompt_padded": args.tokens, "batch_size": args.batch_size, "repeats": args.repeats,
            "threads": threads, "hook_chunk_elements": args.hook_chunk_elements or HOOK_CHUNK_ELEMENTS,
            "method": "cpu_peak_rss (psutil, 2 ms sampling) in a fresh process per run",
        },
        "runs": runs,
        "per_prompts": per_n,
        "capture_growth_max_over_min": flatness,
        "flat": flatness < 1.25,
        "measured_hook_transient_bytes": transient,
        "paper_comparison": paper,
        "logits_check": logits_runs,
    }
    def mib(value, sign=""):
        return "-" if value is None else f"{value / MiB:{sign}.1f}"

    rows = [(f"{row['prompts']:,}", mib(row["plain_growth_bytes"]), mib(row["capture_growth_bytes"]),
             mib(row["capture_extra_bytes"], "+"), f"{row['stats_bytes'] / MiB:.3f}",
             f"{row['capture_seconds']:.1f}") for row in per_n]
    common.print_table(
        f"Capture memory vs number of prompts (Qwen2.5-{args.model} hidden {config.hidden_size}, d_ff "
        f"{config.intermediate_size}, {args.layers} layer(s))",
        ["prompts N", "plain RSS growth MiB", "capture RSS growth MiB", "capture extra MiB", "NeuronStats MiB",
         "capture s"], rows,
        caption=f"batches {args.batch_size} x {args.tokens} tokens; max/min capture growth {flatness:.2f} "
                f"(flat: < 1.25); one |h| copy per layer call = {transient / MiB:.1f} MiB\n"
                + common.machine_line(info),
    )
    common.print_table(
        f"Paper's N x L x d_ff float32 tensor vs streamed statistics (N = {PAPER_PROMPTS:,})",
        ["model", "L x d_ff", "paper", "ours (stats)", "ratio", "ours + |h| copy (8 x 512)", "ratio"],
        [(row["model"], f"{row['layers']} x {row['d_ff']:,}", f"{row['paper_bytes'] / 2**30:.2f} GiB",
          f"{row['ours_stats_bytes'] / MiB:.1f} MiB", f"{row['paper_over_ours_stats']:,.0f}x",
          f"{(row['ours_stats_bytes'] + row['ours_transient_bytes']) / MiB:.0f} MiB",
          f"{row['paper_over_ours_stats_plus_transient']:,.0f}x") for row in paper],
        caption="ours (stats) = 3 float64 L x d_ff tensors, whatever N; the |h| copy is transient "
                "(one layer at a time)",
    )
    if logits_runs:
        by_mode = {r["mode"]: r for r in logits_runs}
        logits_bytes = min(args.batch_size, args.prompts[0]) * args.tokens * by_mode["capture"]["vocab_size"] * 4
        payload["logits_bytes_per_batch"] = logits_bytes
        common.print_table(
            f"Capture with the real vocabulary ({by_mode['capture']['vocab_size']:,}), N = {args.prompts[0]}",
            ["mode", "RSS growth MiB", "logits per batch MiB (B x T x V x 4)"],
            [(mode, f"{r['growth_bytes'] / MiB:.1f}", f"{logits_bytes / MiB:.1f}") for mode, r in by_mode.items()],
        )
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
