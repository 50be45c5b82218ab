"""OCC's scopes through verl's real Megatron engine in bf16 (verl_mtp/testing/real_engine.py).

Each step: old log-probs from the worker's ``infer_batch``, then ``train_mini_batch`` over two
mini-batches of four sequences (micro-batches of two unless said otherwise): the first mini-batch
is on-policy, the second follows an update. What runs is verl's worker loop with the plugin's
patches (``occ_update_schedule`` on ``train_mini_batch`` / ``BaseEngine.train_batch``), the
engine's ``forward_backward_batch`` through megatron's schedule, and the actor loss verl binds.
"""

import pytest
import torch

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.testing import real_engine

pytestmark = pytest.mark.megatron

DEPTHS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    return real_engine.write_tiny_engine_checkpoint(str(tmp_path_factory.mktemp("occ_ckpt")), mtp_depths=DEPTHS)


def build(checkpoint, micro_batch_size=2, **mtp):
    mtp = {"mtp_training_mode": "joint", "mtp_loss_type": "rl", "mtp_coef_mode": "occ", **mtp}
    return real_engine.RealEngine.build(checkpoint, ExtendedMtpConfig(enable=True, enable_train=True, **mtp),
                                        micro_batch_size=micro_batch_size)


def counted_step(engine, seed=0):
    """rl_step, counting the engine's forward-only passes during the update (the OCC pre-pass)."""
    calls = []
    inner = engine.engine.forward_backward_batch

    def forward_backward_batch(data, loss_function, forward_only=False):
        calls.append(forward_only)
        return inner(data, loss_function, forward_only=forward_only)

    prompts, responses, advantages = real_engine.tiny_rollout(seed=seed)
    batch = real_engine.rollout_batch(prompts, responses)
    old = engine.compute_log_prob(batch)["old_log_probs"]
    engine.engine.forward_backward_batch = forward_backward_batch
    try:
        metrics = engine.update_actor(batch, old, advantages[:, : old.shape[1]])
    finally:
        del engine.engine.forward_backward_batch
        engine.close()
    return metrics, calls


def coefs(metrics, k):
    return [float(v) for v in metrics[f"actor/mtp_{k}/coef"]]


def test_mini_batch_scope_uses_one_lambda_from_the_whole_mini_batch(checkpoint):
    whole, whole_calls = counted_step(build(checkpoint, occ_scope="mini_batch"))
    # The reference: micro_batch scope with one micro-batch per mini-batch calibrates on exactly
    # the whole mini-batch.
    one_micro, _ = counted_step(build(checkpoint, occ_scope="micro_batch", micro_batch_size=4))
    per_micro, _ = counted_step(build(checkpoint, occ_scope="micro_batch"))
    assert whole_calls.count(False) == 2 and whole_calls.count(True) >= 1  # the pre-pass is forward-only
    for k in range(1, DEPTHS + 1):
        lam = coefs(whole, k)
        assert len(lam) == 4 and lam[2] == lam[3] != 0.0  # mini-batch 2: one lambda for both micro-batches
        assert lam[2] == pytest.approx(coefs(one_micro, k)[1], rel=2e-2)
        assert all(abs(lam[2] - other) > 1e-3 for other in coefs(per_micro, k)[2:])  # the scopes really differ
        # The agreement metric sums exactly over micro-batches (verl's SUM aggregation): a fraction.
        assert all(0.0 <= float(a) <= 1.0 for a in whole[f"actor/mtp_{k}/draft_agreement"])


def test_micro_batch_scope_runs_no_pre_pass_and_calibrates_each_micro_batch(checkpoint):
    metrics, calls = counted_step(build(checkpoint, occ_scope="micro_batch"))
    assert calls == [False, False]  # one train_batch per mini-batch, no forward-only pre-pass
    for k in range(1, DEPTHS + 1):
        lam = coefs(metrics, k)
        assert lam[2] != lam[3] and all(torch.isfinite(torch.tensor(lam)))


@pytest.mark.parametrize("scope", ["micro_batch", "mini_batch"])
def test_first_mini_batch_of_a_step_is_on_policy(checkpoint, scope):
    # old log-probs from infer_batch (bf16, other micro-batching) on the weights the first
    # mini-batch trains from: on-policy, lambda = occ_on_policy_coef=previous (nothing measured yet).
    metrics, _ = counted_step(build(checkpoint, occ_scope=scope))
    for k in range(1, DEPTHS + 1):
        assert [float(v) for v in metrics[f"actor/mtp_{k}/occ_on_policy"]] == [1.0, 1.0, 0.0, 0.0]
        assert coefs(metrics, k)[:2] == [0.0, 0.0]


def test_no_grad_forwards_skip_the_mtp_heads_unless_asked(checkpoint):
    # verl's old-log-prob pass runs the engine forward-only under no_grad with labels (MTP trains):
    # the heads are not run unless OCC's pre-pass asks for their scores.
    from verl_mtp.megatron.mtp_forward import score_mtp_without_grad

    engine = build(checkpoint, occ_scope="micro_batch")
    try:
        prompts, responses, _ = real_engine.tiny_rollout()
        data = engine.mini_batch_data(real_engine.rollout_batch(prompts, responses))
        calls, outputs = [], []
        engine.gpt_models()[0].mtp.register_forward_hook(lambda *args: calls.append(1))

        def capture(model_output, data, dp_group=None):
            outputs.append(model_output)
            return torch.zeros(()), {}

        engine.forward_backward(data, capture, forward_only=True)
        assert not calls and outputs and all("mtp_log_probs" not in out for out in outputs)
        skipped = [out["log_probs"] for out in outputs]
        outputs.clear()
        with score_mtp_without_grad():
            engine.forward_backward(data, capture, forward_only=True)
        assert calls and all("mtp_log_probs" in out for out in outputs)
        # the main head's log-probs are the same either way
        for a, out in zip(skipped, outputs):
            assert torch.equal(a.values(), out["log_probs"].values())
    finally:
        engine.close()


def test_train_batch_patch_leaves_other_losses_alone(checkpoint):
    from verl.workers.engine.base import BaseEngine

    assert hasattr(BaseEngine.train_batch, "__verl_mtp_original__")
    metrics, calls = counted_step(build(checkpoint, mtp_coef_mode="fixed"))
    assert calls == [False, False]
    assert coefs(metrics, 1) == [pytest.approx(0.1)] * 4  # mtp_loss_scaling_factor, unchanged
