"""Task YAML: checked key by key at the door; variants; the exact prompts a template renders
(zero- and few-shot), distractors and gold indices; bad records become listed failures."""
from __future__ import annotations

import json

import pytest
import yaml

from lmstack.eval import Failure, build_examples, builtin_tasks, load_task
from lmstack.eval.tasks import extract, parse_task
from lmstack.utils import LmstackError

BASE = {"name": "t", "version": 3, "kind": "generate_until", "source": {"jsonl": "data.jsonl"},
        "template": "Q: {q}\nA:", "target": "{a}"}
RECORDS = [{"q": "one", "a": "1", "g": "x"}, {"q": "two", "a": "2", "g": "x"}, {"q": "three", "a": "3", "g": "y"},
           {"q": "four", "a": "4", "g": "x"}, {"q": "five", "a": "5", "g": "y"}]


def write_task(tmp_path, records=RECORDS, **over) -> str:
    (tmp_path / "data.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({**BASE, **over}))
    return str(path)


def test_every_builtin_task_and_judge_template_loads():
    names = builtin_tasks()
    assert {"facts", "facts_mc", "arithmetic", "arithmetic_mc", "arithmetic_steps", "instructions",
            "instructions_mc", "reading", "val_ppl"} <= set(names)
    for name in names:
        spec = load_task(name)
        assert spec.version is not None and spec.metrics
        for v in spec.variants:
            assert load_task(f"{name}:{v}").variant == v


@pytest.mark.parametrize("over,match", [
    ({"prompt": "x"}, r"unknown key\(s\) \['prompt'\]"),
    ({"kind": "essay"}, "kind must be one of"),
    ({"metrics": ["acc"]}, r"metric\(s\) \['acc'\] do not apply to generate_until"),
    ({"source": {"hub": "squad"}}, "source must be one of"),
    ({"fewshot": -1}, "fewshot must be an int >= 0"),
    ({"generation": {"max_tokens": 0}}, "generation takes max_tokens"),
    ({"extract": {"regex": "("}}, "extract.regex does not compile"),
    ({"kind": "multiple_choice", "metrics": ["acc"]}, "multiple_choice needs choices"),
])
def test_bad_task_files_fail_at_the_door(over, match):
    with pytest.raises(LmstackError, match=match):
        parse_task({**BASE, **over}, "task.yaml")


def test_missing_keys_and_unknown_variants():
    with pytest.raises(LmstackError, match=r"missing required key\(s\) \['template'\]"):
        parse_task({k: v for k, v in BASE.items() if k != "template"}, "task.yaml")
    with pytest.raises(LmstackError, match=r"no variant 'v9'; variants: \['default', 'v1'\]"):
        parse_task({**BASE, "variants": {"v1": {"fewshot": 1}}}, "task.yaml", "v9")
    with pytest.raises(LmstackError, match="unknown task 'nope'"):
        load_task("nope")


def test_zero_and_few_shot_prompts_are_exactly_rendered(tmp_path):
    path = write_task(tmp_path, variants={"shots2": {"fewshot": 2, "version": 4}})
    zero = build_examples(load_task(path))
    assert [e.prompt for e in zero] == [f"Q: {r['q']}\nA:" for r in RECORDS]
    assert [e.target for e in zero] == ["1", "2", "3", "4", "5"]
    spec = load_task(path, "shots2")
    assert (spec.variant, spec.version, spec.label) == ("shots2", 4, "t:shots2")
    few = build_examples(spec, limit=2)
    assert len(few) == 2
    for ex in few:
        *shots, last = ex.prompt.split("\n\n")
        assert last == f"Q: {RECORDS[ex.index]['q']}\nA:" and len(shots) == 2
        for shot in shots:          # solved examples of *other* records: template + " " + target
            r = next(r for r in RECORDS if shot == f"Q: {r['q']}\nA: {r['a']}")
            assert r is not RECORDS[ex.index]
    assert [e.prompt for e in build_examples(spec, limit=2)] == [e.prompt for e in few]   # deterministic


def test_multiple_choice_distractors_and_gold(tmp_path):
    path = write_task(tmp_path, kind="multiple_choice", metrics=["acc"],
                      choices={"distractors": "a", "group_by": "g", "n": 3})
    for ex in build_examples(load_task(path)):
        rec = RECORDS[ex.index]
        same_group = {r["a"] for r in RECORDS if r["g"] == rec["g"]}
        assert ex.choices[ex.gold] == rec["a"] and set(ex.choices) <= same_group
        assert len(ex.choices) == min(3, len(same_group)) and len(set(ex.choices)) == len(ex.choices)
    # choices from a field, gold given as an index or as the right choice's text
    recs = [{"q": "a", "opts": ["x", "y"], "label": 1}, {"q": "b", "opts": ["x", "y"], "label": "x"},
            {"q": "c", "opts": ["x", "y"], "label": 5}, {"q": "d", "opts": "xy", "label": 0}]
    path = write_task(tmp_path, recs, kind="multiple_choice", metrics=["acc"], choices={"field": "opts", "gold": "label"})
    out = build_examples(load_task(path))
    assert (out[0].gold, out[1].gold) == (1, 0)
    assert isinstance(out[2], Failure) and "gold 5 is not an index" in str(out[2])
    assert isinstance(out[3], Failure) and "must hold a list of >= 2 strings" in str(out[3])


def test_bad_records_become_failures_and_the_rest_goes_on(tmp_path):
    recs = [RECORDS[0], "{not json", {"q": "no answer"}, "[1, 2]", RECORDS[1]]
    out = build_examples(load_task(write_task(tmp_path, recs)))
    assert [type(x).__name__ for x in out] == ["Example", "Failure", "Failure", "Failure", "Example"]
    assert "data.jsonl:2: not JSON" in str(out[1])
    assert "missing field 'a' for the target (record fields: ['q'])" in str(out[2])
    assert "data.jsonl:4: not a JSON object" in str(out[3])
    assert len(build_examples(load_task(write_task(tmp_path, recs)), limit=2)) == 2
    with pytest.raises(LmstackError, match="pass --data DIR"):
        build_examples(load_task("facts"))


def test_extract():
    spec = parse_task({**BASE, "extract": {"regex": r"so [^=]*=\s*(-?\d+)"}})
    assert extract(spec, "3+4=7, write 7. so 13+4=17 and more") == "17"
    with pytest.raises(LmstackError, match="matched nothing"):
        extract(spec, "no result here")
    assert extract(parse_task(BASE), "  42 \nnext line") == "42"
