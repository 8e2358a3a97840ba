"""Where training numbers go: out/metrics.jsonl, TensorBoard, the MFU estimate, and the
checks on what an objective reports.

metrics.jsonl holds one JSON object per line, e.g.
    {"step": 10, "split": "train", "loss": 4.21, "lr": 0.001, "grad_norm": 0.8, "tokens": 20480, ...}
    {"step": 100, "split": "val", "loss": 3.02, "ppl": 20.5}
Lines are appended and flushed as they come. On resume from step k, lines after step k (and
a half-written last line from a kill) are dropped first, so a resumed run's file equals an
uninterrupted run's.

MFU (model FLOPs utilisation) = achieved model FLOP/s / the device's peak. Peaks are dense
(no sparsity) tensor-core numbers from the vendors' data sheets, in TFLOP/s:
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from lmstack.utils import LmstackError, atomic_write_text

# (substring of torch.cuda.get_device_name(), {dtype: peak TFLOP/s}); first match wins.
GPU_PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),   # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
    ("3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
    ("T4", {"bf16": 0.0, "fp16": 65.0, "fp32": 8.1}),
]
# CPU: a rough estimate, cores x 2.5 GHz x FLOPs per cycle per core: 2 FMA units x SIMD lanes
# x 2 (multiply + add): AVX-512 fp32 = 64, AVX2 fp32 = 32; bf16 with AVX512_BF16 doubles it.
CPU_CLOCK_HZ = 2.5e9


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device in `dtype`; 0.0 when unknown (MFU then shows as 0)."""
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, table in GPU_PEAK_TFLOPS:
            if pattern in name:
                return table[key] * 1e12
        return 0.0
    flags = _cpu_flags()
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 8
    if key == "bf16" and "avx512_bf16" in flags:
        per_cycle *= 2
    return torch.get_num_threads() * CPU_CLOCK_HZ * per_cycle


# Keys the Trainer writes itself; an objective's metrics may not use them.
RESERVED = {"step", "split", "loss", "lr", "grad_norm", "aux_loss", "tokens", "tok_per_s", "mfu", "ppl"}


def check_objective_output(name: str, out, keys: list[str] | None) -> list[str]:
    """Check `out` = objective.loss(...) is (0-dim loss tensor, metrics dict) with the same
    metric keys as before (`keys`; None on the first call). Returns the sorted keys."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
            and out[0].dim() == 0 and isinstance(out[1], dict)):
        got = type(out).__name__ if not isinstance(out, tuple) else f"a tuple of {len(out)}"
        raise LmstackError(f"objective {name!r}: loss(model, batch) must return (a 0-dim loss tensor, a dict "
                           f"of metrics), got {got}")
    now = sorted(out[1])
    if keys is None and RESERVED & set(now):
        raise LmstackError(f"objective {name!r} returns reserved metric names {sorted(RESERVED & set(now))}; "
                           f"rename them")
    if keys is not None and now != keys:
        raise LmstackError(f"objective {name!r} returned metrics {now}, earlier {keys}; return the same keys "
                           f"every time")
    return now


def metric_vector(head: list[torch.Tensor], metrics: dict, keys: list[str], device) -> torch.Tensor:
    """(len(head) + len(keys),) float64 on `device`: the head tensors, then metrics in key
    order, so a step's numbers are summed and all-reduced as one tensor (no host sync here)."""
    vals = [t.detach().reshape(()) for t in head]
    for k in keys:
        v = metrics[k]
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise LmstackError(f"metric {k!r} must be a float or a 0-dim tensor, got shape {tuple(v.shape)}")
            v = v.detach().reshape(())
        vals.append(torch.as_tensor(v, dtype=torch.float64, device=device))
    return torch.stack([v.to(device, torch.float64) for v in vals])


class MetricsLog:
    """Append-only JSONL metrics plus an optional TensorBoard mirror. Rank 0 only."""

    def __init__(self, out: Path, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
                self._tb = SummaryWriter(log_dir=str(Path(out) / "tb"))
            except ImportError:
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop lines with step > `step` and any unparsable (half-written) line."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def reset(self) -> None:
        if self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """All complete records of out/metrics.jsonl."""
    path = Path(out) / "metrics.jsonl"
    recs = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    return recs
