"""The LoRA adapter as a Flower ArrayRecord: only the trainable tensors travel, never the base.

Keys are peft's adapter-name-free keys (as in adapter_model.safetensors), so an ArrayRecord, a
saved adapter directory and the registry all name the same tensors the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights

OPACUS_PREFIX = "_module."  # Opacus' GradSampleModule keeps the wrapped model as `_module`


def strip_opacus_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(OPACUS_PREFIX): v for k, v in state.items()}


def peft_model_of(model: torch.nn.Module) -> PeftModel:
    """The PeftModel itself, whether or not Opacus wrapped it."""
    inner = getattr(model, "_module", model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a PeftModel (or Opacus-wrapped one), got {type(inner)}")
    return inner


def adapter_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The adapter's tensors, detached and on CPU, as an ArrayRecord."""
    state = strip_opacus_prefix(model.state_dict())
    lora = get_peft_model_state_dict(peft_model_of(model), state_dict=state)
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in lora.items()})


def arrays_to_adapter(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load the adapter tensors in place; an extra or a missing LoRA tensor is an error."""
    peft_model = peft_model_of(model)
    device = next(peft_model.parameters()).device
    state = {k: v.to(device) for k, v in arrays.to_torch_state_dict().items()}
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise KeyError(
            f"adapter does not fit the model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]}"
        )


def load_adapter_dir(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Load a saved adapter directory's tensors in place (same strictness as ArrayRecords)."""
    tensors = load_peft_weights(str(adapter_dir), device="cpu")
    arrays_to_adapter(model, ArrayRecord({k: v.contiguous() for k, v in tensors.items()}))
