"""The MTP policy-loss term on verl's real ppo_loss and policy-loss registry.

The model outputs here are synthetic tensors shaped exactly like the Megatron engine's
(jagged nested, full sequence = prompt + response): the forward that produces them on a real
model is tested separately.
"""

from types import SimpleNamespace

import pytest
import torch
import verl.utils.tensordict_utils as tu
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config.actor import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.loss import MtpLossError, MtpPolicyLoss
from verl_mtp.occ import OccCoefficient, calibrate

PROMPTS = [3, 2, 4]
RESPONSES = [4, 5, 2]
DEPTHS = 2


def nested(tensors):
    return torch.nested.nested_tensor(tensors, layout=torch.jagged)


def make_config(loss_mode="vanilla", entropy_coeff=0.0, use_kl_loss=False, actor=None, **mtp):
    config = ActorConfig(
        strategy="megatron", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
        entropy_coeff=entropy_coeff, use_kl_loss=use_kl_loss, **(actor or {}),
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )
    settings = {"mtp_training_mode": "joint", "mtp_loss_type": "rl", **mtp}
    config.model_config = SimpleNamespace(mtp=ExtendedMtpConfig(**settings))
    return config


def make_batch(seed=0, invalid_first=True, with_ref=False):
    """data, model_output and the same values as plain per-sequence response tensors (the reference)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    old = [-torch.rand(r, generator=g) * 2 for r in RESPONSES]
    adv = [torch.randn(r, generator=g) for r in RESPONSES]
    mask = [torch.ones(r) for r in RESPONSES]
    mask[1][-1] = 0  # a padded-out response token
    tensors = {
        "prompts": nested([torch.randint(0, 50, (p,), generator=g) for p in PROMPTS]),
        "responses": nested([torch.randint(0, 50, (r,), generator=g) for r in RESPONSES]),
        "response_mask": nested(mask),
        "old_log_probs": nested(old),
        "advantages": nested(adv),
    }
    if with_ref:
        tensors["ref_log_prob"] = nested([-torch.rand(r, generator=g) for r in RESPONSES])
    data = tu.get_tensordict(tensors, {"dp_size": 1, "batch_num_tokens": int(sum(m.sum() for m in mask)),
                                       "global_batch_size": len(PROMPTS)})
    log_probs = [-torch.rand(n, generator=g) * 2 for n in lengths]
    # MTP outputs in megatron's indexing: raw[t, k-1] scores input_ids[t+k+1]; its label must lie
    # inside the sequence.
    raw = [-torch.rand(n, DEPTHS, generator=g) * 2 for n in lengths]
    raw_valid = [torch.tensor([[t + k + 1 < n for k in range(1, DEPTHS + 1)] for t in range(n)]) for n in lengths]
    if invalid_first:
        # A slot the forward marked invalid holds garbage (it maps to sequence 0's response token 1, depth 2).
        raw_valid[0][1, 1] = False
        raw[0][1, 1] = float("nan")
    # The nested tensors are the autograd leaves, as the engine's outputs are graph nodes.
    output = {
        "log_probs": nested(log_probs).requires_grad_(),
        "entropy": nested([torch.rand(n, generator=g) for n in lengths]),
        "mtp_log_probs": nested(raw).requires_grad_(),
        "mtp_valid": nested(raw_valid),
    }

    # The reference, straight from the definition: response token j of a sequence with prompt
    # length P is scored by the main head at index P+j-1 and by depth k at raw index P+j-1-k.
    def mtp_reference(k):
        values, valid = [], []
        for x, ok, p, r in zip(raw, raw_valid, PROMPTS, RESPONSES):
            idx = [p + j - 1 - k for j in range(r)]
            valid.append(torch.tensor([i >= 0 and bool(ok[i, k - 1]) for i in idx]))
            values.append(torch.stack([x[i, k - 1] if i >= 0 else torch.tensor(0.0) for i in idx]))
        return values, valid

    reference = {
        "old": old, "adv": adv, "mask": mask,
        "log_prob": [x[p - 1 : p - 1 + r] for x, p, r in zip(log_probs, PROMPTS, RESPONSES)],
        "mtp": [mtp_reference(k) for k in range(1, DEPTHS + 1)],
    }
    return data, output, reference


def pad(seqs, fill=0.0):
    width = max(x.shape[0] for x in seqs)
    return torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[0]), value=fill) for x in seqs])


def reference_mtp_term(config, ref, coefs, weights):
    fn = get_policy_loss_fn(config.policy_loss["loss_mode"])
    total = 0.0
    for k in range(DEPTHS):
        values, valid = ref["mtp"][k]
        mask = pad([(m > 0) & v for m, v in zip(ref["mask"], valid)], False).bool()
        old = pad(ref["old"])
        q = torch.where(mask, pad(values), old)
        pg, _ = fn(old_log_prob=old, log_prob=q, advantages=pad(ref["adv"]), response_mask=mask,
                   loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=None)
        total = total + coefs[k] * weights[k] * pg
    return total


def test_zero_coefficient_reproduces_stock_loss_and_gradients():
    config = make_config(mtp_loss_scaling_factor=0.0)
    data, output, ref = make_batch()
    stock, stock_metrics = ppo_loss(config, output, data)
    (stock_grad,) = torch.autograd.grad(stock, output["log_probs"])
    ours, metrics = MtpPolicyLoss(ppo_loss)(config, output, data)
    assert torch.equal(ours, stock)
    grads = torch.autograd.grad(ours, [output["log_probs"], output["mtp_log_probs"]])
    assert torch.equal(grads[0].values(), stock_grad.values())
    assert torch.count_nonzero(grads[1].values()) == 0
    assert set(stock_metrics) <= set(metrics)


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo", "clip_cov"])
def test_fixed_coefficient_term_is_the_policy_loss_on_mtp_log_probs(loss_mode):
    config = make_config(loss_mode=loss_mode, mtp_loss_scaling_factor=0.3, mtp_step_weight_beta=0.5)
    data, output, ref = make_batch()
    stock, _ = ppo_loss(config, output, data)
    ours, metrics = MtpPolicyLoss(ppo_loss)(config, output, data)
    expected = reference_mtp_term(config, ref, [0.3, 0.3], [1.0, 0.5])
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours - stock, expected, rtol=1e-5, atol=1e-6)
    assert metrics["actor/mtp_2/step_weight"] == 0.5 and metrics["actor/mtp_1/coef"] == 0.3


def test_gradient_reaches_only_valid_mtp_positions():
    # Random log-probs give ratios far outside PPO's clip range (zero gradient); widen it.
    wide = {"clip_ratio": 100.0, "clip_ratio_low": 100.0, "clip_ratio_high": 100.0, "clip_ratio_c": 1000.0}
    config = make_config(mtp_loss_scaling_factor=1.0, actor=wide)
    data, output, ref = make_batch()
    loss, _ = MtpPolicyLoss(ppo_loss)(config, output, data)
    (grad,) = torch.autograd.grad(loss, output["mtp_log_probs"])
    assert torch.isfinite(grad.values()).all()
    seq0 = grad.values()[: PROMPTS[0] + RESPONSES[0]]  # sequence 0's tokens, [tokens, depth]
    # Sequence 0 (P=3, R=4): depth 1 scores response tokens from raw 1..4, depth 2 from raw 0..3.
    assert torch.count_nonzero(seq0[1:5, 0]) == 4 and seq0[0, 0] == 0 and torch.count_nonzero(seq0[5:, 0]) == 0
    assert seq0[1, 1] == 0.0  # the slot the forward marked invalid gets nothing
    assert torch.count_nonzero(seq0[[0, 2, 3], 1]) == 3 and torch.count_nonzero(seq0[4:, 1]) == 0
    # Sequence 1 (P=2): response token 0 would need depth 2 at raw index -1: no prediction, masked.
    seq1 = grad.values()[7:14]
    assert torch.count_nonzero(seq1[:, 1]) == 3  # raw 0..2 score response tokens 1..3 (token 4 is masked out)


def test_entropy_and_kl_keep_the_mtp_term():
    config = make_config(entropy_coeff=0.01, use_kl_loss=True, mtp_loss_scaling_factor=0.2)
    data, output, ref = make_batch(with_ref=True)
    stock, stock_metrics = ppo_loss(config, output, data)
    assert "actor/entropy_loss" in stock_metrics and "kl_loss" in stock_metrics
    ours, _ = MtpPolicyLoss(ppo_loss)(config, output, data)
    torch.testing.assert_close(ours - stock, reference_mtp_term(config, ref, [0.2, 0.2], [1.0, 1.0]),
                               rtol=1e-5, atol=1e-6)


def test_occ_coefficients_come_from_calibration():
    config = make_config(mtp_coef_mode="occ", occ_scope="micro_batch")
    data, output, ref = make_batch()
    loss_fn = MtpPolicyLoss(ppo_loss)
    with pytest.raises(MtpLossError, match="outside verl's mini-batch loop"):
        loss_fn(config, output, data)  # OCC never guesses where in the schedule it is
    loss_fn.begin_update_step(config)
    loss_fn.begin_mini_batch(config)
    loss_fn.begin_mini_batch(config)  # the step's second mini-batch: off-policy
    ours, metrics = loss_fn(config, output, data)
    masks = [pad([(m > 0) & v for m, v in zip(ref["mask"], ref["mtp"][k][1])], False).bool() for k in range(DEPTHS)]
    expected = calibrate([OccCoefficient(), OccCoefficient()], pad(ref["log_prob"]).detach(),
                         [pad(ref["mtp"][k][0]).detach() for k in range(DEPTHS)], pad(ref["old"]), masks)
    assert [metrics[f"actor/mtp_{k}/coef"] for k in (1, 2)] == pytest.approx(expected)
    stock, _ = ppo_loss(config, output, data)
    torch.testing.assert_close(ours - stock, reference_mtp_term(config, ref, expected, [1.0, 1.0]), rtol=1e-5, atol=1e-6)
    assert metrics["actor/mtp_1/occ_on_policy"] == 0.0
    # The step's next one is on-policy again: lambda follows occ_on_policy_coef (previous), not the formula.
    loss_fn.end_update_step(config)
    loss_fn.begin_update_step(config)
    loss_fn.begin_mini_batch(config)
    _, metrics = loss_fn(config, output, data)
    assert metrics["actor/mtp_1/occ_on_policy"] == 1.0
    assert [metrics[f"actor/mtp_{k}/coef"] for k in (1, 2)] == pytest.approx(expected)


def test_ce_loss_type_leaves_verl_loss_alone():
    config = make_config(mtp_loss_type="ce")
    data, output, _ = make_batch()
    stock, _ = ppo_loss(config, output, data)
    ours, metrics = MtpPolicyLoss(ppo_loss)(config, output, data)
    assert torch.equal(ours, stock) and not any("mtp_" in k for k in metrics)


def test_rl_without_mtp_log_probs_fails_clearly():
    config = make_config()
    data, output, _ = make_batch()
    del output["mtp_log_probs"]
    with pytest.raises(MtpLossError, match="delivered no mtp_log_probs"):
        MtpPolicyLoss(ppo_loss)(config, output, data)
