"""Shared pieces of the benchmarks: Qwen2.5 shapes, machine description, interleaved timing, JSON, tables.

Not part of the library: the benchmark scripts import it as a sibling module (``benchmarks/`` is put on
``sys.path`` by each script), so it works both as ``python benchmarks/x.py`` and when a test imports a
script by path.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Real shapes of the Qwen2.5 base models (config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B}); weights here are random.
QWEN25_SHAPES: dict[str, dict] = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}

# Wide tables stay readable when the output is piped to a file (rich would fall back to 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)


def qwen25_config(model: str = "0.5b", layers: int | None = None, vocab_size: int | None = None,
                  intermediate_size: int | None = None):
    """A ``Qwen2Config`` with the real Qwen2.5 shapes of ``model``, optionally cut in depth or vocabulary.

    Raises:
        ValueError: If ``model`` is unknown or ``layers``/``vocab_size`` < 1.
    """
    from transformers import Qwen2Config

    if model not in QWEN25_SHAPES:
        raise ValueError(f"`model` must be one of {sorted(QWEN25_SHAPES)}; got {model!r}")
    shape = dict(QWEN25_SHAPES[model])
    for name, value in (("layers", layers), ("vocab_size", vocab_size), ("intermediate_size", intermediate_size)):
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be >= 1; got {value}")
    if layers is not None:
        shape["num_hidden_layers"] = layers
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    if intermediate_size is not None:
        shape["intermediate_size"] = intermediate_size
    return Qwen2Config(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       pad_token_id=None, bos_token_id=None, eos_token_id=None, **shape)


def build_model(config, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``Qwen2ForCausalLM`` (float32, eval mode) for ``config``."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def set_threads(threads: int | None) -> int:
    """Fix the intra-op thread count (default: physical cores) and flush denormals; return the count."""
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    return threads


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """CPU, cores, memory, library versions, torch threads, load and date: the context of every number."""
    import transformers

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with the flags every benchmark shares: ``--out`` and ``--threads``."""
    parser = argparse.ArgumentParser(prog=f"python benchmarks/{name}.py", description=description)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help=f"JSON output path (default: benchmarks/results/{name}.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: physical cores)")
    return parser


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return number


def interleaved(runs: dict[str, Callable[[], object]], repeats: int,
                warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Time every callable ``repeats`` times, interleaved (ABC, BCA, CAB, ...), after ``warmup`` untimed rounds.

    Rotating the order each round spreads slow drifts (another process, thermal state, allocator) over
    all variants instead of biasing the one that always runs first. Both clocks are kept: wall time and
    this process's CPU time (``time.process_time``). With one torch thread the CPU time is what the wall
    time would be on an otherwise idle machine: time spent descheduled by other processes does not count.

    Returns:
        ``{"wall": {name: [seconds, ...]}, "cpu": {name: [seconds, ...]}}``, in run order.
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            times["cpu"][name].append(time.process_time() - cpu)
            times["wall"][name].append(time.perf_counter() - wall)
    return times


def headline_clock(threads: int) -> str:
    """The clock the headline ratios use: CPU time with one thread (robust on a shared machine), else wall."""
    return "cpu" if threads == 1 else "wall"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Relative spread of repeated measurements: (max - min) / median."""
    mid = statistics.median(values)
    return float((max(values) - min(values)) / mid) if mid else 0.0


def write_json(path: Path, payload: dict) -> Path:
    """Write a benchmark's results (atomically, :func:`lit_prune.jsonl.write_json`) and say where."""
    from lit_prune.jsonl import write_json as write

    path = write(payload, path)
    console.print(f"wrote {path}")
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, caption_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def machine_line(info: dict) -> str:
    return (f"{info['cpu_model']} ({info['cpu_capability']}), {info['physical_cores']} cores, "
            f"{info['memory_gb']} GB, torch {info['torch']} with {info['torch_threads']} threads, "
            f"load {info['load_average_1m']}, {info['date']}")


def padded_batches(num_prompts: int, batch_size: int, min_tokens: int, max_tokens: int, vocab_size: int,
                   seed: int = 0, pad_to: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches of random prompts of random length in ``[min_tokens, max_tokens]``.

    Each batch is padded to its longest prompt, or to ``pad_to`` (a fixed shape for every batch).
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_tokens, max_tokens + 1, (num_prompts,), generator=generator)
    batches = []
    for start in range(0, num_prompts, batch_size):
        rows = lengths[start:start + batch_size]
        width = pad_to or int(rows.max())
        input_ids = torch.randint(1, vocab_size, (len(rows), width), generator=generator)
        mask = (torch.arange(width)[None, :] < rows[:, None]).long()
        input_ids = input_ids * mask  # pad id 0
        batches.append((input_ids, mask))
    return batches
