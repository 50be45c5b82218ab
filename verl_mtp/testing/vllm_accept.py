"""``accept-eval`` against vLLM's real CPU engine: a head whose acceptance lies strictly between 0
and 1, the engine's step-by-step generation, and the replay of the engine's drafting over
accept-eval's per-anchor acceptances (used by ``tests/engine/test_accept_eval_engine.py``).

Child-process sides (one engine per process, see ``vllm_engine``):

- ``export OUT``: a tiny MiMo checkpoint written by ``export_hf_weights`` with the *mixed* head
  below (``mixed``; ``mixed_megatron`` is the same weights with the config megatron's bridges
  read), plus ``construction.json`` (successor permutation, token subset).
- ``engine PATH RESULT --draft {greedy,probabilistic,none} --run T[:unpatched] ...``: one
  ``vllm.LLM``, every prompt generated as requests stepped one engine step at a time with
  ``RequestOutputKind.DELTA``: a request's new tokens per step are 1 + its accepted drafts, so
  the anchors the engine drafted from are known; plus the spec-decode counters per run.
- ``score PATH SEQUENCES RESULT``: ``run_accept_eval`` (K = 1, T = 1) on the engine's own
  sequences with per-anchor values, and the target's probability of the trunk's top token at
  every response position (the distribution check).

The construction (on top of ``vllm_engine``'s bigram trunk, greedy next token ``succ[x]``):
embedding rows have norm ``RHO_IN`` for tokens in a fixed half ``S`` of the vocabulary and 1
otherwise, and the output layer is scaled by ``SCALE`` so the trunk's distribution at T = 1 is
neither one-hot nor flat. The MTP head mixes both halves of its input projection, ``ALPHA`` on
the next token's embedding (which alone predicts ``succ[x_{t+1}]``, the right draft) and
``BETA`` on the trunk's hidden state (which alone predicts ``succ[x_t]`` = ``x_{t+1}``, a wrong
one). The draft's argmax is the right token unless ``x_{t+1}`` is outside S and ``x_t`` inside
(``ALPHA * 1 < BETA * RHO_IN``): greedy acceptance is about 3/4, and at T = 1 the draft
distribution has two peaks, so p(argmax q) and sum min(p, q) differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from verl_mtp.testing.vllm_engine import HIDDEN, SHAPES, VOCAB, spec_counters

RHO_IN, SCALE, ALPHA, BETA = 1.3, 0.7, 1.0, 0.85
NUM_PROMPTS, PROMPT_LEN, MAX_TOKENS = 16, 6, 128
SIGMAS = 4.5  # the bound on |engine - estimate| in binomial standard errors
# config.json keys vLLM reads besides the tiny checkpoint's (it builds MiMo from a qwen2 config).
ENGINE_CONFIG = {"mimo": {"model_type": "qwen2"}}


# --- export side -----------------------------------------------------------------------------------

def _in_subset(vocab: int = VOCAB, seed: int = 1):
    import torch

    return torch.randperm(vocab, generator=torch.Generator().manual_seed(seed)) < vocab // 2


def _set_scaled_trunk(model, succ, subset) -> None:
    """Bigram trunk (greedy next token succ[x]) with controlled embedding norms and a softened
    output layer: out[succ[y]] = SCALE * e_y, |e_y| = RHO_IN for y in S, 1 otherwise."""
    import torch

    from verl_mtp.testing.vllm_engine import _set_bigram_trunk

    _set_bigram_trunk(model, succ)
    with torch.no_grad():
        emb = model.embedding.word_embeddings.weight
        rho = torch.where(subset, RHO_IN, 1.0).to(emb.dtype)
        emb.copy_(emb / emb.norm(dim=-1, keepdim=True) * rho[:, None])
        model.output_layer.weight[succ] = SCALE * emb.detach().clone()


def _set_mixed_head(model) -> None:
    """The matched head with ALPHA on the embedding half and BETA on the hidden half."""
    import torch

    from verl_mtp.testing.vllm_engine import _set_matched_head

    _set_matched_head(model)  # checks that megatron's projection reads [embedding, hidden]
    with torch.no_grad():
        eh = model.mtp.layers[0].eh_proj.weight
        eh[:, :HIDDEN] = ALPHA * torch.eye(HIDDEN)
        eh[:, HIDDEN:] = BETA * torch.eye(HIDDEN)


def export_mixed(out: str, family: str = "mimo", seed: int = 0) -> str:
    """Write ``out/mixed`` (the checkpoint) and ``out/construction.json``; returns the checkpoint."""
    if family not in ENGINE_CONFIG:
        raise ValueError(f"family={family!r}: the accept-eval engine check builds {', '.join(ENGINE_CONFIG)}")
    from verl_mtp.local_megatron.hf_model import export_hf_weights, load_hf_model
    from verl_mtp.testing.tiny_hf import tiny_config, write_checkpoint, write_tiny_checkpoint
    from verl_mtp.testing.vllm_engine import successor, write_tokenizer

    source = os.path.join(out, "source")
    write_tiny_checkpoint(source, family, 1, seed=seed, **SHAPES[family])
    config = dict(tiny_config(family, 1, **SHAPES[family]), **ENGINE_CONFIG[family])
    succ, subset = successor(seed=seed), _in_subset()
    loaded = load_hf_model(source)
    _set_scaled_trunk(loaded.model, succ, subset)
    _set_mixed_head(loaded.model)
    path = write_checkpoint(os.path.join(out, "mixed"), config, export_hf_weights(loaded), shards=1)
    write_tokenizer(path)
    _megatron_view(path, os.path.join(out, "mixed_megatron"), family)
    with open(os.path.join(out, "construction.json"), "w") as f:
        json.dump({"successor": succ.tolist(), "subset": subset.tolist()}, f)
    return path


def _megatron_view(path: str, view: str, family: str) -> None:
    """The same weights under the config.json megatron's bridges read (the family's own
    model_type, as released checkpoints have it; vLLM is given MiMo as model_type qwen2 instead,
    which the bridges do not take): links to the files, only config.json differs."""
    os.makedirs(view)
    for name in os.listdir(path):
        if name != "config.json":
            os.symlink(os.path.join(path, name), os.path.join(view, name))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(view, "config.json"), "w") as f:
        json.dump(dict(config, model_type=family), f, indent=2)


# --- engine side -----------------------------------------------------------------------------------

def _expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
    """Pure-torch ``expand_batch_to_tokens``: token k gets the value of the request it belongs to."""
    import torch

    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    token = torch.arange(num_tokens, device=x.device)
    owner = torch.searchsorted(cu_num_tokens.to(torch.int64), token, right=True).clamp(max=x.shape[0] - 1)
    return values[owner]


def fix_cpu_expand_batch_to_tokens(on: bool = True) -> None:
    """Test-only workaround for a vLLM 0.32 CPU bug at temperature > 0 with speculation.

    Without Triton, the rejection sampler's ``expand_batch_to_tokens`` runs a C++ fallback that is
    handed int64 *copies* of its float output (``_ensure_int64`` in
    ``vllm/utils/cpu_triton_utils.py``): the copy is filled, the real output stays uninitialised,
    and the target logits of drafted positions are divided by that memory. The function is
    replaced in the rejection sampler's module, in this process (the in-process engine runs its
    worker here; the sampler looks the name up at every call). ``on=False`` puts vLLM's back.
    """
    from vllm.v1.sample import rejection_sampler

    original = _VLLM_ORIGINAL.setdefault("expand_batch_to_tokens", rejection_sampler.expand_batch_to_tokens)
    rejection_sampler.expand_batch_to_tokens = _expand_batch_to_tokens if on else original


_VLLM_ORIGINAL: dict = {}


def prompts(count: int = NUM_PROMPTS, length: int = PROMPT_LEN, seed: int = 2) -> list[list[int]]:
    """Prompts as token ids (random, so the runs visit many bigrams)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(count)]


def build_engine(path: str, draft: str):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    kwargs = dict(model=path, dtype="float32", max_model_len=512, max_num_seqs=NUM_PROMPTS, seed=0,
                  enforce_eager=True, disable_log_stats=False)
    if draft != "none":
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": 1,
                                        "draft_sample_method": draft}
    return LLM(**kwargs)


def step_until_finished(engine, runs: dict) -> None:
    """Step a vLLM engine whose requests use ``RequestOutputKind.DELTA`` until all finish, appending
    to ``runs[request_id]`` each step's new tokens ("response_ids") and their count ("steps": 1 +
    the drafts accepted in that step)."""
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = list(out.outputs[0].token_ids)
            if new:
                runs[out.request_id]["response_ids"] += new
                runs[out.request_id]["steps"].append(len(new))


def generate_stepwise(llm, temperature: float, tag: str, seed: int = 0) -> dict:
    """All prompts at ``temperature``, stepped by hand; per request the prompt, the response and
    the number of new tokens each engine step gave it; the counters this run added."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    before = spec_counters(llm.get_metrics())
    engine = llm.llm_engine
    runs = {}
    for k, ids in enumerate(prompts()):
        params = SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, ignore_eos=True,
                                seed=seed * 1000 + k, output_kind=RequestOutputKind.DELTA)
        rid = f"{tag}-{k}"
        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params)
        runs[rid] = {"prompt_ids": ids, "response_ids": [], "steps": []}
    step_until_finished(engine, runs)
    after = spec_counters(llm.get_metrics())
    return {"requests": [runs[f"{tag}-{k}"] for k in range(len(runs))],
            "counters": {k: after[k] - before[k] for k in after}}


# --- accept-eval side ------------------------------------------------------------------------------

def score_sequences(path: str, sequences: str, temperature: float = 1.0) -> dict:
    """``path``: the megatron view of the checkpoint (``mixed_megatron``). accept-eval (K = 1) on ``sequences`` (JSONL of prompt_ids/response_ids) with per-anchor
    values, and the target's probability of the trunk's top token succ[x] at every response
    position after the first (``top_prob[r][k]`` for response token k + 1)."""
    import torch

    from verl_mtp.local_megatron.hf_model import load_hf_model
    from verl_mtp.tools.accept_eval.run import run_accept_eval
    from verl_mtp.tools.accept_eval.scoring import _logits, teacher_forced_hidden

    report = run_accept_eval(path, sequences, k_max=1, temperatures=(temperature,), dtype="float32",
                             per_anchor=True)
    with open(os.path.join(os.path.dirname(path), "construction.json")) as f:
        succ = torch.tensor(json.load(f)["successor"])
    model = load_hf_model(path).model
    top_prob = []
    with open(sequences) as f:
        for line in f:
            rec = json.loads(line)
            ids = rec["prompt_ids"] + rec["response_ids"]
            main, _ = teacher_forced_hidden(model, torch.tensor([ids]), [0])
            p = torch.softmax(_logits(model, main, VOCAB).double() / temperature, -1)
            start = len(rec["prompt_ids"])  # logits at index i predict token i + 1
            index = torch.arange(start, len(ids) - 1)
            top_prob.append(p[index, succ[torch.tensor(ids)[index]]].tolist())
    return {"report": report.as_dict(), "top_prob": top_prob}


# --- comparisons (plain Python, run in the test) ---------------------------------------------------

def visited_anchors(prompt_len: int, steps: list[int]) -> list[tuple[int, int | None]]:
    """(anchor, accepted drafts or None) of every verify step of one request (K = 1).

    The first engine step is the prefill (one token, index prompt_len); then the drafter at anchor
    i (the index whose hidden state it reads; the last committed token is i + 1) proposes token
    i + 2, the verify step commits 1 + accepted tokens and the next anchor is the new last index
    minus one. The last step may be cut by max_tokens, so its outcome is not read from it (None).
    """
    if not steps or steps[0] != 1:
        raise AssertionError(f"the prefill step should give one token, got steps {steps[:3]}")
    last, out = prompt_len, []
    for k, n in enumerate(steps[1:], start=1):
        final = k == len(steps) - 1
        if not (1 <= n <= 2):
            raise AssertionError(f"a K=1 verify step gave {n} tokens")
        out.append((last - 1, None if final else n - 1))
        last += n
    return out


def replay(requests: list[dict], anchors: list[dict], rule: str, shift: int = 0, strict: bool = True) -> dict:
    """The engine's drafts over accept-eval's per-anchor values of ``rule`` ("greedy" or
    "sampled/1", "argmax_draft/1"): drafts, the estimate's sum and variance sum, and the per-anchor
    outcomes read from the steps next to their estimates (``shift`` offsets accept-eval's anchor
    index, to show a misaligned estimate is caught; ``strict=False`` then skips the drafts it moves
    off the scored anchors)."""
    drafts, expected, variance, pairs = 0, 0.0, 0.0, []
    for req, values in zip(requests, anchors):
        table = values["greedy"] if rule == "greedy" else values[rule.split("/")[0]][rule.split("/")[1]]
        for anchor, accepted in visited_anchors(len(req["prompt_ids"]), req["steps"]):
            row = anchor - values["first_anchor"] + shift
            if not (0 <= row < len(table)) or not values["valid"][row][0]:
                if not strict:
                    continue
                raise AssertionError(f"the engine drafted from anchor {anchor}, which accept-eval does not score")
            a = table[row][0]
            drafts += 1
            expected += a
            variance += a * (1 - a)
            pairs.append((accepted, a))
    return {"drafts": drafts, "expected": expected, "variance": variance, "pairs": pairs}


def within(engine_accepted: float, rep: dict, sigmas: float = SIGMAS) -> tuple[bool, float]:
    """|engine - estimate| <= sigmas * sqrt(sum a(1-a)) (each visited draft is accepted with its
    estimated probability given the past: a martingale, so the sum's variance is sum a(1-a))."""
    bound = sigmas * math.sqrt(rep["variance"])
    return abs(engine_accepted - rep["expected"]) <= bound, bound


def top_token_test(requests: list[dict], top_prob: list[list[float]], succ: list[int],
                   drafted_only: bool = False) -> dict:
    """Hits of the trunk's top token succ[previous] among sampled response tokens against the
    target's probabilities: z = (hits - sum p) / sqrt(sum p(1-p)). ``drafted_only``: only the
    tokens at positions a draft was verified for (where the rejection sampler chose the token;
    which positions those are depends on the past only, so the same bound holds)."""
    hits, mean, var, n = 0, 0.0, 0.0, 0
    for req, probs in zip(requests, top_prob):
        ids = req["prompt_ids"] + req["response_ids"]
        start = len(req["prompt_ids"])
        if drafted_only:  # anchor i verified token i + 2, predicted at index i + 1
            positions = [anchor + 1 for anchor, _ in visited_anchors(start, req["steps"])]
        else:
            positions = range(start, start + len(probs))
        for i in positions:  # logits at i predict token i + 1
            p = probs[i - start]
            hits += int(ids[i + 1] == succ[ids[i]])
            mean += p
            var += p * (1 - p)
            n += 1
    return {"tokens": n, "hits": hits, "expected": mean, "z": (hits - mean) / math.sqrt(var)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("out")
    en = sub.add_parser("engine")
    en.add_argument("path")
    en.add_argument("result")
    en.add_argument("--draft", choices=("greedy", "probabilistic", "none"), required=True)
    en.add_argument("--run", action="append", required=True, metavar="T[:unpatched]",
                    help="one generation of every prompt at temperature T, in order; ':unpatched' runs it "
                    "without the expand_batch_to_tokens workaround")
    sc = sub.add_parser("score")
    sc.add_argument("path")
    sc.add_argument("sequences")
    sc.add_argument("result")
    args = parser.parse_args(argv)
    if args.cmd == "export":
        print(json.dumps({"mixed": export_mixed(args.out)}))
        return 0
    if args.cmd == "engine":
        llm = build_engine(args.path, args.draft)
        result = {}
        for k, run in enumerate(args.run):
            temperature, _, mode = run.partition(":")
            fix_cpu_expand_batch_to_tokens(on=mode != "unpatched")
            result[run] = generate_stepwise(llm, float(temperature), tag=f"run{k}", seed=k)
    else:
        result = score_sequences(args.path, args.sequences)
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
