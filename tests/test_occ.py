"""OCC: known answers, masking, non-finite inputs, on-policy handling, data-parallel reduction."""

import math
import pytest
import torch

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.occ import OccCoefficient, UpdateSchedule, calibrate, occ_partial_sums
from verl_mtp.testing.gloo import run_on_gloo_ranks


def _batch(seed=0, shape=(4, 16)):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g) * 3
    delta = torch.randn(shape, generator=g) * 0.1
    mask = (torch.rand(shape, generator=g) > 0.2).float()
    return old, delta, mask


@pytest.mark.parametrize("a", [0.5, 2.0, -3.0])
def test_proportional_deltas_give_inverse_ratio(a):
    old, delta, mask = _batch()
    sums = occ_partial_sums(old + delta, old + a * delta, old, mask)
    # Inputs are fp32 log-probs, so the deltas carry fp32 rounding (~1e-7 relative).
    coef = OccCoefficient(scale=1.0, eps=1e-12).update(sums)
    assert coef == pytest.approx(1.0 / a, rel=1e-5)
    assert OccCoefficient(scale=0.5, eps=1e-12).update(sums) == pytest.approx(0.5 / a, rel=1e-5)


def test_matches_formula_on_random_inputs():
    old, delta, mask = _batch(1)
    mtp = old + torch.randn_like(old) * 0.2
    d_rl = ((old + delta) - old).double() * mask
    d_mtp = (mtp - old).double() * mask
    expected = float((d_rl * d_mtp).sum() / ((d_mtp**2).sum() + 1e-8))
    assert OccCoefficient().update(occ_partial_sums(old + delta, mtp, old, mask)) == pytest.approx(expected, rel=1e-6)


def test_masked_tokens_do_not_change_lambda():
    old, delta, mask = _batch(2)
    mtp = old + torch.randn_like(old) * 0.3
    base = OccCoefficient().update(occ_partial_sums(old + delta, mtp, old, mask))
    # Garbage (huge values, NaN, inf) in masked positions must not matter.
    junk = torch.where(mask.bool(), torch.zeros_like(old), torch.full_like(old, float("nan")))
    junk_mtp = torch.where(mask.bool(), mtp, torch.full_like(old, 1e9))
    again = OccCoefficient().update(occ_partial_sums(old + delta + junk, junk_mtp, old, mask))
    assert again == base


def test_non_finite_valid_positions_are_dropped_and_counted():
    old, delta, mask = _batch(3)
    mask[0, 0] = 1
    log_prob = old + delta
    log_prob[0, 0] = float("nan")
    sums = occ_partial_sums(log_prob, old + 2 * delta, old, mask)
    coef = OccCoefficient(eps=1e-12)
    assert coef.update(sums) == pytest.approx(0.5, rel=1e-5)
    assert coef.last["dropped_tokens"] == 1.0


@pytest.mark.parametrize("rule, expected", [("zero", 0.0), ("fixed", 0.1), ("previous", 0.5)])
def test_empty_mask_measures_nothing_and_takes_the_on_policy_rule(rule, expected):
    old, delta, mask = _batch(4)
    coef = OccCoefficient(on_policy=rule, fixed=0.1, eps=1e-12)
    coef.update(occ_partial_sums(old + delta, old + 2 * delta, old, mask))  # off-policy: 0.5
    assert coef.update(occ_partial_sums(old + delta, old, old, torch.zeros_like(old))) == pytest.approx(expected)
    assert coef.last["on_policy"] == 1.0 and coef.last["tokens"] == 0.0
    assert coef.last_off_policy == pytest.approx(0.5)  # an empty mini-batch does not overwrite previous


@pytest.mark.parametrize("rule, expected", [("zero", 0.05), ("fixed", 0.2), ("previous", 0.2)])
def test_the_on_policy_rule_is_clipped_like_every_lambda(rule, expected):
    old, delta, mask = _batch(8)
    coef = OccCoefficient(on_policy=rule, fixed=0.9, coef_min=0.05, coef_max=0.2, eps=1e-12)
    coef.update(occ_partial_sums(old + delta, old + 2 * delta, old, mask))  # off-policy 0.5, clipped to 0.2
    assert coef.update(occ_partial_sums(old, old + delta, old, mask), on_policy=True) == pytest.approx(expected)


@pytest.mark.parametrize("rule, expected", [("zero", 0.0), ("fixed", 0.1), ("previous", 0.5)])
def test_on_policy_minibatch_uses_the_configured_rule(rule, expected):
    old, delta, mask = _batch(5)
    coef = OccCoefficient(on_policy=rule, fixed=0.1, eps=1e-12)
    coef.update(occ_partial_sums(old + delta, old + 2 * delta, old, mask))  # off-policy: 0.5
    on_policy = coef.update(occ_partial_sums(old, old + delta, old, mask), on_policy=True)  # pi_theta == pi_old
    assert coef.last["on_policy"] == 1.0 and coef.last["numerator"] == 0.0
    assert on_policy == pytest.approx(expected)


@pytest.mark.parametrize("rule, expected", [("zero", 0.0), ("fixed", 0.1), ("previous", 0.5)])
def test_on_policy_is_the_schedules_word_not_a_threshold_on_delta_rl(rule, expected):
    """bf16: the old log-probs from another pass differ by ~1e-3 per token on the on-policy
    mini-batch. The formula there is noise (here -0.5 or +0.5 by the noise's sign); the schedule's
    flag gives the rule's value and leaves ``previous`` untouched."""
    old, delta, mask = _batch(5)
    noise = 1e-3 * torch.sign(torch.randn(old.shape, generator=torch.Generator().manual_seed(3)))
    coef = OccCoefficient(on_policy=rule, fixed=0.1, eps=1e-12)
    coef.update(occ_partial_sums(old + delta, old + 2 * delta, old, mask))  # off-policy: 0.5
    for sign in (-1.0, 1.0):
        value = coef.update(occ_partial_sums(old + noise, old + sign * 2 * noise, old, mask), on_policy=True)
        assert value == pytest.approx(expected)
        assert coef.last["raw_coef"] == pytest.approx(sign * 0.5, rel=1e-4)  # what the threshold rule would use
        assert coef.last["delta_rl_rms"] == pytest.approx(1e-3, rel=1e-4)
    assert coef.last_off_policy == pytest.approx(0.5)
    # The same sums off-policy are taken at face value.
    assert coef.update(occ_partial_sums(old + noise, old + 2 * noise, old, mask)) == pytest.approx(0.5, rel=1e-4)


def test_update_schedule_marks_only_the_first_mini_batch_of_a_step():
    schedule = UpdateSchedule()
    assert schedule.on_policy is None  # outside verl's loop: unknown, never guessed
    for _step in range(2):
        schedule.begin_step()
        seen = []
        for _ in range(3):  # e.g. 3 mini-batches (or ppo_epochs x mini-batches)
            schedule.begin_mini_batch()
            seen.append(schedule.on_policy)
        assert seen == [True, False, False]
        schedule.end_step()
        assert schedule.on_policy is None


def test_previous_is_zero_before_any_off_policy_minibatch():
    old, delta, mask = _batch(6)
    coef = OccCoefficient(on_policy="previous")
    assert coef.update(occ_partial_sums(old, old + delta, old, mask), on_policy=True) == 0.0


def test_ema_and_clip():
    old, delta, mask = _batch(7)
    coef = OccCoefficient(ema_decay=0.5, coef_max=0.8, eps=1e-12)
    assert coef.update(occ_partial_sums(old + delta, old + 1.0 * delta, old, mask)) == pytest.approx(0.8)  # 1.0 clipped
    # EMA state is unclipped: 0.5 * 1.0 + 0.5 * 0.25 = 0.625
    assert coef.update(occ_partial_sums(old + delta, old + 4.0 * delta, old, mask)) == pytest.approx(0.625, rel=1e-5)
    state = coef.state_dict()
    restored = OccCoefficient(ema_decay=0.5, coef_max=0.8)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_from_config():
    cfg = ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scale=2.0,
                            occ_on_policy_coef="fixed", mtp_loss_scaling_factor=0.3)
    coef = OccCoefficient.from_config(cfg)
    assert (coef.scale, coef.on_policy, coef.fixed) == (2.0, "fixed", 0.3)


def test_no_gradient_flows_through_statistics():
    old, delta, mask = _batch(8)
    log_prob = (old + delta).requires_grad_()
    assert not occ_partial_sums(log_prob, old + delta * 2, old, mask).requires_grad


# --- data-parallel reduction: 2 gloo processes == one process on the concatenated batch -------


def test_data_parallel_reduction_equals_single_rank_on_concatenated_batch():
    old, delta, mask = _batch(9, shape=(6, 10))
    log_prob = old + delta
    mtp = [old + torch.randn_like(old) * 0.2, old + torch.randn_like(old) * 0.5]  # two depths
    # Uneven shards with different valid-token counts: a mean of per-rank lambdas would differ.
    per_rank_args = [
        ([OccCoefficient(), OccCoefficient()], log_prob[rows], [q[rows] for q in mtp], old[rows], mask[rows])
        for rows in (slice(0, 1), slice(1, None))
    ]

    single = calibrate([OccCoefficient(), OccCoefficient()], log_prob, mtp, old, mask)
    per_rank_mean = [sum(calibrate([OccCoefficient(), OccCoefficient()], *args[1:])[k] for args in per_rank_args) / 2
                     for k in range(2)]
    assert not math.isclose(per_rank_mean[0], single[0], rel_tol=1e-3)  # the reference patch's error

    results = run_on_gloo_ranks(calibrate, per_rank_args)
    assert results[0] == results[1]
    assert results[0] == pytest.approx(single, rel=1e-12)


def test_calibrate_rejects_depth_mismatch():
    old, delta, mask = _batch(10)
    with pytest.raises(ValueError, match="1 OCC coefficients for 2 MTP depths"):
        calibrate([OccCoefficient()], old + delta, [old, old], old, mask)
