"""Parameter counts, peak memory, throughput and the paper's relative metrics."""

from __future__ import annotations

import math

import pytest
import torch

from lit_prune.eval import (
    PeakMemory,
    compression_ratio,
    count_parameters,
    decode_throughput,
    performance_retention,
    prefill_throughput,
    relative_accuracy_loss,
    relative_gain,
)

from conftest import TINY_VOCAB, make_tiny_qwen2


def _expected_qwen2_parameters(vocab, hidden, d_ff, layers, heads, kv_heads, tied):
    """Independent count from the architecture (Qwen2: q/k/v have biases, o_proj none, RMSNorm weights)."""
    head_dim = hidden // heads
    attention = hidden * hidden + hidden + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim) + hidden * hidden
    mlp = 3 * hidden * d_ff
    per_layer = attention + mlp + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden + (0 if tied else vocab * hidden)


@pytest.mark.parametrize("tied", [False, True])
def test_count_parameters_counts_tied_weights_once(tied):
    model = make_tiny_qwen2(tie_word_embeddings=tied)
    expected = _expected_qwen2_parameters(TINY_VOCAB, 64, 256, 2, 4, 2, tied)
    assert count_parameters(model) == expected
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())  # torch dedups shared objects


def test_count_parameters_dedups_shared_storage_and_meta():
    shared = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(shared, torch.nn.Linear(4, 4, bias=False))
    model[1].weight = torch.nn.Parameter(shared.weight.data)  # a distinct Parameter over the same storage
    assert count_parameters(model) == 16
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    assert count_parameters(meta) == 3 * 5 + 5 + 5 * 2 + 2
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module; got str"):
        count_parameters("model")


def test_peak_memory_cpu_sees_a_held_allocation():
    block_bytes = 256 * 2**20
    with PeakMemory("cpu") as memory:
        block = torch.ones(block_bytes // 4, dtype=torch.float32)  # touched pages: resident
    assert memory.method == "cpu_peak_rss"
    assert memory.growth_bytes >= 0.9 * block_bytes
    assert memory.peak_bytes >= memory.start_bytes + memory.growth_bytes - 1
    assert memory.num_samples >= 2
    assert memory.as_dict()["growth_bytes"] == memory.growth_bytes and memory.as_dict()["method"] == "cpu_peak_rss"
    del block


def test_peak_memory_cpu_catches_a_freed_allocation_through_sampling():
    block_bytes = 256 * 2**20
    with PeakMemory("cpu", interval_s=0.001) as memory:
        block = torch.ones(block_bytes // 4, dtype=torch.float32)
        seen = memory.num_samples
        while memory.num_samples < seen + 3:  # let the sampler thread read RSS while the block is alive
            pass
        del block
    assert memory.growth_bytes >= 0.9 * block_bytes


def test_peak_memory_arguments():
    with pytest.raises(ValueError, match="`interval_s` must be a number of seconds > 0; got 0"):
        PeakMemory("cpu", interval_s=0)
    with pytest.raises(ValueError, match="`device` must be a CPU or CUDA device; got 'meta'"):
        PeakMemory("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device`='cuda' but CUDA is not available"):
            PeakMemory("cuda")
        assert PeakMemory().method == "cpu_peak_rss"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    with PeakMemory("cuda") as memory:
        block = torch.ones(64 * 2**20 // 4, device="cuda")
        del block
    assert memory.method == "cuda_max_allocated" and memory.growth_bytes >= 64 * 2**20


def test_decode_and_prefill_throughput(tiny_qwen2, tiny_tokenizer):
    tiny_qwen2.train()
    rate = decode_throughput(tiny_qwen2, tiny_tokenizer, "Hello", new_tokens=8, warmup=1, repeats=2)
    assert math.isfinite(rate) and rate > 0
    assert tiny_qwen2.training  # mode restored
    prefill = prefill_throughput(tiny_qwen2, batch_size=2, seq_len=16, repeats=2)
    assert math.isfinite(prefill) and prefill > 0


def test_decode_throughput_generates_exactly_new_tokens_even_past_eos(tiny_tokenizer):
    model = make_tiny_qwen2()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits tie, so greedy picks token 0 ...
    model.generation_config.eos_token_id = 0  # ... which is made the EOS token
    encoded = tiny_tokenizer("Hello", return_tensors="pt")
    plain = model.generate(**encoded, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert plain.shape[1] - encoded["input_ids"].shape[1] == 1  # without forcing, it stops at once
    assert decode_throughput(model, tiny_tokenizer, "Hello", new_tokens=6, warmup=0, repeats=1) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"new_tokens": 0}, "`new_tokens` must be an int >= 1; got 0"),
        ({"warmup": -1}, "`warmup` must be an int >= 0; got -1"),
        ({"repeats": 0}, "`repeats` must be an int >= 1; got 0"),
        ({"prompt": ""}, "`prompt` must be a non-empty str; got ''"),
    ],
)
def test_decode_throughput_arguments(tiny_qwen2, tiny_tokenizer, kwargs, message):
    arguments = {"prompt": "Hello", **kwargs}
    with pytest.raises(ValueError, match=message):
        decode_throughput(tiny_qwen2, tiny_tokenizer, arguments.pop("prompt"), **arguments)


def test_prefill_throughput_arguments(tiny_qwen2):
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1; got 0"):
        prefill_throughput(tiny_qwen2, 0, 8)
    with pytest.raises(ValueError, match="`seq_len` must be an int >= 1; got 0"):
        prefill_throughput(tiny_qwen2, 1, 0)


def test_relative_accuracy_loss_is_eq3():
    # (A_original - A_pruned) / A_original * 100
    assert relative_accuracy_loss(80.0, 60.0) == pytest.approx(25.0)
    assert relative_accuracy_loss(0.8, 0.6) == pytest.approx(25.0)  # fractions work the same
    assert relative_accuracy_loss(50, 55) == pytest.approx(-10.0)  # pruning helped
    assert relative_accuracy_loss(0.5, 0.0) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="`base` must be > 0"):
        relative_accuracy_loss(0.0, 0.5)
    with pytest.raises(ValueError, match="`pruned` must be a finite number >= 0; got -1"):
        relative_accuracy_loss(1.0, -1)
    with pytest.raises(ValueError, match="`base` must be a finite number >= 0; got nan"):
        relative_accuracy_loss(float("nan"), 1.0)


def test_relative_gain_is_eq4():
    # (A_after - A_before) / A_before * 100
    assert relative_gain(40.0, 60.0) == pytest.approx(50.0)
    assert relative_gain(0.2, 0.7) == pytest.approx(250.0)
    assert relative_gain(60.0, 45.0) == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="`pruned` must be > 0"):
        relative_gain(0.0, 0.5)
    with pytest.raises(ValueError, match="`finetuned` must be a finite number >= 0; got inf"):
        relative_gain(0.5, float("inf"))


def test_compression_ratio_and_retention():
    assert compression_ratio(1000, 750) == pytest.approx(0.25)
    assert compression_ratio(1000, 1000) == 0.0
    assert performance_retention(80.0, 60.0) == pytest.approx(75.0)
    assert performance_retention(80.0, 60.0) == pytest.approx(100 - relative_accuracy_loss(80.0, 60.0))
    with pytest.raises(ValueError, match="`pruned_params` must be <= `dense_params` \\(10\\); got 11"):
        compression_ratio(10, 11)
    with pytest.raises(ValueError, match="`dense_params` must be an int >= 1; got 0"):
        compression_ratio(0, 0)
    with pytest.raises(ValueError, match="`dense_params` must be an int >= 1; got 10.5"):
        compression_ratio(10.5, 1)
    with pytest.raises(ValueError, match="`dense_score` must be > 0"):
        performance_retention(0, 1)


def test_compression_ratio_of_a_sliced_model():
    dense = make_tiny_qwen2()
    pruned = make_tiny_qwen2(intermediate_size=128)  # half the MLP neurons
    removed = 2 * 3 * 64 * 128
    assert compression_ratio(count_parameters(dense), count_parameters(pruned)) == pytest.approx(
        removed / count_parameters(dense)
    )
