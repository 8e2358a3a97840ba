"""Calibration for GPTQ and AWQ: token windows, and the block-by-block runner that feeds each
block the outputs of the already-quantized blocks before it (GPTQ's sequential scheme).

    windows = calibration_windows(text, n_samples=16, seq_len=128, vocab_size=V, tokenizer=tok)
    run_sequential(model, names, windows, batch_size, make_stat, quantize_one)

`run_sequential` captures the input of block 0 once (a forward stopped at the block), then
for each block i: hooks the targeted linears inside it, runs the block on its inputs so every
hook sees its linear's inputs (`make_stat()` objects with `.add(x)`), calls
`quantize_one(name, linear, stat)` for each and swaps the result in, and runs the block again
to make the inputs of block i+1 with block i quantized. Linears outside the blocks (an
untied LM head) are calibrated last by a full forward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lmstack.model.quantized import QuantError
from lmstack.model.replace import set_module


def calibration_windows(calib, n_samples: int, seq_len: int, vocab_size: int, tokenizer=None,
                        context_length: int | None = None) -> Tensor:
    """Text, token ids (a list, a list of lists, a 1-D or 2-D tensor) -> (n_samples, seq_len) long.

    Everything is read as one token stream and cut into consecutive windows; too few tokens
    is an error that says how many are needed."""
    if calib is None:
        raise QuantError("GPTQ and AWQ need calibration data: pass calib= text (with tokenizer=) or token ids")
    if context_length is not None and seq_len > context_length:
        raise QuantError(f"calib_seq_len={seq_len} is longer than the model's context_length={context_length}")
    if isinstance(calib, str):
        if tokenizer is None:
            raise QuantError("calib is text: pass tokenizer= to turn it into token ids")
        stream = torch.tensor(tokenizer.encode(calib), dtype=torch.long)
    elif isinstance(calib, Tensor):
        stream = calib.detach().reshape(-1).long().cpu()
    elif isinstance(calib, (list, tuple)):
        flat = [t for row in calib for t in row] if calib and isinstance(calib[0], (list, tuple)) else list(calib)
        if not all(isinstance(t, int) for t in flat):
            raise QuantError("calib as a list must hold token ids (ints) or lists of them")
        stream = torch.tensor(flat, dtype=torch.long)
    else:
        raise QuantError(f"calib must be text, a list of token ids or a tensor, got {type(calib).__name__}")
    need = n_samples * seq_len
    if stream.numel() < need:
        raise QuantError(f"calibration data has {stream.numel()} tokens but calib_samples x calib_seq_len = "
                         f"{n_samples} x {seq_len} = {need} are needed; give more text or lower "
                         f"calib_samples / calib_seq_len")
    if int(stream.min()) < 0 or int(stream.max()) >= vocab_size:
        raise QuantError(f"calibration token ids must lie in [0, {vocab_size}); the tokenizer does not match "
                         f"the model")
    return stream[:need].view(n_samples, seq_len)


class _Stop(Exception):
    """Raised by the capture hook to end a forward at block 0."""


def _block_inputs(model: nn.Module, windows: Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """(args, kwargs) with which the model calls blocks[0], one entry per batch of windows."""
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(batch.to(model.wte.weight.device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _collect(module: nn.Module, names: list[str], make_stat: Callable, run: Callable[[], None],
             prefix: str = "") -> dict[str, object]:
    """Hook each named linear (names relative to model; `prefix` is module's name), call run(),
    and return name -> stat holding every input the linear saw."""
    stats = {n: make_stat() for n in names}
    handles = []
    for n in names:
        sub = module.get_submodule(n[len(prefix):]) if prefix else module.get_submodule(n)
        handles.append(sub.register_forward_hook(lambda m, inp, out, s=stats[n]: s.add(inp[0].detach())))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def run_sequential(model: nn.Module, names: list[str], windows: Tensor, batch_size: int,
                   make_stat: Callable[[], object], quantize_one: Callable[[str, nn.Module, object], nn.Module]
                   ) -> None:
    """Quantize the linears `names` block by block (see the module docstring). On any error
    the original linears are put back, so the model is never left half-quantized."""
    originals = {n: model.get_submodule(n) for n in names}
    was_training = model.training
    model.eval()
    try:
        inputs = _block_inputs(model, windows, batch_size)
        done: set[str] = set()
        for i, block in enumerate(model.blocks):
            prefix = f"blocks.{i}."
            mine = [n for n in names if n.startswith(prefix)]
            if mine:
                stats = _collect(block, mine, make_stat, lambda: [block(*a, **k) for a, k in inputs], prefix)
                for n in mine:
                    set_module(model, n, quantize_one(n, originals[n], stats[n]))
                done.update(mine)
            if i + 1 < len(model.blocks):
                inputs = [((block(*a, **k),) + tuple(a[1:]), k) for a, k in inputs]
        rest = [n for n in names if n not in done]
        if rest:  # outside the blocks (an untied LM head): a full forward with the blocks quantized
            stats = _collect(model, rest, make_stat,
                             lambda: [model(b.to(model.wte.weight.device)) for b in windows.split(batch_size)])
            for n in rest:
                set_module(model, n, quantize_one(n, originals[n], stats[n]))
    except BaseException:
        for n, lin in originals.items():
            set_module(model, n, lin)
        raise
    finally:
        model.train(was_training)
