"""Token-chunked MTP logits: equal to the unchunked computation, forward and backward, and bounded.

Real parts: the tiny megatron-core GPT's output layer, verl's vocab-parallel log-prob helper and
megatron's own ``compute_language_model_loss`` / ``MTPLossAutoScaler``. The hidden states are
random (the chunking acts after the MTP block), so lengths can be long without a long forward.
"""

import pytest
import torch

from verl_mtp.local_megatron.single_process import cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt
from verl_mtp.megatron.mtp_log_probs import add_mtp_ce_losses, map_token_chunks, mtp_raw_log_probs, token_chunks
from verl_mtp.testing.memory import peak_tensor_bytes

pytestmark = pytest.mark.megatron


def assert_equal_to_1e6(got, ref):
    """Chunked == unchunked to 1e-6 in fp32, relative to the tensor's scale.

    The output layer's weight gradient sums over every token; chunking changes the order of that
    fp32 sum, so its rounding differs by ~1e-7 of the gradient's magnitude, not of each element.
    """
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()))


def test_token_chunks_cover_every_position_once_in_output_layer_order():
    plain = token_chunks(10, 4)
    assert [c[0] for c in plain] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert torch.cat([p for _, p in plain]).tolist() == list(range(10))
    # Sequence parallel, 2 ranks of 5 positions: the gathered chunk is rank 0's rows, then rank 1's.
    sp = token_chunks(5, 2, sequence_parallel=True, tp_size=2)
    assert [p.tolist() for _, p in sp] == [[0, 1, 5, 6], [2, 3, 7, 8], [4, 9]]
    assert sorted(torch.cat([p for _, p in sp]).tolist()) == list(range(10))


def test_map_token_chunks_restores_label_order_under_sequence_parallel_layout():
    # A stand-in "score" that reports which label each row scored, in the gathered row order a
    # sequence-parallel output layer produces (rank-major): the result must come back in order.
    tp, local_len = 2, 6
    labels = torch.arange(tp * local_len).view(1, -1)
    hidden = torch.zeros(local_len, 1, 3)

    def score(hidden_chunk, labels_chunk):
        return (labels_chunk.float(),)

    (out,) = map_token_chunks(score, hidden, (labels,), chunk_tokens=4, sequence_parallel=True, tp_size=tp)
    assert out.tolist() == labels.float().tolist()


def _model_and_inputs(depths=2, seq_len=37, batch=3, vocab=96, seed=0):
    spec = TinyGPTSpec(mtp_num_layers=depths, vocab_size=vocab)
    model = build_tiny_gpt(spec)
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(seq_len, batch, spec.hidden_size, generator=g) for _ in range(depths)]
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g)
    temperature = 0.5 + torch.rand(batch, 1, generator=g).expand(batch, seq_len)
    return model, hidden, labels, temperature


def _rl_run(model, hidden, labels, temperature, chunk_tokens, detach):
    hidden = [h.clone().requires_grad_() for h in hidden]
    model.zero_grad(set_to_none=True)
    with cpu_megatron():
        log_probs, valid, agree = mtp_raw_log_probs(
            model.output_layer, hidden, labels, temperature,
            detach_output_layer=detach, with_agreement=True, chunk_tokens=chunk_tokens,
        )
    # A loss with per-token weights, so every position's gradient matters.
    weights = torch.linspace(-1.0, 2.0, log_probs.numel()).view_as(log_probs)
    (log_probs * weights * valid).sum().backward()
    weight_grad = model.output_layer.weight.grad
    return log_probs.detach(), valid, agree, [h.grad for h in hidden], None if weight_grad is None else weight_grad.clone()


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 40, 3 * 37 - 1])
def test_rl_log_probs_chunked_equal_unchunked_forward_and_backward(chunk_tokens, detach):
    model, hidden, labels, temperature = _model_and_inputs()
    ref = _rl_run(model, hidden, labels, temperature, 0, detach)
    got = _rl_run(model, hidden, labels, temperature, chunk_tokens, detach)
    assert_equal_to_1e6(got[0], ref[0])
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    for g, r in zip(got[3], ref[3]):
        assert_equal_to_1e6(g, r)
    if detach:
        assert got[4] is None and ref[4] is None
    else:
        assert_equal_to_1e6(got[4], ref[4])


def _ce_run(model, hidden, labels, chunk_tokens, per_token_loss):
    main = torch.zeros(hidden[0].shape, requires_grad=True)
    hidden = [h.clone().requires_grad_() for h in hidden]
    loss_mask = (torch.arange(labels.shape[1]) > 5).float().expand_as(labels).contiguous()
    recorded = {}
    model.zero_grad(set_to_none=True)
    with cpu_megatron():
        carried, agree, valid = add_mtp_ce_losses(
            main, hidden, labels, loss_mask,
            output_layer=model.output_layer, output_weight=None,
            compute_language_model_loss=model.compute_language_model_loss,
            depth_scales=(0.3, 0.15), per_token_loss=per_token_loss,
            record=lambda loss, k: recorded.__setitem__(k, loss.item()),
            chunk_tokens=chunk_tokens,
        )
        carried.sum().backward()
    return recorded, agree, valid, [h.grad for h in hidden], model.output_layer.weight.grad.clone()


@pytest.mark.parametrize("per_token_loss", [False, True])
@pytest.mark.parametrize("chunk_tokens", [5, 64])
def test_ce_losses_chunked_equal_unchunked_forward_and_backward(chunk_tokens, per_token_loss):
    model, hidden, labels, _ = _model_and_inputs()
    ref = _ce_run(model, hidden, labels, 0, per_token_loss)
    got = _ce_run(model, hidden, labels, chunk_tokens, per_token_loss)
    assert got[0].keys() == ref[0].keys() == {0, 1}
    for k in ref[0]:
        assert got[0][k] == pytest.approx(ref[0][k], rel=1e-6, abs=1e-6)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    for g, r in zip(got[3], ref[3]):
        assert r.abs().sum() > 0
        assert_equal_to_1e6(g, r)
    assert_equal_to_1e6(got[4], ref[4])


def test_chunked_peak_memory_is_bounded_by_the_chunk_not_the_sequence():
    # Vocabulary-heavy shapes, as in real models (V >> h): unchunked, a depth's logits and their
    # softmax for the whole sequence are alive at once; chunked, only one chunk's are.
    vocab, batch, chunk_tokens = 2048, 1, 64
    peaks = {}
    for seq_len in (512, 2048):
        model, hidden, labels, temperature = _model_and_inputs(depths=1, seq_len=seq_len, batch=batch, vocab=vocab)
        for chunk in (0, chunk_tokens):
            hidden_req = [h.clone().requires_grad_() for h in hidden]

            def step():
                with cpu_megatron():
                    log_probs, valid = mtp_raw_log_probs(
                        model.output_layer, hidden_req, labels, temperature, chunk_tokens=chunk
                    )
                    (log_probs * valid).sum().backward()

            peaks[seq_len, chunk] = peak_tensor_bytes(step)
    logits_bytes = lambda tokens: tokens * vocab * 4  # noqa: E731 - fp32 logits of `tokens` tokens
    # Unchunked holds at least one full-sequence logits tensor; chunked stays far below that.
    for seq_len in (512, 2048):
        assert peaks[seq_len, 0] >= logits_bytes(seq_len * batch)
        assert peaks[seq_len, chunk_tokens] < logits_bytes(seq_len * batch) / 2
    # Growth with length: chunked grows only by per-token tensors (hidden, labels, log-probs),
    # a small fraction of what the unchunked logits add.
    chunked_growth = peaks[2048, chunk_tokens] - peaks[512, chunk_tokens]
    unchunked_growth = peaks[2048, 0] - peaks[512, 0]
    print({k: round(v / 2**20, 2) for k, v in peaks.items()})
    assert chunked_growth < unchunked_growth / 8, peaks


# --- tensor parallelism: 2 gloo ranks with a vocabulary-parallel output layer ------------------

TP_SHAPES = dict(seq_len=12, batch=2, hidden=16, vocab=64)


def _tp_inputs():
    g = torch.Generator().manual_seed(3)
    s, b, h, v = (TP_SHAPES[k] for k in ("seq_len", "batch", "hidden", "vocab"))
    return torch.randn(v, h, generator=g), torch.randn(s, b, h, generator=g), torch.randint(0, v, (b, s), generator=g)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_chunked_equals_single_rank_reference(sequence_parallel):
    from verl_mtp.testing.gloo import run_on_gloo_ranks
    from verl_mtp.testing.tensor_parallel import vocab_parallel_mtp_scoring_rank

    # Reference: one rank, the full vocabulary, no chunking.
    weight, hidden, labels = _tp_inputs()
    model = build_tiny_gpt(TinyGPTSpec(hidden_size=TP_SHAPES["hidden"], vocab_size=TP_SHAPES["vocab"]))
    model.output_layer.weight.data.copy_(weight)
    ref = _rl_run(model, [hidden], labels, None, 0, False)

    results = run_on_gloo_ranks(
        vocab_parallel_mtp_scoring_rank, [(weight, hidden, labels, sequence_parallel, 5)] * 2
    )
    for rank, (log_probs, valid, hidden_grad, weight_grad) in enumerate(results):
        assert torch.equal(valid, ref[1])
        assert_equal_to_1e6(log_probs, ref[0])
        expected_hidden_grad = ref[3][0].chunk(2)[rank] if sequence_parallel else ref[3][0]
        assert_equal_to_1e6(hidden_grad, expected_hidden_grad)
        assert_equal_to_1e6(weight_grad, ref[4].chunk(2)[rank])
