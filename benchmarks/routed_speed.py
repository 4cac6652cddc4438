"""Speed of routed models (dynamic depth): batch-1 greedy decoding, dense vs D-LLM-style routers that skip 20 / 40 /
60 % of the tokens of every routed block.

A randomly initialised Llama (default: hidden 512, 8 layers, d_ff 1536, 8 heads, vocab 2048, float32) gets
``dllm`` routers (:func:`lit_prune.pruning.routing.install_routers`; block 0 is never routed) with random weights;
their execute biases are then calibrated block by block, in order, so that each routed block skips ``ratio`` of the
tokens of 16 calibration texts shaped like the bare loop's input below (the prompt, then random tokens; speed depends
on how many tokens skip, not on which). The routed copies share
every base tensor with the dense model. Measured, interleaved over models and repeated (medians):

* decode, steady state (the headline): a bare KV-cache loop of single-token forwards, interleaved token by token
  across the models (the prompt's prefill not timed), fed a fixed random token stream (teacher-forced, the same for
  every model): a random model's own greedy text is a repetition loop, on which per-token routers skip all or nothing,
  so the stream keeps the tokens from the distribution the routers were calibrated on,
* decode, ``model.generate``: ``lit_prune.eval.resources.decode_throughput`` (greedy, exactly ``--new-tokens``
  tokens after a short prompt, KV cache; includes the prompt's prefill and ``generate``'s own per-token work); its
  skip rate is whatever the routers decide on that greedy text, reported beside it.

The skip counters are reset before each of the two measurements, so every routed model reports the skip rate its
routers really took, and :func:`~lit_prune.pruning.routing.routed_param_ratio` (the study's ``1 - active
parameters per token / dense``) from it. Limit: batch-1 decode reads every weight it uses once per token, so the best
speed-up is the dense bytes of weights read per token (decoder linears and the LM head) over the routed ones (each
routed block's linears times the fraction of tokens that ran it, the routers added).

    python benchmarks/routed_speed.py                                    # hidden 512, 8 layers
    python benchmarks/routed_speed.py --layers 2 --hidden 64 --new-tokens 4 --repeats 1   # seconds
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
from lit_prune.eval.resources import decode_throughput  # noqa: E402
from lit_prune.pruning.routing import (  # noqa: E402
    RoutingSpec,
    install_routers,
    reset_skip_counters,
    routed_param_ratio,
    routers_of,
    skip_rates,
)

NAME = "routed_speed"
PROMPT = "How many apples does Tom have?"
TOKENIZER_DIR = common.REPO_ROOT / "checkpoints" / "tiny-random-qwen2"
CALIBRATION_TEXTS = 16
LOOP_WARMUP = 2  # untimed decode steps of each bare-loop round


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=common.positive, default=512)
    parser.add_argument("--layers", type=common.positive, default=8)
    parser.add_argument("--intermediate", type=common.positive, default=None, help="d_ff (default: 3 x hidden)")
    parser.add_argument("--heads", type=common.positive, default=8)
    parser.add_argument("--vocab", type=common.positive, default=2048)
    parser.add_argument("--ratios", default="0.2,0.4,0.6", help="comma list of skip ratios")
    parser.add_argument("--new-tokens", type=common.positive, default=48, help="tokens per decode run")
    parser.add_argument("--repeats", type=common.positive, default=6, help="timed decode rounds")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    return args


def build_llama(args) -> nn.Module:
    """A random ``LlamaForCausalLM`` of the requested shape (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=args.intermediate or 3 * args.hidden, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=4096,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def calibrate(model: nn.Module, ratio: float, calibration_ids: torch.Tensor) -> None:
    """Shift each routed block's execute bias so that it skips ``ratio`` of the calibration tokens (blocks in order:
    a block's inputs depend on the decisions of the blocks before it)."""
    for _, routing in routers_of(model):
        router = routing.routers["block"]
        margins = []
        handle = router.register_forward_hook(
            lambda m, a, out, margins=margins: margins.append((out[..., 0] - out[..., 1]).flatten()))
        try:
            model(calibration_ids, use_cache=False)
        finally:
            handle.remove()
        # A token runs iff its margin + shift >= 0: the ratio-quantile of the margins goes to zero.
        router.proj[-1].bias[0] -= torch.quantile(margins[0].double(), ratio).item()


def routed_copy(model: nn.Module, ratio: float, calibration_ids: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with calibrated ``dllm`` routers; every base tensor is shared."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared)
    install_routers(clone, RoutingSpec(kind="dllm", ratio=ratio))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, routing in routers_of(clone):
            for parameter in routing.parameters():  # token-dependent decisions (the installed head starts flat)
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    clone.eval()
    calibrate(clone, ratio, calibration_ids)
    return clone


def linear_bytes(module: nn.Module) -> int:
    return sum(p.nbytes for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))


def weight_bytes_per_token(model: nn.Module, rates: dict[str, float]) -> float:
    """Bytes of weights a batch-1 decode step reads on average: decoder and router linears and the LM head, each
    routed block's own linears times the fraction of tokens that ran it (``rates``: :func:`skip_rates`)."""
    total = linear_bytes(model.model.layers) + linear_bytes(model.get_output_embeddings())
    for index, routing in routers_of(model):
        block = model.model.layers[index]
        total -= rates[str(index)] * (linear_bytes(block) - linear_bytes(routing))
    return total


@torch.inference_mode()
def interleaved_decode_steps(models: dict[str, nn.Module], prompt_ids: torch.Tensor, stream_ids: torch.Tensor,
                             rounds: int, warmup_steps: int = 2) -> dict[str, dict[str, list[float]]]:
    """Per-token seconds of single-token KV-cache forwards fed ``stream_ids`` (teacher-forced), interleaved token by
    token across the models (as ``benchmarks/pruned_speed.py``); the prompt's prefill is not timed, nor the first
    ``warmup_steps`` tokens of each round."""
    from transformers import DynamicCache

    names = list(models)
    times = {name: {"wall": [], "cpu": []} for name in names}
    steps = stream_ids.shape[1]
    for round_index in range(rounds):
        caches = {}
        for name, model in models.items():
            caches[name] = DynamicCache(config=model.config)
            model(input_ids=prompt_ids, cache=caches[name], use_cache=True, logits_to_keep=1)
        for step in range(steps):
            shift = (round_index * steps + step) % len(names)
            position = torch.tensor([[prompt_ids.shape[1] + step]])
            for name in names[shift:] + names[:shift]:
                wall, cpu = time.perf_counter(), time.process_time()
                logits = models[name](input_ids=stream_ids[:, step:step + 1], cache=caches[name], use_cache=True,
                                      position_ids=position).logits
                logits[:, -1].argmax(-1)  # the greedy pick a decoder makes, as in pruned_speed.py
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if step >= warmup_steps:
                    times[name]["wall"].append(wall)
                    times[name]["cpu"].append(cpu)
    return times


def _speed(own: list[float], base: list[float], limit: float) -> dict:
    speedup = common.median([o / b for o, b in zip(own, base)])
    return {"tokens_per_s": own, "median_tokens_per_s": common.median(own), "spread": common.spread(own),
            "speedup": speedup, "speedup_over_limit": speedup / limit}


def _skip_summary(model: nn.Module, dense_bytes: float) -> dict:
    """The skip rates the routers took since the last reset, the active-parameter ratio and the decode limit."""
    rates = skip_rates(model)
    return {"skip_rates": rates, "mean_skip_rate": sum(rates.values()) / len(rates) if rates else 0.0,
            "active_param_ratio": routed_param_ratio(model) if rates else 0.0,
            "decode_limit": dense_bytes / weight_bytes_per_token(model, rates)}


def main(argv: list[str] | None = None) -> dict:
    from lit_prune.loading import load_tokenizer

    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    if args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab {args.vocab} is smaller than the prompt tokenizer's {len(tokenizer)} ids")
    dense = build_llama(args)
    config = dense.config
    common.console.print(f"random Llama: hidden {config.hidden_size}, {config.num_hidden_layers} layers, d_ff "
                         f"{config.intermediate_size}, vocab {config.vocab_size}, {threads} threads")
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(2)
    stream_ids = torch.randint(0, args.vocab, (1, LOOP_WARMUP + args.new_tokens), generator=generator)
    # Texts shaped like the bare loop's (the prompt, then random tokens), other streams than the timed one.
    calibration_ids = torch.cat([prompt_ids.expand(CALIBRATION_TEXTS, -1), torch.randint(
        0, args.vocab, (CALIBRATION_TEXTS, stream_ids.shape[1]), generator=generator)], dim=1)
    models: dict[str, nn.Module] = {"dense": dense}
    for ratio in args.ratios:
        models[f"routed_{round(ratio * 100)}"] = routed_copy(dense, ratio, calibration_ids)
    dense_bytes = weight_bytes_per_token(dense, {})

    generate_rates: dict[str, list[dict]] = {name: [] for name in models}

    def generate_run(name: str, model: nn.Module):
        def run():
            cpu = time.process_time()
            wall_rate = decode_throughput(model, tokenizer, PROMPT, new_tokens=args.new_tokens, warmup=0, repeats=1)
            generate_rates[name].append({"wall": wall_rate, "cpu": args.new_tokens / (time.process_time() - cpu)})
        return run

    for model in models.values():
        reset_skip_counters(model)
    common.console.print(f"decode (generate): {args.warmup} warm-up + {args.repeats} interleaved rounds over "
                         f"{len(models)} models")
    common.interleaved({n: generate_run(n, m) for n, m in models.items()}, args.repeats, args.warmup)
    generate_skips = {name: _skip_summary(model, dense_bytes) for name, model in models.items()}
    for model in models.values():
        reset_skip_counters(model)
    common.console.print(f"decode (bare loop): {args.repeats} rounds of {args.new_tokens} token-interleaved steps")
    step_times = interleaved_decode_steps(models, prompt_ids, stream_ids, args.repeats, LOOP_WARMUP)
    loop_skips = {name: _skip_summary(model, dense_bytes) for name, model in models.items()}

    clock = common.headline_clock(threads)
    rows_out, table = {}, []
    for name in models:
        generate = [r[clock] for r in generate_rates[name][args.warmup:]]
        base_generate = [r[clock] for r in generate_rates["dense"][args.warmup:]]
        loop = [1.0 / t for t in step_times[name][clock]]
        base_loop = [1.0 / t for t in step_times["dense"][clock]]
        entry = {
            "target_ratio": None if name == "dense" else float(name.split("_")[1]) / 100,
            "loop": {**loop_skips[name], **_speed(loop, base_loop, loop_skips[name]["decode_limit"])},
            "generate": {**generate_skips[name],
                         **_speed(generate, base_generate, generate_skips[name]["decode_limit"])},
        }
        rows_out[name] = entry
        loop_entry, generate_entry = entry["loop"], entry["generate"]
        table.append((name, f"{loop_entry['mean_skip_rate']:.1%}", f"{loop_entry['active_param_ratio']:.1%}",
                      f"{loop_entry['decode_limit']:.3f}", f"{loop_entry['median_tokens_per_s']:.1f}",
                      f"{loop_entry['speedup']:.3f}", f"{loop_entry['speedup_over_limit']:.2f}",
                      f"{generate_entry['mean_skip_rate']:.1%}", f"{generate_entry['median_tokens_per_s']:.1f}",
                      f"{generate_entry['speedup']:.3f}", f"{generate_entry['speedup_over_limit']:.2f}"))
    info = common.machine_info()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "model": "random Llama, float32", "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size, "routers": "dllm, random weights, biases calibrated per block",
            "calibration_texts": CALIBRATION_TEXTS, "new_tokens": args.new_tokens, "loop_warmup": LOOP_WARMUP,
            "prompt_tokens": int(prompt_ids.shape[1]), "repeats": args.repeats, "warmup": args.warmup,
            "threads": threads,
        },
        "models": rows_out,
        "headline": "loop",
        "headline_clock": clock,
    }
    common.print_table(
        f"Batch-1 decode, random Llama (hidden {config.hidden_size}, {config.num_hidden_layers} layers, float32), "
        "dense vs dllm routers",
        ["model", "loop: skip rate", "active-param ratio", "limit", "tok/s", "speed-up", "/ limit",
         "generate: skip rate", "tok/s", "speed-up", "/ limit"],
        table,
        caption=f"{clock} clock; {args.new_tokens} tokens per run, {args.repeats} interleaved rounds (medians of "
                "per-step ratios for the bare loop, fed a random token stream; per-round for greedy generate()); "
                "skip rates measured in the same runs, block 0 not routed\n" + common.machine_line(info),
    )
    common.write_json(args.out, payload)
    return payload

if __name__ == "__main__":
    main()
