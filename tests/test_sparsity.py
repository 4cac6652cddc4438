"""Weight sparsity masks: each method against an independent reference, N:M and exact counts through LoRA recovery,
export and resume, the errors, and a smoke run of ``benchmarks/sparsity_time.py``."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math

import pytest
import torch
from conftest import make_tiny_qwen2
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from transformers import AutoModelForCausalLM

from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback, WeightSparsityCallback
from lit_prune.data import PruneDataModule
from lit_prune.module import LoraSettings, PrunableCausalLM
from lit_prune.pruning.sparsity import (
    METHODS,
    InputRecorder,
    SparsityResult,
    SparsitySpec,
    measure_sparsity,
    n_m_violations,
    pack_mask,
    prune_model,
    ria_scores,
    select_mask,
    sparsegpt_prune,
    target_linears,
    unpack_mask,
    wanda_scores,
)

from conftest import DIALOG, GSM8K, ROOT, SQUAD
from conftest import make_trainer as _trainer

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def batches():
    """Right-padded calibration batches with ragged lengths (padding must never count)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for lengths in ((12, 7, 3), (9, 9, 5, 1)):
        width = max(lengths)
        ids = torch.randint(3, 380, (len(lengths), width), generator=generator)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append((ids * mask, mask))
    return out


@pytest.fixture(scope="module")
def long_batches():
    """More valid tokens (about 400) than the widest input (256): a full-rank Hessian, as in real calibration."""
    generator = torch.Generator().manual_seed(2)
    out = []
    for _ in range(5):
        lengths = torch.randint(60, 97, (4,), generator=generator)
        ids = torch.randint(3, 380, (4, 96), generator=generator)
        mask = (torch.arange(96)[None, :] < lengths[:, None]).long()
        out.append((ids * mask, mask))
    return out


def _rounded(sparsity: float, numel: int) -> int:
    return math.floor(sparsity * numel + 0.5)


@torch.no_grad()
def _reference_inputs(model: nn.Module, batches, unpadded: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Every decoder linear's valid-token inputs, ``sum x^2`` and ``X X^T``: one unpadded sequence at a time, or
    (``unpadded=False``, faster) the padded batch with its padding rows dropped."""
    inputs: dict[str, list[torch.Tensor]] = {}
    valid: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: inputs.setdefault(name, []).append(
                    args[0].reshape(-1, args[0].shape[-1])[valid[-1]])))
    try:
        for input_ids, attention_mask in batches:
            if not unpadded:
                valid.append(attention_mask.reshape(-1) > 0)
                model(input_ids=input_ids, attention_mask=attention_mask)
                continue
            for row, row_mask in zip(input_ids, attention_mask):
                length = int(row_mask.sum())
                if length:
                    valid.append(torch.ones(length, dtype=torch.bool))
                    model(input_ids=row[None, :length])  # no padding at all
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).double()
        stats[name] = {"sq_sum": (x * x).sum(0), "hessian": x.T @ x}
    return stats


# ---------------------------------------------------------------------------------------------------- statistics
def test_input_statistics_skip_padding_and_match_unpadded_sequences(batches):
    model = make_tiny_qwen2()
    linears = target_linears(model)
    assert len(linears) == 14 and not any("embed" in n or "lm_head" in n for n in linears)
    recorder = InputRecorder(linears, hessian=True)
    with recorder.recording():
        for input_ids, attention_mask in batches:
            recorder.observe(functools.partial(model, input_ids=input_ids, attention_mask=attention_mask),
                             attention_mask)
    reference = _reference_inputs(model, batches)
    assert int(recorder.tokens) == sum(int(m.sum()) for _, m in batches) == 46
    for name in linears:
        torch.testing.assert_close(recorder.sq_sums[name], reference[name]["sq_sum"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recorder.hessians[name], reference[name]["hessian"], rtol=1e-5, atol=1e-5)


def test_masks_pack_round_trip():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == math.ceil(91 / 8)
    assert torch.equal(unpack_mask(packed), mask)


# ---------------------------------------------------------------------------------------------------- references
def _naive_scores(method: str, weight: torch.Tensor, sq_sum: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The papers' formulas, one weight at a time."""
    w = weight.double()
    rows, cols = w.shape
    norms = [math.sqrt(float(sq_sum[j])) for j in range(cols)]
    row_sums = [float(w[i].abs().sum()) for i in range(rows)]
    col_sums = [float(w[:, j].abs().sum()) for j in range(cols)]
    scores = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            a = abs(float(w[i, j]))
            if method == "magnitude":
                scores[i, j] = a
            elif method == "wanda":
                scores[i, j] = a * norms[j]
            else:
                scores[i, j] = (a / col_sums[j] + a / row_sums[i]) * norms[j] ** alpha
    return scores


def _naive_keep(scores: torch.Tensor, sparsity: float, scope: str, n_m) -> torch.Tensor:
    rows, cols = scores.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if n_m is not None:
        n, m = n_m
        for i in range(rows):
            for start in range(0, cols, m):
                group = sorted(range(start, start + m), key=lambda j: float(scores[i, j]))
                for j in group[:n]:
                    keep[i, j] = False
    elif scope == "row":
        for i in range(rows):
            for j in sorted(range(cols), key=lambda j: float(scores[i, j]))[:round(sparsity * cols)]:
                keep[i, j] = False
    else:
        order = sorted(range(rows * cols), key=lambda f: float(scores.view(-1)[f]))
        for flat in order[:_rounded(sparsity, rows * cols)]:
            keep.view(-1)[flat] = False
    return keep


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria"])
def test_score_methods_match_a_naive_reference(batches, method, pattern):
    model = make_tiny_qwen2()
    dense = copy.deepcopy(model)
    spec = SparsitySpec(method, pattern, targets=["k_proj", "down_proj"])
    result = prune_model(model, batches, spec)
    reference = _reference_inputs(dense, batches)
    scope = {"magnitude": "layer", "wanda": "row", "ria": "layer"}[method]
    assert set(result.masks) == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.k_proj", "mlp.down_proj")}
    for name, keep in result.masks.items():
        weight = dense.get_submodule(name).weight.detach()
        scores = _naive_scores(method, weight, reference[name]["sq_sum"])
        assert torch.equal(keep, _naive_keep(scores, spec.sparsity, scope, spec.n_m)), name
        pruned_weight = model.get_submodule(name).weight
        assert torch.equal(pruned_weight, weight * keep)  # zeros exactly where pruned, the rest untouched
    untouched = {n: p for n, p in model.named_parameters() if "k_proj" not in n and "down_proj" not in n}
    assert all(torch.equal(p, dense.get_parameter(n)) for n, p in untouched.items())


@pytest.mark.parametrize("sparsity", [0.3, 0.55])
def test_unstructured_counts_are_exact_when_rows_cannot_share_evenly(sparsity):
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(48, 64, generator=generator, dtype=torch.float64)
    for scope in ("row", "layer"):
        keep = select_mask(scores, sparsity, scope)
        pruned = (~keep).sum(dim=1)
        assert int(pruned.sum()) == _rounded(sparsity, scores.numel())  # exact to one weight per layer
        if scope == "row":
            assert int(pruned.max() - pruned.min()) <= 1
            for row, row_keep in zip(scores, keep):  # each row prunes its own lowest scores
                assert float(row[~row_keep].max()) <= float(row[row_keep].min())
        else:
            assert float(scores[~keep].max()) <= float(scores[keep].min())


def test_ria_scores_handle_an_all_zero_row():
    weight = torch.randn(4, 8, dtype=torch.float64)
    weight[1] = 0
    scores = ria_scores(weight, torch.ones(8, dtype=torch.float64))
    assert torch.isfinite(scores).all() and torch.equal(scores[1], torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(wanda_scores(weight, torch.full((8,), 4.0)), weight.abs() * 2)


def _obs_reference(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, n_m, damping: float,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook Optimal Brain Surgeon, one column at a time (no Cholesky factor, no lazy block updates): pruning
    column i moves the later columns by -(w - q) / [H_F^-1]_00 times row 0 of H_F^-1, F = {i, ..., n-1}, and the
    inverse of the remaining columns' Hessian is the Schur-complement downdate of the previous one (Hassibi & Stork).
    Masks are chosen as SparseGPT does: per block of columns (unstructured) on the weights at the block's start, per
    group of M when the loop reaches it (N:M), scored by w^2 / [H_F^-1]_00."""
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    h += damping * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    inverse, trailing_rows = torch.linalg.inv(h), []
    for _ in range(cols):  # row 0 of (H[i:, i:])^-1 for every i, by eliminating one column after the other
        trailing_rows.append(inverse[0].clone())
        inverse = inverse[1:, 1:] - torch.outer(inverse[1:, 0], inverse[0, 1:]) / inverse[0, 0]
    diagonal = torch.stack([row[0] for row in trailing_rows])
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if n_m is None and i % block_size == 0:
            end = min(i + block_size, cols)
            scores = w[:, i:end] ** 2 / diagonal[i:end]
            count = _rounded(sparsity, rows * end) - _rounded(sparsity, rows * i)
            block = torch.zeros(rows * (end - i), dtype=torch.bool)
            block[scores.reshape(-1).argsort()[:count]] = True
            pruned[:, i:end] = block.reshape(rows, end - i)
        if n_m is not None and i % n_m[1] == 0:
            for r in range(rows):
                scores = [float(w[r, j] ** 2 / diagonal[j]) for j in range(i, i + n_m[1])]
                for j in sorted(range(n_m[1]), key=lambda j: scores[j])[:n_m[0]]:
                    pruned[r, i + j] = True
        q = torch.where(pruned[:, i], torch.zeros_like(w[:, i]), w[:, i])
        w[:, i:] -= torch.outer((w[:, i] - q) / diagonal[i], trailing_rows[i])
        w[:, i] = q
    return w, ~pruned


@pytest.mark.parametrize(("sparsity", "n_m"), [(0.5, None), (0.3, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_sparsegpt_matches_the_per_column_obs_reference(sparsity, n_m):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 96, generator=generator, dtype=torch.float64)
    inputs = torch.randn(400, 96, generator=generator, dtype=torch.float64) @ torch.randn(96, 96, generator=generator,
                                                                                        dtype=torch.float64)
    hessian = inputs.T @ inputs
    updated, keep = sparsegpt_prune(weight, hessian, sparsity, n_m, damping=0.01, block_size=32, dtype=torch.float64)
    expected, expected_keep = _obs_reference(weight, hessian, sparsity, n_m, 0.01, 32)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(updated, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(updated == 0, ~keep)
    if n_m is None:
        assert int((~keep).sum()) == _rounded(sparsity, weight.numel())
    else:
        assert n_m_violations(updated, *n_m) == 0
    # The updates compensate: the layer's output error on the calibration inputs beats zeroing the same weights.
    error = ((inputs @ (updated - weight).T) ** 2).sum()
    assert error < ((inputs @ (weight * keep - weight).T) ** 2).sum()


def test_sparsegpt_factor_is_the_references_upper_cholesky_of_the_damped_inverse():
    from lit_prune.pruning.sparsity import _inverse_cholesky_upper

    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(300, 700, generator=generator, dtype=torch.float64)  # rank 300 < 700: damping matters
    hessian = inputs.T @ inputs
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(700, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)  # reference
    factor = _inverse_cholesky_upper(hessian, 0.01)  # 700 > the 512 leaf: the blocked inverse runs
    torch.testing.assert_close(factor, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(factor.T @ factor, torch.linalg.inv(damped), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_calibrates_each_layer_on_the_pruned_earlier_layers(long_batches, pattern):
    batches = long_batches
    model = make_tiny_qwen2()
    dense = copy.deepcopy(model)
    spec = SparsitySpec("sparsegpt", pattern)
    assert spec.is_sequential
    prune_model(model, batches, spec, compute_dtype=torch.float64)
    hybrid = copy.deepcopy(dense)  # layers < l as the result pruned them, layer l still dense
    for index in range(2):
        if index:
            hybrid.model.layers[index - 1].load_state_dict(model.model.layers[index - 1].state_dict())
        reference = _reference_inputs(hybrid, batches, unpadded=False)
        for linear in LINEARS:
            name = next(n for n in reference if n.startswith(f"model.layers.{index}.") and n.endswith(linear))
            weight = dense.get_submodule(name).weight
            expected, expected_keep = _obs_reference(weight, reference[name]["hessian"], spec.sparsity, spec.n_m,
                                                     spec.damping, spec.block_size)
            got = model.get_submodule(name).weight
            assert torch.equal(got == 0, ~expected_keep), name
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    # Layer 1 really saw pruned inputs: the dense model's layer-1 statistics differ.
    dense_inputs = _reference_inputs(dense, batches, unpadded=False)["model.layers.1.self_attn.q_proj"]["sq_sum"]
    assert not torch.allclose(dense_inputs, reference["model.layers.1.self_attn.q_proj"]["sq_sum"], rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_leaves_the_model_unchanged(batches, method):
    model = make_tiny_qwen2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    result = prune_model(model, batches, SparsitySpec(method, sparsity=0.0))
    assert not calls  # nothing to remove: no calibration either
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(bool(m.all()) for m in result.masks.values()) and len(result.masks) == 14


def test_measure_sparsity_counts_zeros_per_layer_and_overall():
    model = make_tiny_qwen2()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :64] = 0  # 64 x 64 of 64 x 256
    measured = measure_sparsity(model, ["down_proj"], n_m=(2, 4))
    assert measured["per_layer"] == {"model.layers.0.mlp.down_proj": 0.25, "model.layers.1.mlp.down_proj": 0.0}
    assert measured["zeros"] == 64 * 64 and measured["weights"] == 2 * 64 * 256
    assert measured["overall"] == pytest.approx(0.125)
    assert measured["n_m_violations"] == 2 * 64 * 64 - 64 * 16  # groups of 4 with < 2 zeros


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "obs"}, r"`method` must be one of \('magnitude', 'wanda', 'sparsegpt', 'ria'\); got 'obs'"),
    ({"sparsity": 1.0}, r"`sparsity` .* must be in \[0, 1\); got 1.0"),
    ({"sparsity": -0.1}, r"`sparsity` .* must be in \[0, 1\); got -0.1"),
    ({"sparsity": "half"}, r"`sparsity` .* must be in \[0, 1\); got 'half'"),
    ({"pattern": "4:2"}, r"`pattern` must be 'unstructured' or 'N:M' with integers 0 < N < M .*; got '4:2'"),
    ({"pattern": "0:4"}, r"`pattern` must be .*; got '0:4'"),
    ({"pattern": "dense"}, r"`pattern` must be .*; got 'dense'"),
    ({"pattern": "2:4", "sparsity": 0.25}, r"`sparsity`=0.25 contradicts `pattern`='2:4', which removes N/M = 0.5"),
    ({"targets": "q_proj"}, r"`targets` must be a list of module names .*; got 'q_proj'"),
    ({"targets": []}, r"`targets` must be a non-empty list"),
    ({"targets": ["q_proj", "q_proj"]}, r"`targets` names a module twice"),
    ({"alpha": -1}, r"`alpha` .* must be a number >= 0; got -1"),
    ({"damping": 0}, r"`damping` .* must be in \(0, 1\); got 0"),
    ({"block_size": 0}, r"`block_size` must be an integer >= 1; got 0"),
    ({"pattern": "4:8", "block_size": 100}, r"`block_size`=100 must be a multiple of M=8"),
    ({"sequential": "yes"}, r"`sequential` must be true, false or null; got 'yes'"),
    ({"calibration": "all"}, r"`calibration` must be one of \('target', 'distractor', 'both'\); got 'all'"),
    ({"capture": "tokens"}, r"`capture` must be one of \('prompt', 'response'\); got 'tokens'"),
    ({"batch_size": 0}, r"`batch_size` must be an integer >= 1; got 0"),
    ({"max_length": 1.5}, r"`max_length` must be an integer >= 1; got 1.5"),
    ({"target_prompts": "What is 2 + 3?"}, r"`target_prompts` must be a list of strings, not one string"),
    ({"target_prompts": []}, r"`target_prompts` is empty"),
    ({"target_prompts": ["a"], "target_responses": ["x", "y"]}, r"`target_responses` must have one response per"),
])
def test_bad_arguments_fail_when_the_callback_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightSparsityCallback(**kwargs)


def _datamodule(**overrides):
    kwargs = dict(target=GSM8K, distractors=[SQUAD, DIALOG], capture_samples=8, finetune=GSM8K, finetune_samples=16,
                  val_samples=0, max_length=256, batch_size=4)
    kwargs.update(overrides)
    return PruneDataModule(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"targets": ["q_proj", "c_attn"]},
     r"`targets` \['c_attn'\] match no nn.Linear inside the decoder layers; the model's are \['down_proj', "
     r"'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"),
    ({"pattern": "2:3", "block_size": 126},
     r"`pattern`='2:3' needs the input width of every targeted layer to be a multiple of M=3; 14 are not: "
     r"\['model.layers.0.self_attn.q_proj \(in_features 64\)'"),
])
def test_model_dependent_errors_fail_before_any_forward_pass(tmp_path, tiny_dir, kwargs, match):
    module = PrunableCausalLM(tiny_dir)
    callback = WeightSparsityCallback(target_prompts=["What is 2 plus 3?"], **kwargs)
    trainer = _trainer([callback], tmp_path)
    trainer.strategy.connect(module)
    calls = []
    module.model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=match):
        callback.sparsify(trainer, module)
    assert not calls and callback.result is None


def test_sparsity_before_width_pruning_is_refused(tmp_path, tiny_dir):
    module = PrunableCausalLM(tiny_dir)
    trainer = _trainer([WeightSparsityCallback(), ActivationCaptureCallback(),
                        SelectivityPruneCallback(0.25, multiple_of=32)], tmp_path)
    with pytest.raises(ValueError, match=r"WeightSparsityCallback comes before SelectivityPruneCallback"):
        trainer.fit(module, datamodule=_datamodule())


def test_calibration_needs_texts(tmp_path, tiny_dir):
    module = PrunableCausalLM(tiny_dir)
    callback = WeightSparsityCallback(calibration="both", target_prompts=["What is 2 plus 3?"])
    trainer = _trainer([callback], tmp_path)
    trainer.strategy.connect(module)
    with pytest.raises(ValueError, match=r"calibration='both'\) needs `distractor_prompts`, or a datamodule"):
        callback.sparsify(trainer, module)


# ---------------------------------------------------------------------------------------------------- Lightning
class MaskProbe(Callback):
    """Listed after the sparsity callback: what the model holds when training starts and what LoRA learned."""

    def __init__(self, sparsity: WeightSparsityCallback):
        self.sparsity = sparsity

    def on_train_start(self, trainer, pl_module):
        result = self.sparsity.result
        self.held_at_start = result.is_held(pl_module.model)
        self.violations_at_start = measure_sparsity(pl_module.model, None, result.spec.n_m).get("n_m_violations")
        self.base = {n: linear.weight.detach().clone() for n, linear in result.linears(pl_module.model).items()}

    def on_train_end(self, trainer, pl_module):
        # The adapters' update is dense: merged as it is, it would fill the masked weights.
        base = pl_module.model.get_base_model()
        self.delta_on_masked = 0.0
        for name, keep in self.sparsity.result.masks.items():
            delta = base.get_submodule(name).get_delta_weight("default").detach()
            self.delta_on_masked = max(self.delta_on_masked, float(delta[~keep].abs().max()))


@pytest.mark.parametrize(("method", "pattern", "sparsity"), [("wanda", "2:4", None), ("sparsegpt", "4:8", None),
                                                            ("ria", "unstructured", 0.3)])
def test_masks_hold_through_lora_recovery_and_export(tmp_path, tiny_dir, method, pattern, sparsity):
    export = tmp_path / "export"
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2,
                              export_dir=str(export))
    callback = WeightSparsityCallback(method, pattern, sparsity, batch_size=4, max_length=128)
    probe = MaskProbe(callback)
    trainer = _trainer([callback, probe], tmp_path, max_steps=4)
    trainer.fit(module, datamodule=_datamodule())
    spec, masks = callback.result.spec, callback.result.masks
    assert len(masks) == 14 and probe.held_at_start
    assert probe.delta_on_masked > 1e-4  # without the re-mask, the zeros would be lost
    assert not module.is_lora_wrapped
    final = target_linears(module.model)
    # LoRA trained: the kept weights moved; the masked ones are exactly zero.
    assert any(not torch.equal(final[n].weight, probe.base[n]) for n in masks)
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    for model in (module.model, reloaded):
        assert callback.result.is_held(model)
        measured = measure_sparsity(model, None, spec.n_m)
        if spec.n_m is not None:
            assert probe.violations_at_start == 0 and measured["n_m_violations"] == 0
        for name, linear in target_linears(model).items():  # exact to one weight per layer, no zero besides the mask
            assert measured["per_layer_zeros"][name] == int((~masks[name]).sum()) == _rounded(spec.sparsity,
                                                                                                linear.weight.numel())
    for name, linear in target_linears(reloaded).items():
        assert torch.equal(linear.weight, final[name].weight)
    card = json.loads((export / "lit_prune.json").read_text())["sparsity"]
    assert (card["method"], card["pattern"], card["sparsity"]) == (method, spec.pattern, spec.sparsity)
    assert card["measured"] == measure_sparsity(reloaded, None, spec.n_m)
    assert card["provenance"]["calibration"] == "target" and card["provenance"]["tokens"] > 0


def test_full_fine_tuning_keeps_the_masks_every_step(tmp_path, tiny_dir):
    module = PrunableCausalLM(tiny_dir, learning_rate=1e-2)  # no LoRA: the base weights train
    callback = WeightSparsityCallback("magnitude", "2:4")

    class EveryStep(Callback):
        def __init__(self):
            self.violations = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.violations.append(measure_sparsity(pl_module.model, None, (2, 4))["n_m_violations"])

    probe = EveryStep()
    trainer = _trainer([callback, probe], tmp_path, max_steps=3)
    trainer.fit(module, datamodule=_datamodule())
    assert probe.violations == [0, 0, 0] and callback.result.is_held(module.model)


def _resume_run(tmp_path, tiny_dir, max_steps, ckpt_path=None, method="sparsegpt"):
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2)
    sparsity = WeightSparsityCallback(method, "2:4", batch_size=4, max_length=128)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    callbacks = [ActivationCaptureCallback(progress=False, max_length=128),
                 SelectivityPruneCallback(0.25, "selective", multiple_of=32), sparsity, checkpoint]
    trainer = _trainer(callbacks, tmp_path, max_steps=max_steps, enable_checkpointing=True)
    if ckpt_path:
        trainer.ckpt_path = ckpt_path
    trainer.fit(module, datamodule=_datamodule())
    return module, sparsity, trainer


def test_resume_keeps_the_masks_without_calibrating(tmp_path, tiny_dir, monkeypatch):
    _, first_sparsity, _ = _resume_run(tmp_path, tiny_dir, max_steps=2)
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert set(checkpoint["lit_prune"]) == {"plan", "sparsity"}  # width plan and masks side by side
    stored = SparsityResult.from_checkpoint(checkpoint["lit_prune"]["sparsity"])
    assert stored.same_masks(first_sparsity.result) and stored.spec == first_sparsity.spec

    import lit_prune.callbacks.sparsity as sparsity_module

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run must not calibrate again")

    monkeypatch.setattr(sparsity_module, "prune_model", no_calibration)
    resumed, resumed_sparsity, trainer = _resume_run(tmp_path, tiny_dir, max_steps=4, ckpt_path=str(last))
    assert trainer.global_step == 4
    assert resumed_sparsity.result.same_masks(first_sparsity.result)
    assert all(b.mlp.down_proj.in_features == 192 for b in resumed.model.model.layers)  # sliced, then masked
    assert resumed_sparsity.result.is_held(resumed.model)
    assert measure_sparsity(resumed.model, None, (2, 4))["n_m_violations"] == 0

    # Other settings against the stored masks: refused in setup, before anything runs.
    with pytest.raises(ValueError, match=r"other settings than this WeightSparsityCallback \(wanda 2:4\): method: "
                                         r"checkpoint 'sparsegpt', callback 'wanda'"):
        _resume_run(tmp_path, tiny_dir, max_steps=6, ckpt_path=str(last), method="wanda")


def test_fit_with_ckpt_path_adopts_the_checkpoints_masks(tmp_path, tiny_dir):
    model = make_tiny_qwen2()
    spec = SparsitySpec("magnitude", "2:4")
    stored = prune_model(copy.deepcopy(model), [], spec)
    module = PrunableCausalLM(tiny_dir)
    callback = WeightSparsityCallback("magnitude", "2:4")
    callback.result = prune_model(module.model, [], spec)  # what this run computed in setup
    flipped = {n: ~m for n, m in stored.masks.items()}  # the checkpoint's masks differ
    checkpoint = {"lit_prune": {"sparsity": SparsityResult(spec, flipped).to_checkpoint()}}
    callback.adopt_checkpoint(module, checkpoint)
    assert callback.result.same_masks(SparsityResult(spec, flipped))
    assert callback.result.is_held(module.model)


@pytest.mark.slow
def test_ddp_spawn_reduces_the_statistics(tmp_path, tiny_dir):
    """Two ranks, each with half the calibration texts, end with the masks and weights of one process."""
    exports, cards = {}, {}
    for devices in (1, 2):
        export = tmp_path / f"export{devices}"
        module = PrunableCausalLM(tiny_dir, export_dir=str(export))
        callback = WeightSparsityCallback("sparsegpt", "unstructured", 0.5, batch_size=3, max_length=128)
        trainer = _trainer([callback], tmp_path / str(devices), devices=devices, max_steps=0,
                           strategy="ddp_spawn" if devices > 1 else "auto")
        trainer.fit(module, datamodule=_datamodule())
        reloaded = AutoModelForCausalLM.from_pretrained(export)
        assert measure_sparsity(reloaded)["overall"] == pytest.approx(0.5, abs=1e-6)
        cards[devices] = json.loads((export / "lit_prune.json").read_text())["sparsity"]["provenance"]
        exports[devices] = target_linears(reloaded)
    assert cards[2]["world_size"] == 2 and cards[2]["tokens"] == cards[1]["tokens"] > 0  # summed over the ranks
    for name, linear in exports[1].items():
        other = exports[2][name].weight
        assert torch.equal(linear.weight == 0, other == 0), name
        torch.testing.assert_close(other, linear.weight, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- benchmark
@pytest.fixture
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.mark.slow  # 9 s: runs both sparsity benchmarks end to end
def test_benchmark_smoke(tmp_path, _restore_torch_threads):
    spec = importlib.util.spec_from_file_location("_benchmark_sparsity_time", ROOT / "benchmarks" / "sparsity_time.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "sparsity.json"
    payload = script.main(["--layers", "1", "--vocab", "64", "--intermediate-size", "128", "--sequences", "2",
                           "--tokens", "8", "--batch-size", "2", "--threads", "1", "--out", str(out)])
    assert payload["benchmark"] == "sparsity_time" and json.loads(out.read_text()) == json.loads(json.dumps(payload))
    runs = {(r["method"], r["pattern"]) for r in payload["results"]}
    assert runs == {(m, p) for m in METHODS for p in ("unstructured", "2:4")}
    for row in payload["results"]:
        assert row["measured_sparsity"] == pytest.approx(0.5)
        assert row["seconds"]["total"] > 0 and row["peak_memory"]["peak_bytes"] > 0
        assert row["extrapolated_total_s"] == pytest.approx(row["per_layer_s"] * 24)
