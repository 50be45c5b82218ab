"""mbridge 0.15 on megatron-core 0.18: the model-type enum member it compares with is gone.

mbridge's ``get_model`` (which verl's ``vanilla_mbridge=True`` path calls to build every model)
compares the model type with ``ModelType.encoder_and_decoder``; megatron-core 0.18 removed that
member (only ``encoder_or_decoder`` is left), so the comparison raises AttributeError and no
model can be built, on GPU as on CPU. verl-mtp's bridges are used through that path.

The fix gives mbridge's ``util`` module a ``ModelType`` namespace that keeps the real
``encoder_or_decoder`` member and adds an ``encoder_and_decoder`` that equals nothing, which is
what the comparison means on a megatron-core without encoder-decoder models.
"""

from __future__ import annotations

from typing import Any, Optional


def model_type_for_mbridge() -> Optional[Any]:
    """A ``ModelType`` stand-in for mbridge, or None when megatron-core still has the member."""
    from megatron.core.enums import ModelType

    if hasattr(ModelType, "encoder_and_decoder"):
        return None

    class ModelTypeForMbridge:
        encoder_or_decoder = ModelType.encoder_or_decoder
        encoder_and_decoder = object()  # no GPT model has it: the encoder-decoder branch is never taken

    return ModelTypeForMbridge
