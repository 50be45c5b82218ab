"""MTP log-probs from a real tiny megatron-core model against an independent reference.

The reference takes the MTP block's hidden states (captured with a forward hook) and scores
``input_ids[t+k+1]`` with ``log_softmax(hidden @ W.T / T)`` by hand, position by position.
"""

import pytest
import torch

from verl_mtp.local_megatron.single_process import cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt, forward, random_batch
from verl_mtp.megatron.mtp_log_probs import mtp_raw_log_probs

pytestmark = pytest.mark.megatron
DEPTHS = 2


def run_and_capture(model, batch):
    captured = {}
    hook = model.mtp.register_forward_hook(lambda module, args, output: captured.setdefault("hidden", output))
    labels = torch.roll(batch["input_ids"], -1, dims=-1)
    forward(model, batch, labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.float32))
    hook.remove()
    return torch.chunk(captured["hidden"], 1 + DEPTHS, dim=0), labels


def reference(chunks, input_ids, weight, temperature):
    b, s = input_ids.shape
    out = torch.full((b, s, DEPTHS), float("nan"))
    for k in range(1, DEPTHS + 1):
        logp = torch.log_softmax(chunks[k].transpose(0, 1).double() @ weight.double().T / temperature, dim=-1)
        for t in range(s - k - 1):
            out[:, t, k - 1] = logp[torch.arange(b), t, input_ids[:, t + k + 1]].float()
    return out


def test_padded_layout_matches_reference_position_by_position():
    spec = TinyGPTSpec(mtp_num_layers=DEPTHS)
    model = build_tiny_gpt(spec)
    batch = random_batch(spec, batch_size=3, seq_len=10, seed=7)
    chunks, labels = run_and_capture(model, batch)
    temperature = torch.full(labels.shape, 0.7)
    with cpu_megatron():
        log_probs, valid = mtp_raw_log_probs(model.output_layer, chunks[1:], labels, temperature)
    expected = reference(chunks, batch["input_ids"], model.output_layer.weight, 0.7)
    s = labels.shape[1]
    for k in range(1, DEPTHS + 1):
        assert valid[:, : s - k - 1, k - 1].all() and not valid[:, s - k - 1 :, k - 1].any()
    torch.testing.assert_close(log_probs[valid], expected[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_detach_output_layer_keeps_lm_head_out_of_the_gradient(detach):
    spec = TinyGPTSpec(mtp_num_layers=DEPTHS)
    model = build_tiny_gpt(spec)
    batch = random_batch(spec, batch_size=2, seq_len=8, seed=1)
    chunks, labels = run_and_capture(model, batch)
    hidden = [c.detach().requires_grad_() for c in chunks[1:]]
    model.zero_grad(set_to_none=True)
    with cpu_megatron():
        log_probs, valid = mtp_raw_log_probs(model.output_layer, hidden, labels, detach_output_layer=detach)
    log_probs[valid].sum().backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in hidden)
    lm_head_grad = model.output_layer.weight.grad
    assert (lm_head_grad is None or lm_head_grad.abs().sum() == 0) == detach


def test_packed_layout_never_reads_the_next_sequence():
    # THD attention needs TransformerEngine, but the label roll and scoring are pure torch:
    # synthetic hidden states in the packed layout [tokens, 1, h] exercise megatron's packed roll.
    from megatron.core.packed_seq_params import PackedSeqParams

    spec = TinyGPTSpec(mtp_num_layers=DEPTHS)
    model = build_tiny_gpt(spec)
    lengths = [5, 3, 6]
    cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, spec.vocab_size, (1, cu[-1].item()), generator=g)
    labels = torch.cat([torch.roll(seq, -1, dims=-1) for seq in torch.split(input_ids, lengths, dim=-1)], dim=-1)
    chunks = [torch.randn(cu[-1].item(), 1, spec.hidden_size, generator=g) for _ in range(DEPTHS)]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    with cpu_megatron():
        log_probs, valid = mtp_raw_log_probs(model.output_layer, chunks, labels, packed_seq_params=params)
    weight = model.output_layer.weight.detach().double()
    for start, length in zip(cu[:-1].tolist(), lengths):
        for t in range(length):
            for k in range(1, DEPTHS + 1):
                if t + k + 1 >= length:  # the label would come from the next sequence
                    assert not valid[0, start + t, k - 1]
                    continue
                assert valid[0, start + t, k - 1]
                logp = torch.log_softmax(chunks[k - 1][start + t, 0].double() @ weight.T, dim=-1)
                expected = logp[input_ids[0, start + t + k + 1]].item()
                assert log_probs[0, start + t, k - 1].item() == pytest.approx(expected, abs=1e-5)
