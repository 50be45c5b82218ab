"""mtp_training_mode=decoupled: the policy-loss MTP term trains the shared parameters, the drafter
loss the MTP module, and nothing crosses.

Through verl's real Megatron engine in bf16 (verl_mtp/testing/real_engine.py: Float16Module, DDP
gradient buffers, the engine's ``forward_backward_batch`` through megatron's schedule, the installed
actor loss): one forward/backward of a decoupled run equals, parameter group by parameter group, the
joint-rl run (shared parameters) and the standalone run with the same drafter loss (MTP module), all
from the same weights and batch. A leak either way shows as a difference there.
"""

import functools

import pytest
import torch

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.errors import MtpConfigError
from verl_mtp.testing import real_engine
from verl_mtp.testing.grad_reach import param_group

PROMPTS, RESPONSES, DEPTHS, COEF = [3, 2, 4], [4, 5, 2], 2, 0.1


def test_decoupled_needs_the_rl_loss_and_takes_every_drafter_loss():
    mtp = ExtendedMtpConfig(mtp_training_mode="decoupled", mtp_loss_type="rl", mtp_coef_mode="occ", mtp_drafter_loss="tv")
    assert mtp.is_decoupled and mtp.enable_train and not mtp.detach_encoder and mtp.uses_occ
    assert mtp.trains_drafter_loss
    with pytest.raises(MtpConfigError, match=r"mtp_training_mode='decoupled'.*mtp_loss_type=rl \(got 'ce'\)"):
        ExtendedMtpConfig(mtp_training_mode="decoupled")
    with pytest.raises(MtpConfigError, match=r"mtp_training_mode='decoupled'.*detach_encoder=True"):
        ExtendedMtpConfig(mtp_training_mode="decoupled", mtp_loss_type="rl", detach_encoder=True)
    with pytest.raises(MtpConfigError, match=r"mtp_drafter_loss='kl'.*decoupled.*mtp_training_mode='joint'"):
        ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_drafter_loss="kl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    return real_engine.write_tiny_engine_checkpoint(str(tmp_path_factory.mktemp("decoupled_ckpt")), mtp_depths=DEPTHS)


def _batch():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (p,), generator=g) for p in PROMPTS]
    responses = [torch.randint(3, 64, (r,), generator=g) for r in RESPONSES]
    width = max(RESPONSES)
    return prompts, responses, -torch.rand(len(PROMPTS), width, generator=g) * 3, torch.randn(len(PROMPTS), width, generator=g)


def gradients(checkpoint, transformer_overrides=None, **mtp):
    """DDP gradients (``main_grad``) by parameter name after one forward/backward of the installed
    actor loss (verl's ppo_loss with verl-mtp's MTP term) on one micro-batch."""
    from verl.workers.engine_workers import ppo_loss  # verl's name, with verl-mtp's wrapper

    engine = real_engine.RealEngine.build(
        checkpoint, ExtendedMtpConfig(mtp_loss_scaling_factor=COEF, **mtp), micro_batch_size=len(PROMPTS),
        temperature=0.8, transformer_overrides=transformer_overrides)
    try:
        prompts, responses, old, advantages = _batch()
        data = engine.mini_batch_data(real_engine.rollout_batch(prompts, responses), old, advantages)
        engine.zero_grad()
        engine.forward_backward(data, functools.partial(ppo_loss, engine.actor_config))
        grads = {n: p.main_grad.detach().clone() for n, p in engine.named_parameters()}
        engine.zero_grad()
        return grads
    finally:
        engine.close()


def _by_group(grads, mtp_module: bool):
    return {n: g for n, g in grads.items() if (param_group(n) == "mtp") == mtp_module}


def _assert_same(got, expected, what):
    assert got.keys() == expected.keys() and got, what
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=f"{what}: {name}")


def _assert_differs(got, other, what):
    assert any(not torch.allclose(got[n], other[n], rtol=1e-3, atol=1e-6) for n in got), what


@pytest.fixture(scope="module")
def joint_rl(checkpoint):
    return gradients(checkpoint, mtp_training_mode="joint", mtp_loss_type="rl")


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.parametrize("drafter", ["ce", "tv"])
def test_each_parameter_group_gets_exactly_one_terms_gradient(checkpoint, joint_rl, drafter):
    decoupled = gradients(checkpoint, mtp_training_mode="decoupled", mtp_loss_type="rl", mtp_drafter_loss=drafter)
    standalone = gradients(checkpoint, mtp_training_mode="standalone", mtp_drafter_loss=drafter)
    # shared parameters: the main loss + lambda * the policy-loss MTP term, as joint rl sends them
    _assert_same(_by_group(decoupled, False), _by_group(joint_rl, False), "shared parameters vs joint rl")
    # the MTP module: the drafter loss alone, as the standalone regime sends it
    _assert_same(_by_group(decoupled, True), _by_group(standalone, True), "MTP module vs standalone")
    # not vacuous: each term really reaches its group (the other run's group differs)
    _assert_differs(_by_group(decoupled, False), _by_group(standalone, False), "the rl term reaches the shared parameters")
    _assert_differs(_by_group(decoupled, True), _by_group(joint_rl, True), "the drafter loss, not rl, trains the MTP module")
    assert all(g.abs().sum() > 0 for n, g in _by_group(decoupled, True).items() if ".eh_proj." in n)


FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


@pytest.mark.slow
@pytest.mark.megatron
def test_the_split_holds_when_megatron_recomputes_the_mtp_layers_in_backward(checkpoint, joint_rl, monkeypatch):
    # Full recompute re-runs each MTP layer inside backward, after the policy pass has ended: the
    # layer's parameters must still take no policy-loss gradient there.
    # Fake for what cannot run here: megatron's checkpoint saves and restores the CUDA RNG state,
    # which a CPU build of torch has not; the model has no dropout, so no RNG state is consumed.
    from megatron.core.tensor_parallel import random as megatron_random

    monkeypatch.setattr(megatron_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    monkeypatch.setattr(megatron_random, "_set_cuda_rng_state", lambda *args, **kwargs: None)
    mtp = dict(mtp_training_mode="decoupled", mtp_loss_type="rl", mtp_drafter_loss="kl")
    from verl_mtp.megatron.compat import PROCESS_MTP_LOSS_API, mtp_api
    from verl_mtp.megatron.decoupled import DecoupledSplitError

    if mtp_api() == PROCESS_MTP_LOSS_API:  # megatron-core 0.18: refused at engine initialisation
        with pytest.raises(DecoupledSplitError, match="recompute_granularity=full on this megatron-core"):
            gradients(checkpoint, transformer_overrides=FULL_RECOMPUTE, **mtp)
        return
    recomputed = gradients(checkpoint, transformer_overrides=FULL_RECOMPUTE, **mtp)
    standalone = gradients(checkpoint, transformer_overrides=FULL_RECOMPUTE, mtp_training_mode="standalone", mtp_drafter_loss="kl")
    _assert_same(_by_group(recomputed, False), _by_group(joint_rl, False), "shared parameters vs joint rl")
    _assert_same(_by_group(recomputed, True), _by_group(standalone, True), "MTP module vs standalone")


@pytest.mark.megatron
def test_recomputing_modules_with_parameters_is_refused_at_engine_initialisation(checkpoint):
    from verl_mtp.megatron.decoupled import DecoupledSplitError

    with pytest.raises(DecoupledSplitError, match=r"recompute_modules=\['core_attn', 'mlp'\].*\['mlp'\]"):
        gradients(checkpoint, transformer_overrides=dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
                  mtp_training_mode="decoupled", mtp_loss_type="rl")


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.parametrize("scope", ["micro_batch", "mini_batch"])
def test_one_rl_step_with_occ_through_verls_worker(checkpoint, scope):
    # The trainer's path: old log-probs from infer_batch, then train_mini_batch (two mini-batches,
    # optimizer steps); OCC calibrates lambda for the shared parameters, the drafter loss is logged
    # as megatron's MTP loss.
    engine = real_engine.RealEngine.build(checkpoint, ExtendedMtpConfig(
        mtp_training_mode="decoupled", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scope=scope, mtp_drafter_loss="tv"))
    try:
        prompts, responses, advantages = real_engine.tiny_rollout()
        result = real_engine.rl_step(engine, prompts, responses, advantages)
    finally:
        engine.close()
    metrics = result.metrics
    for k in range(1, DEPTHS + 1):
        tv = [float(v) for v in metrics[f"mtp_losses/mtp_{k}_loss"]]
        assert len(tv) == 2 and all(0.0 < v < 1.0 for v in tv)  # a total variation, per mini-batch
        coef = [float(v) for v in metrics[f"actor/mtp_{k}/coef"]]
        assert len(coef) == 4 and coef[2] != 0.0  # OCC's lambda off-policy (second mini-batch)
        assert [float(v) for v in metrics[f"actor/mtp_{k}/occ_on_policy"]] == [1.0, 1.0, 0.0, 0.0]
    groups = {param_group(n) for n in result.changed()}
    assert groups == {"mtp", "trunk", "embedding", "lm_head"}, groups
