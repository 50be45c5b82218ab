"""The gradient the MTP log-probs hand back to the output layer is laid out [s, b, V], as megatron's.

The benchmark through verl's real engine (scripts/bench_mtp_step.py) found ``mtp_loss_type=rl``
3-4x slower per update than CE: the temperature division ran on a transposed [b, s] view, and its
backward laid the logits' gradient out as [b, s, V] memory under an [s, b, V] shape, so
``torch.matmul`` in the output layer's backward ran one GEMM per position and copied the weight
for each. The layout is checked here, on a real tiny megatron-core model's output layer.
"""

import pytest
import torch

from verl_mtp.local_megatron.single_process import cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt, forward, random_batch
import verl_mtp.megatron.mtp_log_probs as mtp_log_probs

pytestmark = pytest.mark.megatron


def dense_strides(shape):
    return torch.empty(shape).stride()


@pytest.mark.parametrize("detach", [False, True], ids=["joint", "standalone"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_logits_gradient_is_dense_in_megatron_layout(monkeypatch, batch_size, detach):
    spec = TinyGPTSpec(mtp_num_layers=1)
    model = build_tiny_gpt(spec)
    batch = random_batch(spec, batch_size=batch_size, seq_len=12, seed=3)
    captured = {}
    hook = model.mtp.register_forward_hook(lambda module, args, output: captured.setdefault("hidden", output))
    labels = torch.roll(batch["input_ids"], -1, dims=-1)
    forward(model, batch, labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.float32))
    hook.remove()
    hidden = torch.chunk(captured["hidden"], 2, dim=0)[1].detach().requires_grad_()

    grads = []
    real_output_logits = mtp_log_probs.output_logits

    def output_logits(*args, **kwargs):
        logits = real_output_logits(*args, **kwargs)
        logits.register_hook(grads.append)
        return logits

    monkeypatch.setattr(mtp_log_probs, "output_logits", output_logits)
    temperature = torch.full(labels.shape, 0.7)  # verl passes one temperature per token, [b, s]
    with cpu_megatron():
        log_probs, valid = mtp_log_probs.mtp_raw_log_probs(
            model.output_layer, [hidden], labels, temperature, detach_output_layer=detach)
    log_probs[valid].sum().backward()
    (grad,) = grads
    assert grad.shape == (12, batch_size, spec.vocab_size)
    assert grad.stride() == dense_strides(grad.shape), grad.stride()
