"""``tempered_log_probs``: the fused fp32 log-prob at a temperature that the MTP RL loss uses.

Checked against the direct formula ``log_softmax(logits / T)[label]`` and autograd's gradient of
it, in fp32 (to 1e-6), with bf16 logits (the dtype a real bf16 run hands it), and split over two
tensor-parallel gloo ranks (vocabulary slices).
"""

import pytest
import torch

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


@pytest.mark.parametrize("with_temperature", [True, False])
def test_matches_log_softmax_and_its_gradient_in_fp32(with_temperature):
    logits, labels, temperature, upstream = _inputs()
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
