"""LoRA adapters on linears (Hu et al. 2021): the module the engine loads, at floor 1.

    y = base(x) + dropout(x) A^T B^T * scale         A: (r, in), B: (rows, r), scale = alpha / r
                                                     (rsLoRA: alpha / sqrt(r), Kalajdzievski 2023)

`LoRALinear` replaces a linear through the seam (replace.py). The base is an `nn.Linear`, or
any frozen module that already replaced one there and offers `dequantize()` -> the float
weight (out, in) and a forward: a quantized linear, which makes this QLoRA (Dettmers et al.
2023). Either way the base's tensors stay under their own state-dict names
(`blocks.0.attn.qkv.weight`, a quantized base's packed codes and scales), so a base
checkpoint loads unchanged into the adapted model.

One (A, B) pair per row slice of the linear: on our fused `qkv` (rows [q | k | v]) adapters
on q and v are two independent low-rank updates of those rows, exactly as PEFT's adapters on
`q_proj` and `v_proj`; a whole fused linear ("all-linear") gets one pair per slice, as PEFT
adapts q_proj, k_proj and v_proj. State-dict names: `<linear>.lora_A.<role>` (r, in) and
`<linear>.lora_B.<role>` (rows, r). Init as PEFT: A Kaiming-uniform (a = sqrt(5)), B zero,
so a fresh adapter changes nothing.

`LoRALinear` holds one adapter, the one being trained or loaded. Serving several adapters
over one base in the same batch (S-LoRA, Sheng et al. 2023; vLLM's multi-LoRA) is
`MultiLoRALinear`: each adapter's pairs, frozen, keyed by an int id, and a `LoRABatch`
shared by all of a model's MultiLoRALinears that says which adapter each token row of the
next forward uses (the engine's runner sets it). Per linear and per adapter present in the
batch: gather its rows, two thin matmuls, add back (no per-row Python loop); rows with no
adapter (id 0) get no delta, and adapters of different ranks and targets mix freely.

Training adapters, merging for export and writing PEFT files live in finetune/ (floor 3);
reading PEFT files, which the engine needs too, in peft_format.py beside this file; this file
is only what a loaded run needs to compute.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.replace import LinearTarget, SeamError, find_linears, replace_linears
from lmstack.model.transforms import record_transform, register_transform


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """What B A is multiplied by: alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def is_quantized_base(module: nn.Module) -> bool:
    """A module that replaced an nn.Linear (it has `base_linear_shape`) and can give back
    its float weight (`dequantize()`): what QLoRA trains adapters over."""
    return type(module) is not nn.Linear and hasattr(module, "base_linear_shape") \
        and callable(getattr(module, "dequantize", None))


# attributes LoRALinear sets on itself; a base with a tensor of one of these names cannot be wrapped
_OWN_NAMES = ("base", "quantized", "base_linear_shape", "slices", "r", "alpha", "rslora", "lora_A", "lora_B",
              "drop", "merged")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, target: LinearTarget, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        quantized = is_quantized_base(base)
        if type(base) is not nn.Linear and not quantized:
            raise SeamError(f"LoRA on {target.name}: the module is a {type(base).__name__}; LoRA wraps an "
                            f"nn.Linear or a quantized linear (base_linear_shape and dequantize())"
                            + (" and it already has adapters" if isinstance(base, LoRALinear) else ""))
        out_f, in_f = tuple(base.base_linear_shape) if quantized else tuple(base.weight.shape)
        sl = dict(target.slices or target.fused)  # a whole fused linear: one adapter per slice, like PEFT
        for role, (a, b) in sl.items():
            if r > min(in_f, b - a):
                raise SeamError(f"LoRA rank r={r} is larger than {target.name} ({role}: {b - a} x {in_f}); "
                                f"choose r <= {min(in_f, b - a)}")
        clash = set(_OWN_NAMES) & (set(base._parameters) | set(base._buffers) | set(base._modules))
        if clash:
            raise SeamError(f"LoRA on {target.name}: the base {type(base).__name__} has tensor(s) or submodule(s) "
                            f"named {sorted(clash)}, names LoRALinear uses for itself")
        ref = base.dequantize() if quantized else base.weight       # adapters live in the compute dtype
        if tuple(ref.shape) != (out_f, in_f):
            raise SeamError(f"LoRA on {target.name}: dequantize() gives shape {tuple(ref.shape)}, but "
                            f"base_linear_shape is {(out_f, in_f)}")
        dev, dt = ref.device, ref.dtype
        # Adopt the base's tensors under their own names by sharing its parameter and buffer
        # dicts (not copies): `model.to()` then moves them once, for both views, and the base's
        # own forward keeps working. The base itself is kept outside `_modules`, so no
        # `.base.` enters any state-dict name.
        self._parameters = base._parameters
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        self._modules.update(base._modules)
        self.__dict__["base"] = base
        self.quantized = quantized
        self.base_linear_shape = (out_f, in_f)
        self.slices = sl
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.lora_A = nn.ParameterDict({k: nn.Parameter(torch.empty(r, in_f, device=dev, dtype=dt)) for k in sl})
        self.lora_B = nn.ParameterDict({k: nn.Parameter(torch.zeros(b - a, r, device=dev, dtype=dt))
                                        for k, (a, b) in sl.items()})
        for p in self.lora_A.values():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def scale(self) -> float:
        # a property, not an attribute: derived from r and alpha, and a quantized base may
        # well have a tensor named `scale` in the dicts shared above
        return lora_scale(self.r, self.alpha, self.rslora)

    def delta_weight(self, role: str) -> Tensor:
        """scale * B @ A for one slice: (rows, in), what merging adds to those rows."""
        return (self.lora_B[role] @ self.lora_A[role]) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)                                               # (..., out)
        if self.merged:
            return y
        # adapters may keep another dtype than the base computes in (fp32 adapters over a bf16
        # or NF4 base, as QLoRA trains them): the adapter path runs in theirs.
        # All slices at once: h A_all^T (..., R), then one matmul by the block-diagonal B_all
        # added into y (addmm), instead of slicing y per slice and concatenating the parts: the
        # slice and cat (and, in backward, a zero-filled full-width gradient per slice) made a
        # forward + backward of the benchmark's all-linear model ~13% slower. (A hand-written
        # backward that skips B_all's zero blocks measured no faster at r=16.)
        A, B = self.stacked_weights()                                  # (R, in), (out, R)
        hr = F.linear(self.drop(x).to(A.dtype), A)                     # (..., R)
        if hr.dtype == y.dtype:   # y + scale * hr B_all^T, in one GEMM
            return torch.addmm(y.reshape(-1, y.shape[-1]), hr.reshape(-1, hr.shape[-1]), B.t(),
                               alpha=self.scale).view(y.shape)
        return y + (F.linear(hr, B) * self.scale).to(y.dtype)

    def stacked_weights(self) -> tuple[Tensor, Tensor]:
        """The adapters of all slices as one pair, differentiable in each A and B:
            A_all = [A_q; A_v]                        (R, in),  R = r * slices
            B_all = [[B_q, 0], [0, 0], [0, B_v]]      (out, R): rows no slice adapts stay 0
        so that scale * B_all @ A_all is every slice's delta_weight in its rows."""
        order = sorted(self.slices.items(), key=lambda kv: kv[1])
        out_f = self.base_linear_shape[0]
        if len(order) == 1 and order[0][1] == (0, out_f):
            role = order[0][0]
            return self.lora_A[role], self.lora_B[role]
        A = torch.cat([self.lora_A[role] for role, _ in order])
        R, blocks, last = A.shape[0], [], 0
        for i, (role, (a, b)) in enumerate(order):
            B = self.lora_B[role]
            if a > last:
                blocks.append(B.new_zeros(a - last, R))
            blocks.append(F.pad(B, (i * self.r, R - (i + 1) * self.r)))
            last = b
        if last < out_f:
            blocks.append(blocks[-1].new_zeros(out_f - last, R))
        return A, torch.cat(blocks)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into the base weight, reversibly (forward then costs one matmul).
        A quantized base has no float weight to fold into: finetune.merge_lora replaces it."""
        if self.quantized:
            raise SeamError("cannot merge an adapter in place into a quantized base; use "
                            "lmstack.finetune.merge_lora, which merges into the dequantized weight")
        if not self.merged:
            for role, (a, b) in self.slices.items():
                self.weight[a:b] += self.delta_weight(role).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for role, (a, b) in self.slices.items():
                self.weight[a:b] -= self.delta_weight(role).to(self.weight.dtype)
            self.merged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Merged is a runtime state: the saved form is always (base, adapters), so a checkpoint
        # taken while merged reloads into an unmerged module with the same function.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            w = self.weight.detach().clone()
            for role, (a, b) in self.slices.items():
                w[a:b] -= self.delta_weight(role).detach().to(w.dtype)
            destination[prefix + "weight"] = w

    def extra_repr(self) -> str:
        base = f"base={type(self.base).__name__}, " if self.quantized else ""
        return f"{base}in={self.base_linear_shape[1]}, out={self.base_linear_shape[0]}, r={self.r}, " \
               f"slices={list(self.slices)}, scale={self.scale:g}"


def inject_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets=("q", "v"), rslora: bool = False, exclude=(), record: bool = True) -> list[str]:
    """Wrap the targeted linears of `model` in LoRALinear; returns the wrapped module names.

    Validates every argument and every target before changing anything. With record=True the
    transform is appended to model.transforms, so save_pretrained/from_pretrained rebuild it."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise SeamError(f"LoRA rank r={r!r} must be a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise SeamError(f"LoRA alpha={alpha!r} must be a number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SeamError(f"LoRA dropout={dropout!r} must be in [0, 1)")
    targets = [targets] if isinstance(targets, str) else list(targets)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    found = find_linears(model, targets, exclude)
    names = replace_linears(model, found, lambda lin, t: LoRALinear(lin, t, r, alpha, dropout, rslora))
    if record:
        record_transform(model, {"kind": "lora", "r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora,
                                 "targets": targets, "exclude": exclude, "modules": names})
    return names


def _rebuild(model: nn.Module, rec: dict) -> None:
    names = inject_lora(model, rec["r"], rec["alpha"], rec.get("dropout", 0.0), rec["targets"],
                        rec.get("rslora", False), rec.get("exclude", ()), record=False)
    if "modules" in rec and names != rec["modules"]:
        raise SeamError(f"targets {rec['targets']} select {names} on this model, but the record lists "
                        f"{rec['modules']}; the adapter was made for another model")


register_transform("lora", _rebuild)


# ---- several adapters, one per token row (multi-LoRA serving) ----------------------------
@dataclass
class AdapterWeights:
    """One adapter's frozen tensors: module name -> role -> (A (r, in), B (rows, r)), and its scale."""
    pairs: dict[str, dict[str, tuple[Tensor, Tensor]]]
    scale: float


class LoRABatch:
    """Which adapter each token of the next forward runs with; shared by a model's MultiLoRALinears.

        with batch.rows([2, 0, 1], T, device):   # row b of the (B, T) batch: adapter row_ids[b], 0 = none
            logits = model(ids, ...)

    The linears read `groups`: per adapter id present, the flat token indices (b * T + t) of
    its rows, or None when every row uses it (no gather then). Computed once per forward,
    not once per layer. Per thread: a forward in another thread (the server's dashboard calls
    the model directly, while the engine thread runs its batch) sees no rows and runs the base."""

    def __init__(self):
        self._local = threading.local()

    @property
    def groups(self) -> list[tuple[int, Tensor | None]]:
        return getattr(self._local, "groups", None) or []

    @property
    def num_tokens(self) -> int:
        return getattr(self._local, "num_tokens", 0)

    @contextlib.contextmanager
    def rows(self, row_ids: list[int], T: int, device):
        groups: list[tuple[int, Tensor | None]] = []
        B = len(row_ids)
        for a in sorted(set(row_ids) - {0}):
            members = [b for b, r in enumerate(row_ids) if r == a]
            if len(members) == B:
                groups.append((a, None))
            else:
                flat = torch.tensor(members)[:, None] * T + torch.arange(T)                  # (len, T)
                groups.append((a, flat.flatten().to(device)))
        self._local.groups, self._local.num_tokens = groups, B * T
        try:
            yield
        finally:
            self._local.groups, self._local.num_tokens = None, 0


# attributes MultiLoRALinear sets on itself (see _OWN_NAMES)
_MULTI_NAMES = ("base", "batch", "base_linear_shape", "fused", "adapters", "adapter_ids")


class MultiLoRALinear(nn.Module):
    """A linear (or quantized linear) plus frozen adapters keyed by id; each token row gets the
    adapter its LoRABatch names (inference only: the deltas are added in place). The base's
    tensors keep their state-dict names; the adapters are non-persistent buffers, so
    `state_dict()` and the engine's weight updates see the base alone.

    One adapter's pairs on this linear are fused into one pair, zero where it adapts nothing:
        A = [A_q; A_v]                                  (r_q + r_v, in)
        B = scale * [[B_q, 0], [0, 0], [0, B_v]]        (out, r_q + r_v): k's rows stay 0
    so an adapter costs two thin matmuls per linear whatever slices it adapts."""

    def __init__(self, base: nn.Module, target: LinearTarget, batch: LoRABatch):
        super().__init__()
        if type(base) is not nn.Linear and not is_quantized_base(base):
            raise SeamError(f"multi-LoRA on {target.name}: the module is a {type(base).__name__}; it wraps an "
                            f"nn.Linear or a quantized linear" + (" (merge its own adapter first)"
                                                                  if isinstance(base, LoRALinear) else ""))
        if "lm_head" in target.fused:
            raise SeamError(f"multi-LoRA on {target.name}: adapters on the LM head are not supported when serving "
                            f"several adapters (the engine runs the head on the sampled positions only); "
                            f"merge that adapter into the base instead")
        clash = set(_MULTI_NAMES) & (set(base._parameters) | set(base._buffers) | set(base._modules))
        if clash:
            raise SeamError(f"multi-LoRA on {target.name}: the base {type(base).__name__} has tensor(s) named "
                            f"{sorted(clash)}, names MultiLoRALinear uses for itself")
        # adopt the base's tensors under their own names, as LoRALinear does
        self._parameters = base._parameters
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        self._modules.update(base._modules)
        self.__dict__["base"] = base
        self.__dict__["batch"] = batch          # shared by every MultiLoRALinear of the model
        self.base_linear_shape = tuple(getattr(base, "base_linear_shape", None) or base.weight.shape)
        self.fused = dict(target.fused)         # role -> (start, stop) rows
        self.adapters = nn.Module()             # buffers A<id> (R, in), B<id> (out, R)
        self.adapter_ids: set[int] = set()

    @torch.no_grad()
    def add_adapter(self, adapter_id: int, pairs: dict[str, tuple[Tensor, Tensor]], scale: float) -> None:
        """Add adapter `adapter_id` (an int >= 1): role -> (A (r, in), B (rows, r)), scaled by `scale`."""
        if not isinstance(adapter_id, int) or adapter_id < 1 or adapter_id in self.adapter_ids:
            raise SeamError(f"adapter id {adapter_id!r} must be a new int >= 1 (0 means no adapter); "
                            f"this linear has {sorted(self.adapter_ids)}")
        out_f, in_f = self.base_linear_shape
        unknown = sorted(set(pairs) - set(self.fused))
        if unknown or not pairs:
            raise SeamError(f"adapter {adapter_id} names role(s) {unknown or '(none)'}; this linear has "
                            f"{list(self.fused)}")
        order = sorted(pairs, key=lambda role: self.fused[role])
        for role in order:
            A, B = pairs[role]
            a, b = self.fused[role]
            if A.dim() != 2 or A.shape[1] != in_f or tuple(B.shape) != (b - a, A.shape[0]):
                raise SeamError(f"adapter {adapter_id}, role {role}: A {tuple(A.shape)} and B {tuple(B.shape)} do "
                                f"not fit a ({b - a} x {in_f}) slice; expected A (r, {in_f}), B ({b - a}, r)")
        A_all = torch.cat([pairs[role][0] for role in order])                         # (R, in)
        B_all = A_all.new_zeros(out_f, A_all.shape[0])                                # (out, R)
        col = 0
        for role in order:
            (a, b), B = self.fused[role], pairs[role][1]
            B_all[a:b, col:col + B.shape[1]] = B * scale
            col += B.shape[1]
        self.adapters.register_buffer(f"A{adapter_id}", A_all.contiguous(), persistent=False)
        self.adapters.register_buffer(f"B{adapter_id}", B_all, persistent=False)
        self.adapter_ids.add(adapter_id)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)                                                   # (..., out)
        groups = self.batch.groups
        if not groups:
            return y
        xf, yf = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])   # (N, in), (N, out)
        if xf.shape[0] != self.batch.num_tokens:
            raise SeamError(f"multi-LoRA: this linear got {xf.shape[0]} token rows but the batch was set for "
                            f"{self.batch.num_tokens} (B * T); a linear must see every token of the forward")
        for adapter_id, rows in groups:
            if adapter_id not in self.adapter_ids:
                continue                                                   # that adapter leaves this linear alone
            A, B = getattr(self.adapters, f"A{adapter_id}"), getattr(self.adapters, f"B{adapter_id}")
            h = xf if rows is None else xf.index_select(0, rows)           # (n, in)
            d = F.linear(F.linear(h.to(A.dtype), A), B).to(yf.dtype)       # (n, R) -> (n, out)
            if rows is None:
                yf.add_(d)
            else:
                yf.index_add_(0, rows, d)
        return yf.view(y.shape)

    def extra_repr(self) -> str:
        return f"in={self.base_linear_shape[1]}, out={self.base_linear_shape[0]}, adapters={sorted(self.adapter_ids)}"


def install_adapters(model: nn.Module, adapters: dict[int, AdapterWeights]) -> LoRABatch:
    """Wrap every linear some adapter adapts in a MultiLoRALinear holding the adapters by id
    (ints >= 1); returns the LoRABatch to set around each forward. Checked before anything
    changes: a model that already has adapters, or an adapter on the LM head, is refused."""
    have = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, MultiLoRALinear))]
    if have:
        raise SeamError(f"the model already has adapters on {have[:3]}; serve several adapters over a base "
                        f"without any (merge_lora it first)")
    if not adapters:
        raise SeamError("install_adapters needs at least one adapter")
    names = {n for w in adapters.values() for n in w.pairs}
    targets = find_linears(model, [re.escape(n) for n in sorted(names)])
    batch = LoRABatch()

    def build(linear: nn.Module, target: LinearTarget) -> MultiLoRALinear:
        m = MultiLoRALinear(linear, target, batch)
        for adapter_id, w in sorted(adapters.items()):
            if target.name in w.pairs:
                m.add_adapter(adapter_id, w.pairs[target.name], w.scale)
        return m

    replace_linears(model, targets, build)
    return batch
