"""Task definitions: versioned YAML prompt templates -> examples ready to score.

A task is one YAML file (the built-in ones live in `lmstack/eval/tasks/`):

    name: facts                      # how results are labelled
    version: 1                       # bump when the prompt changes; recorded in the output JSON
    kind: generate_until             # | multiple_choice | perplexity
    source: {eval: facts}            # DATA/eval/facts.jsonl | {docs: val} (DATA/docs/val.jsonl)
                                     # | {jsonl: FILE} (relative to the YAML file)
    template: "{prompt}"             # str.format over the record's fields
    target: "{answer}"               # the reference (generate) / the gold choice (multiple choice)
    fewshot: 0                       # solved examples before the prompt (other records of the source)
    generation: {max_tokens: 24, stop: ["\\n"]}
    extract: {regex: "=(-?\\d+)$"}   # optional: score what group 1 captures (prediction and reference)
    metrics: [exact_match, f1]
    choices: {distractors: answer, group_by: relation, n: 4}   # multiple choice: wrong answers drawn
                                     # from other records (same group), or {field: choices, gold: label}
    variants:                        # named overrides: `--tasks facts:fewshot3` or --template-variant
      fewshot3: {fewshot: 3}

Every key is checked when the file is read: an unknown key, a missing required one or a
value of the wrong kind is an error naming the file and the key. A record that lacks a
field the template uses is not: that example is recorded as failed (listed in the output)
and the others run. Few-shot examples and distractors are drawn from the other records by
a generator seeded with the task name and the example's index: the same file gives the same
prompts on every run, which is what makes a prompt testable like code.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from lmstack.eval.metrics import GENERATION_METRICS, MC_METRICS, PPL_METRICS
from lmstack.utils import LmstackError

BUILTIN_DIR = Path(__file__).parent / "tasks"
KINDS = {"generate_until": GENERATION_METRICS, "multiple_choice": MC_METRICS, "perplexity": PPL_METRICS}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    version: int | str
    kind: str
    source: dict
    template: str
    target: str = "{answer}"
    description: str = ""
    fewshot: int = 0
    fewshot_separator: str = "\n\n"
    target_delimiter: str = " "
    generation: dict = field(default_factory=lambda: {"max_tokens": 32, "stop": ["\n"]})
    extract: dict | None = None
    metrics: tuple = ()
    choices: dict | None = None
    chat: bool = False
    variants: dict = field(default_factory=dict)
    # where it came from (not YAML keys)
    path: str = ""
    variant: str = "default"

    @property
    def label(self) -> str:
        return self.name if self.variant == "default" else f"{self.name}:{self.variant}"


_KEYS = {f.name for f in fields(TaskSpec)} - {"path", "variant"}
_REQUIRED = ("name", "version", "kind", "source", "template")


@dataclass
class Example:
    index: int
    prompt: str                          # the rendered context (few-shot block included)
    target: str = ""                     # reference answer / gold choice text
    choices: list[str] | None = None
    gold: int | None = None
    record: dict = field(default_factory=dict)


@dataclass
class Failure:
    """An example that could not be scored, and why (listed in the output)."""
    reason: str

    def __str__(self) -> str:
        return self.reason


# ------------------------------------------------------------------ loading specs
def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml") if not p.stem.startswith("judge_"))


def load_task(spec: str, variant: str | None = None) -> TaskSpec:
    """'facts', 'facts:fewshot3', 'path/to/task.yaml' or 'task.yaml:variant' -> TaskSpec."""
    name, _, inline = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
    if inline and variant and inline != variant:
        raise LmstackError(f"task {spec!r} names variant {inline!r} and --template-variant {variant!r}; give one")
    variant = inline or variant or "default"
    path = Path(name)
    if not path.is_file():
        path = BUILTIN_DIR / f"{name}.yaml"
        if not path.is_file():
            raise LmstackError(f"unknown task {name!r}: not a YAML file and not a built-in task; built-in "
                               f"tasks: {', '.join(builtin_tasks())}")
    return parse_task(yaml.safe_load(path.read_text(encoding="utf-8")), str(path), variant)


def parse_task(raw, path: str = "<task>", variant: str = "default") -> TaskSpec:
    """Check a task's YAML mapping key by key and apply the variant's overrides."""
    if not isinstance(raw, dict):
        raise LmstackError(f"{path}: a task file must be a YAML mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise LmstackError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(_KEYS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise LmstackError(f"{path}: missing required key(s) {missing}")
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict):
        raise LmstackError(f"{path}: variants must be a mapping of name -> overrides")
    if variant != "default":
        if variant not in variants:
            raise LmstackError(f"{path}: no variant {variant!r}; variants: {['default', *sorted(variants)]}")
        over = variants[variant] or {}
        bad = sorted(set(over) - _KEYS - {"name", "version", "variants"}) if isinstance(over, dict) else [over]
        if bad or "variants" in over:
            raise LmstackError(f"{path}: variant {variant!r} overrides unknown key(s) {bad}")
        raw = {**raw, **over}
    spec = TaskSpec(**{**raw, "metrics": tuple(raw.get("metrics") or KINDS.get(raw["kind"], ())),
                       "path": path, "variant": variant})
    _check(spec)
    return spec


def _check(s: TaskSpec) -> None:
    where = f"{s.path} ({s.label})"
    if s.kind not in KINDS:
        raise LmstackError(f"{where}: kind must be one of {sorted(KINDS)}, got {s.kind!r}")
    bad = [m for m in s.metrics if m not in KINDS[s.kind]]
    if bad:
        raise LmstackError(f"{where}: metric(s) {bad} do not apply to {s.kind}; valid: {list(KINDS[s.kind])}")
    if not (isinstance(s.source, dict) and len(s.source) == 1 and next(iter(s.source)) in ("eval", "docs", "jsonl")):
        raise LmstackError(f"{where}: source must be one of {{eval: NAME}}, {{docs: SPLIT}}, {{jsonl: FILE}}; "
                           f"got {s.source!r}")
    if not isinstance(s.fewshot, int) or s.fewshot < 0:
        raise LmstackError(f"{where}: fewshot must be an int >= 0, got {s.fewshot!r}")
    for key in ("template", "target", "fewshot_separator", "target_delimiter"):
        if not isinstance(getattr(s, key), str):
            raise LmstackError(f"{where}: {key} must be a string")
    gen = s.generation or {}
    if not isinstance(gen, dict) or set(gen) - {"max_tokens", "stop"} or \
            not (isinstance(gen.get("max_tokens", 1), int) and gen.get("max_tokens", 1) >= 1):
        raise LmstackError(f"{where}: generation takes max_tokens (int >= 1) and stop (list of strings); got {gen!r}")
    if s.extract is not None:
        if not isinstance(s.extract, dict) or "regex" not in s.extract:
            raise LmstackError(f"{where}: extract must be {{regex: PATTERN, group: 1}}")
        try:
            re.compile(s.extract["regex"])
        except re.error as e:
            raise LmstackError(f"{where}: extract.regex does not compile: {e}") from None
    if s.kind == "multiple_choice":
        c = s.choices or {}
        if not (("field" in c) or ("distractors" in c)):
            raise LmstackError(f"{where}: multiple_choice needs choices: {{distractors: FIELD, n: 4}} or "
                               f"{{field: FIELD, gold: FIELD}}")


# ------------------------------------------------------------------ records
def source_path(spec: TaskSpec, data_dir: str | Path | None) -> Path:
    """The JSONL file a task reads: {jsonl: FILE} beside the YAML, or DATA/eval|docs/NAME.jsonl."""
    (kind, value), = spec.source.items()
    if kind == "jsonl":
        path = Path(value)
        return path if path.is_absolute() else Path(spec.path).parent / path
    if data_dir is None:
        raise LmstackError(f"task {spec.label} reads a data directory ({kind}: {value}); pass --data DIR "
                           f"(a run directory's data lives in RUN/data)")
    return Path(data_dir) / ("eval" if kind == "eval" else "docs") / f"{value}.jsonl"


def read_records(spec: TaskSpec, data_dir: str | Path | None) -> list[dict | Failure]:
    """The source's lines in order: a record, or a Failure for a line that is not a JSON object."""
    path = source_path(spec, data_dir)
    if not path.is_file():
        raise LmstackError(f"task {spec.label}: {path} does not exist")
    entries: list[dict | Failure] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            entries.append(Failure(f"{path.name}:{lineno}: not JSON ({e.msg})"))
            continue
        entries.append(rec if isinstance(rec, dict) else Failure(f"{path.name}:{lineno}: not a JSON object"))
    return entries


def render(template: str, record: dict, what: str) -> str:
    try:
        return template.format_map(record)
    except KeyError as e:
        raise LmstackError(f"missing field {e.args[0]!r} for the {what} (record fields: {sorted(record)})") from None
    except (ValueError, IndexError, AttributeError) as e:
        raise LmstackError(f"the {what} template cannot be rendered: {e}") from None


def build_examples(spec: TaskSpec, data_dir=None, limit: int | None = None) -> list[Example | Failure]:
    """One Example (or a Failure naming the problem) per line of the source, the first
    `limit` lines. Few-shot examples and distractors come from all of the file's records."""
    entries = read_records(spec, data_dir)
    records = [e for e in entries if isinstance(e, dict)]
    out: list[Example | Failure] = []
    i = 0                                          # index among the records
    for entry in entries[:limit] if limit is not None else entries:
        if isinstance(entry, Failure):
            out.append(entry)
            continue
        try:
            out.append(_example(spec, records, i))
        except LmstackError as e:
            out.append(Failure(f"record {i}: {e}"))
        i += 1
    return out


def _example(spec: TaskSpec, records: list[dict], i: int) -> Example:
    rec = records[i]
    rng = random.Random(f"{spec.name}:{i}")
    if spec.kind == "perplexity":
        return Example(i, render(spec.template, rec, "document"), record=rec)
    prompt = render(spec.template, rec, "prompt")
    target = _target(spec, rec)
    if spec.fewshot:
        others = [j for j in range(len(records)) if j != i]
        shots = []
        for j in rng.sample(others, min(spec.fewshot, len(others))):
            try:
                shots.append(render(spec.template, records[j], "prompt") + spec.target_delimiter
                             + _target(spec, records[j]))
            except LmstackError:
                continue                       # a broken record is not a good example; it fails on its own turn
        prompt = spec.fewshot_separator.join(shots + [prompt])
    ex = Example(i, prompt, target, record=rec)
    if spec.kind == "multiple_choice":
        if "field" in spec.choices:
            ex.choices, ex.gold = _field_choices(spec, rec)
        else:
            ex.choices, ex.gold = _distractors(spec, records, i, target, rng)
    return ex


def _target(spec: TaskSpec, rec: dict) -> str:
    """The reference answer, or for choices given in a field, the gold choice's text."""
    if spec.kind == "multiple_choice" and "field" in spec.choices:
        choices, gold = _field_choices(spec, rec)
        return choices[gold]
    return render(spec.target, rec, "target")


def _field_choices(spec: TaskSpec, rec: dict) -> tuple[list[str], int]:
    name, gold_key = spec.choices["field"], spec.choices.get("gold", "gold")
    choices = rec.get(name)
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(x, str) for x in choices)):
        raise LmstackError(f"field {name!r} must hold a list of >= 2 strings")
    gold = rec.get(gold_key)
    if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
        raise LmstackError(f"gold {gold!r} is not an index into (or one of) the {len(choices)} choices")
    return choices, gold


def _distractors(spec: TaskSpec, records, i: int, target: str, rng: random.Random) -> tuple[list[str], int]:
    """The target plus n - 1 other records' answers (same group_by value), shuffled."""
    key, group, rec = spec.choices["distractors"], spec.choices.get("group_by"), records[i]
    pool = sorted({str(r[key]) for r in records if key in r and (group is None or r.get(group) == rec.get(group))}
                  - {target})
    if not pool:
        raise LmstackError(f"no distractors: no other record has a different {key!r}"
                           + (f" in its {group!r} group" if group else ""))
    choices = rng.sample(pool, min(int(spec.choices.get("n", 4)) - 1, len(pool))) + [target]
    rng.shuffle(choices)
    return choices, choices.index(target)


def extract(spec: TaskSpec, text: str) -> str:
    """The part of a generation that is scored: group `extract.group` (default 1, or the
    whole match) of the first match of extract.regex, else the first line stripped."""
    if spec.extract is None:
        return text.split("\n")[0].strip()
    m = re.search(spec.extract["regex"], text)
    if m is None:
        raise LmstackError(f"the extractor /{spec.extract['regex']}/ matched nothing in {text[:80]!r}")
    group = spec.extract.get("group", 1 if m.re.groups else 0)
    return (m.group(group) or "").strip()
