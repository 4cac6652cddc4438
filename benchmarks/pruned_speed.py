"""Speed of pruned models: batch-1 greedy decoding and batch prefill, dense vs 10 / 20 / 35 % MLP pruning
(and, with ``--depth``, vs removing whole decoder blocks at the same fraction of the parameters).

A randomly initialised model with Qwen2.5-0.5B's real shapes (float32, real 151,936-token tied LM head)
is pruned with a seeded ``random`` plan (speed does not depend on which neurons go; the kept widths follow
``kept_width`` with ``multiple_of=128``). The pruned copies share every non-MLP tensor with the dense model.
With ``--depth``, each ratio also gets a depth-pruned copy (``depth_<pct>``) that removes the number of blocks
nearest to the width plan's fraction of the parameters (``width_param_fraction`` -> ``blocks_for_param_ratio``:
the equal-size comparison, ``1 - params(pruned) / params(dense)``); which blocks go does not change the speed
(the last ones before the final block are taken), and the copy shares every tensor of the blocks it keeps.
Measured, interleaved over models and repeated (medians):

* decode, ``model.generate``: ``lit_prune.eval.resources.decode_throughput`` (greedy, exactly
  ``--new-tokens`` tokens after a short prompt, KV cache; includes the prompt's prefill and ``generate``'s
  own per-token work),
* decode, steady state: a plain KV-cache loop of single-token forwards (no ``generate``), interleaved token by
  token across the models (each step of every model timed alone, the prompt's prefill not timed): the
  per-token time of the model itself, paired step by step,
* prefill: ``lit_prune.eval.resources.prefill_throughput`` at ``--prefill-batch`` x ``--prefill-len``.

Limits: decode at batch 1 reads every weight once per token, so the best speed-up is the ratio of the bytes
of weights read per token, dense over pruned (every decoder ``nn.Linear`` and the LM head; embedding
lookups, norms and the KV cache excluded). Prefill is compute bound: its limit is the ratio of matmul
FLOPs (decoder linears plus causal attention scores; one LM-head row per sequence). The headline is
achieved speed-up / limit (target >= 0.9 for decode).

    python benchmarks/pruned_speed.py                       # 0.5B shapes
    python benchmarks/pruned_speed.py --layers 1 --vocab 1024 --new-tokens 4 --repeats 1 \\
        --prefill-batch 1 --prefill-len 16                  # seconds
    python benchmarks/pruned_speed.py --depth               # width vs depth at equal size, 0.5B shapes
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as common  # noqa: E402
from lit_prune.eval.resources import count_parameters, decode_throughput, prefill_throughput  # noqa: E402
from lit_prune.pruning import (  # noqa: E402
    NeuronStats,
    PruneSpec,
    blocks_for_param_ratio,
    find_swiglu_mlps,
    make_plan,
    remove_blocks,
    width_param_fraction,
)

NAME = "pruned_speed"
TARGET = 0.9
PAPER_TABLE5 = {"model": "Qwen2.5-1.5B", "ratio": 0.35, "speedup": 1.08}
# Short (12 tokens with the tiny tokenizer) so that generate() timings are dominated by decoding, not the prefill.
PROMPT = "How many apples does Tom have?"
TOKENIZER_DIR = common.REPO_ROOT / "checkpoints" / "tiny-random-qwen2"


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["0.5b", "1.5b"], default="0.5b", help="Qwen2.5 shapes to build")
    parser.add_argument("--layers", type=common.positive, default=None, help="cut the depth (default: real)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size; 0 = the real one (default)")
    parser.add_argument("--ratios", default="0.1,0.2,0.35", help="comma list of pruning ratios")
    parser.add_argument("--new-tokens", type=common.positive, default=32, help="tokens per decode run")
    parser.add_argument("--prefill-batch", type=common.positive, default=8)
    parser.add_argument("--prefill-len", type=common.positive, default=256)
    parser.add_argument("--repeats", type=common.positive, default=6, help="timed decode rounds")
    parser.add_argument("--prefill-repeats", type=common.positive, default=3, help="timed prefill rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--multiple-of", type=common.positive, default=128)
    parser.add_argument("--depth", action="store_true",
                        help="also time depth-pruned copies at the width plans' fractions of the parameters")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    return args


def random_stats(num_layers: int, width: int, seed: int = 0) -> NeuronStats:
    """Statistics with random sums (the plan is ``random`` anyway; they only need the right shape)."""
    generator = torch.Generator().manual_seed(seed)
    stats = NeuronStats.zeros(num_layers, width)
    for key, tensor in stats.state.items():
        if tensor.dim() == 0:
            tensor.fill_(1.0)
        else:
            tensor.copy_(torch.rand(num_layers, width, generator=generator, dtype=torch.float64))
    return stats


def pruned_copy(model: nn.Module, ratio: float, multiple_of: int, seed: int = 42):
    """A copy of ``model`` sliced by a ``random`` plan; every tensor the slicing does not replace is shared."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared)
    blocks = find_swiglu_mlps(model)
    plan = make_plan(model, random_stats(len(blocks), blocks[0].width),
                     PruneSpec(ratio, "random", multiple_of=multiple_of, seed=seed)).plan
    plan.apply(clone)
    return clone.eval(), plan


def depth_copy(model: nn.Module, param_fraction: float) -> tuple[nn.Module, list[int]]:
    """A copy of ``model`` without the blocks nearest in size to ``param_fraction`` of its parameters (the last
    ones before the final block); the tensors of the blocks it keeps are shared.

    Raises:
        ValueError: If the fraction rounds to no block or to every block (``blocks_for_param_ratio``).
    """
    count = blocks_for_param_ratio(model, param_fraction)
    last = model.config.num_hidden_layers - 1
    first = max(0, last - count)
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared)
    blocks = list(range(first, first + count))
    remove_blocks(clone, blocks)
    return clone.eval(), blocks


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every decoder ``nn.Linear`` and the LM head."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, nn.Linear):
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    head = model.get_output_embeddings()
    total += sum(p.nbytes for p in head.parameters(recurse=False))
    return total


def prefill_flops(model: nn.Module, batch: int, length: int) -> float:
    """Matmul FLOPs of one prefill pass: decoder linears on every token, causal attention scores, one LM-head row."""
    config = model.config
    linear_params = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * 2 * 2 * config.num_attention_heads * head_dim * (length * (length + 1) / 2)
    head = model.get_output_embeddings().weight.numel()
    return batch * (2 * linear_params * length + attention + 2 * head)


@torch.inference_mode()
def interleaved_decode_steps(models: dict[str, nn.Module], prompt_ids: torch.Tensor, steps: int, rounds: int,
                             warmup_steps: int = 2) -> dict[str, dict[str, list[float]]]:
    """Per-token seconds of greedy single-token KV-cache forwards, interleaved token by token across models.

    Each round prefills the prompt in every model (not timed), then runs ``steps`` decode steps in which
    every model advances by one token in turn (rotating which goes first). Pairing models within one step
    cancels drifts much shorter than a whole ``generate`` call. The first ``warmup_steps`` steps of each
    round are not recorded.

    Returns:
        ``{name: {"wall": [...], "cpu": [...]}}`` seconds per token, aligned across models step by step.
    """
    names = list(models)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(rounds):
        state = {}
        for name, model in models.items():
            output = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
            state[name] = (output.past_key_values, output.logits[:, -1].argmax(-1, keepdim=True))
        for step in range(warmup_steps + steps):
            shift = (round_index * steps + step) % len(names)
            for name in names[shift:] + names[:shift]:
                cache, token = state[name]
                wall, cpu = time.perf_counter(), time.process_time()
                output = models[name](input_ids=token, past_key_values=cache, use_cache=True)
                token = output.logits[:, -1].argmax(-1, keepdim=True)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                state[name] = (output.past_key_values, token)
                if step >= warmup_steps:
                    times[name]["wall"].append(wall)
                    times[name]["cpu"].append(cpu)
    return times


def _with_cpu_rate(measure, tokens: int) -> dict[str, float]:
    """Call a library throughput function (wall-clock tokens/s) and add the CPU-clock rate of the same call."""
    cpu = time.process_time()
    wall_rate = measure()
    return {"wall": wall_rate, "cpu": tokens / (time.process_time() - cpu)}


def main(argv: list[str] | None = None) -> dict:
    from lit_prune.loading import load_tokenizer

    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    config = common.qwen25_config(args.model, args.layers, args.vocab or None)
    common.console.print(f"building Qwen2.5-{args.model} shapes: {config.num_hidden_layers} layers, d_ff "
                         f"{config.intermediate_size}, vocab {config.vocab_size}, {threads} threads")
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    if config.vocab_size < len(tokenizer):
        raise SystemExit(f"--vocab {config.vocab_size} is smaller than the prompt tokenizer's {len(tokenizer)} ids")
    dense = common.build_model(config)
    models: dict[str, nn.Module] = {"dense": dense}
    plans, depth = {}, {}
    for ratio in args.ratios:
        name = f"pruned_{round(ratio * 100)}"
        models[name], plans[name] = pruned_copy(dense, ratio, args.multiple_of)
    for ratio in args.ratios if args.depth else []:
        fraction = width_param_fraction(dense, ratio, args.multiple_of)
        try:
            clone, blocks = depth_copy(dense, fraction)
        except ValueError as error:  # too few layers for this fraction: say so, time the others
            common.console.print(f"no depth variant at {ratio:.0%}: {error}")
            continue
        name = f"depth_{round(ratio * 100)}"
        models[name] = clone
        depth[name] = {"width": f"pruned_{round(ratio * 100)}", "width_param_fraction": fraction,
                       "removed_blocks": blocks}
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]

    prefill_tokens = args.prefill_batch * args.prefill_len
    # Each run appends its own {"wall": tokens/s, "cpu": tokens/s}; the helper's own call timings are not used.
    results: dict[str, dict[str, list[dict]]] = {name: {"generate": [], "loop": [], "prefill": []} for name in models}

    def record(name: str, kind: str, fn):
        def run():
            results[name][kind].append(fn())
        return run

    decode_runs, prefill_runs = {}, {}
    for name, model in models.items():
        decode_runs[f"{name}/generate"] = record(name, "generate", lambda model=model: _with_cpu_rate(
            lambda: decode_throughput(model, tokenizer, PROMPT, new_tokens=args.new_tokens, warmup=0, repeats=1),
            args.new_tokens))
        prefill_runs[f"{name}/prefill"] = record(name, "prefill", lambda model=model: _with_cpu_rate(
            lambda: prefill_throughput(model, args.prefill_batch, args.prefill_len, repeats=1, warmup=0),
            prefill_tokens))
    common.console.print(f"decode (generate): {args.warmup} warm-up + {args.repeats} interleaved rounds over "
                         f"{len(models)} models")
    common.interleaved(decode_runs, args.repeats, args.warmup)
    common.console.print(f"decode (bare loop): {args.repeats} rounds of {args.new_tokens} token-interleaved steps")
    step_times = interleaved_decode_steps(models, prompt_ids, args.new_tokens, args.repeats)
    common.console.print(f"prefill {args.prefill_batch} x {args.prefill_len}: {args.warmup} warm-up + "
                         f"{args.prefill_repeats} interleaved rounds")
    common.interleaved(prefill_runs, args.prefill_repeats, args.warmup)
    for name in models:  # drop the warm-up measurements
        for kind in ("generate", "prefill"):
            results[name][kind] = results[name][kind][args.warmup:]
        # One "rate" per decode step; the speed-up pairs the steps of one rotation (same moment, all models).
        count = len(step_times[name]["wall"])
        results[name]["loop"] = [{c: 1.0 / step_times[name][c][i] for c in ("wall", "cpu")} for i in range(count)]

    clock = common.headline_clock(threads)
    dense_bytes = weight_bytes_per_token(dense)
    dense_flops = prefill_flops(dense, args.prefill_batch, args.prefill_len)
    rows_out = {}
    dense_parameters = count_parameters(dense)
    for name, model in models.items():
        bytes_per_token = weight_bytes_per_token(model)
        flops = prefill_flops(model, args.prefill_batch, args.prefill_len)
        parameters = count_parameters(model)
        entry = {
            "kept_width": find_swiglu_mlps(model)[0].width,
            "exact_ratio": plans[name].exact_ratio if name in plans else 0.0,
            "num_layers": model.config.num_hidden_layers,
            "param_fraction": 1.0 - parameters / dense_parameters,
            "parameters": parameters,
            "weight_bytes_per_token": bytes_per_token,
            "decode_limit": dense_bytes / bytes_per_token,
            "prefill_flops": flops,
            "prefill_limit": dense_flops / flops,
        }
        for kind in ("generate", "loop", "prefill"):
            limit = entry["prefill_limit"] if kind == "prefill" else entry["decode_limit"]
            entry[kind] = {}
            for clock_name in ("wall", "cpu"):
                own = [r[clock_name] for r in results[name][kind]]
                base = [r[clock_name] for r in results["dense"][kind]]
                speedup = common.median([o / b for o, b in zip(own, base)])
                entry[kind][clock_name] = {
                    "tokens_per_s": own, "median_tokens_per_s": common.median(own), "spread": common.spread(own),
                    "speedup": speedup, "speedup_over_limit": speedup / limit,
                }
        rows_out[name] = entry
    # Time per generated token that pruning cannot shrink: generate() minus the model's own decode steps.
    dense_entry = rows_out["dense"]
    generate_overhead_ms = 1e3 * (1 / dense_entry["generate"][clock]["median_tokens_per_s"]
                                  - 1 / dense_entry["loop"][clock]["median_tokens_per_s"])
    pruned_names = [n for n in models if n != "dense"]
    headline = {n: rows_out[n]["generate"][clock]["speedup_over_limit"] for n in pruned_names}
    info = common.machine_info()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "model": f"Qwen2.5-{args.model} shapes, random weights, float32",
            "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_word_embeddings, "plan": "random (seed 42)",
            "multiple_of": args.multiple_of, "new_tokens": args.new_tokens, "prompt_tokens": int(prompt_ids.shape[1]),
            "prefill": [args.prefill_batch, args.prefill_len], "repeats": args.repeats,
            "prefill_repeats": args.prefill_repeats, "warmup": args.warmup, "threads": threads,
        },
        "models": rows_out,
        "headline_clock": clock,
        "generate_overhead_ms_per_token": generate_overhead_ms,
        "decode_speedup_over_limit": headline,
        "depth": depth,
        "target": TARGET,
        "meets_target": all(v >= TARGET for v in headline.values()),
        "paper_table5": PAPER_TABLE5,
    }
    decode_rows, prefill_rows = [], []
    for name, entry in rows_out.items():
        generate, loop, prefill = entry["generate"][clock], entry["loop"][clock], entry["prefill"][clock]
        decode_rows.append((
            name, entry["num_layers"], entry["kept_width"], f"{entry['exact_ratio']:.1%}",
            f"{entry['param_fraction']:.1%}", f"{entry['weight_bytes_per_token'] / 2**20:,.0f}",
            f"{entry['decode_limit']:.3f}",
            f"{generate['median_tokens_per_s']:.2f}", f"{generate['speedup']:.3f}",
            f"{generate['speedup_over_limit']:.2f}",
            f"{loop['median_tokens_per_s']:.2f}", f"{loop['speedup']:.3f}", f"{loop['speedup_over_limit']:.2f}",
        ))
        prefill_rows.append((
            name, entry["num_layers"], entry["kept_width"], f"{entry['prefill_flops'] / 1e9:,.1f}",
            f"{entry['prefill_limit']:.3f}",
            f"{prefill['median_tokens_per_s']:,.0f}", f"{prefill['spread']:.1%}", f"{prefill['speedup']:.3f}",
            f"{prefill['speedup_over_limit']:.2f}",
        ))
    title = f"Qwen2.5-{args.model} shapes ({config.num_hidden_layers} layers, vocab {config.vocab_size}, float32)"
    common.print_table(
        f"Batch-1 greedy decode, {title}",
        ["model", "layers", "d_ff", "neurons pruned", "params removed", "weights MiB/token", "limit",
         "generate tok/s", "speed-up", "/ limit",
         "bare loop tok/s", "speed-up", "/ limit"],
        decode_rows,
        caption=f"{clock} clock; {args.new_tokens} new tokens, {args.repeats} interleaved rounds (medians; speed-ups "
                f"are medians of per-round ratios, per-step for the bare loop); generate() costs {generate_overhead_ms:.1f} ms/token over the bare loop; target "
                f"speed-up / limit >= {TARGET}. Paper Table 5: {PAPER_TABLE5['speedup']}x at 35% on Qwen2.5-1.5B.",
    )
    common.print_table(
        f"Prefill {args.prefill_batch} x {args.prefill_len}, {title}",
        ["model", "layers", "d_ff", "GFLOP/pass", "FLOP limit", "tok/s", "spread", "speed-up", "/ limit"],
        prefill_rows,
        caption=f"{clock} clock; {args.prefill_repeats} interleaved rounds\n" + common.machine_line(info),
    )
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
