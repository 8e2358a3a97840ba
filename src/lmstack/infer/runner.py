"""The model runner: scheduled sequences -> rows -> index tensors -> one forward per group -> logits.

`execute_model(scheduler_output)` turns each scheduled sequence into a row (`prepare`): the
token ids fed this step (a prefill chunk, a decode token, or a decode token plus draft
tokens to verify), the position of the first one, the sequence's block table (read from
the block manager), and how many trailing positions need logits (0 for a prefill chunk
that does not finish the prompt). `execute(rows)` runs any rows (the draft model's too).

The model is any module following the KV-cache protocol; nothing here looks at its
submodules, so LoRA-wrapped or quantized linears run as they are. Serving several adapters
(infer/lora.py), the runner also tells the model which adapter each row uses: it sets the
model's `LoRABatch` from the rows' `lora_id` around the forward.

Rows go through the model padded to `(B, T)` with position -1 on padding. Padding is real
compute on a CPU (every padded token runs through every MLP, every padded key slot through
attention), so rows are first grouped (`group_rows`): a batch of 1-token decodes never gets
padded to a 500-token prefill chunk, nor a 20-token context to a 2000-token one. Usually a
step is a group or two of decodes plus one of prefill chunks. All index arithmetic is
vectorised once per group; per layer, rows of a few tokens take the fused paged-attention
kernel (`PagedKVCache.attend`), longer ones `PagedKVCache.update`: two scatters and two gathers.
A group of plain decode rows (one token, one logit each) skips the padding arithmetic: its
bindings are a few ints per row, computed in Python and sent as two tensors (`_decode_forward`;
at batch 1 on a tiny model the step is mostly such per-op overhead, issue 20). For a
Llama-family model such a group then runs as one compiled op from ids to logits
(fused_decode.py), the module forward being the fallback wherever that op does not apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmstack import kernels
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.fast_linear import DecodeLinears
from lmstack.infer.fused_decode import FusedDecode
from lmstack.infer.paged_cache import PagedKVCache
from lmstack.infer.scheduler import SchedulerOutput
from lmstack.model import Transformer
from lmstack.model.lora import LoRABatch


PREFILL_WASTE = 0.1     # group_rows' max_waste for the rows other than decodes on the CPU (_groups)


@dataclass
class RunnerRow:
    token_ids: list[int]       # fed this step
    start_pos: int             # position of token_ids[0]
    block_table: list[int]
    num_logits: int            # logits wanted for the last num_logits fed tokens
    lora_id: int = 0           # the LoRA adapter this row runs with (0 = the base)


def group_rows(lengths: list[int], contexts: list[int] | None = None, max_waste: float = 0.25,
               slack: int = 32, attn_slack: int = 2048) -> list[list[int]]:
    """Partition row indices so that padding each group to its longest row wastes little.

    Two kinds of padding: tokens (rows padded to the longest T: every layer's linears) and
    key slots (rows padded to the longest context S: the gather and attention). Rows sorted
    by (T, S), longest first, join the current group while both wastes stay under
    `max_waste` (plus a little slack: one more forward costs a few ms of overhead)."""
    contexts = contexts if contexts is not None else lengths
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], -contexts[i]))
    groups: list[list[int]] = []
    tokens = area = 0
    for i in order:
        if groups:
            g = groups[-1]
            T, S, n = lengths[g[0]], contexts[g[0]], len(g) + 1   # g[0]: longest T, then longest S
            padded_tokens, padded_area = T * n, T * S * n
            if (padded_tokens - (tokens + lengths[i]) <= max_waste * padded_tokens + slack and
                    padded_area - (area + lengths[i] * contexts[i]) <= max_waste * padded_area + attn_slack):
                g.append(i)
                tokens += lengths[i]
                area += lengths[i] * contexts[i]
                continue
        groups.append([i])
        tokens, area = lengths[i], lengths[i] * contexts[i]
    return groups


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, block_manager: BlockManager,
                 device: torch.device, lora: LoRABatch | None = None):
        self.model = model
        self.lora = lora                       # the model's LoRABatch when it serves adapters
        self.cache = cache
        self.block_manager = block_manager     # read-only here: block tables by seq id
        self.device = device
        self.block_size = cache.block_size
        self.fast_linears = DecodeLinears(model)   # decode GEMVs on the compiled kernel (fast_linear.py)
        self.fused = FusedDecode(model, cache)     # the whole decode step in one op (fused_decode.py)

    def prepare(self, out: SchedulerOutput) -> list[RunnerRow]:
        """One row per scheduled sequence: its next uncomputed tokens (+ draft tokens)."""
        rows = []
        for s in out.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            fed = seq.token_ids[start:start + s.num_new_tokens] + seq.spec_token_ids   # [last, d_1 .. d_k]
            rows.append(RunnerRow(fed, start, self.block_manager.block_table(seq.seq_id), s.num_logits,
                                  seq.lora_id))
        return rows

    def execute_model(self, out: SchedulerOutput) -> Tensor:
        """Logits (sum of num_logits, V) float32 of the scheduled sequences, in schedule order."""
        return self.execute(self.prepare(out), out.copies)

    @torch.inference_mode()
    def execute(self, rows: list[RunnerRow], copies: list[tuple[int, int]] = ()) -> Tensor:
        """Run rows; return logits (sum(num_logits), V) float32, rows' logits in row order."""
        self.cache.copy_blocks(list(copies))
        groups = self._groups(rows)
        if len(groups) == 1 and groups[0] == list(range(len(rows))):   # one forward, rows in order (decode)
            with self.fast_linears.active():
                logits = self._forward(rows)
            return logits.float() if logits.shape[0] else torch.empty(0, 0)
        out: list[tuple[int, Tensor]] = []
        for group in groups:
            with self.fast_linears.active():
                logits = self._forward([rows[i] for i in group])
            offset = 0
            for i in group:
                n = rows[i].num_logits
                out.append((i, logits[offset:offset + n]))
                offset += n
        out.sort(key=lambda x: x[0])
        parts = [t for _, t in out if t.shape[0]]
        if not parts:
            return torch.empty(0, 0)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).float()

    def _groups(self, rows: list[RunnerRow]) -> list[list[int]]:
        """The forwards of a step (group_rows). Plain decode rows read their context in place on
        the CPU kernels (fused_decode.py, PagedKVCache.attend), so padding them to the longest
        context costs nothing there: they all go into one forward, and only the other rows
        (prefill chunks, draft verification) are grouped by padding, more tightly than
        group_rows' default: on the CPU a padded token costs as much as a real one, another
        forward only its fixed overhead (the offline benchmark's 16 prompts of 16-256 tokens:
        12.5% of prefill tokens were padding at max_waste 0.25 in 5 forwards, 3.6% at 0.1 in 10)."""
        if len(rows) == 1:
            return [[0]]
        lengths = [len(r.token_ids) for r in rows]
        contexts = [r.start_pos + n for r, n in zip(rows, lengths)]
        c = self.cache
        if c.quantized or c.k.dtype != torch.float32 or c.k.device.type != "cpu" or not kernels.available():
            return group_rows(lengths, contexts)
        decode = [i for i, r in enumerate(rows) if lengths[i] == 1 and r.num_logits == 1]
        rest = [i for i, r in enumerate(rows) if lengths[i] != 1 or r.num_logits != 1]
        groups = [decode] if decode else []
        if rest:
            groups += [[rest[j] for j in g] for g in group_rows([lengths[i] for i in rest], [contexts[i] for i in rest],
                                                               max_waste=PREFILL_WASTE)]
        return groups

    def _forward(self, rows: list[RunnerRow]) -> Tensor:
        if all(len(r.token_ids) == 1 and r.num_logits == 1 for r in rows):
            return self._decode_forward(rows)
        return self._general_forward(rows)

    def _general_forward(self, rows: list[RunnerRow]) -> Tensor:
        """Any rows: padded to (B, T), index tensors built vectorised."""
        dev, bs = self.device, self.block_size
        lens = [len(r.token_ids) for r in rows]
        T = max(lens)
        padded_ids = [r.token_ids + [0] * (T - len(r.token_ids)) for r in rows]
        ids = torch.tensor(padded_ids, dtype=torch.long, device=dev)                  # (B, T)
        start = torch.tensor([r.start_pos for r in rows], dtype=torch.long, device=dev)
        n_new = torch.tensor(lens, dtype=torch.long, device=dev)
        t = torch.arange(T, device=dev)
        positions = start[:, None] + t[None, :]                                        # (B, T)
        valid = t[None, :] < n_new[:, None]
        positions = torch.where(valid, positions, torch.full_like(positions, -1))
        n_blk = max(len(r.block_table) for r in rows)
        tables = torch.tensor([r.block_table + [0] * (n_blk - len(r.block_table)) for r in rows],
                              dtype=torch.long, device=dev)                              # (B, n_blk)
        # where each new token is written: slot of (row b, position p)
        p = positions.clamp_min(0)
        slots = tables.gather(1, p // bs) * bs + p % bs                                 # (B, T)
        if bool(valid.all()):
            write_rows, write_slots = None, slots.flatten()
        else:
            write_rows = valid.flatten().nonzero().squeeze(1)
            write_slots = slots.flatten()[write_rows]
        # what each row reads back: its whole context 0 .. start+n_new-1 (through its table)
        self.cache.bind_tables(write_rows, write_slots, tables, start + n_new)
        # each row's last num_logits positions, in row order, as indices into the flat (B*T)
        pick = torch.tensor([b * T + lens[b] - k for b, r in enumerate(rows) for k in range(r.num_logits, 0, -1)],
                            dtype=torch.long, device=dev)
        if self.lora is None:
            return self._logits_at(ids, positions, pick)
        with self.lora.rows([r.lora_id for r in rows], T, dev):
            return self._logits_at(ids, positions, pick)

    def _decode_forward(self, rows: list[RunnerRow]) -> Tensor:
        """_forward for rows of one token each, all wanting logits (plain decode): the same
        bindings, computed in Python from the few ints and built as two tensors instead of the
        ~15 small index ops of the general path. Logits (B, V) in row order."""
        dev, bs, B = self.device, self.block_size, len(rows)
        pos = [r.start_pos for r in rows]
        slots = [r.block_table[p // bs] * bs + p % bs for r, p in zip(rows, pos)]
        # [ids | positions | write slots | context lengths], sliced into views (B,) each
        flat = torch.tensor([r.token_ids[0] for r in rows] + pos + slots + [p + 1 for p in pos],
                            dtype=torch.long, device=dev)
        ids, positions, write_slots, context_lens = flat.view(4, B)
        n_blk = max(len(r.block_table) for r in rows)
        tables = torch.tensor([r.block_table + [0] * (n_blk - len(r.block_table)) for r in rows],
                              dtype=torch.long, device=dev)                              # (B, n_blk)
        ids, positions = ids.view(B, 1), positions.view(B, 1)
        if self.lora is None:   # a Llama-family model: ids -> logits in one compiled op
            logits = self.fused(ids, positions, tables, max(pos))
            if logits is not None:
                return logits
        self.cache.bind_tables(None, write_slots, tables, context_lens)
        if self.lora is None:
            return self._logits_at(ids, positions, None)
        with self.lora.rows([r.lora_id for r in rows], 1, dev):
            return self._logits_at(ids, positions, None)

    def _logits_at(self, ids: Tensor, positions: Tensor, pick: Tensor | None) -> Tensor:
        """Logits (len(pick), V) at flat positions `pick` of the (B, T) batch (None: all B*T).

        Our Transformer takes `logits_indices` and runs its LM head only on the picked
        positions: for a 32k vocab the head over a whole prefill chunk costs more than all the
        blocks. Any other module following the protocol is called whole and its logits indexed."""
        m = self.model
        if pick is None:
            logits = m(ids, positions=positions, cache=self.cache)                      # (B, T, V)
            return logits.reshape(-1, logits.shape[-1])
        if isinstance(m, Transformer):   # multi-LoRA rows need every token at every linear: no pruning
            return m(ids, positions=positions, cache=self.cache, logits_indices=pick,
                     prune_last_block=self.lora is None)                                 # (N, V)
        logits = m(ids, positions=positions, cache=self.cache)                          # (B, T, V)
        return logits.reshape(-1, logits.shape[-1])[pick]
