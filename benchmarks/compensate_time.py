"""Time of ``compensated`` per layer: greedy OBS selection and the least-squares re-fit of ``W_down``.

One MLP layer at real Qwen2.5 shapes (``--model 1.5b``: d_ff 8,960, hidden 1,536) with a random ``W_down`` and a
random positive-definite Gram matrix (diagonal plus a rank-``--rank`` term: the timing depends on the shapes,
not on the values). For each ratio: ``obs_select`` (one float64 inverse of the d_ff x d_ff Gram, then block
downdates of ``--group`` neurons), ``refit_down`` (Cholesky solve on the kept block) and, for comparison, the
re-fit alone after a ranking (``energy+refit``: no inverse of the full Gram). Multiply by the number of layers
(28 at 1.5B) for a whole model. float64 throughout, as the library computes it.

    python benchmarks/compensate_time.py                         # Qwen2.5-1.5B shapes, 25% and 50%
    python benchmarks/compensate_time.py --model 0.5b --ratios 0.5 --repeats 1
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as common  # noqa: E402
from lit_prune.pruning import kept_width, obs_select, refit_down  # noqa: E402

NAME = "compensate_time"


def parse_args(argv: list[str] | None):
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["0.5b", "1.5b", "7b"], default="1.5b", help="Qwen2.5 shapes")
    parser.add_argument("--width", type=int, default=None, help="override d_ff (e.g. for a quick smoke run)")
    parser.add_argument("--ratios", default="0.25,0.5", help="comma list of pruning ratios")
    parser.add_argument("--group", type=common.positive, default=32, help="obs_group: neurons removed per update")
    parser.add_argument("--rank", type=common.positive, default=256, help="rank of the random Gram's low-rank part")
    parser.add_argument("--repeats", type=common.positive, default=1)
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    config = common.qwen25_config(args.model)
    width = args.width or config.intermediate_size
    hidden = config.hidden_size if args.width is None else min(config.hidden_size, width)
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(width, min(args.rank, width), generator=generator, dtype=torch.float64)
    gram = low_rank @ low_rank.T + torch.diag(torch.rand(width, generator=generator, dtype=torch.float64) + 0.1)
    weight = torch.randn(hidden, width, generator=generator, dtype=torch.float64)
    common.console.print(f"one layer of Qwen2.5-{args.model}: d_ff {width}, hidden {hidden}, {threads} threads")
    rows, results = [], []
    for ratio in args.ratios:
        keep = kept_width(width, ratio, 128 if width % 128 == 0 else 1)
        timings = {"obs_select": [], "refit_down": [], "rank_then_refit": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            kept = obs_select(weight, gram, keep, group_size=args.group)
            timings["obs_select"].append(time.perf_counter() - start)
            start = time.perf_counter()
            refit_down(weight, gram, kept)
            timings["refit_down"].append(time.perf_counter() - start)
            start = time.perf_counter()
            energy = weight.pow(2).sum(0) * gram.diagonal()
            ranked = torch.topk(energy, keep).indices.sort().values
            refit_down(weight, gram, ranked)
            timings["rank_then_refit"].append(time.perf_counter() - start)
        medians = {k: common.median(v) for k, v in timings.items()}
        compensated = medians["obs_select"] + medians["refit_down"]
        result = {"ratio": ratio, "kept_width": keep, "seconds": timings, "median_s": medians,
                  "compensated_per_layer_s": compensated,
                  "compensated_model_s": compensated * config.num_hidden_layers,
                  "rank_then_refit_model_s": medians["rank_then_refit"] * config.num_hidden_layers}
        results.append(result)
        rows.append((f"{100 * ratio:.0f}%", keep, f"{medians['obs_select']:.2f}", f"{medians['refit_down']:.2f}",
                     f"{compensated:.2f}", f"{compensated * config.num_hidden_layers / 60:.1f}",
                     f"{medians['rank_then_refit']:.2f}"))
    info = common.machine_info()
    payload = {"benchmark": NAME, "machine": info,
               "settings": {"model": f"Qwen2.5-{args.model}", "intermediate_size": width, "hidden_size": hidden,
                            "num_layers": config.num_hidden_layers, "group": args.group, "rank": args.rank,
                            "repeats": args.repeats, "threads": threads, "dtype": "float64"},
               "results": results}
    common.print_table(
        f"compensated per layer, Qwen2.5-{args.model} shapes (d_ff {width})",
        ["ratio", "kept", "OBS select s", "re-fit s", "compensated s/layer",
         f"x {config.num_hidden_layers} layers (min)", "energy+refit s/layer"], rows,
        caption=f"obs_group {args.group}, float64, median of {args.repeats}\n" + common.machine_line(info))
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
