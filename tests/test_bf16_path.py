"""What a bf16 Megatron run does differently from the fp32 harness, each checked on real parts.

Every real verl Megatron run is bf16: megatron wraps the model in ``Float16Module``, which hands
the logits processor ``logits.float()`` (a new tensor), and the MTP logits come out of the output
layer in bf16. Real parts: a tiny megatron-core GPTModel with MTP, megatron's ``Float16Module``,
verl's ``patch_engine_mtp`` and ``gptmodel_forward_model_engine`` and the engine's logits processor
(with verl-mtp's patches), verl's actor loss.
"""

import pytest
import torch

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.local_megatron import engine_step
from verl_mtp.local_megatron.single_process import cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec

pytestmark = pytest.mark.megatron

DEPTHS = 2


def bf16_engine_model(mtp):
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(0)
    model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS))
    model.config.bf16 = True  # what verl's McoreEngineConfig (bfloat16) sets
    with cpu_megatron():
        return Float16Module(model.config, model)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (n,), generator=g) for n in (3, 4)]
    responses = [torch.randint(0, 64, (n,), generator=g) for n in (5, 4)]
    return prompts, responses


@pytest.mark.parametrize("loss_type", ["rl", "ce"])
def test_mtp_outputs_reach_the_loss_through_float16module(loss_type):
    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type=loss_type)
    wrapped = bf16_engine_model(mtp)
    assert next(wrapped.module.parameters()).dtype == torch.bfloat16
    prompts, responses = batch()
    out = engine_step.engine_forward(wrapped, prompts, responses)
    assert out["log_probs"].values().dtype == torch.float32  # the main head is upcast by Float16Module
    assert "mtp_agree" in out and "mtp_valid" in out  # draft_agreement for both loss types
    if loss_type == "rl":
        values = out["mtp_log_probs"].values()
        assert values.shape[-1] == DEPTHS and values.dtype == torch.float32 and torch.isfinite(values).all()


def test_another_models_stash_is_never_used():
    """The hand-over belongs to the engine whose model made it: a processor of another engine (the
    reference policy's, say) ignores it, and the next forward of any model clears it."""
    from verl.models.mcore.model_forward import gptmodel_forward_model_engine  # noqa: F401

    from verl_mtp.megatron import mtp_forward

    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl")
    wrapped = bf16_engine_model(mtp)
    prompts, responses = batch(1)
    with torch.enable_grad():
        out = engine_step.engine_forward(wrapped, prompts, responses)
    pending = mtp_forward._PendingMtp(
        model=wrapped.module, hidden_chunks=(), labels=None, output_weight=None, packed_seq_params=None,
        cp_group=None, runtime_gather_output=None, logits_shape=(2, 9, 64),
    )
    other_engine = type("Engine", (), {"module": [torch.nn.Linear(1, 1)]})()
    assert not mtp_forward._belongs_to(pending, other_engine, torch.zeros(2, 9, 64))
    own_engine = type("Engine", (), {"module": [wrapped]})()
    assert mtp_forward._belongs_to(pending, own_engine, torch.zeros(2, 9, 64, dtype=torch.float32))
    assert not mtp_forward._belongs_to(pending, own_engine, torch.zeros(2, 8, 64))  # another micro-batch's shape
    assert "mtp_log_probs" in out


def test_mtp_log_probs_are_tempered_in_fp32():
    """bf16 logits divided by the temperature in bf16 lose ~3 significant bits; the main head's are
    upcast first. The MTP log-probs must equal the fp32 computation on the same bf16 logits."""
    from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits

    from verl_mtp.megatron.mtp_log_probs import mtp_raw_log_probs
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 64, bias=False).to(torch.bfloat16)

    class OutputLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = layer.weight

        def forward(self, hidden, weight=None, runtime_gather_output=None):
            return hidden @ self.weight.t(), None

    output_layer = OutputLayer()
    hidden = (torch.randn(10, 1, 16) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 64, (1, 10))
    temperature = 0.7
    log_probs, valid = mtp_raw_log_probs(output_layer, [hidden], labels, torch.tensor(temperature), chunk_tokens=4)
    logits = (hidden @ layer.weight.t()).float() / temperature
    rolled = torch.roll(labels, -1, dims=1)  # ``labels`` are rolled once already; depth 1 rolls once more
    expected = vocab_parallel_log_probs_from_logits(logits, rolled.transpose(0, 1)).transpose(0, 1)
    mask = valid[..., 0]
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs[..., 0][mask], expected[mask], rtol=0, atol=1e-5)
