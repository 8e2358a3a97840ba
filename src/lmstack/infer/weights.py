"""New weights for a running engine's model, in place (RL rollouts, `LLMEngine.update_weights`).

    pairs = match_weights(engine_model, policy.state_dict())   # checks everything, changes nothing
    copy_weights(pairs)                                         # then writes every tensor in place

`weights` is a state dict (names as in `model.state_dict()`; a subset is fine: the rest
keep their values) or a module with the same state-dict names, such as the policy being
trained. Every tensor is checked before any is written: an unknown name, a non-tensor, a
wrong shape, or a float tensor for an integer one (a quantized weight) raises one
`WeightsError` naming each offending tensor, and the model is untouched. Values are copied
into the model's own tensors (`Tensor.copy_`), converting dtype and device, so every
module, the KV cache and anything else holding the model keep working with the new values.

Nothing here looks at module types: names and shapes come from `state_dict()`, so a model
whose linears were replaced (LoRA wrappers keeping `.weight`, quantized linears) updates the
same way. Tied tensors (a tied LM head) appear under both names and are one tensor: giving
either name updates both.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lmstack.utils import LmstackError

MAX_LISTED = 8     # problems listed in one error message


class WeightsError(LmstackError, ValueError):
    """Weights that do not fit the engine's model; nothing was changed."""


def match_weights(model: nn.Module, weights: Mapping[str, Tensor] | nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(name, the model's tensor, the new value) for every entry of weights, or WeightsError."""
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    if not isinstance(weights, Mapping):
        raise WeightsError(f"update_weights takes a state dict (name -> tensor) or an nn.Module, "
                           f"got {type(weights).__name__}")
    if not weights:
        raise WeightsError("update_weights got an empty state dict; give at least one tensor")
    targets = model.state_dict(keep_vars=True)      # name -> the Parameter/buffer itself (no copies)
    pairs, problems = [], []
    for name, value in weights.items():
        target = targets.get(name)
        if target is None:
            close = difflib.get_close_matches(str(name), list(targets), n=1)
            problems.append(f"{name!r} is not a tensor of the model"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif not isinstance(value, Tensor):
            problems.append(f"{name!r} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(target.shape):
            problems.append(f"{name!r} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}")
        elif value.dtype.is_floating_point != target.dtype.is_floating_point:
            problems.append(f"{name!r} is {value.dtype}, the model's is {target.dtype} (a float tensor cannot "
                            f"replace an integer one, e.g. a quantized weight, or the other way round)")
        else:
            pairs.append((name, target, value))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise WeightsError(f"update_weights: {len(problems)} of {len(weights)} tensors do not fit the model; "
                           f"nothing was changed:\n  " + "\n  ".join(problems[:MAX_LISTED]) + more)
    return pairs


@torch.no_grad()
def copy_weights(pairs: list[tuple[str, Tensor, Tensor]]) -> None:
    """Write each value into the model's tensor (dtype and device converted)."""
    for _, target, value in pairs:
        target.copy_(value)
