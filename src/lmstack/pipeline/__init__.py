"""Floor 6: the main job. A recipe of stages run in order into a run directory.

    from lmstack.pipeline import RunOptions, run_pipeline
    summary = run_pipeline(RunOptions(name="demo"))     # runs/demo/{report.html, summary.json, ...}

Stages (default): corpus -> tokenizer -> shards -> pretrain -> evaluate -> sample -> sft -> dpo
-> grpo -> quantize -> measure -> rag -> report (`stages.py`; the chat ones in `chat_stages.py`,
measure and rag in `measure.py`); or import (a Hugging Face folder) instead of the first four,
and export (GGUF + HF folder). Each skips itself when its inputs are unchanged (`runner.py`),
`force=True` redoes them; a failed stage keeps the ones before it and the same command continues.
`lmstack run` is the command-line face of `run_pipeline`.
"""
from __future__ import annotations

from typing import Callable

from lmstack.pipeline.options import STAGE_NAMES, RunOptions
from lmstack.pipeline.runner import (Stage, StageRecord, format_effects, format_probes, format_table, run_stages,
                                     stage_keys)
from lmstack.pipeline.stages import STAGES

__all__ = ["RunOptions", "STAGES", "STAGE_NAMES", "Stage", "StageRecord", "format_effects", "format_probes",
           "format_table",
           "run_pipeline", "stage_keys"]

assert tuple(s.name for s in STAGES) == STAGE_NAMES, "stage list and RunOptions.stages disagree"


def run_pipeline(opts: RunOptions | None = None, force: bool = False,
                 log: Callable[[str], None] | None = None) -> dict:
    """Run the main job; returns the summary dict that is also written to summary.json."""
    return run_stages(STAGES, opts or RunOptions(), force=force, log=log)
