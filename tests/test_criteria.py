"""Every width criterion against an independent reference computation on a tiny model, and the OBS/re-fit maths.

The references keep what the streaming statistics avoid: the whole (tokens x d_ff) activation matrix of every
layer, recomputed from the MLP *input* as ``act(gate(x)) * up(x)`` (not read from the down_proj hook the
recorder uses), and gradients from ``loss.backward()`` with ``retain_grad`` instead of ``autograd.grad``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import make_tiny_qwen2

from lit_prune.pruning import (
    CRITERIA,
    ActivationRecorder,
    PruneSpec,
    compute_scores,
    find_swiglu_mlps,
    make_plan,
    obs_select,
    refit_down,
)


def _batches(seed: int, count: int, vocab: int = 300, length: int = 10):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        input_ids = torch.randint(3, vocab, (3, length), generator=generator)
        lengths = torch.randint(2, length + 1, (3,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        yield input_ids, mask


def _labels(input_ids, mask):
    labels = input_ids.clone()
    labels[:, :2] = -100  # a "prompt" of two tokens
    labels[mask == 0] = -100
    return labels


def _reference(model, batches):
    """Per layer: list over prompts of the (valid tokens, d_ff) matrix h, recomputed from the MLP input."""
    blocks = find_swiglu_mlps(model)
    inputs = {}
    handles = [b.module.register_forward_pre_hook(lambda m, a, i=b.layer_index: inputs.__setitem__(i, a[0]))
               for b in blocks]
    per_layer = [[] for _ in blocks]
    try:
        for input_ids, mask in batches:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=mask)
            for b in blocks:
                x = inputs[b.layer_index].double()
                h = F.silu(x @ b.gate_proj.weight.double().T) * (x @ b.up_proj.weight.double().T)
                for row in range(len(input_ids)):
                    per_layer[b.layer_index].append(h[row, mask[row].bool()])
    finally:
        for handle in handles:
            handle.remove()
    return per_layer


def _reference_gradients(model, batches):
    """Per layer: list over prompts of sum_t h * dL/dh (valid tokens), by backward() with retain_grad."""
    blocks = find_swiglu_mlps(model)
    stash = {}

    def keep(module, args, i):
        args[0].retain_grad()
        stash[i] = args[0]

    handles = [b.down_proj.register_forward_pre_hook(lambda m, a, i=b.layer_index: keep(m, a, i)) for b in blocks]
    per_layer = [[] for _ in blocks]
    try:
        for input_ids, mask in batches:
            model.zero_grad()
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits
            labels = _labels(input_ids, mask)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
            loss.backward()
            for b in blocks:
                h, g = stash[b.layer_index], stash[b.layer_index].grad
                per_layer[b.layer_index].extend(((h * g).double() * mask[..., None]).sum(1).detach())
    finally:
        for handle in handles:
            handle.remove()
    return per_layer


@pytest.fixture(scope="module")
def captured():
    """Statistics of one capture (forward, Gram, gradients) of the tiny Qwen2 model and the references' inputs;
    shared by the tests of this module, which never modify ``make_tiny_qwen2()``'s weights in place."""
    tiny_qwen2 = make_tiny_qwen2()
    target, distractor = list(_batches(0, 4)), list(_batches(1, 3))
    recorder = ActivationRecorder(tiny_qwen2, gram=True, gradients=True)
    with recorder.recording():
        for input_ids, mask in target:
            recorder.observe(tiny_qwen2, input_ids, mask, "target")
        for input_ids, mask in distractor:
            recorder.observe(tiny_qwen2, input_ids, mask, "distractor")
        for input_ids, mask in target:
            recorder.observe_gradients(tiny_qwen2, input_ids, mask, _labels(input_ids, mask))
    return recorder.finalize(), _reference(tiny_qwen2, target), _reference(tiny_qwen2, distractor), target


def _expected(name, model, target, distractor, target_batches):
    blocks = find_swiglu_mlps(model)
    rows = []
    for b in blocks:
        t = torch.cat(target[b.layer_index])
        d = torch.cat(distractor[b.layer_index])
        down = b.down_proj.weight.double()
        if name == "selective":  # per-token aggregation
            pooled = torch.cat([t, d]).abs()
            rows.append((t.abs().mean(0) - d.abs().mean(0)) / (pooled.std(0, unbiased=True) + 1e-6))
        elif name == "reverse":
            pooled = torch.cat([t, d]).abs()
            rows.append(-(t.abs().mean(0) - d.abs().mean(0)) / (pooled.std(0, unbiased=True) + 1e-6))
        elif name == "target_mean":
            rows.append(t.abs().mean(0))
        elif name == "magnitude":
            rows.append((b.gate_proj.weight.double().pow(2).sum(1) + b.up_proj.weight.double().pow(2).sum(1)
                         + down.pow(2).sum(0)).sqrt())
        elif name == "wanda_sp":
            rows.append(down.abs().mean(0) * (t.pow(2).sum(0) / len(t)).sqrt())
        elif name == "flap":
            rows.append(t.var(0, unbiased=True) * down.pow(2).sum(0))
        elif name == "minitron":
            rows.append(torch.stack([p.abs().mean(0) for p in target[b.layer_index]]).pow(2).sum(0).sqrt())
        elif name == "energy":
            rows.append(down.pow(2).sum(0) * t.pow(2).sum(0))
        elif name == "compensated":
            gram = t.T @ t
            gram = gram + 0.01 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
            rows.append(down.pow(2).sum(0) / torch.linalg.inv(gram).diagonal())
    if name in ("taylor", "taylor_fisher"):
        grads = _reference_gradients(model, target_batches)
        rows = [torch.stack(g).sum(0).abs() if name == "taylor" else torch.stack(g).pow(2).sum(0) for g in grads]
    return torch.stack(rows)


@pytest.mark.parametrize("name", [c for c in CRITERIA if c != "random"])
def test_criterion_matches_an_independent_reference(tiny_qwen2, captured, name):
    stats, target, distractor, target_batches = captured
    scores = compute_scores(stats, name, find_swiglu_mlps(tiny_qwen2), aggregation="token")
    expected = _expected(name, tiny_qwen2, target, distractor, target_batches)
    torch.testing.assert_close(scores, expected, rtol=2e-4, atol=1e-7)


def test_gram_matches_the_activation_matrix(tiny_qwen2, captured):
    stats, target, _, _ = captured
    for layer, prompts in enumerate(target):
        h = torch.cat(prompts)
        torch.testing.assert_close(stats.gram(layer), h.T @ h, rtol=1e-4, atol=1e-6)


def test_refit_equals_least_squares():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(400, 24, generator=generator, dtype=torch.float64) @ torch.randn(24, 24, generator=generator,
                                                                                      dtype=torch.float64)
    weight = torch.randn(8, 24, generator=generator, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5, 8, 9, 13, 14, 15, 17, 20, 23])
    refit = refit_down(weight, h.T @ h, kept, damping=0.0)
    solution = torch.linalg.lstsq(h[:, kept], h @ weight.T).solution.T
    torch.testing.assert_close(refit, solution, rtol=1e-8, atol=1e-9)


def _greedy_from_scratch(weight, gram, keep):
    """Exact greedy OBS without downdates: re-solve the least squares on the remaining set at every step."""
    alive = list(range(gram.shape[0]))
    while len(alive) > keep:
        inverse = torch.linalg.inv(gram[alive][:, alive])
        fitted = (weight @ gram[:, alive]) @ inverse  # least-squares fit of W on the remaining neurons
        errors = fitted.pow(2).sum(0) / inverse.diagonal()
        alive.pop(int(errors.argmin()))
    return torch.tensor(alive)


def test_obs_greedy_equals_a_from_scratch_greedy():
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(300, 20, generator=generator, dtype=torch.float64) @ torch.randn(20, 20, generator=generator,
                                                                                      dtype=torch.float64)
    weight = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    gram = h.T @ h
    ours = obs_select(weight, gram, keep=9, group_size=1, damping=0.0)
    assert ours.tolist() == _greedy_from_scratch(weight, gram, 9).tolist()


def test_compensated_plan_lowers_the_layer_output_error(tiny_qwen2, captured):
    stats, target, _, _ = captured
    blocks = find_swiglu_mlps(tiny_qwen2)
    originals = [b.down_proj.weight.detach().double().clone() for b in blocks]
    compensated = make_plan(tiny_qwen2, stats, PruneSpec(0.5, "compensated", multiple_of=8))
    plain = make_plan(tiny_qwen2, stats, PruneSpec(0.5, "energy", multiple_of=8))
    refit = make_plan(tiny_qwen2, stats, PruneSpec(0.5, "energy", multiple_of=8, refit=True))
    assert compensated.down_weights is not None and plain.down_weights is None
    assert refit.plan.label == "energy+refit" and compensated.plan.label == "compensated"
    for layer, prompts in enumerate(target):
        h = torch.cat(prompts)
        reference = h @ originals[layer].T

        def error(result):
            kept = torch.tensor(result.plan.kept_indices[layer])
            weight = result.down_weights[layer] if result.down_weights is not None else originals[layer][:, kept]
            return float((h[:, kept] @ weight.detach().T - reference).pow(2).sum())

        assert error(refit) < error(plain)
        assert error(compensated) < error(plain)
    # Applying writes the re-fitted weights into the sliced model.
    compensated.apply(tiny_qwen2)  # the function-scoped fixture: a fresh copy of the same weights
    for block, weight in zip(find_swiglu_mlps(tiny_qwen2), compensated.down_weights):
        torch.testing.assert_close(block.down_proj.weight.double(), weight, rtol=1e-6, atol=1e-6)


def test_missing_statistics_name_the_capture_option(tiny_qwen2):
    recorder = ActivationRecorder(tiny_qwen2)
    with recorder.recording():
        for (input_ids, mask), group in zip(_batches(0, 2), ["target", "distractor"]):
            recorder.observe(tiny_qwen2, input_ids, mask, group)
    stats = recorder.finalize()
    with pytest.raises(ValueError, match=r"Gram matrix.*ActivationCaptureCallback\(gram=True\)"):
        make_plan(tiny_qwen2, stats, PruneSpec(0.25, "compensated", multiple_of=8))
    with pytest.raises(ValueError, match=r"with `refit` needs the target Gram"):
        make_plan(tiny_qwen2, stats, PruneSpec(0.25, "wanda_sp", multiple_of=8, refit=True))
    with pytest.raises(ValueError, match=r"gradient statistics.*gradients=True"):
        make_plan(tiny_qwen2, stats, PruneSpec(0.25, "taylor", multiple_of=8))


@pytest.mark.parametrize(("settings", "match"), [
    ({"ratio": 1.0}, "`ratio`"), ({"ratio": 0.2, "criterion": "wanda"}, "`criterion` must be one of"),
    ({"ratio": 0.2, "seed": None}, "`seed`"), ({"ratio": 0.2, "seed": "abc"}, "`seed`"),
    ({"ratio": 0.2, "multiple_of": 0}, "`multiple_of`"), ({"ratio": 0.2, "capture": "all"}, "`capture`"),
    ({"ratio": 0.2, "damping": -1}, "`damping`"), ({"ratio": 0.2, "criterion": "compensated", "refit": False},
                                                  "always re-fits"),
])
def test_spec_rejects_bad_settings_when_built(settings, match):
    with pytest.raises(ValueError, match=match):
        PruneSpec(**settings)


def test_spec_checks_the_model_before_capture(tiny_qwen2):
    with pytest.raises(ValueError, match=r"`multiple_of` must be an integer in \[1, d_ff=256\]; got 512"):
        PruneSpec(0.25, multiple_of=512).check_model(tiny_qwen2)
    assert PruneSpec(0.25, multiple_of=32).check_model(tiny_qwen2) == 192
    paper = PruneSpec.paper(0.25)
    assert (paper.criterion, paper.capture, paper.aggregation, paper.refits) == ("selective", "prompt", "prompt", False)
