"""Tiny MiMo, DeepSeek-V3 and GLM-4.5 checkpoints exported by verl-mtp's bridges, run by vLLM's real CPU engine.

Two sides, each run as its own child process by ``tests/engine/test_export_drafts.py``:

- ``export`` (needs megatron-core + mbridge, not verl): a tiny checkpoint of the family is loaded
  into a megatron-core GPTModel with MTP (``load_hf_model``), its weights are set to a
  construction whose draft is known (below), and ``export_hf_weights`` writes it back as a
  Hugging Face checkpoint that vLLM loads (``MiMoForCausalLM`` / ``DeepseekV3ForCausalLM`` /
  ``Glm4MoeForCausalLM``).
- ``engine`` (needs vllm, not verl): one ``vllm.LLM`` in this process, greedy generation, and
  the spec-decode counters from ``LLM.get_metrics()``.

They run as separate processes because megatron's single-process setup and vLLM's in-process
engine both initialise torch.distributed, and one process holds one vLLM engine cleanly.

The construction: the trunk's attention and MLP write nothing to the residual stream (their
output projections are zero, all norms are ones), and the output layer is the embedding with
its rows permuted, so the trunk's greedy next token is ``succ[x]`` for a fixed permutation
``succ`` without fixed points. A matched MTP head keeps only the token half of its input
projection (MiMo ``input_proj``, DeepSeek-V3 ``eh_proj``: identity) and an identity block, so at position t it predicts ``succ[x_{t+1}]`` = x_{t+2}:
acceptance 1 at T = 0. With ``input_proj``'s halves in the wrong order it reads the hidden half
instead and predicts ``succ[x_t]`` = x_{t+1} != x_{t+2}: acceptance 0. A random head is near
chance (1 / vocab).

DeepSeek-V3 (MLA + MoE; the MoE experts' output projections are zero like the MLP's) runs in
bf16 with ``kv_lora_rank`` 512 and rope dim 64, the sizes vLLM's CPU MLA accepts; GLM-4.5 (GQA
with qkv bias, partial rotary, MoE) in float32 with head_dim 32.

Qwen3.5 / Qwen3-Next: verl-mtp exports only their MTP names on a Qwen3 attention trunk (tiny
family ``qwen_mtp``; no bridge builds their gated-delta-net trunks). ``ENGINE_CONFIG`` dresses that
checkpoint as each of them with every layer full attention and no output gate; ``refusals``
records why vLLM does not run either here (see tests/engine/test_export_drafts.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

HIDDEN, VOCAB = 128, 1024
_COMMON_SHAPE = dict(hidden_size=HIDDEN, intermediate_size=256, vocab_size=VOCAB, max_position_embeddings=512)
SHAPES = {  # MiMo: head_dim 32 (CPU attention needs >= 32)
    "mimo": dict(_COMMON_SHAPE, num_attention_heads=4, num_key_value_heads=2),
    "deepseek_v3": dict(_COMMON_SHAPE, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32,
                        kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                        moe_intermediate_size=64),
    "glm4_moe": dict(_COMMON_SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     moe_intermediate_size=64),
    "qwen3_5": dict(_COMMON_SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "qwen3_next": dict(_COMMON_SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}
# The tiny family megatron builds for each engine family (default: the same name).
SOURCE_FAMILY = {"qwen3_5": "qwen_mtp", "qwen3_next": "qwen_mtp"}
_ALL_FULL_ATTENTION = dict(layer_types=["full_attention", "full_attention"], attn_output_gate=False)
# config.json keys the engine reads besides the source's.
ENGINE_CONFIG = {
    "mimo": dict(model_type="qwen2"),
    "deepseek_v3": dict(model_type="deepseek_v3"),
    "glm4_moe": dict(model_type="glm4_moe"),
    "qwen3_5": dict(_ALL_FULL_ATTENTION, model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"]),
    "qwen3_next": dict(_ALL_FULL_ATTENTION, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"],
                       num_experts=0),
}
# vLLM builds MiMo from a qwen2 config with MiMo's architecture name and MTP depth count.
ENGINE_DTYPE = {"deepseek_v3": "bfloat16"}  # vLLM's CPU MLA / MoE run in bf16; the others float32
INPUT_PROJ = "model.mtp_layers.0.input_proj.weight"
PROMPTS = ["The quick brown fox", "def main():", "Speculative decoding with an MTP head", "1 2 3 4 5 6"]


# --- what every engine test file shares ----------------------------------------------------------

ENGINE_MODULES = ("vllm", "megatron.core", "mbridge")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def engine_environment_missing() -> list[str]:
    """The modules of the engine environment that are not installed here (empty: tests can run)."""
    missing = []
    for module in ENGINE_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(module)
    return missing


def child_env(**extra: str) -> dict[str, str]:
    """One in-process engine per child, one thread each: the engine starts in seconds on 2 cores."""
    return dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", PYTHONPATH=REPO,
                TOKENIZERS_PARALLELISM="false", **extra)


def run_child(module: str, *args: str, timeout: float = 900, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a child process; a failure shows the end of its output."""
    proc = subprocess.run([sys.executable, "-m", module, *args], env=child_env(**extra_env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} {args[:1]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# --- export side (megatron-core) ------------------------------------------------------------------

def successor(vocab: int = VOCAB, seed: int = 0):
    """A permutation of the vocabulary made of one cycle: no token is its own successor."""
    import torch

    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    succ = torch.empty(vocab, dtype=torch.long)
    succ[order] = order.roll(-1)
    return succ


def _set_bigram_trunk(model, succ) -> None:
    """Trunk whose greedy next token is ``succ[last token]``: blocks write nothing, norms are ones,
    output row succ[x] is x's embedding (random embeddings in 128 dims: self-similarity wins)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("decoder.") and name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                p.zero_()
            elif name.startswith("decoder.") and p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
        emb = model.embedding.word_embeddings.weight
        out = model.output_layer.weight
        out[succ] = emb.detach().clone()


def _set_matched_head(model) -> None:
    """MTP depth 0 passes the normalised embedding of the next token through unchanged."""
    import torch

    layer = model.mtp.layers[0]
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                p.zero_()
            elif p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
        eh = layer.eh_proj.weight
        eh.zero_()
        # megatron concatenates [embedding, hidden]: the identity goes on the embedding half.
        eh[:, :HIDDEN] = torch.eye(HIDDEN)
        probe_h, probe_e = torch.randn(3, 1, HIDDEN), torch.randn(3, 1, HIDDEN)
        got = layer._concat_embeddings(probe_h, probe_e)
        want = probe_e * torch.rsqrt(probe_e.pow(2).mean(-1, keepdim=True) + layer.enorm.eps)
        if not torch.allclose(got, want, atol=1e-4):
            raise AssertionError("megatron's MTP projection does not read the embedding half first")


def write_tokenizer(path: str, vocab: int = VOCAB) -> None:
    """A byte-level BPE tokenizer trained offline, padded with added tokens to exactly ``vocab``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 64, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = "the quick brown fox jumps over a lazy dog while speculative decoding drafts tokens".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i} def f{i}(x): return x"
              for i in range(400)]
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab - tok.get_vocab_size())])
    if tok.get_vocab_size() != vocab:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} tokens, want {vocab}")
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "bos_token": None, "model_max_length": 512}, f)


def export_checkpoints(out: str, family: str = "mimo", seed: int = 0) -> dict[str, str]:
    """Write ``out/{matched,random,trunk}`` (MiMo: and ``swapped``) and ``successor.json``; returns
    head -> path. ``trunk`` is ``random`` without its MTP tensors and depth key."""
    from verl_mtp.local_megatron.hf_model import export_hf_weights, load_hf_model
    from verl_mtp.models.families import DEPTH_KEYS, detect_family
    from verl_mtp.models.mtp_bridge import swap_halves
    from verl_mtp.testing.tiny_hf import tiny_config, write_checkpoint, write_tiny_checkpoint

    if family not in SHAPES:
        raise ValueError(f"family={family!r}: the engine tests build {', '.join(SHAPES)}")
    source = os.path.join(out, "source")
    built = SOURCE_FAMILY.get(family, family)
    write_tiny_checkpoint(source, built, 1, seed=seed, **SHAPES[family])
    config = dict(tiny_config(built, 1, **SHAPES[family]), **ENGINE_CONFIG[family])
    succ = successor(seed=seed)
    paths = {}
    for head in ("random", "matched"):
        loaded = load_hf_model(source)
        _set_bigram_trunk(loaded.model, succ)
        if head == "matched":
            _set_matched_head(loaded.model)
        tensors = export_hf_weights(loaded)
        variants = {head: tensors}
        if head == "matched" and family == "mimo":
            variants["swapped"] = dict(tensors, **{INPUT_PROJ: swap_halves(tensors[INPUT_PROJ])})
        if head == "random":  # the trunk alone (no MTP tensors, no depth key): what `ckpt graft` mends
            naming = detect_family(config).naming(config, 1, tensors)
            variants["trunk"] = {n: t for n, t in tensors.items() if not naming.is_mtp(n)}
        for name, t in variants.items():
            conf = config if name != "trunk" else {k: v for k, v in config.items() if k not in DEPTH_KEYS}
            paths[name] = write_checkpoint(os.path.join(out, name), conf, t, shards=1)
            write_tokenizer(paths[name])
    with open(os.path.join(out, "successor.json"), "w") as f:
        json.dump(succ.tolist(), f)
    return paths


# --- engine side (vLLM) ---------------------------------------------------------------------------

def spec_counters(metrics) -> dict[str, float]:
    """drafts / draft_tokens / accepted_tokens from ``LLM.get_metrics()`` (summed over labels)."""
    want = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}
    out = dict.fromkeys(want.values(), 0.0)
    for m in metrics:
        if m.name in want:
            out[want[m.name]] += float(m.value)
    return out


def run_engine(path: str, speculate: bool, max_tokens: int = 48) -> dict:
    """Greedy generation of ``PROMPTS`` on vLLM's in-process CPU engine; token ids and counters."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    with open(os.path.join(path, "config.json")) as f:
        dtype = ENGINE_DTYPE.get(json.load(f)["model_type"], "float32")
    kwargs = dict(model=path, dtype=dtype, max_model_len=256, max_num_seqs=4, seed=0,
                  enforce_eager=True, disable_log_stats=False)
    if speculate:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": 1}
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    result = {"prompt_ids": [list(o.prompt_token_ids) for o in outputs],
              "ids": [list(o.outputs[0].token_ids) for o in outputs]}
    result.update(spec_counters(llm.get_metrics()))
    result["acceptance"] = result["accepted_tokens"] / result["draft_tokens"] if result["draft_tokens"] else None
    return result


def write_engine_config_checkpoint(path: str, family: str, seed: int = 0) -> str:
    """A random checkpoint in the engine's config for ``family`` (no megatron): enough for a
    refusal that happens before weights are read."""
    from verl_mtp.testing.tiny_hf import random_tensors, tiny_config, write_checkpoint

    built = SOURCE_FAMILY.get(family, family)
    source = tiny_config(built, 1, **SHAPES[family])
    write_checkpoint(path, dict(source, **ENGINE_CONFIG[family]), random_tensors(source, seed), shards=1)
    write_tokenizer(path)
    return path


def engine_refusals(workdir: str) -> dict[str, str]:
    """Why this vLLM does not run the Qwen families verl-mtp can export names for (one vLLM import):
    family -> the error, or "" when it ran."""
    out = {}
    try:  # Qwen3.5's text model lives in a module that imports the vision tower's image processor
        importlib.import_module("vllm.model_executor.models.qwen3_5")
        out["qwen3_5"] = ""
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        out["qwen3_5"] = f"{type(exc).__name__}: {exc}"
    path = write_engine_config_checkpoint(os.path.join(workdir, "qwen3_next"), "qwen3_next")
    try:
        run_engine(path, speculate=True, max_tokens=4)
        out["qwen3_next"] = ""
    except Exception as exc:  # noqa: BLE001
        out["qwen3_next"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("out")
    ex.add_argument("--family", default="mimo", choices=sorted(SHAPES))
    en = sub.add_parser("engine")
    en.add_argument("path")
    en.add_argument("result")
    en.add_argument("--no-spec", action="store_true")
    re_ = sub.add_parser("refusals")
    re_.add_argument("workdir")
    args = parser.parse_args(argv)
    if args.cmd == "export":
        print(json.dumps(export_checkpoints(args.out, args.family)))
    elif args.cmd == "refusals":
        print(json.dumps(engine_refusals(args.workdir)))
    else:
        result = run_engine(args.path, speculate=not args.no_spec)
        with open(args.result, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
