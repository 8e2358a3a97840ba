"""Serving several LoRA adapters over one base, in the same batch (vLLM's multi-LoRA API).

    llm = LLM("runs/base", lora={"sql": "adapters/sql", "chat": "adapters/chat"})
    llm.generate(prompts, params, lora_request="sql")                 # every prompt with "sql"
    llm.generate(prompts, params, lora_request=["sql", None, LoRARequest("chat", 2, "adapters/chat")])

Adapters are PEFT-format folders (`lmstack.finetune.save_adapter`, or PEFT's own). They are
read when the engine is built by model/peft_format.py, the one PEFT reader (finetune's
load_adapter uses it too), which checks the folder's config, every tensor name and shape, and
the base fingerprint without touching the model; an adapter that does not fit is an error
naming the adapter and its folder, before anything is served. Then every adapted linear
becomes one `MultiLoRALinear` holding all the adapters that touch it (model/lora.py).

Ids: adapters get 1, 2, ... in the order given; 0 is the base. A request names its adapter
by name (a string) or by vLLM's `LoRARequest(lora_name, lora_int_id, lora_path)`, whose id
and path, when given, must agree with what was loaded. The id travels with the request's
sequences: the runner tells the model which rows use which adapter (`LoRABatch`), and the
block manager starts the sequence's prefix-hash chain from it, so the same prompt under two
adapters never shares KV blocks.

Speculative decoding works with adapters, exactly: n-gram drafts come from the tokens; a
draft model drafts without the adapter (worse guesses cost acceptance, not correctness);
the target verifies every row under its own adapter, so greedy output is token for token
the plain one and rejection sampling keeps the adapter's distribution. Beam search takes
one adapter for all its prompts (`LLM.beam_search(..., lora_request="sql")`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from torch import nn

from lmstack.model.lora import AdapterWeights, LoRABatch, LoRALinear, install_adapters, is_quantized_base
from lmstack.model.peft_format import read_peft_adapter
from lmstack.utils import LmstackError


class LoRAError(LmstackError, ValueError):
    """Adapters that cannot be served (bad name, folder that does not fit the base)."""


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: which adapter a request runs with. `lora_int_id` and `lora_path`
    may be left out; when given they must match the adapter loaded under `lora_name`."""
    lora_name: str
    lora_int_id: int | None = None
    lora_path: str | Path | None = None


class LoRAAdapters:
    """The adapters an engine serves: names -> ids, folders, and the model's LoRABatch."""

    def __init__(self, model: nn.Module, adapters: Mapping[str, str | Path]):
        if not isinstance(adapters, Mapping) or not adapters:
            raise LoRAError(f"lora= takes a non-empty dict of adapter name -> PEFT adapter folder, got {adapters!r}")
        for name, path in adapters.items():
            if not isinstance(name, str) or not name.strip() or name != name.strip():
                raise LoRAError(f"LoRA adapter name {name!r} must be a non-empty string without surrounding spaces")
            if not isinstance(path, (str, Path)) or not Path(path).is_dir():
                raise LoRAError(f"LoRA adapter {name!r}: {path!r} is not a folder; give the PEFT adapter folder "
                                f"(adapter_config.json + adapter_model.safetensors)")
        own = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        if own:
            raise LoRAError(f"the model carries a LoRA adapter of its own (on {own[:2]} ...); serve its merged form "
                            f"(lmstack.finetune.merge_lora) or its base with the adapters in lora=")
        self.ids = {name: i + 1 for i, name in enumerate(adapters)}
        self.paths = {name: Path(path).resolve() for name, path in adapters.items()}
        weights = {self.ids[name]: read_adapter(model, name, path) for name, path in self.paths.items()}
        try:
            self.batch: LoRABatch = install_adapters(model, weights)
        except LmstackError as e:
            raise LoRAError(f"cannot serve these adapters: {e}") from None

    @property
    def names(self) -> list[str]:
        return list(self.ids)

    def resolve(self, lora_request) -> LoRARequest | None:
        """A request's adapter (None, a name, or a LoRARequest) -> the full LoRARequest
        (name, id, path), or None for the base; RequestError-worthy problems raise LoRAError."""
        if lora_request is None:
            return None
        req = LoRARequest(lora_request) if isinstance(lora_request, str) else lora_request
        if not isinstance(req, LoRARequest):
            raise LoRAError(f"lora_request must be an adapter name, a LoRARequest or None, got "
                            f"{type(lora_request).__name__}")
        name = req.lora_name
        if name not in self.ids:
            raise LoRAError(f"unknown LoRA adapter {name!r}; this engine serves {self.names}")
        if req.lora_int_id is not None and req.lora_int_id != self.ids[name]:
            raise LoRAError(f"LoRARequest({name!r}, lora_int_id={req.lora_int_id!r}): adapter {name!r} has id "
                            f"{self.ids[name]} here (ids follow the order of lora=: {self.ids})")
        if req.lora_path is not None and Path(req.lora_path).resolve() != self.paths[name]:
            raise LoRAError(f"LoRARequest({name!r}, lora_path={str(req.lora_path)!r}): adapter {name!r} was loaded "
                            f"from {self.paths[name]}; adapters are loaded when the engine is built")
        return LoRARequest(name, self.ids[name], str(self.paths[name]))


def read_adapter(model: nn.Module, name: str, path: Path) -> AdapterWeights:
    """One PEFT adapter folder's tensors for `model` (every check of model/peft_format.py), in
    each adapted linear's dtype and on its device, as a trained adapter would be. The model is
    not changed."""
    try:
        adapter = read_peft_adapter(model, path)
    except (LmstackError, OSError) as e:
        raise LoRAError(f"LoRA adapter {name!r} ({path}): {e}") from None
    pairs: dict[str, dict] = {}
    for (module, role), ab in adapter.pairs.items():
        linear = model.get_submodule(module)
        ref = linear.dequantize() if is_quantized_base(linear) else linear.weight    # the compute dtype
        pairs.setdefault(module, {})[role] = tuple(ab[p].to(ref.device, ref.dtype) for p in "AB")
    return AdapterWeights(pairs, adapter.scale)
