"""mtp_loss_type=rl end to end, as deep as CPU allows, with the plugin's patches active.

Real parts: a megatron-core GPTModel with 2 MTP depths; verl's patch_engine_mtp (wrapped by
verl-mtp), verl's gptmodel_forward_model_engine (BSHD), the engine's _lm_head_logits_processor
(wrapped by verl-mtp), verl's un-packing into nested tensors, and the actor loss that verl's
engine_workers binds (verl's ppo_loss wrapped by verl-mtp).

CPU boundary: verl's BSHD path passes a [batch, seq] padding mask that only TransformerEngine
attention accepts; the test hands megatron's local attention the equivalent 4-D causal mask
(right padding + causal attention: valid positions never attend to padding). The packed (THD)
path needs TransformerEngine and is covered by the packed tests of the pieces.
"""

import functools

import pytest
import torch
from verl.workers.utils.losses import ppo_loss

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.loss import MtpPolicyLoss
from verl_mtp.megatron.compat import expected_gradient_reach
from verl_mtp.megatron.grad_reach import gradient_norms_by_group
from verl_mtp.testing import engine_step
from verl_mtp.testing.engine_step import in_update_step
from verl_mtp.testing.tiny_megatron import TinyGPTSpec, cpu_megatron

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


def test_engine_forward_delivers_aligned_mtp_log_probs_equal_to_reference():
    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl")
    model, captured = build(mtp)
    prompts, responses, _ = batch()
    out = engine_forward(model, prompts, responses)
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
                assert aligned[i][t, k - 1].item() == pytest.approx(logp[tokens[t + 1]].item(), abs=1e-5)
                checked += 1
    assert checked == sum(RESPONSES) * DEPTHS - 1  # only (sequence 1, token 0, depth 2) has no prediction


@pytest.mark.parametrize("regime", ["standalone", "joint"])
def test_policy_loss_term_gradient_reach(regime):
    # The table explain prints for mtp_loss_type=rl, measured here on the installed megatron-core.
    reached = set(expected_gradient_reach(regime))
    mtp = ExtendedMtpConfig(mtp_training_mode=regime, mtp_loss_type="rl", mtp_loss_scaling_factor=1.0)
    model, _ = build(mtp)
    prompts, responses, g = batch(1)
    out = engine_forward(model, prompts, responses)
    config, data = loss_inputs(prompts, responses, g, mtp)
    term, _ = MtpPolicyLoss(ppo_loss).mtp_term(config, mtp, out, data)  # the MTP term alone
    model.zero_grad(set_to_none=True)
    term.backward()
    norms = gradient_norms_by_group(model)
    assert {group for group, norm in norms.items() if norm > 0} == reached, norms


def test_installed_actor_loss_trains_the_mtp_head_with_occ():
    import verl.workers.engine_workers as engine_workers

    assert isinstance(engine_workers.ppo_loss, MtpPolicyLoss)  # the name init_model binds
    mtp = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scope="micro_batch")
    model, _ = build(mtp)
    prompts, responses, g = batch(2)
    config, data = loss_inputs(prompts, responses, g, mtp)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("mtp.")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = engine_forward(model, prompts, responses)
    loss_function = functools.partial(engine_workers.ppo_loss, config=config)
    with in_update_step(loss_function, mini_batch_index=1, engine_trains=False):  # off-policy: OCC measures
        loss, metrics = loss_function(model_output=out, data=data)
    assert torch.isfinite(loss)
    for k in (1, 2):
        assert f"actor/mtp_{k}/pg_loss" in metrics and metrics[f"actor/mtp_{k}/occ_on_policy"] == 0.0
        assert metrics[f"actor/mtp_{k}/coef"] != 0.0
    loss.backward()
    optimizer.step()
    # The engine still collects megatron's MTP CE metrics after each step; an rl run adds none.
    from verl.utils.megatron_utils import get_megatron_mtp_loss

    assert get_megatron_mtp_loss(1) == {}
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("eh_proj" in n for n in changed) and any("layers.1." in n for n in changed)


def test_ce_runs_score_no_mtp_log_probs_but_report_agreement():
    mtp = ExtendedMtpConfig(mtp_training_mode="standalone", mtp_loss_type="ce")
    model, _ = build(mtp)
    prompts, responses, _ = batch(3)
    out = engine_forward(model, prompts, responses)
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
