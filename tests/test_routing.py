"""Dynamic depth (routers that skip decoder blocks per token): the three kinds on Qwen2 and Llama, the routed forward
against the dense model, KV-cache generation against full forwards, eviction of skipped tokens, training through a
real Trainer with LoRA, export and reload, refusal of routers made for another model, every bad input and the
active-parameter ratio against a hand computation."""

from __future__ import annotations

import importlib.util
import json
import math

import lightning as L
import pytest
import torch
from conftest import GSM8K, ROOT, SQUAD, make_tiny_llama, make_tiny_qwen2
from conftest import make_trainer as _trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel

from lit_prune.callbacks import DynamicDepthCallback
from lit_prune.data import PruneDataModule
from lit_prune.io import is_export
from lit_prune.module import LoraSettings, PrunableCausalLM
from lit_prune.pruning.routing import (
    ROUTERS_FILENAME,
    ROUTING_FILENAME,
    ROUTING_KINDS,
    RoutingSpec,
    active_param_ratio,
    install_routers,
    load_routed,
    load_routers,
    reset_skip_counters,
    routed_param_ratio,
    routers_of,
    routing_penalty,
    save_routers,
    skip_rates,
)
from lit_prune.tiny import save_tiny_model

LAYERS = 3
MAKERS = {"qwen2": make_tiny_qwen2, "llama": make_tiny_llama}


def _routed(make, kind: str, std: float | None = 0.5, **overrides):
    """A tiny float64 model with routers of ``kind``; ``std``: random router weights that skip a real fraction."""
    model = make(num_hidden_layers=LAYERS, **overrides).double()
    install_routers(model, RoutingSpec(kind=kind, ratio=0.5))
    if std is not None:
        torch.manual_seed(1)
        for _, routing in routers_of(model):
            for parameter in routing.parameters():
                torch.nn.init.normal_(parameter, std=std)
    return model.eval()


def _always_execute(model) -> None:
    with torch.no_grad():
        for _, routing in routers_of(model):
            for router in routing.routers.values():
                head = router.proj if isinstance(router.proj, torch.nn.Linear) else router.proj[-1]
                head.bias[0] = 1e4  # execute logit (MoD: the score; its sigmoid is 1)


# ---------------------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("kind", ROUTING_KINDS)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_routers_install_and_executing_everything_is_the_dense_model(name, kind, tmp_path):
    make = MAKERS[name]
    dense = make(num_hidden_layers=LAYERS).double().eval()
    model = _routed(make, kind)
    _always_execute(model)
    assert [i for i, _ in routers_of(model)] == [1, 2]  # block 0 is never routed
    units = {"block"} if kind != "skip_mlp_attn" else {"attn", "mlp"}
    assert all(set(routing.routers) == units for _, routing in routers_of(model))
    input_ids = torch.randint(3, 300, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    valid = attention_mask.bool()  # padding queries attend to their own key too (their outputs are not used)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, attention_mask=attention_mask).logits[valid],
                                   dense(input_ids, attention_mask=attention_mask).logits[valid], rtol=0, atol=1e-12)
    assert all(rate == 0.0 for rate in skip_rates(model).values())
    model.save_pretrained(tmp_path)  # the routers stay out of the base checkpoint
    from safetensors.torch import load_file

    assert not [k for k in load_file(tmp_path / "model.safetensors") if "routing" in k]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ROUTING_KINDS)
def test_cached_greedy_generation_equals_argmax_of_full_forwards(kind, implementation):
    model = _routed(make_tiny_qwen2, kind, attn_implementation=implementation)
    model.generation_config.eos_token_id = None  # every step is compared, none stops early
    prompt = torch.randint(3, 300, (1, 8))
    steps = 10
    with torch.no_grad():
        reset_skip_counters(model)
        generated = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True)
        rates = skip_rates(model)
        expected = prompt
        for _ in range(steps):
            logits = model(expected, use_cache=False).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)
    mean = sum(rates.values()) / len(rates)
    assert 0.15 < mean < 0.85, rates  # the routers skip a real fraction of the tokens


@pytest.mark.parametrize("kind", ["dllm", "skip_mlp_attn"])
def test_skipped_tokens_write_no_kv_and_run_nothing(kind):
    model = _routed(make_tiny_llama, kind)
    seen = {}
    blocks = model.model.layers
    handles = [blocks[i].mlp.register_forward_hook(
        lambda m, a, o, i=i: seen.update({i: seen.get(i, 0) + a[0].shape[1]})) for i in range(LAYERS)]
    prompt = torch.randint(3, 300, (1, 12))
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            full = model(prompt, use_cache=False).logits
            seen.clear()
            reset_skip_counters(model)
            cached = model(prompt, cache=cache, use_cache=True).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-12)
    for index, routing in routers_of(model):
        attn = routing.routers["block" if kind == "dllm" else "attn"]
        mlp = routing.routers["block" if kind == "dllm" else "mlp"]
        assert cache.get_seq_length(index) == 12 - int(attn.skipped_tokens) < 12  # eviction: executed tokens only
        assert seen.get(index, 0) == 12 - int(mlp.skipped_tokens)  # the MLP ran on the executed tokens only
    assert cache.get_seq_length(0) == 12 and seen[0] == 12


def test_batched_cached_generation_masks_the_skipped_keys():
    model = _routed(make_tiny_qwen2, "skip_mlp_attn")
    model.generation_config.eos_token_id = None
    prompts = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        generated = model.generate(prompts, max_new_tokens=6, do_sample=False, use_cache=True)
        expected = prompts
        for _ in range(6):
            logits = model(expected, use_cache=False).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


def test_mod_trains_its_causal_predictor_toward_the_capacity():
    """MoD (Sec. 3.5): top-k in training is exactly the capacity; the BCE term teaches the router's sign to match it."""
    model = _routed(make_tiny_qwen2, "mod", std=None)
    routers = [p for _, r in routers_of(model) for p in r.parameters()]
    optimizer = torch.optim.Adam(routers, lr=5e-2)
    batch = torch.randint(3, 300, (4, 16))
    with torch.no_grad():
        reset_skip_counters(model)
        model(batch, use_cache=False)
        before = skip_rates(model)
    model.train()
    for _ in range(15):
        reset_skip_counters(model)
        model(batch, use_cache=False)
        assert set(skip_rates(model).values()) == {0.5}  # top-k: exactly 8 of 16 tokens skip in training
        loss = routing_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        reset_skip_counters(model)
        model(batch, use_cache=False)
        after = skip_rates(model)
    assert all(b < 0.1 for b in before.values()) and all(0.3 < a < 0.7 for a in after.values()), (before, after)


# ---------------------------------------------------------------------------------------------------- training
class SkipRateRecorder(Callback):
    """Listed before DynamicDepthCallback, which resets the counters after each batch."""

    def __init__(self):
        self.rates, self.penalties = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rates = skip_rates(pl_module.model)
        self.rates.append(sum(rates.values()) / len(rates))
        self.penalties.append(float(trainer.callback_metrics["train_routing_penalty"]))


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory, equal_length_data):
    """A real fit: the tiny model (3 blocks), LoRA, D-LLM routers at ratio 0.5, exported."""
    root = tmp_path_factory.mktemp("routed")
    model_dir = str(save_tiny_model(root / "model", num_hidden_layers=LAYERS))
    module = PrunableCausalLM(model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2,
                              export_dir=str(root / "export"))
    base_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    routing, recorder = DynamicDepthCallback(kind="dllm", ratio=0.5, penalty_weight=10.0), SkipRateRecorder()
    trainer = _trainer([recorder, routing], root / "run", max_steps=10)
    data = PruneDataModule(target=GSM8K, distractors=[SQUAD], capture_samples=1, finetune=equal_length_data,
                           finetune_samples=None, val_samples=0, max_length=128, batch_size=4)
    trainer.fit(module, datamodule=data)
    return module, recorder, base_before, root / "export", trainer.callback_metrics


def _fresh_routers(model_dir: str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    install_routers(model, RoutingSpec(kind="dllm", ratio=0.5, penalty_weight=10.0))
    return {k: v for k, v in model.state_dict().items() if ".routing." in k}


def test_routers_train_with_lora_and_the_skip_rate_moves_toward_the_ratio(routed_run):
    module, recorder, base_before, _, metrics = routed_run
    rates = recorder.rates
    assert float(metrics["train_skip_rate"]) == pytest.approx(rates[-1])  # the callback's log of the last step
    assert len(rates) == 10 and rates[0] < 0.2  # routers start near dense (p(execute) = 0.9)
    assert 0.35 < sum(rates[-3:]) / 3 < 0.65, rates  # the penalty pulls it to 0.5 (measured: 0.09 -> 0.49)
    assert recorder.penalties[-1] < recorder.penalties[0], recorder.penalties
    after = module.model.state_dict()
    initial = _fresh_routers(module.model_name_or_path)  # the same seed: the routers as installed
    assert initial and all(not torch.equal(after[k], v) for k, v in initial.items())  # every router trained
    adapted = tuple(LoraSettings().target_modules)  # the export merged the LoRA deltas into these
    frozen = [k for k in base_before if ".routing." not in k and not any(f".{t}." in k for t in adapted)]
    assert frozen and all(torch.equal(after[k], base_before[k]) for k in frozen)  # norms, embeddings, head frozen
    assert module.label == "dllm-50%+lora"


def test_export_holds_the_routers_and_reloads_with_identical_logits(routed_run):
    module, _, _, export, _ = routed_run
    card = json.loads((export / "lit_prune.json").read_text())
    assert {ROUTERS_FILENAME, ROUTING_FILENAME} <= set(card["lit_prune_export"]["files"]) and is_export(export)
    assert card["routing"]["kind"] == "dllm" and card["routing"]["architecture"]["num_hidden_layers"] == LAYERS
    reloaded = load_routed(export)
    input_ids = torch.randint(3, 300, (2, 10))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, module.model(input_ids).logits, rtol=0, atol=0)


class RouterProbe(Callback):
    """What the routers hold when training starts (after a resumed checkpoint's weights loaded)."""

    def on_train_start(self, trainer, pl_module):
        self.routers = {k: v.clone() for k, v in pl_module.state_dict().items() if ".routing." in k}


def test_a_resumed_run_reinstalls_the_routers_and_loads_their_trained_weights(tmp_path, equal_length_data):
    model_dir = str(save_tiny_model(tmp_path / "model", num_hidden_layers=LAYERS))
    data = dict(target=GSM8K, distractors=[SQUAD], capture_samples=1, finetune=equal_length_data,
                finetune_samples=None, val_samples=0, max_length=128, batch_size=4)

    def fit(max_steps, ckpt_path=None):
        module = PrunableCausalLM(model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2)
        probe = RouterProbe()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
        trainer = _trainer([DynamicDepthCallback(kind="skip_mlp_attn", ratio=0.3), probe, checkpoint], tmp_path,
                           max_steps=max_steps, enable_checkpointing=True)
        trainer.fit(module, datamodule=PruneDataModule(**data), ckpt_path=ckpt_path)
        return probe

    fit(2)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    resumed = fit(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.routers and all(torch.equal(v, saved[k]) for k, v in resumed.routers.items())


# ---------------------------------------------------------------------------------------------------- save and load
def test_save_and_load_routed_round_trip_gives_identical_logits(tmp_path):
    model = _routed(make_tiny_llama, "skip_mlp_attn").float()
    model.save_pretrained(tmp_path)
    data = save_routers(model, tmp_path)
    assert data["architecture"] == {"model_type": "llama", "num_hidden_layers": LAYERS, "hidden_size": 64}
    reloaded = load_routed(tmp_path)
    input_ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("other", "match"), [
    (lambda: make_tiny_llama(num_hidden_layers=LAYERS + 1), r"num_hidden_layers 3 \(the model has 4\)"),
    (lambda: make_tiny_llama(num_hidden_layers=LAYERS, hidden_size=32), r"hidden_size 64 \(the model has 32\)"),
    (lambda: make_tiny_qwen2(num_hidden_layers=LAYERS), r"model_type 'llama' \(the model has 'qwen2'\)"),
])
def test_routers_are_refused_on_another_model(tmp_path, other, match):
    save_routers(_routed(make_tiny_llama, "dllm"), tmp_path)
    expected = rf"routing.json' holds routers trained for another model: they expect {match}"
    with pytest.raises(ValueError, match=expected):
        load_routers(other(), tmp_path)


def test_load_routed_needs_the_router_files(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no \['routing.json', 'routers.safetensors'\]"):
        load_routed(tmp_path)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ratio": 0.0}, r"`ratio` \(target fraction of tokens that skip a routed block\) must be in \(0, 1\); got 0.0"),
    ({"ratio": 1.0}, r"`ratio` .* must be in \(0, 1\); got 1.0"),
    ({"ratio": -0.2}, r"`ratio` .* must be in \(0, 1\); got -0.2"),
    ({"ratio": True}, r"`ratio` .* must be in \(0, 1\); got True"),
    ({"kind": "moe"}, r"`kind` must be one of \('mod', 'dllm', 'skip_mlp_attn'\); got 'moe'"),
    ({"penalty_weight": -1.0}, r"`penalty_weight` must be a finite number >= 0; got -1.0"),
    ({"router_hidden": 0}, r"`router_hidden` must be an integer >= 1; got 0"),
    ({"temperature": 0}, r"`temperature` must be a finite number > 0; got 0"),
])
def test_bad_arguments_fail_when_the_callback_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicDepthCallback(**kwargs)


class _HoldsModel(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.model(batch[0]).logits.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 50, (4, 6))))


def test_a_model_without_routable_blocks_fails_in_setup_before_training(tmp_path):
    module = _HoldsModel(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)))
    trainer = _trainer([DynamicDepthCallback()], tmp_path)
    with pytest.raises(ValueError, match=r"routers need decoder blocks with \['self_attn', 'mlp', 'input_layernorm', "
                                         r"'post_attention_layernorm'\]; GPT2Block in `transformer.h` lacks"):
        trainer.fit(module)
    assert module.steps == 0


def test_a_model_without_decoder_blocks_is_refused():
    class NoBlocks(torch.nn.Module):
        config = make_tiny_qwen2().config

    with pytest.raises(ValueError, match=r"routers need a list of decoder blocks, .* NoBlocks has no such list"):
        install_routers(NoBlocks(), RoutingSpec())


def test_routers_are_installed_once():
    model = _routed(make_tiny_qwen2, "dllm")
    with pytest.raises(ValueError, match=r"the model already has routers \(dllm-50%\); install routers once"):
        install_routers(model, RoutingSpec(kind="mod"))


# ---------------------------------------------------------------------------------------------------- the ratio
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_active_param_ratio_against_a_hand_computation(name):
    model = _routed(MAKERS[name], "skip_mlp_attn")
    rates = {(1, "attn"): 0.25, (1, "mlp"): 0.5, (2, "attn"): 0.0, (2, "mlp"): 1.0}
    for index, routing in routers_of(model):
        for unit, router in routing.routers.items():
            router.seen_tokens.fill_(8)
            router.skipped_tokens.fill_(int(8 * rates[index, unit]))
    c = model.config
    d, ff, heads, kv, head_dim = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, 16
    qkv_bias = (heads + 2 * kv) * head_dim if name == "qwen2" else 0  # Qwen2: q/k/v biases; Llama here: MLP biases
    attention = d * heads * head_dim * 2 + 2 * d * kv * head_dim + qkv_bias + d  # q, o, k, v, their norm
    mlp = 3 * d * ff + (2 * ff + d if name == "llama" else 0) + d
    embeddings = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    dense = embeddings + LAYERS * (attention + mlp) + d  # final norm
    router = 2 * (LAYERS - 1) * (d * 64 + 64 + 64 * 2 + 2)  # one MLP router per sub-block of blocks 1 and 2
    saved = 0.25 * attention + 0.5 * mlp + 1.0 * mlp
    assert routed_param_ratio(model) == pytest.approx((saved - router) / dense, rel=1e-12)
    assert active_param_ratio([0.5, 0.0], [100, 60], 1000, router_params=10) == pytest.approx(0.04)


@pytest.mark.parametrize(("args", "match"), [
    (([0.5], [1, 2], 10), r"one entry per unit; got 1 and 2"),
    (([1.5], [1], 10), r"`skip_rates` must be in \[0, 1\]; got \[1.5\]"),
    (([0.5], [1], 0), r"`dense_params` must be > 0; got 0"),
])
def test_active_param_ratio_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        active_param_ratio(*args)


# ---------------------------------------------------------------------------------------------------- the benchmark
@pytest.fixture
def _restore_torch_threads():
    """The benchmark fixes the thread count and flushes denormals; give the rest of the session its settings back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_speed_benchmark_reports_measured_skip_rates(tmp_path, _restore_torch_threads):
    spec = importlib.util.spec_from_file_location("_benchmark_routed_speed", ROOT / "benchmarks" / "routed_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "speed.json"
    payload = script.main(["--layers", "3", "--hidden", "64", "--heads", "4", "--vocab", "512", "--ratios", "0.5",
                           "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    models = payload["models"]
    assert list(models) == ["dense", "routed_50"]
    loop = models["routed_50"]["loop"]
    assert set(loop["skip_rates"]) == {"1", "2"} and 0.2 < loop["mean_skip_rate"] < 0.8  # calibrated to 0.5
    assert 0 < loop["active_param_ratio"] < loop["mean_skip_rate"] and loop["decode_limit"] > 1.0
    assert models["dense"]["loop"]["decode_limit"] == 1.0
    for entry in models.values():
        assert math.isfinite(entry["generate"]["median_tokens_per_s"])
        assert math.isfinite(entry["loop"]["median_tokens_per_s"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
