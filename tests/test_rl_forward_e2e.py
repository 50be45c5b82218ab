"""mtp_loss_type=rl end to end, with the plugin's patches active.

Through verl's real Megatron engine in bf16 (verl_mtp/testing/real_engine.py: the engine built
from a checkpoint with Float16Module and DDP, its ``forward_backward_batch`` through megatron's
schedule, the worker's ``infer_batch`` / ``train_mini_batch``, megatron's optimizer): the
aligned MTP log-probs, the gradient reach of the MTP policy-loss term, the installed actor loss
training the head with OCC, and ce runs' outputs.

On the bare fp32 model with the engine's forward pieces (``engine_step``: verl's
``gptmodel_forward_model_engine`` and the engine's logits processor, no engine object): the
token-chunking equality (to 1e-6, which bf16 cannot resolve) and the stash test, which makes a
forward whose logits never reach the logits processor, something the engine never does.
"""

import pytest
import torch
from verl.workers.utils.losses import ppo_loss

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.local_megatron import engine_step
from verl_mtp.local_megatron.single_process import cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec
from verl_mtp.loss import MtpPolicyLoss
from verl_mtp.megatron.compat import expected_gradient_reach
from verl_mtp.testing import real_engine

pytestmark = pytest.mark.megatron

PROMPTS, RESPONSES, DEPTHS, TEMPERATURE = [3, 2, 4], [4, 5, 2], 2, 0.8


def build(mtp: ExtendedMtpConfig):
    model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS))
    captured = {}
    model.mtp.register_forward_hook(lambda module, args, output: captured.__setitem__("hidden", output))
    return model, captured


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (p,), generator=g) for p in PROMPTS]
    responses = [torch.randint(0, 64, (r,), generator=g) for r in RESPONSES]
    return prompts, responses, g


def engine_forward(model, prompts, responses, mtp_enable_train=True):
    return engine_step.engine_forward(model, prompts, responses, TEMPERATURE, mtp_enable_train)


def loss_inputs(prompts, responses, g, mtp):
    old = [-torch.rand(r, generator=g) * 4 for r in RESPONSES]
    advantages = [torch.randn(r, generator=g) for r in RESPONSES]
    return engine_step.actor_loss_inputs(prompts, responses, old, advantages, mtp)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    return real_engine.write_tiny_engine_checkpoint(str(tmp_path_factory.mktemp("rl_ckpt")), mtp_depths=DEPTHS)


def real(checkpoint, micro_batch_size=len(PROMPTS), **mtp):
    return real_engine.RealEngine.build(
        checkpoint, ExtendedMtpConfig(enable=True, enable_train=True, **mtp), micro_batch_size=micro_batch_size,
        temperature=TEMPERATURE,
    )


def engine_outputs(engine, prompts, responses, loss=None, g=None):
    """One training-mode ``forward_backward_batch`` of the engine over the sequences; returns the
    (model_output, micro-batch data) pairs the loss function saw. ``loss(model_output, data)``
    is backpropagated (default: the main log-probs x 0)."""
    old = advantages = None
    if g is not None:
        width = max(len(r) for r in responses)
        old, advantages = -torch.rand(len(prompts), width, generator=g) * 4, torch.randn(len(prompts), width, generator=g)
    data = engine.mini_batch_data(real_engine.rollout_batch(prompts, responses), old, advantages, calculate_entropy=True)
    seen = []

    def capture(model_output, data, dp_group=None):
        seen.append((model_output, data))
        value = loss(model_output, data) if loss else model_output["log_probs"].values().sum() * 0.0
        return value, {}

    engine.forward_backward(data, capture)
    return seen


def main_grads(engine):
    """Gradients the backward left in megatron's DDP buffers, by parameter name."""
    return {n: p.main_grad.detach().clone() for n, p in engine.named_parameters() if getattr(p, "main_grad", None) is not None}


def test_engine_forward_delivers_aligned_mtp_log_probs_equal_to_reference(checkpoint):
    engine = real(checkpoint, mtp_training_mode="joint", mtp_loss_type="rl")
    captured = {}
    model = engine.gpt_models()[0]
    model.mtp.register_forward_hook(lambda module, args, output: captured.__setitem__("hidden", output))
    prompts, responses, _ = batch()
    try:
        ((out, _),) = engine_outputs(engine, prompts, responses)
    finally:
        engine.zero_grad()
        engine.close()
    assert set(out) >= {"log_probs", "entropy", "mtp_log_probs", "mtp_valid"}
    assert out["mtp_log_probs"].is_nested and out["mtp_log_probs"].values().shape == (sum(PROMPTS) + sum(RESPONSES), DEPTHS)

    from verl_mtp.align import align_mtp_to_main_head

    aligned, valid = align_mtp_to_main_head(out["mtp_log_probs"], out["mtp_valid"])
    chunks = torch.chunk(captured["hidden"], 1 + DEPTHS, dim=0)  # [s_max, b, h] each (BSHD, right-padded)
    weight = model.output_layer.weight.detach().double()
    checked = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens = torch.cat([p, r])
        for j in range(len(r)):
            t = len(p) + j - 1  # main-head index of response token j
            for k in range(1, DEPTHS + 1):
                source = t - k  # hidden position of depth k that scores tokens[t + 1]
                if source < 0:
                    assert not valid[i][t, k - 1]
                    continue
                assert valid[i][t, k - 1]
                logp = torch.log_softmax(chunks[k][source, i].double() @ weight.T / TEMPERATURE, dim=-1)
                # bf16 logits (megatron's output layer) against a float64 product of the same
                # bf16 tensors; a neighbouring token or position is off by O(1)
                assert aligned[i][t, k - 1].item() == pytest.approx(logp[tokens[t + 1]].item(), abs=5e-2)
                checked += 1
    assert checked == sum(RESPONSES) * DEPTHS - 1  # only (sequence 1, token 0, depth 2) has no prediction


@pytest.mark.parametrize("regime", ["standalone", "joint"])
def test_policy_loss_term_gradient_reach(checkpoint, regime):
    # The table explain prints for mtp_loss_type=rl, measured on the installed megatron-core
    # through the engine (Float16Module, DDP gradient buffers).
    from verl_mtp.testing.grad_reach import PARAM_GROUPS, param_group

    reached = set(expected_gradient_reach(regime))
    engine = real(checkpoint, mtp_training_mode=regime, mtp_loss_type="rl", mtp_loss_scaling_factor=1.0)
    mtp = engine.actor_config.model_config.mtp
    prompts, responses, g = batch(1)
    term = lambda out, data: MtpPolicyLoss(ppo_loss).mtp_term(engine.actor_config, mtp, out, data)[0]  # noqa: E731
    try:
        engine.zero_grad()
        engine_outputs(engine, prompts, responses, loss=term, g=g)
        grads = main_grads(engine)
    finally:
        engine.zero_grad()
        engine.close()
    norms = dict.fromkeys(PARAM_GROUPS, 0.0)
    for name, grad in grads.items():
        norms[param_group(name)] += float(grad.float().pow(2).sum())
    assert {group for group, norm in norms.items() if norm > 0} == reached, norms


def test_installed_actor_loss_trains_the_mtp_head_with_occ(checkpoint):
    import verl.workers.engine_workers as engine_workers

    assert isinstance(engine_workers.ppo_loss, MtpPolicyLoss)  # the name init_model binds
    engine = real(checkpoint, micro_batch_size=2, mtp_training_mode="joint", mtp_loss_type="rl",
                  mtp_coef_mode="occ", occ_scope="micro_batch")
    try:
        step = real_engine.rl_step(engine, *real_engine.tiny_rollout(seed=2))
    finally:
        engine.close()
    metrics = step.metrics
    assert all(torch.isfinite(torch.tensor([float(v) for v in metrics["loss"]])))
    for k in (1, 2):
        assert f"actor/mtp_{k}/pg_loss" in metrics
        assert [float(v) for v in metrics[f"actor/mtp_{k}/occ_on_policy"]][2:] == [0.0, 0.0]
        assert all(float(c) != 0.0 for c in metrics[f"actor/mtp_{k}/coef"][2:])
    # The engine still collects megatron's MTP CE metrics after each step; an rl run adds none.
    assert not any(key.startswith("mtp_losses/") for key in metrics)
    changed = step.changed()
    assert any("eh_proj" in n for n in changed) and any("layers.1." in n for n in changed)


def test_ce_runs_score_no_mtp_log_probs_but_report_agreement(checkpoint):
    engine = real(checkpoint, mtp_training_mode="standalone", mtp_loss_type="ce")
    prompts, responses, _ = batch(3)
    try:
        ((out, _),) = engine_outputs(engine, prompts, responses)
    finally:
        engine.zero_grad()
        engine.close()
    assert "mtp_log_probs" not in out and "log_probs" in out
    assert {"mtp_agree", "mtp_valid"} <= set(out)


def test_a_stash_never_reaches_another_forwards_output():
    from verl_mtp.megatron import mtp_forward

    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl")
    model, _ = build(mtp)
    prompts, responses, _ = batch(4)
    labels = torch.roll(torch.cat([prompts[0], responses[0]]).unsqueeze(0), -1, dims=-1)
    with cpu_megatron():  # a forward with labels whose logits never go through the processor
        model(input_ids=labels, position_ids=torch.arange(labels.shape[1]).unsqueeze(0), attention_mask=None, labels=labels)
    assert mtp_forward._slot.pending is not None
    out = engine_forward(model, prompts, responses, mtp_enable_train=False)  # no MTP in this forward
    assert "mtp_log_probs" not in out
    assert mtp_forward._slot.pending is None


@pytest.mark.parametrize(
    "regime, loss_type", [("joint", "rl"), ("standalone", "rl"), ("joint", "ce"), ("standalone", "ce")]
)
def test_token_chunked_step_equals_unchunked(regime, loss_type):
    # The whole actor step (engine forward, installed actor loss, backward) with 3-token logits
    # chunks gives the loss and every parameter gradient of the unchunked step.
    import verl.workers.engine_workers as engine_workers
    from verl.utils.megatron_utils import get_megatron_mtp_loss

    def step(chunk_tokens):
        mtp = ExtendedMtpConfig(mtp_training_mode=regime, mtp_loss_type=loss_type, mtp_logits_chunk_tokens=chunk_tokens)
        model, _ = build(mtp)
        assert model._verl_mtp_plan.chunk_tokens == chunk_tokens
        prompts, responses, g = batch(5)
        config, data = loss_inputs(prompts, responses, g, mtp)
        model.zero_grad(set_to_none=True)
        loss, _ = engine_workers.ppo_loss(config, engine_forward(model, prompts, responses), data)
        loss.backward()
        ce = get_megatron_mtp_loss(1)  # drains megatron's MTP loss tracker (ce only)
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, ce

    ref_loss, ref_grads, ref_ce = step(0)
    loss, grads, ce = step(3)
    assert grads.keys() == ref_grads.keys() and any(n.startswith("mtp.") for n in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()), msg=name)
    assert bool(ref_ce) == (loss_type == "ce"), ref_ce
    assert ce.keys() == ref_ce.keys() and all(ce[k] == pytest.approx(ref_ce[k], abs=1e-6) for k in ce)
