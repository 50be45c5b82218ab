"""Peak tensor memory of a block of code on any device, CPU included (benchmarks and tests).

torch has no ``max_memory_allocated`` for the CPU. ``PeakTensorMemory`` is a dispatch mode that
sees every tensor an operator returns, counts each new storage once, and uncounts it when the
storage is freed (a weakref finalizer): ``peak`` is the most bytes of storages created inside the
block and alive at the same time. Tensors that existed before the block (weights, inputs) are not
counted; gradients and optimizer updates made inside it are.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = weakref.WeakKeyDictionary()  # storage -> bytes; entries vanish with the storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage of their own
            return
        if storage in self._seen:  # a view, or an in-place result
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes


def peak_tensor_bytes(fn) -> int:
    """Run ``fn()`` and return the peak bytes of tensors it created (``PeakTensorMemory``)."""
    tracker = PeakTensorMemory()
    with tracker:
        fn()
    return tracker.peak
