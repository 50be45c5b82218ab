"""Drafter losses (``kl``, ``tv``): an MTP depth's distribution against the policy's, per token.

Checked against the direct formulas on ``torch.log_softmax`` and autograd's gradient of them, in
fp32 (to 1e-6), with bf16 logits, through the tiny megatron-core GPT's real output layer with token
chunking (chunked == unchunked), and split over two tensor-parallel gloo ranks (vocabulary slices,
with and without sequence parallelism) through megatron's ColumnParallelLinear.
"""

import pytest
import torch

from verl_mtp.megatron import tempered_log_probs as tempered
from verl_mtp.megatron.drafter_losses import drafter_divergence, mtp_drafter_divergences

KINDS = ("kl", "tv")
# 1.0 and 0.7 as one value for every token; "per-token" as verl hands temperatures.
TEMPERATURES = (1.0, 0.7, "per-token")


def _temperature(spec, shape, gen):
    if spec == "per-token":
        return 0.5 + torch.rand(shape, generator=gen)
    return torch.full(shape, spec)


def _inputs(seed=0, s=7, b=3, vocab=50, dtype=torch.float32, temperature=0.7):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(s, b, vocab, generator=gen) * 2).to(dtype)
    teacher = (torch.randn(s, b, vocab, generator=gen) * 2).to(dtype)
    temperature = _temperature(temperature, (s, b), gen)
    upstream = torch.randn(s, b, generator=gen)
    return student, teacher, temperature, upstream


def _reference_value(student, teacher, kind, temperature):
    """The divergence written directly, in fp32: [..., V] logits -> [...]."""
    scale = temperature.unsqueeze(-1) if temperature is not None else 1.0
    log_q = torch.log_softmax(student.float() / scale, dim=-1)
    log_p = torch.log_softmax(teacher.float() / scale, dim=-1)
    if kind == "kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _reference(student, teacher, kind, temperature, upstream):
    leaf = student.detach().clone().requires_grad_()
    value = _reference_value(leaf, teacher, kind, temperature)
    (value * upstream).sum().backward()
    return value.detach(), leaf.grad


def _close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# None: one block; 2: several, the last ragged (kl holds three fp32 scratch blocks, tv two)
@pytest.mark.parametrize("rows_per_block", [None, 2])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_direct_formula_and_its_gradient_in_fp32(kind, temperature, rows_per_block, monkeypatch):
    student, teacher, temperature, upstream = _inputs(temperature=temperature)
    if rows_per_block:
        monkeypatch.setattr(tempered, "_CPU_BLOCK_BYTES", 3 * 4 * student.shape[-1] * rows_per_block)
    expected, expected_grad = _reference(student, teacher, kind, temperature, upstream)
    leaf = student.clone().requires_grad_()
    teacher_leaf = teacher.clone().requires_grad_()  # asks for a gradient: it must get none
    got = drafter_divergence(leaf, teacher_leaf, kind, temperature)
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32 and got.shape == student.shape[:-1]
    _close(got, expected)
    _close(leaf.grad, expected_grad)
    assert teacher_leaf.grad is None


def test_temperature_none_is_one():
    student, teacher, _, _ = _inputs()
    for kind in KINDS:
        assert torch.equal(drafter_divergence(student, teacher, kind), drafter_divergence(student, teacher, kind, 1.0))


def test_tv_is_one_minus_the_acceptance_and_kl_has_soft_cross_entropys_gradient():
    student, teacher, temperature, upstream = _inputs()
    q = torch.softmax(student / temperature.unsqueeze(-1), dim=-1)
    p = torch.softmax(teacher / temperature.unsqueeze(-1), dim=-1)
    _close(drafter_divergence(student, teacher, "tv", temperature), 1 - torch.minimum(p, q).sum(-1))
    # soft cross-entropy -Σ p log q: same gradient wrt the student's logits, (q - p) / T
    leaf = student.clone().requires_grad_()
    (drafter_divergence(leaf, teacher, "kl", temperature) * upstream).sum().backward()
    _close(leaf.grad, (q - p) / temperature.unsqueeze(-1) * upstream.unsqueeze(-1))


def test_identical_distributions_have_zero_divergence_and_gradient():
    student, _, temperature, upstream = _inputs()
    for kind in KINDS:
        leaf = student.clone().requires_grad_()
        value = drafter_divergence(leaf, student, kind, temperature)
        (value * upstream).sum().backward()
        torch.testing.assert_close(value, torch.zeros_like(value), rtol=0, atol=1e-6)
        torch.testing.assert_close(leaf.grad, torch.zeros_like(leaf.grad), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_logits_score_in_fp32_and_get_a_bf16_gradient(kind):
    student, teacher, temperature, upstream = _inputs(dtype=torch.bfloat16)
    expected, expected_grad = _reference(student, teacher, kind, temperature, upstream)  # fp32 maths on bf16 values
    leaf = student.clone().requires_grad_()
    got = drafter_divergence(leaf, teacher, kind, temperature)
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32 and leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # no bf16 rounding of the values
    torch.testing.assert_close(leaf.grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_keeps_no_fp32_copy_of_the_vocabulary_for_backward(kind):
    # what autograd holds between forward and backward: the two bf16 logits and per-token vectors
    student, teacher, temperature, _ = _inputs(dtype=torch.bfloat16, s=64, b=2, vocab=512)
    leaf = student.clone().requires_grad_()
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        drafter_divergence(leaf, teacher, kind, temperature)
    vocabulary_sized = [t for t in saved if t.dim() and t.shape[-1] == student.shape[-1]]
    assert [t.dtype for t in vocabulary_sized] == [torch.bfloat16, torch.bfloat16]
    assert sum(t.numel() * t.element_size() for t in saved) < 2.1 * student.numel() * student.element_size()


def test_bad_kind_and_mismatched_shapes_are_refused():
    student, teacher, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"kind='ce'.*\('kl', 'tv'\)"):
        drafter_divergence(student, teacher, "ce")
    with pytest.raises(ValueError, match="same shape"):
        drafter_divergence(student, teacher[..., :-1], "kl")


# --- through the tiny megatron-core GPT's output layer, token-chunked ---------------------------


def _model_and_hidden(depths=2, seq_len=23, batch=3, vocab=96, seed=0, temperature=0.7):
    from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt

    spec = TinyGPTSpec(mtp_num_layers=depths, vocab_size=vocab)
    model = build_tiny_gpt(spec)
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(seq_len, batch, spec.hidden_size, generator=g) for _ in range(depths)]
    teacher = [torch.randn(seq_len, batch, spec.hidden_size, generator=g) for _ in range(depths)]
    temperature = _temperature(temperature, (batch, seq_len), g)
    return model, hidden, teacher, temperature


def _chunked_run(model, hidden, teacher, kind, temperature, chunk_tokens):
    from verl_mtp.local_megatron.single_process import cpu_megatron

    hidden = [h.clone().requires_grad_() for h in hidden]
    teacher = [t.clone().requires_grad_() for t in teacher]
    model.zero_grad(set_to_none=True)
    with cpu_megatron():
        divergence = mtp_drafter_divergences(
            model.output_layer, hidden, teacher, kind, temperature, chunk_tokens=chunk_tokens
        )
    weights = torch.linspace(-1.0, 2.0, divergence.numel()).view_as(divergence)
    (divergence * weights).sum().backward()
    assert all(t.grad is None for t in teacher)
    return divergence.detach(), [h.grad for h in hidden], model.output_layer.weight.grad.clone()


def _assert_1e6_of_scale(got, ref):
    # weight gradients sum over every token: chunking reorders the fp32 sum (~1e-7 of its scale)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()))


@pytest.mark.megatron
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", KINDS)
def test_output_layer_path_matches_direct_formula(kind, temperature):
    from verl_mtp.local_megatron.single_process import cpu_megatron

    model, hidden, teacher, temperature = _model_and_hidden(temperature=temperature)
    got, hidden_grads, weight_grad = _chunked_run(model, hidden, teacher, kind, temperature, 0)
    # Reference: the same output layer (so the same GEMM rounding), then the formula written directly.
    model.zero_grad(set_to_none=True)
    leaves = [h.clone().requires_grad_() for h in hidden]
    with cpu_megatron():
        student_logits = [model.output_layer(h)[0].transpose(0, 1) for h in leaves]
        with torch.no_grad():
            teacher_logits = [model.output_layer(t)[0].transpose(0, 1) for t in teacher]
    expected = torch.stack(
        [_reference_value(s, t, kind, temperature) for s, t in zip(student_logits, teacher_logits)], dim=-1
    )
    weights = torch.linspace(-1.0, 2.0, expected.numel()).view_as(expected)
    (expected * weights).sum().backward()
    _close(got, expected.detach())
    for g, r in zip(hidden_grads, leaves):
        _assert_1e6_of_scale(g, r.grad)
    _assert_1e6_of_scale(weight_grad, model.output_layer.weight.grad)  # the student's only


@pytest.mark.megatron
@pytest.mark.parametrize("chunk_tokens", [1, 7, 40])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_forward_and_backward(kind, chunk_tokens):
    model, hidden, teacher, temperature = _model_and_hidden(temperature="per-token")
    ref = _chunked_run(model, hidden, teacher, kind, temperature, 0)
    got = _chunked_run(model, hidden, teacher, kind, temperature, chunk_tokens)
    _assert_1e6_of_scale(got[0], ref[0])
    for g, r in zip(got[1], ref[1]):
        assert r.abs().sum() > 0
        _assert_1e6_of_scale(g, r)
    _assert_1e6_of_scale(got[2], ref[2])


@pytest.mark.megatron
@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_chunks_compute_the_value_once(kind, monkeypatch):
    """A chunk's recompute in backward stops at the gradient's node (torch's checkpoint early stop),
    before the value: the value's vocabulary passes run once per chunk, not twice."""
    from verl_mtp.megatron import drafter_losses

    calls = []
    value = drafter_losses._divergence_value
    monkeypatch.setattr(drafter_losses, "_divergence_value", lambda *a: calls.append(a[0].shape) or value(*a))
    model, hidden, teacher, temperature = _model_and_hidden(depths=2, seq_len=23, batch=3)
    _chunked_run(model, hidden, teacher, kind, temperature, 7 * 3)  # chunks of 7 positions: 4 per depth
    assert len(calls) == 2 * 4, calls


@pytest.mark.megatron
@pytest.mark.parametrize("detach", [False, True], ids=["joint", "standalone"])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_layer_gets_dense_hidden_states(batch, detach, monkeypatch):
    """The student's and the teacher's hidden states reach the output layer dense. A strided 3-D
    input that requires grad is not folded by ``torch.matmul`` into one GEMM: it broadcast the
    [h, V] weight to every position (a [s, h, V] copy) and made verl's real-engine update with kl /
    tv ~20x slower than with CE (scripts/bench_mtp_step.py)."""
    from verl_mtp.local_megatron.single_process import cpu_megatron
    from verl_mtp.megatron import mtp_log_probs

    model, hidden, teacher, temperature = _model_and_hidden(depths=1, seq_len=9, batch=batch)
    seen = []
    real_output_logits = mtp_log_probs.output_logits

    def output_logits(output_layer, inputs, *args):
        seen.append((inputs.requires_grad, inputs.is_contiguous()))
        return real_output_logits(output_layer, inputs, *args)

    monkeypatch.setattr(mtp_log_probs, "output_logits", output_logits)
    hidden = [h.clone().requires_grad_() for h in hidden]
    with cpu_megatron():
        divergence = mtp_drafter_divergences(
            model.output_layer, hidden, teacher, "kl", temperature, detach_output_layer=detach
        )
    divergence.sum().backward()
    assert len(seen) == 2 and all(dense for _, dense in seen), seen  # the student's and the teacher's
    assert seen[0][0], seen  # the student's carries the gradient (the case matmul would not fold)


# --- tensor parallelism: 2 gloo ranks, each a vocabulary slice ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, "per-token"])
def test_two_tensor_parallel_ranks_match_one(temperature):
    from verl_mtp.testing.drafter_ranks import drafter_divergence_rank
    from verl_mtp.testing.gloo import run_on_gloo_ranks

    student, teacher, temperature, upstream = _inputs(vocab=64, temperature=temperature)
    args = (student, teacher, KINDS, temperature, upstream)
    results = run_on_gloo_ranks(drafter_divergence_rank, [args, args])
    for kind in KINDS:
        expected, expected_grad = _reference(student, teacher, kind, temperature, upstream)
        for by_kind in results:
            _close(by_kind[kind][0], expected)
        _close(torch.cat([by_kind[kind][1] for by_kind in results], dim=-1), expected_grad)


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_chunked_output_layer_equals_single_rank(sequence_parallel):
    from verl_mtp.testing.drafter_ranks import vocab_parallel_drafter_rank
    from verl_mtp.testing.gloo import run_on_gloo_ranks

    g = torch.Generator().manual_seed(3)
    s, b, h, v = 12, 2, 16, 64
    weight = torch.randn(v, h, generator=g) * 0.5
    hidden, teacher = torch.randn(s, b, h, generator=g), torch.randn(s, b, h, generator=g)
    temperature = _temperature("per-token", (b, s), g)
    upstream = torch.randn(b, s, generator=g)
    for kind in KINDS:
        # reference: one rank, the full vocabulary, unchunked, written directly
        w = weight.clone().requires_grad_()
        leaf = hidden.clone().requires_grad_()
        student_logits, teacher_logits = (leaf @ w.T).transpose(0, 1), (teacher @ weight.T).transpose(0, 1)
        expected = _reference_value(student_logits, teacher_logits, kind, temperature)
        (expected * upstream).sum().backward()
        args = (weight, hidden, teacher, kind, temperature, upstream, sequence_parallel, 5)
        results = run_on_gloo_ranks(vocab_parallel_drafter_rank, [args, args])
        for rank, (value, hidden_grad, teacher_grad, weight_grad) in enumerate(results):
            _close(value, expected.detach())
            assert teacher_grad is None
            _assert_1e6_of_scale(hidden_grad, leaf.grad.chunk(2)[rank] if sequence_parallel else leaf.grad)
            _assert_1e6_of_scale(weight_grad, w.grad.chunk(2)[rank])


# --- the teacher's rows: the main head at the position the depth predicts from -------------------


def _position_hidden(seq_len, batch=2, h=3):
    # row t carries t, so an aligned row says which main-head position it came from
    return torch.arange(seq_len, dtype=torch.float32).view(-1, 1, 1).expand(seq_len, batch, h).clone()


@pytest.mark.megatron
@pytest.mark.parametrize("packed", [False, True])
def test_aligned_teacher_rows_are_the_main_heads_at_the_predicted_position(packed):
    from megatron.core.packed_seq_params import PackedSeqParams

    from verl_mtp.megatron.drafter_losses import aligned_teacher_hidden
    from verl_mtp.megatron.mtp_log_probs import depth_targets

    seq_len, depths = 11, 3
    batch = 1 if packed else 2
    params = None
    if packed:  # two sequences of 6 and 5 tokens, THD: [s, 1, h]
        cu = torch.tensor([0, 6, 11], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    main = _position_hidden(seq_len, batch).requires_grad_()
    labels = (torch.arange(seq_len) + 1).expand(batch, seq_len).contiguous()  # main head at t scores token t+1
    if packed:
        labels = torch.where(torch.arange(seq_len) == 5, 0, labels)  # the first sequence's junk last label
    aligned = aligned_teacher_hidden(main, depths, packed_seq_params=params)
    assert len(aligned) == depths and all(not a.requires_grad for a in aligned)
    for teacher, target in zip(aligned, depth_targets(labels, depths, packed_seq_params=params)):
        k = target.depth
        rows = teacher[..., 0].transpose(0, 1)  # [b, s]: which main-head position each row holds
        valid = target.valid
        assert valid.any()
        positions = torch.arange(seq_len).expand(batch, seq_len)
        assert torch.equal(rows[valid], (positions + k)[valid].float())
        # and that position's main head predicts exactly the depth's label
        assert torch.equal(rows[valid] + 1, target.labels[valid].float())


@pytest.mark.slow
@pytest.mark.megatron
def test_aligned_teacher_under_sequence_parallel_equals_one_rank():
    from verl_mtp.megatron.drafter_losses import aligned_teacher_hidden
    from verl_mtp.testing.drafter_ranks import aligned_teacher_rank
    from verl_mtp.testing.gloo import run_on_gloo_ranks

    main = torch.randn(12, 2, 4, generator=torch.Generator().manual_seed(5))
    expected = aligned_teacher_hidden(main, 2)
    results = run_on_gloo_ranks(aligned_teacher_rank, [(main, 2)] * 2)
    for depth in range(2):
        assert torch.equal(torch.cat([r[depth] for r in results], dim=0), expected[depth])


# --- the setting: mtp_drafter_loss, through verl's real Megatron engine ---------------------------


def test_mtp_drafter_loss_setting_is_checked_at_config_time():
    from verl_mtp.config import ExtendedMtpConfig
    from verl_mtp.errors import MtpConfigError

    assert ExtendedMtpConfig().mtp_drafter_loss == "ce"
    assert ExtendedMtpConfig(mtp_training_mode="standalone", mtp_drafter_loss="tv").mtp_drafter_loss == "tv"
    with pytest.raises(MtpConfigError, match=r"mtp_drafter_loss.*'js'.*ce, kl, tv"):
        ExtendedMtpConfig(mtp_training_mode="standalone", mtp_drafter_loss="js")
    with pytest.raises(MtpConfigError, match=r"mtp_drafter_loss.*'kl'.*standalone.*mtp_training_mode='joint'"):
        ExtendedMtpConfig(mtp_training_mode="joint", mtp_drafter_loss="kl")
    with pytest.raises(MtpConfigError, match=r"mtp_drafter_loss.*'tv'.*mtp_loss_type='rl'"):
        ExtendedMtpConfig(mtp_training_mode="standalone", mtp_loss_type="rl", mtp_drafter_loss="tv")


ENGINE_STEPS = 3


@pytest.fixture(scope="module")
def engine_checkpoint(tmp_path_factory):
    from verl_mtp.local_megatron.single_process import init_single_process_megatron
    from verl_mtp.testing import real_engine

    init_single_process_megatron()
    return real_engine.write_tiny_engine_checkpoint(str(tmp_path_factory.mktemp("engine_ckpt")), mtp_depths=2)


def _engine_steps(checkpoint, **mtp):
    """ENGINE_STEPS RL steps (old log-probs, actor update) on one engine, from the same weights and data.

    Zero advantages: the policy's gradient is zero, so the teacher stays put and the divergence of
    each mini-batch is comparable across steps; any drafter gradient leaking into the policy's
    parameters would move them away from the MTP-disabled run's.
    """
    from verl_mtp.config import ExtendedMtpConfig
    from verl_mtp.testing import real_engine

    # clip_grad out of reach: the global grad norm includes the MTP head's gradient
    engine = real_engine.RealEngine.build(checkpoint, ExtendedMtpConfig(**mtp), clip_grad=1e9)
    try:
        prompts, responses, advantages = real_engine.tiny_rollout()
        zero = torch.zeros_like(advantages)
        return [real_engine.rl_step(engine, prompts, responses, zero) for _ in range(ENGINE_STEPS)]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def no_mtp_steps(engine_checkpoint):
    return _engine_steps(engine_checkpoint, enable=False)


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.parametrize("kind", KINDS)
def test_standalone_drafter_loss_trains_the_head_toward_the_policy_in_verls_engine(
    engine_checkpoint, no_mtp_steps, kind
):
    steps = _engine_steps(engine_checkpoint, mtp_training_mode="standalone", mtp_drafter_loss=kind)
    for k in (1, 2):
        # megatron's tracker, read by verl's engine: the depth's divergence, two mini-batches a step
        per_step = [[float(v) for v in step.metrics[f"mtp_losses/mtp_{k}_loss"]] for step in steps]
        assert all(len(v) == 2 for v in per_step)
        flat = [v for values in per_step for v in values]
        assert all(0.0 < v < (1.0 if kind == "tv" else 20.0) for v in flat), flat
        for mini_batch in (0, 1):  # the same data each step: the head moves toward the policy
            trace = [values[mini_batch] for values in per_step]
            assert all(later < earlier for earlier, later in zip(trace, trace[1:])), per_step
            assert trace[-1] < 0.9 * trace[0], per_step
        agreement = [float(v) for step in steps for v in step.metrics[f"actor/mtp_{k}/draft_agreement"]]
        assert all(0.0 <= a <= 1.0 for a in agreement)
    for step, reference in zip(steps, no_mtp_steps):
        assert any(n.startswith("mtp.") for n in step.changed())
        # the policy's parameters learn exactly what they learn without MTP: nothing from the drafter loss
        for name, value in reference.after.items():
            assert torch.equal(step.after[name], value), name
