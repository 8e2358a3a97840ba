"""The stage machinery: cache keys, skip-if-done, timing, the summary table.

A `Stage` names the options its output depends on (`params`) and the stages it reads
(`needs`). Its cache key is a hash of those params and of the keys of the stages it needs,
so changing `vocab_size` re-runs tokenizer, shards, pretrain, evaluate and sample, but not
the corpus. A finished stage writes `RUN_DIR/stages/<name>.json` {key, seconds, numbers};
the next run skips it when the key matches and its outputs still exist.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from lmstack.pipeline.options import RunOptions, check_nested
from lmstack.utils import LmstackError, atomic_write_json, atomic_write_text, ensure_writable_dir

# Bump when a stage's outputs change meaning, so old caches are not reused.
CACHE_VERSION = 2


@dataclass
class StageRecord:
    name: str
    key: str
    status: str = "pending"          # ran | cached | not selected
    seconds: float = 0.0             # time of the run that produced the output
    cpu_seconds: float = 0.0         # CPU time of this process meanwhile (what the stage cost on a busy machine)
    numbers: dict[str, Any] = field(default_factory=dict)


class Run:
    """What a stage sees: the options, the run directory and the records of earlier stages."""

    def __init__(self, opts: RunOptions, log: Callable[[str], None]):
        self.opts = opts
        self.dir = Path(opts.out_dir) / opts.name
        self.data_dir = self.dir / "data"
        self.records: dict[str, StageRecord] = {}
        self.log = log
        # True while a stage runs whose last run with the same cache key started and never
        # finished (interrupted): the stage may continue from what that run left (pretrain
        # resumes from its checkpoints). Never under force=True.
        self.resuming = False
        self._cache: dict[str, Any] = {}

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        """Load a heavy object (tokenizer, model, engine) once per run."""
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def forget(self, *names: str) -> None:
        for n in names:
            self._cache.pop(n, None)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    needs: tuple[str, ...] | Callable[[RunOptions], tuple[str, ...]]   # stages it reads (may depend on the recipe)
    params: Callable[[RunOptions], dict]       # the options this stage's output depends on
    run: Callable[[Run], dict]                 # does the work, returns its numbers
    outputs: Callable[[Run], list[Path]]       # must exist for a cached result to be reused
    cache: bool = True                         # False: always re-run (cheap, reads everything)
    estimate: Callable[[RunOptions, float], float] | None = None   # seconds, given train tokens/s (for ETAs)

    def needs_for(self, opts: RunOptions) -> tuple[str, ...]:
        return tuple(self.needs(opts)) if callable(self.needs) else self.needs


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(stages: list[Stage], opts: RunOptions) -> dict[str, str]:
    keys: dict[str, str] = {}
    for s in stages:
        keys[s.name] = _hash({"stage": s.name, "version": CACHE_VERSION, "params": s.params(opts),
                              "needs": [keys[n] for n in s.needs_for(opts)]})
    return keys


# Train tokens/s assumed for ETAs until this run's pretraining (or an earlier one) has measured its own.
DEFAULT_TOKENS_PER_S = 4000.0


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _load_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _load_record(path: Path, key: str) -> StageRecord | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("key") != key:
        return None
    return StageRecord(rec["name"], key, "cached", float(rec.get("seconds", 0.0)), float(rec.get("cpu_seconds", 0.0)),
                       rec.get("numbers", {}))


def run_stages(stages: list[Stage], opts: RunOptions, force: bool = False,
               log: Callable[[str], None] | None = None) -> dict:
    """Run the selected stages in order into OUT_DIR/NAME; return the summary (also summary.json)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_nested(opts)
    run = Run(opts, log)
    keys = stage_keys(stages, opts)
    selected = set(opts.stages)
    ensure_writable_dir(run.dir, "choose a writable --out-dir")
    (run.dir / "stages").mkdir(exist_ok=True)

    # Unselected stages must already be done (same key), or nothing downstream can use them.
    needers = {n: s.name for s in stages if s.name in selected for n in s.needs_for(opts)}
    for s in stages:
        if s.name in selected:
            continue
        rec = _load_record(run.dir / "stages" / f"{s.name}.json", keys[s.name])
        if rec is not None and all(p.exists() for p in s.outputs(run)):
            rec.status = "not selected"
            run.records[s.name] = rec
        elif s.name in needers:
            raise LmstackError(f"stage {needers[s.name]!r} needs the output of stage {s.name!r}, which has no "
                               f"up-to-date output in {run.dir}; add {s.name!r} to --stages before it")

    atomic_write_text(run.dir / "recipe.yaml", yaml.safe_dump(opts.to_recipe(), sort_keys=False))
    t_all = time.perf_counter()
    todo = [s for s in stages if s.name in selected]
    for i, s in enumerate(todo):
        record_path = run.dir / "stages" / f"{s.name}.json"
        rec = None if (force or not s.cache) else _load_record(record_path, keys[s.name])
        if rec is not None and all(p.exists() for p in s.outputs(run)):
            log(f"[{s.name}] cached (key {keys[s.name]}), skipping")
            run.records[s.name] = rec
            continue
        left = _estimates(todo[i:], run, force, keys)
        log(f"[{s.name}] stage {i + 1}/{len(todo)}: {s.help}; ETA this stage ~{_clock(left[0])}, "
            f"whole run ~{_clock(sum(left))} left")
        started = run.dir / "stages" / f"{s.name}.started.json"
        run.resuming = not force and _load_key(started) == keys[s.name]
        atomic_write_json(started, {"name": s.name, "key": keys[s.name]})
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            numbers = s.run(run)
        except Exception as e:        # KeyboardInterrupt passes through untouched (the CLI explains it)
            run.records[s.name] = StageRecord(s.name, keys[s.name], "failed", time.perf_counter() - t0,
                                              time.process_time() - c0, {"error": f"{type(e).__name__}: {e}"})
            _write_summary(run, opts, t_all)
            done = [n for n, r in run.records.items() if r.status in ("ran", "cached", "not selected")]
            raise LmstackError(f"stage {s.name!r} failed: {e}\nthe stages before it are kept in {run.dir} "
                               f"({', '.join(done) or 'none'}); run the same command again to continue from "
                               f"{s.name!r}") from e
        started.unlink(missing_ok=True)
        run.resuming = False
        rec = StageRecord(s.name, keys[s.name], "ran", time.perf_counter() - t0, time.process_time() - c0, numbers)
        run.records[s.name] = rec
        if s.cache:
            atomic_write_json(record_path, {"name": s.name, "key": rec.key, "seconds": rec.seconds,
                                            "cpu_seconds": rec.cpu_seconds, "numbers": numbers})
        log(f"[{s.name}] done in {rec.seconds:.1f}s")
    return _write_summary(run, opts, t_all)


def _write_summary(run: Run, opts: RunOptions, t_all: float) -> dict:
    summary = {
        "name": opts.name,
        "run_dir": str(run.dir),
        "seconds": time.perf_counter() - t_all,
        "stages": [vars(r) for r in run.records.values()],
        "recipe": opts.to_recipe(),
    }
    atomic_write_json(run.dir / "summary.json", summary)
    return summary


def _estimates(stages: list[Stage], run: Run, force: bool, keys: dict[str, str]) -> list[float]:
    """Seconds each of `stages` will take: 0 when cached, else the stage's estimate from the train
    tokens/s this run's pretraining measured (or DEFAULT_TOKENS_PER_S before it has)."""
    pre = run.records.get("pretrain")
    speed = (pre.numbers.get("tokens_per_s") if pre else None) or DEFAULT_TOKENS_PER_S
    out = []
    for s in stages:
        rec = None if (force or not s.cache) else _load_record(run.dir / "stages" / f"{s.name}.json", keys[s.name])
        if rec is not None and all(p.exists() for p in s.outputs(run)):
            out.append(0.0)
        else:
            out.append(s.estimate(run.opts, speed) if s.estimate else 1.0)
    return out


def clear_outputs(paths: list[Path]) -> None:
    """Delete stale outputs of an earlier run of a stage before it re-runs."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def format_table(summary: dict, width: int = 72) -> str:
    """The summary table printed at the end of `lmstack run`. Every number of every stage is
    shown: a stage's numbers wrap onto further lines at `width` characters, never cut."""
    rows = [("stage", "status", "time", ["numbers"])]
    for r in summary["stages"]:
        items = [f"{k}={_short(v)}" for k, v in r["numbers"].items() if not isinstance(v, (dict, list))]
        seconds = f"{r['seconds']:.1f}s" if r["status"] == "ran" else f"({r['seconds']:.1f}s)"
        rows.append((r["name"], r["status"], seconds, _wrap(items, width) or [""]))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    indent = " " * (sum(w) + 6)
    lines = []
    for a, b, c, nums in rows:
        lines.append(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {nums[0]}".rstrip())
        lines += [indent + more for more in nums[1:]]
    lines.insert(1, "-" * (sum(w) + 6 + min(width, max(len(n) for row in rows for n in row[3]))))
    lines.append(f"run dir: {summary['run_dir']}   total: {summary['seconds']:.1f}s")
    return "\n".join(lines)


def _wrap(items: list[str], width: int) -> list[str]:
    """Join items with ", " into lines of at most `width` characters (a longer item stands alone)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += ", " + item
        else:
            if lines:
                lines[-1] += ","
            lines.append(item)
    return lines


def format_probes(run_dir: str | Path) -> str:
    """Per-task probe accuracy vs chance from RUN_DIR/eval.json ('' when there are no probes)."""
    try:
        rows = json.loads((Path(run_dir) / "eval.json").read_text(encoding="utf-8")).get("probes", [])
    except (OSError, json.JSONDecodeError):
        return ""
    if not rows:
        return ""
    w = max(len("task"), *(len(r["task"]) for r in rows))
    lines = [f"{'task':<{w}}  {'n':>4}  {'accuracy':>8}  {'chance':>6}"]
    lines += [f"{r['task']:<{w}}  {r['n']:>4}  {r['accuracy']:>8.1%}  {r['chance']:>6.1%}" for r in rows]
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_effects(run_dir: str | Path) -> str:
    """Each stage's measured effect from RUN_DIR/measure.json ('' when there is none)."""
    try:
        effects = json.loads((Path(run_dir) / "measure.json").read_text(encoding="utf-8")).get("effects", [])
    except (OSError, json.JSONDecodeError):
        return ""
    return "\n".join(f"{e['stage']:<9} {e['metric']:<36} {e['before']:.3f} -> {e['after']:.3f}  {e['verdict']}"
                     for e in effects)
