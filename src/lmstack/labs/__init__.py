"""Floor 5: labs. Build it, plot it, break it: one experiment per module, one command each.

    lmstack lab list
    lmstack lab attention --quick --out runs/labs/attention
    lmstack lab all --quick                      # every lab + a gallery page

    from lmstack.labs import run_lab, run_all
    res = run_lab("kv-cache", "runs/labs/kv-cache", quick=True, seed=0)
    res["numbers"], res["insight"]["sentence"]

A lab composes library pieces (tokenizer, data, model, the one Trainer, the engine), measures
and draws; it adds no model code. Each writes numbers.json, its figures (PNG, and
self-contained HTML/JS where motion or a slider explains more) and index.html with its
question, what was built, the figures, the numbers and the insight those numbers support
(base.py). `--quick` runs in seconds (the test suite runs every lab that way); the full
mode takes minutes. Every lab is deterministic from its seed, wall-clock timings excepted.

Files: registry (the table of labs, torch-free), base (LabContext, LabResult, Figure,
Insight), runner (run_lab, run_all), page (HTML), plot (matplotlib), widgets (HTML/JS),
toy (shared data, models and training through the Trainer), one module per lab.
"""
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.registry import LABS, LabError, LabSpec, format_list, get_lab
from lmstack.labs.runner import run_all, run_lab

__all__ = ["LABS", "LabSpec", "LabError", "LabContext", "LabResult", "Figure", "Insight", "get_lab", "format_list",
           "run_lab", "run_all"]
