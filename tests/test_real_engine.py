"""verl's real Megatron engine in bf16, on CPU: every MTP regime x loss type x OCC scope.

What runs is what a ``main_ppo`` actor runs: ``MegatronEngineWithLMHead`` built from a Hugging
Face checkpoint through verl's vanilla-mbridge path (verl-mtp's MiMo bridge, megatron's
``Float16Module`` and DDP, the distributed optimizer), old log-probs from the worker's
``infer_batch`` (its own micro-batch size, 4), the update through the worker's
``train_mini_batch`` -> engine ``train_batch`` -> megatron's schedule (micro-batches of 2), and
megatron's optimizer step, with the loss function verl's actor worker binds. The CPU
redirections are listed in verl_mtp/testing/real_engine.py. Eight sequences, mini-batches of
four: two mini-batches per step, so the second one is off-policy.
"""

import os

import pytest
import torch

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.megatron.compat import expected_gradient_reach
from verl_mtp.testing import real_engine
from verl_mtp.testing.grad_reach import PARAM_GROUPS, param_group

pytestmark = pytest.mark.megatron

DEPTHS = 2
# (loss type, coefficient mode, OCC scope)
LOSSES = [("ce", "fixed", None), ("rl", "fixed", None), ("rl", "occ", "micro_batch"), ("rl", "occ", "mini_batch")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    return real_engine.write_tiny_engine_checkpoint(str(tmp_path_factory.mktemp("engine_ckpt")), mtp_depths=DEPTHS)


def step(checkpoint, clip_grad=1e9, **mtp):
    # clip_grad out of reach: the global grad norm includes the MTP head's gradient, so clipping
    # would scale the trunk's update differently with and without MTP.
    engine = real_engine.RealEngine.build(checkpoint, ExtendedMtpConfig(**mtp), clip_grad=clip_grad)
    try:
        return real_engine.rl_step(engine, *real_engine.tiny_rollout())
    finally:
        engine.close()


@pytest.fixture(scope="module")
def no_mtp_step(checkpoint):
    """The same step from the same weights with MTP disabled (verl drops the MTP depths)."""
    return step(checkpoint, enable=False)


def values(metrics, key):
    assert key in metrics, f"{key} missing from {sorted(metrics)}"
    return [float(v) for v in metrics[key]]


@pytest.mark.parametrize("loss_type, coef_mode, scope", LOSSES, ids=["-".join(filter(None, c)) for c in LOSSES])
@pytest.mark.parametrize("regime", ["standalone", "joint"])
def test_one_step_through_verls_engine(checkpoint, no_mtp_step, regime, loss_type, coef_mode, scope):
    mtp = dict(enable=True, enable_train=True, mtp_training_mode=regime, mtp_loss_type=loss_type, mtp_coef_mode=coef_mode)
    if scope:
        mtp["occ_scope"] = scope
    result = step(checkpoint, **mtp)
    metrics = result.metrics

    # Old log-probs come from infer_batch (bf16 model): finite, negative, the main head's alone.
    assert result.old_log_probs.shape == no_mtp_step.old_log_probs.shape
    assert torch.isfinite(result.old_log_probs).all() and (result.old_log_probs <= 0).all()
    torch.testing.assert_close(result.old_log_probs, no_mtp_step.old_log_probs, rtol=0, atol=0)

    assert len(values(metrics, "actor/pg_loss")) == 2  # two mini-batches, one optimizer step each
    assert all(torch.isfinite(torch.tensor(values(metrics, "grad_norm"))))
    for k in range(1, DEPTHS + 1):
        agreement = values(metrics, f"actor/mtp_{k}/draft_agreement")
        assert len(agreement) == 2 and all(0.0 <= a <= 1.0 for a in agreement)
        if loss_type == "ce":
            ce = values(metrics, f"mtp_losses/mtp_{k}_loss")  # megatron's tracker, read by verl's engine
            assert all(0.0 < v < 20.0 for v in ce)
            assert f"actor/mtp_{k}/pg_loss" not in metrics
            continue
        assert not any(key.startswith("mtp_losses/") for key in metrics)  # rl adds no CE term
        assert all(torch.isfinite(torch.tensor(values(metrics, f"actor/mtp_{k}/pg_loss"))))
        coef = values(metrics, f"actor/mtp_{k}/coef")
        assert len(coef) == 4 and all(torch.isfinite(torch.tensor(coef)))  # 2 mini-batches x 2 micro-batches
        if coef_mode == "fixed":
            assert coef == [pytest.approx(0.1)] * 4  # mtp_loss_scaling_factor
            continue
        # the step's first mini-batch is on-policy; the second follows an update
        assert values(metrics, f"actor/mtp_{k}/occ_on_policy") == [1.0, 1.0, 0.0, 0.0]
        assert coef[2] != 0.0 and coef[3] != 0.0
        if scope == "mini_batch":  # one lambda for the whole second mini-batch
            assert coef[2] == coef[3]

    # What the update changed, group by group, against the MTP-disabled step from the same weights.
    assert any(name.startswith("mtp.") for name in result.changed())
    assert all(result.changed() >= {n for n in result.after if n.startswith(f"mtp.layers.{k - 1}.eh_proj")}
               for k in range(1, DEPTHS + 1))
    reached = set(expected_gradient_reach(regime))
    differs = {group: False for group in PARAM_GROUPS if group != "mtp"}
    for name, ref in no_mtp_step.after.items():
        differs[param_group(name)] |= not torch.equal(result.after[name], ref)
    assert {group for group, changed in differs.items() if changed} == reached - {"mtp"}, differs


def test_disabled_mtp_builds_no_mtp_head(no_mtp_step):
    assert not any(name.startswith("mtp.") for name in no_mtp_step.after)
    assert not any("mtp" in key for key in no_mtp_step.metrics)
    assert no_mtp_step.changed()  # the main head still trains


def test_the_engine_is_built_as_a_real_run_builds_it(checkpoint):
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.module import Float16Module
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    engine = real_engine.RealEngine.build(checkpoint, ExtendedMtpConfig(enable=True, enable_train=True))
    try:
        assert type(engine.engine) is MegatronEngineWithLMHead
        (chunk,) = engine.engine.module
        assert isinstance(chunk, DistributedDataParallel) and isinstance(chunk.module, Float16Module)
        model = engine.gpt_models()[0]
        assert model.config.bf16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert len(model.mtp.layers) == DEPTHS
        optimizers = getattr(engine.engine.optimizer, "chained_optimizers", [engine.engine.optimizer])
        assert all(isinstance(o, DistributedOptimizer) for o in optimizers)
    finally:
        engine.close()


def test_the_redirections_are_undone_after_each_call(checkpoint):
    originals = (torch.cuda.current_device, torch.nn.Module.cuda, torch.cuda.synchronize, torch.cuda.mem_get_info)
    engine = real_engine.RealEngine.build(checkpoint, ExtendedMtpConfig(enable=True, enable_train=True))
    try:
        assert (torch.cuda.current_device, torch.nn.Module.cuda, torch.cuda.synchronize, torch.cuda.mem_get_info) == originals
        assert torch.zeros(1, device="meta").device.type == "meta"  # no device mode left active
        model = engine.gpt_models()[0]
        assert "forward" in model.__dict__  # the causal-mask shim lives on the instance only
    finally:
        engine.close()
    assert "forward" not in model.__dict__


def _spawn_pipeline(checkpoint, scenarios, out_dir):
    import torch.multiprocessing as mp

    from verl_mtp.local_megatron.single_process import free_port as _free_port

    mp.spawn(real_engine.pipeline_rank_main, args=(_free_port(), checkpoint, scenarios, str(out_dir)), nprocs=2)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_two_pipeline_stages_on_gloo(checkpoint, no_mtp_step, tmp_path):
    # Two ranks, pipeline parallelism 2: megatron's p2p exchange runs on gloo, the MTP head and
    # the loss on the last stage. The same step as the single-rank tests, so the same numbers;
    # OCC in both scopes (mini_batch: the pre-pass runs on both stages, lambda where the loss runs).
    scenarios = [
        dict(mtp_training_mode="standalone", mtp_loss_type="ce"),
        dict(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scope="micro_batch"),
        dict(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scope="mini_batch"),
    ]
    first, last = _spawn_pipeline(checkpoint, scenarios, tmp_path)
    single = {i: step(checkpoint, clip_grad=1.0, enable=True, enable_train=True, **s) for i, s in enumerate(scenarios)}
    for index in range(len(scenarios)):
        assert first[index]["metrics"] == {} and first[index]["old_log_probs"] is None  # no outputs on stage 0
        assert all(n.startswith(("embedding.", "decoder.")) for n in first[index]["names"])
        assert any(n.startswith("mtp.") for n in last[index]["names"])
        assert first[index]["changed"] and any(n.startswith("mtp.") for n in last[index]["changed"])
        torch.testing.assert_close(last[index]["old_log_probs"], single[index].old_log_probs, rtol=0, atol=1e-6)
        metrics, reference = last[index]["metrics"], single[index].metrics
        for key in ("actor/pg_loss", "actor/mtp_1/draft_agreement", "actor/mtp_2/draft_agreement"):
            assert values(metrics, key) == pytest.approx(values(reference, key), abs=2e-2), key
    assert values(last[0]["metrics"], "mtp_losses/mtp_1_loss")[0] == pytest.approx(
        values(single[0].metrics, "mtp_losses/mtp_1_loss")[0], abs=2e-2)
    for index in (1, 2):  # OCC, micro_batch and mini_batch scope: lambda where the loss runs (stage 1)
        coef = values(last[index]["metrics"], "actor/mtp_1/coef")
        assert values(last[index]["metrics"], "actor/mtp_1/occ_on_policy") == [1.0, 1.0, 0.0, 0.0]
        assert all(torch.isfinite(torch.tensor(coef))) and coef[2] != 0.0
        assert coef == pytest.approx(values(single[index].metrics, "actor/mtp_1/coef"), rel=2e-2)
    lam = values(last[2]["metrics"], "actor/mtp_1/coef")
    assert lam[2] == lam[3]  # one lambda for the whole second mini-batch


def test_on_policy_mini_batch_comes_from_the_schedule_not_from_delta_rl(checkpoint):
    """The old log-probs of a real run come from another pass than the training forward (the
    rollout engine in bypass mode, or infer_batch with other GEMM shapes on a GPU) and differ from
    it by bf16 noise, ~1e-3 per token, on the step's first mini-batch although no update happened.
    On this CPU infer_batch and the training forward agree bit for bit, so the noise is added to
    the old log-probs here. The first mini-batch must still be on-policy (lambda from
    occ_on_policy_coef=previous: 0, nothing measured yet), not the formula applied to noise."""
    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ")
    engine = real_engine.RealEngine.build(checkpoint, mtp)
    try:
        prompts, responses, advantages = real_engine.tiny_rollout()
        batch = real_engine.rollout_batch(prompts, responses)
        old = engine.compute_log_prob(batch)["old_log_probs"]
        noise = 1e-3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(0))
        metrics = engine.update_actor(batch, old + noise, advantages[:, : batch["responses"].shape[1]])
    finally:
        engine.close()
    for k in range(1, DEPTHS + 1):
        assert values(metrics, f"actor/mtp_{k}/occ_on_policy") == [1.0, 1.0, 0.0, 0.0]
        rms = values(metrics, f"actor/mtp_{k}/occ_delta_rl_rms")
        assert all(3e-4 < r < 3e-3 for r in rms[:2]), rms  # the noise floor, not zero
        coef = values(metrics, f"actor/mtp_{k}/coef")
        assert coef[:2] == [0.0, 0.0], coef  # the rule, not lambda_plus * c / v2 of the noise
        assert coef[2] != 0.0 and coef[3] != 0.0
