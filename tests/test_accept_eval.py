"""``verl-mtp accept-eval``: the acceptance math, the teacher-forced MTP chain, and end to end on
tiny MiMo-layout checkpoints loaded through mbridge (verl_mtp.local_megatron.hf_model.load_hf_model).

The end-to-end checkpoints are built so the answer is known:

* "matched" head: one trunk layer whose attention output projection is zero, so the trunk's
  output at index t is a function of token t alone: h_t = F(e_t) with
  F(e) = final_norm(e + MLP(post_norm(e))) (the residual stream never sees other positions), and
  the main head predicts G(x_t) = lm_head(F(e_t)) for token t+1. The MTP layer is a copy of that
  trunk layer (same weights, attention output also zero), its final_layernorm a copy of the
  trunk's final norm, token_layernorm = 1 and the embeddings have unit RMS, so the normalised
  embedding is the embedding itself, and input_proj passes the embedding half through and zeroes
  the hidden half (MiMo's input_proj columns are [hidden | embedding]). Depth 1 at index i then
  computes lm_head(F(e_{i+1})) = G(x_{i+1}): exactly the main head's prediction at index i+1,
  which is what verifies draft position 1. Reusing the layer for position j gives G(x_{i+j}) =
  the verifier at i+j again, so every position is accepted: greedy acceptance 1.0 and
  sum_v min(p, q) = 1 at any temperature. (Only RMSNorm's epsilon separates "unit RMS" from
  exactly identity: a relative 5e-7 change that cannot move an argmax here.)
* the same checkpoint with input_proj in megatron's [embedding | hidden] column order, i.e.
  passing the *hidden* half: a loader that forgot MiMo's half swap would read this one as the
  matched head; it must score near chance, so the test also pins the conversion.
* "random" head: every MTP tensor random (attention included). Its argmax carries no
  information about the verifier's, so greedy acceptance must be near the chance rate
  c = sum_v f_target(v) f_draft(v) of independent draws from the two argmax marginals (computed
  here from the same anchors). Tolerance: 4 binomial standard deviations with an effective
  sample size of min(anchors, vocabulary), since both argmaxes depend mostly on one shared token.
"""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from verl_mtp.tools.accept_eval.acceptance import (
    ChainAccumulator,
    argmax_draft_acceptance,
    chain_expected_accepted,
    greedy_acceptance,
    sampled_acceptance,
)
from verl_mtp.tools.accept_eval.options import AcceptEvalError
from verl_mtp.tools.accept_eval.run import evaluate
from verl_mtp.tools.accept_eval.samples import Sample, read_samples
from verl_mtp.tools.accept_eval.scoring import layer_for_position, score_sequence, teacher_forced_hidden

pytestmark = pytest.mark.megatron

V, H, FFN, HEADS, KV_HEADS = 64, 32, 64, 4, 2


# --- the acceptance of one position --------------------------------------------------------------


def test_sampled_acceptance_is_the_overlap_of_the_tempered_distributions():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    logits_p, logits_q = p.log().unsqueeze(0), q.log().unsqueeze(0)
    # T = 1: min(.5,.2) + min(.3,.3) + min(.2,.5) = 0.7
    assert sampled_acceptance(logits_p, logits_q, 1.0).item() == pytest.approx(0.7, abs=1e-12)
    # T = 2: p_T is proportional to sqrt(p).
    sp, sq = p.sqrt(), q.sqrt()
    sp, sq = sp / sp.sum(), sq / sq.sum()
    by_hand = sum(min(a, b) for a, b in zip(sp.tolist(), sq.tolist()))
    assert sampled_acceptance(logits_p, logits_q, 2.0).item() == pytest.approx(by_hand, abs=1e-12)
    # identical distributions are always accepted; disjoint ones never
    assert sampled_acceptance(logits_p, logits_p, 0.7).item() == pytest.approx(1.0, abs=1e-12)
    disjoint_p = torch.tensor([[0.0, -1e9, -1e9]])
    disjoint_q = torch.tensor([[-1e9, 0.0, -1e9]])
    assert sampled_acceptance(disjoint_p, disjoint_q, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    # greedy: argmax q = 2, argmax p = 0
    assert greedy_acceptance(logits_p, logits_q).item() == 0.0
    assert greedy_acceptance(logits_p, logits_p).item() == 1.0
    # greedy draft verified by sampling: p(argmax q) = p(2) = 0.2
    assert argmax_draft_acceptance(logits_p, logits_q, 1.0).item() == pytest.approx(0.2, abs=1e-12)


def _speculative_step(p, q, generator, n):
    """n independent speculative-sampling steps of one position: draft x ~ q, keep it with
    probability min(1, p(x)/q(x)), else resample from norm(max(p - q, 0)). Returns (kept, token)."""
    x = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=generator).squeeze(-1)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    kept = u < (p[x] / q[x]).clamp(max=1.0)
    residual = (p - q).clamp(min=0)
    resampled = torch.multinomial((residual / residual.sum()).expand(n, -1), 1, replacement=True, generator=generator)
    return kept, torch.where(kept, x, resampled.squeeze(-1))


def test_min_pq_matches_real_speculative_sampling_monte_carlo():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for trial in range(3):
        p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, -1)
        q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, -1)
        alpha = sampled_acceptance(p.log()[None], q.log()[None], 1.0).item()
        kept, token = _speculative_step(p, q, g, n)
        sigma = math.sqrt(alpha * (1 - alpha) / n)
        assert abs(kept.double().mean().item() - alpha) < 5 * sigma + 1e-9, trial
        # the procedure simulated is the lossless one: its output is distributed as p
        freq = torch.bincount(token, minlength=6).double() / n
        assert torch.allclose(freq, p, atol=5 * math.sqrt(0.25 / n)), trial
        # greedy draft (q one-hot on argmax q): kept with probability p(argmax q)
        x = q.argmax()
        kept_greedy = torch.rand(n, generator=g, dtype=torch.float64) < p[x]
        beta = argmax_draft_acceptance(p.log()[None], q.log()[None], 1.0).item()
        assert beta == pytest.approx(p[x].item(), abs=1e-12)
        assert abs(kept_greedy.double().mean().item() - beta) < 5 * math.sqrt(beta * (1 - beta) / n) + 1e-9


def test_chain_rule_expected_length_by_hand_and_by_simulation():
    # one anchor, acceptance 0.9, 0.5, 0.2: K=1 -> 0.9, K=2 -> 0.9 + 0.45, K=3 -> + 0.09
    expected = chain_expected_accepted(torch.tensor([[0.9, 0.5, 0.2]], dtype=torch.float64))
    assert expected.tolist() == pytest.approx([0.9, 1.35, 1.44], abs=1e-12)

    # simulate K=3 drafts that stop at the first rejection
    g = torch.Generator().manual_seed(1)
    n = 200_000
    pairs = [
        (torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), -1),
         torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), -1))
        for _ in range(3)
    ]
    alphas = torch.tensor([[sampled_acceptance(p.log()[None], q.log()[None], 1.0).item() for p, q in pairs]])
    alive = torch.ones(n, dtype=torch.bool)
    accepted = torch.zeros(n)
    for p, q in pairs:
        kept, _ = _speculative_step(p, q, g, n)
        alive &= kept
        accepted += alive
    predicted = chain_expected_accepted(alphas)[-1].item()
    assert abs(accepted.mean().item() - predicted) < 5 * accepted.std().item() / math.sqrt(n)


def test_accumulator_marginal_conditional_and_expected_length_by_hand():
    accept = torch.tensor([[1.0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # last anchor: end of response
    acc = ChainAccumulator(3)
    acc.add(accept[:2], valid[:2])  # two sequences: sums carry over
    acc.add(accept[2:], valid[2:])
    s = acc.summary()
    assert [p["anchors"] for p in s["positions"]] == [4, 4, 3]
    assert [p["marginal"] for p in s["positions"]] == pytest.approx([3 / 4, 3 / 4, 2 / 3])
    # conditional: accepted through j / accepted through j-1, over anchors where j is valid
    assert [p["conditional"] for p in s["positions"]] == pytest.approx([3 / 4, 2 / 3, 0.0])
    # K=1: 3/4; K=2: (2+1+0+2)/4; K=3 (first three anchors): (2+1+0)/3
    assert s["expected_accepted"] == pytest.approx([0.75, 1.25, 1.0])
    assert s["tokens_per_step"] == pytest.approx([1.75, 2.25, 2.0])


def test_layer_for_position_reuses_layers_cyclically():
    assert layer_for_position(1, 4) == [0, 0, 0, 0]
    assert layer_for_position(2, 5) == [0, 1, 0, 1, 0]
    assert layer_for_position(3, 2) == [0, 1]


# --- the teacher-forced chain on a real megatron-core model ----------------------------------------


def _block_hidden(model, input_ids):
    """megatron's own MTP block output ([trunk, depth 1, ...] chunks) from a stock forward."""
    from verl_mtp.local_megatron.single_process import causal_mask
    from verl_mtp.local_megatron.tiny_gpt import forward

    captured = {}
    hook = model.mtp.register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    s = input_ids.shape[1]
    batch = {"input_ids": input_ids, "position_ids": torch.arange(s)[None], "attention_mask": causal_mask(s)}
    labels = torch.roll(input_ids, -1, -1)
    with torch.no_grad():
        forward(model, batch, labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.float32))
    hook.remove()
    return torch.chunk(captured["h"], 1 + model.config.mtp_num_layers, dim=0)


def test_chain_equals_megatrons_block_and_reuse_equals_a_copied_layer():
    from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt

    spec = TinyGPTSpec(mtp_num_layers=2, seed=3)
    model = build_tiny_gpt(spec).eval()
    ids = torch.randint(0, spec.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    reference = _block_hidden(model, ids)
    main, drafts = teacher_forced_hidden(model, ids, [0, 1])
    for got, want in zip([main, *drafts], reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Reusing layer 0 for position 2 is megatron's chain with a second layer equal to the first.
    _, reused = teacher_forced_hidden(model, ids, [0, 0])
    twin = build_tiny_gpt(spec).eval()
    twin.load_state_dict(model.state_dict())
    twin.mtp.layers[1].load_state_dict(model.mtp.layers[0].state_dict())
    torch.testing.assert_close(reused[1], _block_hidden(twin, ids)[2], rtol=0, atol=0)
    assert not torch.allclose(reused[1], drafts[1])  # layer 1 really differs from layer 0


def _reference_scores(model, prompt, response, k_max, temperature):
    """Per-anchor acceptances by explicit loops over the hidden states (hidden @ W.T)."""
    ids = torch.tensor([prompt + response])
    main, drafts = teacher_forced_hidden(model, ids, layer_for_position(len(model.mtp.layers), k_max))
    w = model.output_layer.weight.double()
    length = ids.shape[1]
    rows = []
    for i in range(len(prompt) - 1, length - 2):
        row = []
        for j in range(1, k_max + 1):
            if i + j + 1 > length - 1:
                row.append(None)
                continue
            p = main[i + j, 0].double() @ w.T
            q = drafts[j - 1][i, 0].double() @ w.T
            pt, qt = torch.softmax(p / temperature, -1), torch.softmax(q / temperature, -1)
            row.append((float(p.argmax() == q.argmax()), torch.minimum(pt, qt).sum().item(), pt[q.argmax()].item(),
                        p.argmax().item(), q.argmax().item()))
        rows.append(row)
    return rows


def test_score_sequence_indexing_against_explicit_loops():
    from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt

    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=1, seed=5)).eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 64, (4,), generator=g).tolist()
    response = torch.randint(0, 64, (9,), generator=g).tolist()
    k = 3
    # anchor_chunk=2 splits the anchors, to cover the chunk bookkeeping as well
    got = score_sequence(model, prompt, response, k_max=k, temperatures=[0.8], anchor_chunk=2)
    want = _reference_scores(model, prompt, response, k, 0.8)
    # anchors: last prompt token .. third-to-last token = indices 3..10 -> 8 anchors
    assert got.valid.shape == (8, k) and len(want) == 8
    for a, row in enumerate(want):
        for j, ref in enumerate(row):
            assert bool(got.valid[a, j]) == (ref is not None)
            if ref is not None:
                assert got.greedy[a, j].item() == ref[0]
                assert got.sampled[0.8][a, j].item() == pytest.approx(ref[1], abs=1e-5)
                assert got.argmax_draft[0.8][a, j].item() == pytest.approx(ref[2], abs=1e-5)
    # a response of one token drafts nothing
    assert score_sequence(model, prompt, response[:1], k_max=k, temperatures=[1.0]) is None


# --- tiny MiMo checkpoints -----------------------------------------------------------------------


def _layer_tensors(prefix, g, zero_attention_output):
    d = H // HEADS
    t = {
        "input_layernorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
        "self_attn.q_proj.weight": torch.randn(H, H, generator=g) / H**0.5,
        "self_attn.q_proj.bias": 0.1 * torch.randn(H, generator=g),
        "self_attn.k_proj.weight": torch.randn(KV_HEADS * d, H, generator=g) / H**0.5,
        "self_attn.k_proj.bias": 0.1 * torch.randn(KV_HEADS * d, generator=g),
        "self_attn.v_proj.weight": torch.randn(KV_HEADS * d, H, generator=g) / H**0.5,
        "self_attn.v_proj.bias": 0.1 * torch.randn(KV_HEADS * d, generator=g),
        "self_attn.o_proj.weight": (
            torch.zeros(H, H) if zero_attention_output else torch.randn(H, H, generator=g) / H**0.5
        ),
        "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
        "mlp.gate_proj.weight": torch.randn(FFN, H, generator=g) / H**0.5,
        "mlp.up_proj.weight": torch.randn(FFN, H, generator=g) / H**0.5,
        "mlp.down_proj.weight": torch.randn(H, FFN, generator=g) / FFN**0.5,
    }
    return {prefix + k: v for k, v in t.items()}


MIMO_CONFIG = {
    "architectures": ["MiMoForCausalLM"], "model_type": "mimo", "hidden_size": H, "intermediate_size": FFN,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "vocab_size": V,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_dropout": 0.0, "num_nextn_predict_layers": 1,
}


def write_mimo_checkpoint(path, head: str, seed: int = 0, tokenizer: bool = False) -> str:
    """head: "matched" (reproduces the verifier, see the module doc), "unswapped" (the matched
    projection in megatron's column order) or "random"."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, H, generator=g)
    emb = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS rows
    tensors = {
        "model.embed_tokens.weight": emb,
        "lm_head.weight": torch.randn(V, H, generator=g),
        "model.norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
    }
    tensors.update(_layer_tensors("model.layers.0.", g, zero_attention_output=True))
    mtp = "model.mtp_layers.0."
    if head == "random":
        r = torch.Generator().manual_seed(seed + 100)
        tensors.update(_layer_tensors(mtp, r, zero_attention_output=False))
        tensors[mtp + "token_layernorm.weight"] = 1 + 0.1 * torch.randn(H, generator=r)
        tensors[mtp + "hidden_layernorm.weight"] = 1 + 0.1 * torch.randn(H, generator=r)
        tensors[mtp + "input_proj.weight"] = torch.randn(H, 2 * H, generator=r) / (2 * H) ** 0.5
        tensors[mtp + "final_layernorm.weight"] = 1 + 0.1 * torch.randn(H, generator=r)
    else:
        for name in list(tensors):
            if name.startswith("model.layers.0."):
                tensors[mtp + name[len("model.layers.0."):]] = tensors[name].clone()
        tensors[mtp + "token_layernorm.weight"] = torch.ones(H)
        tensors[mtp + "hidden_layernorm.weight"] = torch.ones(H)
        zero, eye = torch.zeros(H, H), torch.eye(H)
        # MiMo's input_proj columns: [hidden | embedding]; pass the embedding, drop the hidden state.
        tensors[mtp + "input_proj.weight"] = torch.cat([zero, eye] if head == "matched" else [eye, zero], dim=1)
        tensors[mtp + "final_layernorm.weight"] = tensors["model.norm.weight"].clone()
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(MIMO_CONFIG, f)
    if tokenizer:
        _write_word_tokenizer(path)
    return str(path)


WORDS = [f"w{i}" for i in range(V - 1)] + ["<unk>"]


def _write_word_tokenizer(path):
    """A word-level tokenizer: WORDS[i] is token i (no special tokens added to a text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def random_samples(n, prompt_len=4, response_len=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(torch.randint(0, V, (prompt_len,), generator=g).tolist(),
               torch.randint(0, V, (response_len,), generator=g).tolist(), i + 1)
        for i in range(n)
    ]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("accept_eval")
    return {
        head: write_mimo_checkpoint(root / head, head, tokenizer=(head == "matched"))
        for head in ("matched", "unswapped", "random")
    }


def _load(path):
    from verl_mtp.local_megatron.hf_model import load_hf_model

    return load_hf_model(path)


def test_matched_head_is_always_accepted(checkpoints):
    loaded = _load(checkpoints["matched"])
    k = 3  # one MTP layer, reused for positions 2 and 3
    report = evaluate(loaded.model, random_samples(4), k_max=k, temperatures=[1.0, 0.5], vocab_size=V)
    assert report.mtp_layers == 1 and report.layer_for_position == [0, 0, 0]
    assert [p["marginal"] for p in report.greedy["positions"]] == [1.0, 1.0, 1.0]
    assert [p["conditional"] for p in report.greedy["positions"]] == [1.0, 1.0, 1.0]
    assert report.greedy["expected_accepted"] == [1.0, 2.0, 3.0]
    assert report.greedy["tokens_per_step"] == [2.0, 3.0, 4.0]
    for t in ("1", "0.5"):
        for p in report.sampled[t]["positions"]:
            assert p["marginal"] == pytest.approx(1.0, abs=1e-4)
        # a greedy draft is kept with the verifier's probability of its argmax: below 1 at T > 0
        assert report.argmax_draft[t]["positions"][0]["marginal"] < 0.99
    # position j drafts every response token from the (j+1)-th on: 4 x (39, 38, 37) anchors
    assert [p["anchors"] for p in report.greedy["positions"]] == [156, 152, 148]


def _chance_rate(model, samples):
    """Greedy agreement expected from independent draws of the verifier's and the draft's argmax
    (their empirical marginals over position-1 anchors), and the number of anchors."""
    target, draft = [], []
    for s in samples:
        for row in _reference_scores(model, s.prompt_ids, s.response_ids, 1, 1.0):
            target.append(row[0][3])
            draft.append(row[0][4])
    ft = torch.bincount(torch.tensor(target), minlength=V).double() / len(target)
    fd = torch.bincount(torch.tensor(draft), minlength=V).double() / len(draft)
    return (ft * fd).sum().item(), len(target)


@pytest.mark.parametrize("head", ["random", "unswapped"])
def test_uninformative_head_is_near_chance(checkpoints, head):
    loaded = _load(checkpoints[head])
    samples = random_samples(12, response_len=60, seed=7)
    report = evaluate(loaded.model, samples, k_max=2, temperatures=[1.0], vocab_size=V)
    measured = report.greedy["positions"][0]["marginal"]
    chance, n = _chance_rate(loaded.model, samples)
    # Both argmaxes depend mostly on the token x[i+1] the anchor shares with its verifier, so
    # agreement is decided per token value more than per anchor: at most V independent outcomes.
    tolerance = 4 * math.sqrt(chance * (1 - chance) / min(n, V))
    print(f"{head}: measured {measured:.4f}, chance {chance:.4f}, tolerance {tolerance:.4f}, anchors {n}")
    assert abs(measured - chance) <= tolerance, (measured, chance, tolerance)
    assert measured < 0.15 and report.sampled["1"]["positions"][0]["marginal"] < 0.5


# --- reading samples -----------------------------------------------------------------------------


def test_reads_ids_and_verl_rollout_dump_text(tmp_path, checkpoints):
    from verl_mtp.tools.accept_eval.samples import tokenizer_loader

    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt_ids": [1, 2], "response_ids": [3, 4, 5], "output": "ignored when ids are given"},
        # what verl's trainer.rollout_data_dir writes: input/output text plus gts/score/step
        {"input": "w9 w8", "output": "w7 w6 w62 <unk>", "gts": None, "score": 1.0, "step": 3},
    ])
    samples = read_samples(data, tokenizer_loader(checkpoints["matched"]))
    assert [(s.prompt_ids, s.response_ids, s.line) for s in samples] == [
        ([1, 2], [3, 4, 5], 1), ([9, 8], [7, 6, 62, 63], 2)
    ]


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"prompt_ids": [1], "score": 1.0}], "no response"),
        ([{"response_ids": [1, 2]}], "no prompt ids"),
        ([{"prompt_ids": [1], "response_ids": "w1 w2"}], "list of integer token ids"),
        ([{"output": "w1 w2"}], "no prompt"),
        ([[1, 2, 3]], "expected a JSON object"),
        ([], "holds no samples"),
    ],
)
def test_bad_lines_name_the_line_and_the_fields(tmp_path, records, message):
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(AcceptEvalError, match=message):
        read_samples(data)


# --- the CLI -------------------------------------------------------------------------------------


def run_cli(capsys, *args):
    from verl_mtp.cli import main

    code = main(["accept-eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_table_json_plot_and_text_input(tmp_path, checkpoints, capsys):
    samples = random_samples(3, response_len=20, seed=3)
    ids = write_jsonl(tmp_path / "ids.jsonl",
                      [{"prompt_ids": s.prompt_ids, "response_ids": s.response_ids} for s in samples])
    code, out, err = run_cli(capsys, checkpoints["matched"], ids, "-k", "2", "--temperature", "0.7")
    assert code == 0, err
    lines = out.splitlines()
    # position 1: layer 0, 3 x 19 anchors, greedy marginal / conditional 1
    assert any(line.split()[:6] == ["1", "0", "57", "1.000", "/", "1.000"] for line in lines), out
    # K = 2: 2 drafts accepted, 3 tokens per verify step
    assert any(line.split()[:4] == ["2", "2.000", "/", "3.000"] for line in lines), out
    assert "T=0.7 min(p,q)" in out and "T=0.7 p(argmax q)" in out
    # acceptance by context length, default buckets: every drafted token (index 5..23) in [0, 256)
    assert any(line.split()[:6] == ["[0,", "256)", "1", "57", "3", "1.000"] for line in lines), out
    assert "no drafted tokens at context >= 256 (10 empty buckets not shown)" in out
    code, out, err = run_cli(capsys, checkpoints["matched"], ids, "-k", "2", "--context-buckets", "0,8,16")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.lstrip().startswith("[")]
    # position 1 drafts indices 5..23 of each of the 3 samples: 3 in [0, 8), 8 in [8, 16), 8 from 16
    assert [r[:5] for r in rows if r[2] == "1"] == [["[0,", "8)", "1", "9", "3"], ["[8,", "16)", "1", "24", "3"],
                                                    ["[16,", "inf)", "1", "24", "3"]], out

    plot = tmp_path / "acc.png"
    code, out, err = run_cli(capsys, checkpoints["matched"], ids, "-k", "2", "--json", "--plot", str(plot))
    assert code == 0, err
    report = json.loads(out)
    assert report["family"] == "mimo" and report["num_speculative_tokens"] == 2 and report["temperatures"] == [1.0]
    assert report["greedy"]["expected_accepted"] == [1.0, 2.0]
    assert report["sampled"]["1"]["positions"][1]["conditional"] == pytest.approx(1.0, abs=1e-4)
    first = report["by_context"]["buckets"][0]
    assert (first["start"], first["end"], first["tokens"], first["sequences"]) == (0, 256, [57, 54], [3, 3])
    assert first["greedy"][1] == {"mean": 1.0, "stderr": 0.0, "stderr_iid": 0.0, "stderr_clustered": 0.0}
    assert report["by_context"]["buckets"][1]["tokens"] == [0, 0] and report["by_context"]["buckets"][1]["greedy"][0]["mean"] is None
    pytest.importorskip("matplotlib")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same samples as text in verl's rollout dump format give the same report
    text = write_jsonl(tmp_path / "text.jsonl", [
        {"input": " ".join(WORDS[t] for t in s.prompt_ids), "output": " ".join(WORDS[t] for t in s.response_ids),
         "gts": None, "score": 0.0, "step": 1}
        for s in samples
    ])
    _, from_text, _ = run_cli(capsys, checkpoints["matched"], text, "-k", "2", "--json")
    _, from_ids, _ = run_cli(capsys, checkpoints["matched"], ids, "-k", "2", "--json")
    a, b = json.loads(from_text), json.loads(from_ids)
    assert a.pop("data") == text and b.pop("data") == ids
    assert a == b


def test_cli_bad_inputs_exit_2(tmp_path, checkpoints, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt_ids": [1, 2], "response_ids": [3, 4, 5]}])
    no_response = write_jsonl(tmp_path / "noresp.jsonl", [{"prompt_ids": [1, 2], "response_ids": [3, 4]},
                                                          {"input": "w1 w2", "score": 1.0}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "w1", "response": "w2 w3"}])
    out_of_vocab = write_jsonl(tmp_path / "oov.jsonl", [{"prompt_ids": [1, 2], "response_ids": [3, V, 5]}])
    no_mtp = tmp_path / "no_mtp"
    no_mtp.mkdir()
    (no_mtp / "config.json").write_text(json.dumps({**MIMO_CONFIG, "num_nextn_predict_layers": 0}))
    cases = [
        ((checkpoints["matched"], str(tmp_path / "missing.jsonl")), "does not exist"),
        ((str(tmp_path / "nowhere"), good), "is not a directory"),
        ((str(no_mtp), good), "has no MTP head"),
        ((checkpoints["matched"], good, "-k", "0"), "--num-speculative-tokens must be an integer >= 1, got 0"),
        ((checkpoints["matched"], good, "--temperature", "0"), "--temperature must be a finite number > 0"),
        ((checkpoints["matched"], no_response), "noresp.jsonl:2: no response"),
        ((checkpoints["random"], text), "has no tokenizer"),  # written without one
        ((checkpoints["matched"], good, "--dtype", "int8"), "--dtype must be one of"),
        ((checkpoints["matched"], good, "--context-buckets", "0,1k,512"), "--context-buckets '0,1k,512': 512 follows 1024"),
        ((checkpoints["matched"], good, "--context-buckets", "0,4x"), "'4x' is not a token count"),
        ((checkpoints["matched"], out_of_vocab), f"line 1: token id {V} is outside"),
        ((checkpoints["matched"], good, "--plot", str(tmp_path / "no" / "such" / "dir.png")), "does not exist"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, *args)
        assert code == 2, (args, out, err)
        assert message in err, (args, err)
        assert out == ""


# --- every family accept-eval claims -------------------------------------------------------------
#
# DeepSeek-V3 and GLM-4.5 run on CPU like MiMo (their MoE routers need megatron-core 0.16's missing
# ``te_general_gemm`` bound, see verl_mtp.local_megatron.single_process.moe_router_gemm_without_te), and
# so do Qwen3.5 / Qwen3-Next MTP names on a Qwen3 attention trunk (``qwen_mtp``; their real
# gated-delta-net trunks are refused, see the last test). The matched head is built as the MiMo
# one in the module doc, on a one-layer trunk (MoE for the MoE families): the trunk layer's
# attention output projection is zero, the MTP layer is a copy of it (router and expert bias
# included), the embedding norm is 1 over unit-RMS embeddings, the head's final norm is the
# trunk's, and the projection is [I | 0] (these families store megatron's [embedding | hidden]
# order, so no half swap). Every MTP tensor of the random head is random.

MOE_FAMILIES = ("deepseek_v3", "glm4_moe")
# family -> (MTP layer prefix, embedding norm, projection, final norm)
_MTP_NAMES = {
    "deepseek_v3": ("model.layers.1.", "model.layers.1.enorm.weight", "model.layers.1.eh_proj.weight",
                    "model.layers.1.shared_head.norm.weight"),
    "qwen_mtp": ("mtp.layers.0.", "mtp.pre_fc_norm_embedding.weight", "mtp.fc.weight", "mtp.norm.weight"),
}
_MTP_NAMES["glm4_moe"] = _MTP_NAMES["deepseek_v3"]


def write_family_checkpoint(path, family, head, seed=11):
    from verl_mtp.testing.tiny_hf import random_tensors, tiny_config, write_checkpoint

    overrides = {"num_hidden_layers": 1}
    if family in MOE_FAMILIES:
        overrides["first_k_dense_replace"] = 0  # the trunk layer and the MTP layer are both MoE
    config = tiny_config(family, 1, **overrides)
    t = random_tensors(config, seed)
    h = config["hidden_size"]
    emb = t["model.embed_tokens.weight"]
    t["model.embed_tokens.weight"] = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    t["model.layers.0.self_attn.o_proj.weight"].zero_()
    layer, enorm, projection, final_norm = _MTP_NAMES[family]
    if head == "matched":
        for name in [n for n in t if n.startswith("model.layers.0.")]:
            t[layer + name[len("model.layers.0."):]] = t[name].clone()
        t[enorm] = torch.ones(h)
        t[projection] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
        t[final_norm] = t["model.norm.weight"].clone()
    if layer + "embed_tokens.weight" in t:  # DeepSeek-V3's per-depth copies equal the trunk's
        t[layer + "embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
        t[layer + "shared_head.head.weight"] = t["lm_head.weight"].clone()
    write_checkpoint(str(path), config, t, shards=1)
    return str(path)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("accept_eval_families")
    return {(f, head): write_family_checkpoint(root / f"{f}_{head}", f, head)
            for f in (*MOE_FAMILIES, "qwen_mtp") for head in ("matched", "random")}


def _ids_file(tmp_path, n=3, response_len=24, seed=5):
    return write_jsonl(tmp_path / "ids.jsonl", [
        {"prompt_ids": s.prompt_ids, "response_ids": s.response_ids}
        for s in random_samples(n, response_len=response_len, seed=seed)
    ])


def _cli_report(capsys, checkpoint, data, *args):
    code, out, err = run_cli(capsys, checkpoint, data, "--json", *args)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "qwen_mtp"])
def test_family_end_to_end_matched_head_accepted_random_head_not(tmp_path, moe_checkpoints, capsys, family):
    ids = _ids_file(tmp_path)
    matched = _cli_report(capsys, moe_checkpoints[family, "matched"], ids, "-k", "2")
    assert matched["family"] == {"qwen_mtp": "qwen3_5"}.get(family, family)
    assert matched["device"] == "cpu" and matched["mtp_layers"] == 1
    assert [p["anchors"] for p in matched["greedy"]["positions"]] == [3 * 23, 3 * 22]
    # position 2 reuses the one MTP layer: still the verifier's prediction, so accepted too
    assert [p["marginal"] for p in matched["greedy"]["positions"]] == [1.0, 1.0]
    assert matched["greedy"]["expected_accepted"] == [1.0, 2.0]
    for p in matched["sampled"]["1"]["positions"]:
        assert p["marginal"] == pytest.approx(1.0, abs=1e-4)

    random_head = _cli_report(capsys, moe_checkpoints[family, "random"], ids, "-k", "2")
    first = random_head["greedy"]["positions"][0]["marginal"]
    assert first < 0.3, random_head["greedy"]
    assert random_head["sampled"]["1"]["positions"][0]["marginal"] < 0.9


def test_cpu_megatron_binds_the_router_name_only_while_active():
    from megatron.core.transformer.moe import moe_utils

    from verl_mtp.local_megatron.single_process import cpu_megatron

    had = "te_general_gemm" in vars(moe_utils)  # megatron-core 0.18: bound (None without TE)
    before = vars(moe_utils).get("te_general_gemm")
    with cpu_megatron():
        assert "te_general_gemm" in vars(moe_utils)
        if not had:
            assert moe_utils.te_general_gemm is None
    assert ("te_general_gemm" in vars(moe_utils)) == had
    assert vars(moe_utils).get("te_general_gemm") is before


# config.json keys that have a default in each family's config class (transformers' own, or
# Qwen2Config for MiMo, whose remote MiMoConfig derives from it); the tiny configs hold exactly
# those defaults, so dropping them must not change a single number.
DEFAULTED_KEYS = {
    "mimo": ("attention_dropout", "rms_norm_eps", "rope_theta", "max_position_embeddings",
             "tie_word_embeddings", "hidden_act"),
    "deepseek_v3": ("attention_dropout", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                    "tie_word_embeddings", "hidden_act", "num_key_value_heads", "rope_scaling", "norm_topk_prob"),
    "glm4_moe": ("attention_dropout", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                 "hidden_act", "head_dim", "partial_rotary_factor", "use_qk_norm", "routed_scaling_factor",
                 "n_group", "topk_group", "norm_topk_prob"),
}


def _without_keys(src, dst, keys):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for k in keys:
        assert k in config, k  # the test drops what the checkpoint really had
        del config[k]
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.mark.parametrize("family", ["mimo", *MOE_FAMILIES])
def test_config_without_defaulted_keys_gives_the_same_report(tmp_path, checkpoints, moe_checkpoints, capsys, family):
    source = checkpoints["matched"] if family == "mimo" else moe_checkpoints[family, "matched"]
    ids = _ids_file(tmp_path, n=2, response_len=12)
    full = _cli_report(capsys, source, ids, "-k", "2")
    keys = DEFAULTED_KEYS[family]
    if family == "mimo":
        keys = keys[:1]  # the case alone first: only attention_dropout missing
        alone = _cli_report(capsys, _without_keys(source, tmp_path / "no_dropout", keys), ids, "-k", "2")
        assert {**alone, "checkpoint": source} == full
        keys = DEFAULTED_KEYS[family]
    sparse = _cli_report(capsys, _without_keys(source, tmp_path / "sparse", keys), ids, "-k", "2")
    assert {**sparse, "checkpoint": source} == full
    assert full["greedy"]["expected_accepted"] == [1.0, 2.0]


@pytest.mark.parametrize("family, key", [
    ("mimo", "hidden_size"), ("mimo", "num_key_value_heads"),
    ("deepseek_v3", "q_lora_rank"), ("deepseek_v3", "moe_intermediate_size"),
    ("glm4_moe", "n_routed_experts"), ("glm4_moe", "num_key_value_heads"),
])
def test_config_without_a_shape_key_exits_2_naming_it(tmp_path, checkpoints, moe_checkpoints, capsys, family, key):
    source = checkpoints["matched"] if family == "mimo" else moe_checkpoints[family, "matched"]
    broken = _without_keys(source, tmp_path / f"no_{key}", [key])
    code, out, err = run_cli(capsys, broken, str(tmp_path / "not_read.jsonl"))
    # refused before the data is read (and long before a model is built)
    assert code == 2 and out == "", err
    assert f"config.json lacks {key!r}" in err and "no default is assumed" in err, err


@pytest.mark.parametrize("config", [
    {"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "mtp_num_hidden_layers": 1},
    {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
     "text_config": {"model_type": "qwen3_5_moe_text", "mtp_num_hidden_layers": 1}},
])
def test_gated_delta_net_families_are_refused_with_the_reason(tmp_path, capsys, config):
    path = tmp_path / config["model_type"]
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(capsys, str(path), str(tmp_path / "not_read.jsonl"))
    assert code == 2 and out == "", err
    assert "cannot be built into megatron-core here, on CPU or GPU" in err
    assert "gated-delta-net" in err and "flash-linear-attention" in err
