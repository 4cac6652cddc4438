"""Time and peak memory of the weight sparsity methods (magnitude, Wanda, SparseGPT, RIA) at real Qwen2.5 shapes.

A ``Qwen2ForCausalLM`` with the real shapes of ``--model`` (default Qwen2.5-0.5B: 24 layers, hidden 896, d_ff
4,864) and random weights (the cost depends on the shapes, not the values), calibrated on ``--sequences`` random
sequences of ``--tokens`` tokens (default 32 x 256, the usual Wanda/SparseGPT calibration budget is 128 x 2,048).
Every targeted linear of every decoder layer (q, k, v, o, gate, up, down) is sparsified with
:func:`lit_prune.pruning.sparsity.prune_model`, exactly as the callback does, once per method and pattern, each on a
fresh copy of the model. ``--layers`` cuts the depth for a quick run: the per-layer cost is the measured total over
the layers run (the capture of the embeddings is negligible), and the extrapolated total multiplies it by the
model's real depth.

Peak memory is the process RSS sampled every 5 ms (``lit_prune.eval.resources.PeakMemory``) above the RSS at the
start of the run, with glibc's free memory returned to the system between runs; ``state_bytes`` is what the method
itself must hold (SparseGPT: one decoder layer's float64 Hessians plus the hidden states of the calibration set).

    python benchmarks/sparsity_time.py --layers 2 --threads 1          # about 10 min on one core
    python benchmarks/sparsity_time.py --methods sparsegpt --patterns 2:4
"""

from __future__ import annotations

import copy
import ctypes
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
from lit_prune.eval.resources import PeakMemory  # noqa: E402
from lit_prune.pruning.sparsity import (  # noqa: E402
    METHODS,
    SparsitySpec,
    measure_sparsity,
    prune_model,
    target_linears,
)

NAME = "sparsity_time"


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(common.QWEN25_SHAPES), default="0.5b", help="Qwen2.5 shapes")
    parser.add_argument("--layers", type=common.positive, default=None, help="decoder layers to build (default: all)")
    parser.add_argument("--vocab", type=common.positive, default=4096,
                        help="vocabulary (the LM head is never run; default 4,096 to save memory)")
    parser.add_argument("--intermediate-size", type=common.positive, default=None, help="override d_ff (smoke runs)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--patterns", default="unstructured,2:4", help="comma list: unstructured (50%%) and/or N:M")
    parser.add_argument("--sequences", type=common.positive, default=32, help="calibration sequences")
    parser.add_argument("--tokens", type=common.positive, default=256, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=common.positive, default=8, help="sequences per forward pass")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.patterns = [p for p in args.patterns.split(",") if p]
    for method in args.methods:
        SparsitySpec(method)  # unknown names fail before any model is built
    for pattern in args.patterns:
        SparsitySpec(pattern=pattern)
    return args


def _release_memory() -> None:
    gc.collect()
    try:  # hand freed heap pages back, so the next run's RSS growth starts from what is really in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _state_bytes(model, spec: SparsitySpec, sequences: int, tokens: int) -> int:
    """Bytes the method itself holds at its peak: statistics of the largest calibration group, plus the hidden
    states of the calibration set when calibrating layer by layer."""
    linears = target_linears(model)
    per_layer: dict[str, int] = {}
    for name, linear in linears.items():
        layer = name.split(".layers.", 1)[1].split(".", 1)[0]
        width = linear.in_features
        per_layer[layer] = per_layer.get(layer, 0) + 8 * (width * width if spec.needs_hessian else width)
    if spec.method == "magnitude":
        return 0
    statistics = max(per_layer.values()) if spec.is_sequential else sum(per_layer.values())
    hidden = sequences * tokens * model.config.hidden_size * 4 if spec.is_sequential else 0
    return statistics + hidden


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    config = common.qwen25_config(args.model, layers=args.layers, vocab_size=args.vocab,
                                  intermediate_size=args.intermediate_size)
    full_depth = common.QWEN25_SHAPES[args.model]["num_hidden_layers"]
    layers = config.num_hidden_layers
    template = common.build_model(config)
    batches = common.padded_batches(args.sequences, args.batch_size, args.tokens, args.tokens, config.vocab_size,
                                    pad_to=args.tokens)
    common.console.print(f"Qwen2.5-{args.model} shapes: {layers} of {full_depth} layers, hidden {config.hidden_size}, "
                         f"d_ff {config.intermediate_size}; {args.sequences} x {args.tokens} calibration tokens, "
                         f"{threads} threads")
    results, rows = [], []
    for method in args.methods:
        for pattern in args.patterns:
            spec = SparsitySpec(method, pattern)
            model = copy.deepcopy(template)
            _release_memory()
            wall, cpu = time.perf_counter(), time.process_time()
            with PeakMemory("cpu") as memory:
                result = prune_model(model, batches, spec)
            cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
            measured = measure_sparsity(model, None, spec.n_m)
            clock = cpu_s if common.headline_clock(threads) == "cpu" else wall_s
            per_layer = clock / layers
            row = {"method": method, "pattern": spec.pattern, "label": spec.label, "sequential": spec.is_sequential,
                   "seconds": dict(result.seconds), "wall_s": wall_s, "cpu_s": cpu_s,
                   "per_layer_s": per_layer, "extrapolated_total_s": per_layer * full_depth,
                   "per_layer_solve_s": result.seconds["solve"] / layers,
                   "peak_memory": memory.as_dict(), "state_bytes": _state_bytes(model, spec, args.sequences, args.tokens),
                   "measured_sparsity": measured["overall"], "n_m_violations": measured.get("n_m_violations")}
            results.append(row)
            rows.append((spec.label, f"{result.seconds['capture']:.1f}", f"{result.seconds['solve']:.1f}",
                         f"{clock:.1f}", f"{per_layer:.1f}", f"{per_layer * full_depth / 60:.1f}",
                         f"{memory.growth_bytes / 2**20:,.0f}", f"{row['state_bytes'] / 2**20:,.1f}",
                         f"{measured['overall']:.4f}"))
            del model, result
    info = common.machine_info()
    payload = {"benchmark": NAME, "machine": info, "headline_clock": common.headline_clock(threads),
               "settings": {"model": f"Qwen2.5-{args.model}", "num_layers": layers, "full_depth": full_depth,
                            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                            "vocab_size": config.vocab_size, "sequences": args.sequences, "tokens": args.tokens,
                            "batch_size": args.batch_size, "threads": threads, "dtype": "float32",
                            "targets": "q,k,v,o,gate,up,down of every layer"},
               "results": results}
    common.print_table(
        f"weight sparsity, Qwen2.5-{args.model} shapes ({layers} of {full_depth} layers), "
        f"{args.sequences} x {args.tokens} calibration tokens",
        ["method", "capture s", "solve s", f"total s ({payload['headline_clock']})", "s / layer",
         f"x {full_depth} layers (min)", "peak RSS growth MiB", "state MiB", "sparsity"], rows,
        caption=common.machine_line(info))
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
