"""OCC over the whole global mini-batch (occ_scope=mini_batch) through verl's BaseEngine.train_batch.

Real parts: verl's ``BaseEngine.train_batch`` (wrapped by the ``occ_update_schedule`` patch),
the tiny megatron-core model, verl's engine forward, and the actor loss verl's engine_workers
binds. Stand-in: ``CpuStandInEngine`` replaces the CUDA-only MegatronEngine's micro-batch loop and
optimizer (see verl_mtp/testing/engine_step.py).
"""

import functools

import pytest
import torch

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.loss import MtpLossError
from verl_mtp.occ import OccCoefficient, calibrate
from verl_mtp.testing import engine_step
from verl_mtp.testing.tiny_megatron import TinyGPTSpec

pytestmark = pytest.mark.megatron

PROMPTS, RESPONSES, DEPTHS = [3, 2, 4, 3], [4, 5, 2, 6], 2


def mini_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "prompts": [torch.randint(0, 64, (p,), generator=g) for p in PROMPTS],
        "responses": [torch.randint(0, 64, (r,), generator=g) for r in RESPONSES],
        # Not the model's own log-probs: pi_theta != pi_old, so OCC's numerator is non-zero.
        "old_log_probs": [-torch.rand(r, generator=g) * 5 - 2 for r in RESPONSES],
        "advantages": [torch.randn(r, generator=g) for r in RESPONSES],
    }


def reference_coefs(model, data, mtp, micro_batch_size):
    """calibrate() on the main/MTP log-probs of the given micro-batches, from a fresh state."""
    from verl.workers.utils.padding import no_padding_2_padding

    from verl_mtp.loss import _occ_inputs

    from verl_mtp.megatron.mtp_forward import score_mtp_without_grad

    coefs = []
    model.eval()
    with torch.no_grad(), score_mtp_without_grad():
        for start in range(0, len(data["prompts"]), micro_batch_size):
            part = {k: v[start : start + micro_batch_size] for k, v in data.items()}
            out = engine_step.engine_forward(model, part["prompts"], part["responses"])
            td = engine_step.loss_data(part["prompts"], part["responses"], part["old_log_probs"], part["advantages"])
            log_prob, q, old, masks = _occ_inputs(out, td)
            assert torch.equal(log_prob, no_padding_2_padding(out["log_probs"], td))
            fresh = [OccCoefficient.from_config(mtp) for _ in range(DEPTHS)]
            coefs.append(calibrate(fresh, log_prob, q, old, masks))
    model.train()
    return coefs


def setup(scope):
    from verl.workers.engine_workers import ppo_loss  # the installed MtpPolicyLoss

    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scope=scope)
    torch.manual_seed(0)
    model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS))
    config = engine_step.actor_config(mtp)
    return model, config, functools.partial(ppo_loss, config=config), mtp


def test_mini_batch_scope_uses_one_lambda_from_the_whole_mini_batch():
    model, config, loss_function, mtp = setup("mini_batch")
    data = mini_batch()
    whole = reference_coefs(model, data, mtp, micro_batch_size=len(PROMPTS))[0]
    per_micro = reference_coefs(model, data, mtp, micro_batch_size=2)
    assert all(abs(a - b) > 1e-3 for a, b in zip(whole, per_micro[0]))  # the scopes really differ here

    engine = engine_step.CpuStandInEngine(model, micro_batch_size=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with engine_step.in_update_step(loss_function, mini_batch_index=1):
        engine.train_batch(data, loss_function)  # verl's BaseEngine.train_batch, patched
    assert engine.forward_only_calls == 1  # the pre-pass
    assert len(engine.micro_batch_metrics) == 2
    for metrics in engine.micro_batch_metrics:
        for k in range(1, DEPTHS + 1):
            assert metrics[f"actor/mtp_{k}/coef"] == pytest.approx(whole[k - 1], rel=1e-6, abs=1e-9)
            assert metrics[f"actor/mtp_{k}/occ_on_policy"] == 0.0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The agreement metric sums exactly over micro-batches (verl's SUM aggregation).
    for k in range(1, DEPTHS + 1):
        values = [m[f"actor/mtp_{k}/draft_agreement"].aggregate() for m in engine.micro_batch_metrics]
        assert 0.0 <= sum(values) <= 1.0
    # Lambda is released after the update: a stray call without a pre-pass fails loudly.
    out = engine_step.engine_forward(model, data["prompts"][:2], data["responses"][:2])
    td = engine_step.loss_data(data["prompts"][:2], data["responses"][:2], data["old_log_probs"][:2], data["advantages"][:2])
    with pytest.raises(MtpLossError, match="occ_scope=micro_batch"):
        loss_function(model_output=out, data=td)


def test_micro_batch_scope_runs_no_pre_pass_and_calibrates_each_micro_batch():
    model, config, loss_function, mtp = setup("micro_batch")
    data = mini_batch(1)
    per_micro = reference_coefs(model, data, mtp, micro_batch_size=2)
    engine = engine_step.CpuStandInEngine(model, micro_batch_size=2)
    with engine_step.in_update_step(loss_function, mini_batch_index=1):
        engine.train_batch(data, loss_function)
    assert engine.forward_only_calls == 0
    # The first micro-batch runs before any update, so it sees the reference model exactly.
    for k in range(1, DEPTHS + 1):
        assert engine.micro_batch_metrics[0][f"actor/mtp_{k}/coef"] == pytest.approx(per_micro[0][k - 1], rel=1e-6)


def test_first_mini_batch_of_a_step_is_on_policy_in_the_pre_pass():
    # old log-probs taken from the model itself (eval mode, as verl's compute_log_prob): delta_RL == 0.
    model, config, loss_function, mtp = setup("mini_batch")
    data = mini_batch(2)
    model.eval()
    with torch.no_grad():
        out = engine_step.engine_forward(model, data["prompts"], data["responses"])
    model.train()
    data["old_log_probs"] = [
        out["log_probs"][i][len(p) - 1 : len(p) + len(r) - 1].clone() for i, (p, r) in enumerate(zip(data["prompts"], data["responses"]))
    ]
    engine = engine_step.CpuStandInEngine(model, micro_batch_size=2)
    with engine_step.in_update_step(loss_function, mini_batch_index=0):
        engine.train_batch(data, loss_function)
    for metrics in engine.micro_batch_metrics:
        assert metrics["actor/mtp_1/occ_on_policy"] == 1.0
        assert metrics["actor/mtp_1/coef"] == 0.0  # occ_on_policy_coef=previous, nothing measured before


def test_no_grad_forwards_skip_the_mtp_heads_unless_asked():
    # verl's old-log-prob pass runs under no_grad with labels (MTP trains): the heads are not run.
    from verl_mtp.megatron.mtp_forward import score_mtp_without_grad

    model, _, _, _ = setup("micro_batch")
    data = mini_batch(4)
    calls = []
    model.mtp.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        skipped = engine_step.engine_forward(model, data["prompts"], data["responses"])
    assert not calls and "mtp_log_probs" not in skipped
    with torch.no_grad(), score_mtp_without_grad():
        scored = engine_step.engine_forward(model, data["prompts"], data["responses"])
    assert calls and "mtp_log_probs" in scored
    # the main head's log-probs are the same either way
    assert torch.equal(skipped["log_probs"].values(), scored["log_probs"].values())


def test_train_batch_patch_leaves_other_losses_alone():
    from verl.workers.engine.base import BaseEngine

    assert hasattr(BaseEngine.train_batch, "__verl_mtp_original__")
    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl")  # fixed lambda
    torch.manual_seed(0)
    model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS))
    from verl.workers.engine_workers import ppo_loss

    engine = engine_step.CpuStandInEngine(model, micro_batch_size=2)
    engine.train_batch(mini_batch(3), functools.partial(ppo_loss, config=engine_step.actor_config(mtp)))
    assert engine.forward_only_calls == 0
    assert engine.micro_batch_metrics[0]["actor/mtp_1/coef"] == mtp.mtp_loss_scaling_factor
