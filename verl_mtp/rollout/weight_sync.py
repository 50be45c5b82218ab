"""How the drafter check's results get back from a weight sync in verl 0.9.1.

verl's colocated ("naive") weight sync drops what the workers return at two places: the vLLM
HTTP server's ``collective_rpc`` awaits the engine's call without returning it, and
``CheckpointEngineManager.update_weights`` ``ray.get``s the trainer workers' ``update_weights``
and throws the results away. The ``drafter_sync_check`` patch swaps in the functions below, after
checking (by reading verl's source) that the code it replaces is still the one described here.
"""

from __future__ import annotations

import ast
import textwrap
from typing import Any, Optional

# verl 0.9.1's naive branch of CheckpointEngineManager.update_weights; the replacement below does
# the same call and keeps the workers' results.
NAIVE_SYNC_SOURCE = "ray.get(self.actor_wg.update_weights(global_steps=global_steps, mode=self.backend))"
NAIVE_BRANCH_SOURCE = 'if self.backend == "naive":'


def collective_rpc_body_kind(source: str) -> str:
    """'discards' when the method is one ``await self.engine.collective_rpc(...)`` statement,
    'returns' when it already returns that call, else 'unknown'."""
    tree = ast.parse(textwrap.dedent(source))
    body = [n for n in tree.body[0].body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], (ast.Expr, ast.Return)):
        return "unknown"
    call = getattr(body[0].value, "value", None)  # Await(...).value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "collective_rpc"):
        return "unknown"
    return "returns" if isinstance(body[0], ast.Return) else "discards"


async def returning_collective_rpc(server: Any, method, timeout=None, args=(), kwargs=None):
    """vLLMHttpServer.collective_rpc that returns the workers' results."""
    return await server.engine.collective_rpc(method=method, timeout=timeout, args=args, kwargs=kwargs)


def is_verls_naive_sync(source: str) -> bool:
    """Whether ``CheckpointEngineManager.update_weights``'s source still syncs the naive backend
    with the one call ``naive_sync_keeping_results`` re-implements."""
    return NAIVE_SYNC_SOURCE in source and NAIVE_BRANCH_SOURCE in source


def naive_sync_keeping_results(manager: Any, global_steps: Optional[int]) -> dict:
    """verl's naive sync (the trainer workers push to their colocated engines), keeping what the
    workers return for the driver's step metrics."""
    import ray

    from verl_mtp.rollout.drafter_sync import record_worker_sync_results

    record_worker_sync_results(ray.get(manager.actor_wg.update_weights(global_steps=global_steps, mode=manager.backend)))
    return {}


def with_drafter_metrics(result: Any) -> Any:
    """A trainer worker's ``update_weights`` result plus this worker's drafter check metrics
    (handed out once); verl's result wins when it is not a dict."""
    from verl_mtp.rollout.drafter_sync import take_drafter_sync_metrics

    metrics = take_drafter_sync_metrics()
    if not metrics:
        return result
    if result is None:
        return metrics
    return {**result, **metrics} if isinstance(result, dict) else result
