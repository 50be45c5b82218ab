"""``tempered_log_probs``: the fused fp32 log-prob at a temperature that the MTP RL loss uses.

Checked against the direct formula ``log_softmax(logits / T)[label]`` and autograd's gradient of
it, in fp32 (to 1e-6), with bf16 logits (the dtype a real bf16 run hands it), and split over two
tensor-parallel gloo ranks (vocabulary slices).
"""

import pytest
import torch

from verl_mtp.megatron import tempered_log_probs as tempered
from verl_mtp.megatron.tempered_log_probs import tempered_log_probs


def _inputs(seed=0, s=7, b=3, vocab=50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, b, vocab, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, vocab, (s, b), generator=gen)
    temperature = 0.5 + torch.rand(s, b, generator=gen)  # per token, as verl hands it
    upstream = torch.randn(s, b, generator=gen)
    return logits, labels, temperature, upstream


def _reference(logits, labels, temperature, upstream):
    leaf = logits.detach().clone().requires_grad_()
    scaled = leaf.float() / (temperature.unsqueeze(-1) if temperature is not None else 1.0)
    log_probs = torch.log_softmax(scaled, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (log_probs * upstream).sum().backward()
    return log_probs.detach(), leaf.grad


@pytest.mark.parametrize("rows_per_block", [None, 2])  # None: one block; 2: 11 blocks, the last ragged
@pytest.mark.parametrize("with_temperature", [True, False])
def test_matches_log_softmax_and_its_gradient_in_fp32(with_temperature, rows_per_block, monkeypatch):
    logits, labels, temperature, upstream = _inputs()
    if rows_per_block:
        monkeypatch.setattr(tempered, "_CPU_BLOCK_BYTES", 4 * logits.shape[-1] * rows_per_block)
    temperature = temperature if with_temperature else None
    expected, expected_grad = _reference(logits, labels, temperature, upstream)
    leaf = logits.clone().requires_grad_()
    got = tempered_log_probs(leaf, labels, temperature)
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=0, atol=1e-6)


def test_bf16_logits_score_in_fp32_and_get_a_bf16_gradient():
    logits, labels, temperature, upstream = _inputs(dtype=torch.bfloat16)
    expected, expected_grad = _reference(logits, labels, temperature, upstream)  # fp32 maths on bf16 values
    leaf = logits.clone().requires_grad_()
    got = tempered_log_probs(leaf, labels, temperature)
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32 and leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # no bf16 rounding of the log-probs
    torch.testing.assert_close(leaf.grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-4)


def test_gradient_is_not_shared_with_the_logits_storage():
    logits, labels, temperature, upstream = _inputs()
    leaf = logits.clone().requires_grad_()
    before = leaf.detach().clone()
    (tempered_log_probs(leaf, labels, temperature) * upstream).sum().backward()
    assert torch.equal(leaf.detach(), before)  # the in-place backward works on its own fp32 copy


def test_keeps_no_fp32_copy_of_the_vocabulary_for_backward():
    # what autograd holds between forward and backward: the bf16 logits and per-token vectors only
    logits, labels, temperature, _ = _inputs(dtype=torch.bfloat16, s=64, b=2, vocab=512)
    leaf = logits.clone().requires_grad_()
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        tempered_log_probs(leaf, labels, temperature)
    vocabulary_sized = [t for t in saved if t.dim() and t.shape[-1] == logits.shape[-1]]
    assert [t.dtype for t in vocabulary_sized] == [torch.bfloat16]
    assert sum(t.numel() * t.element_size() for t in saved) < 1.1 * logits.numel() * logits.element_size()


@pytest.mark.slow
def test_two_tensor_parallel_ranks_match_one():
    from verl_mtp.testing.gloo import run_on_gloo_ranks

    logits, labels, temperature, upstream = _inputs(vocab=64)
    expected, expected_grad = _reference(logits, labels, temperature, upstream)
    args = (logits, labels, temperature, upstream)
    results = run_on_gloo_ranks(
        __import__("verl_mtp.testing.tempered_ranks", fromlist=["x"]).tempered_log_probs_rank, [args, args]
    )
    for log_probs, _ in results:
        torch.testing.assert_close(log_probs, expected, rtol=1e-6, atol=1e-6)
    grad = torch.cat([g for _, g in results], dim=-1)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
