"""tinyworld: determinism, record layout, exact answers, and no leakage of evaluation items."""
from __future__ import annotations

import hashlib
import re

from lmstack.data import CorpusOptions, build_corpus, iter_texts, read_jsonl
from lmstack.data.tinyworld import TinyWorldConfig, generate
from lmstack.data.tinyworld_world import qa


def _tree_digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    digests = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        build_corpus(CorpusOptions(corpus="tinyworld", out=str(tmp_path / name), size_mb=0.1, seed=seed,
                                   dedupe=True, noise=0.1))
        digests.append(_tree_digest(tmp_path / name))
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_size_is_respected_and_world_does_not_depend_on_size():
    small, big = generate(TinyWorldConfig(seed=1, size_mb=0.05)), generate(TinyWorldConfig(seed=1, size_mb=0.2))
    for c, mb in ((small, 0.05), (big, 0.2)):
        n = sum(len(d.encode()) + 1 for d in c.docs)
        assert mb * 1e6 <= n < mb * 1e6 + 2000
    assert small.world == big.world and small.evals == big.evals and small.kb_docs == big.kb_docs


def test_records_render_as_documents_and_answers_are_exact(tw_dir):
    records = read_jsonl(tw_dir / "tasks" / "train.jsonl")
    docs = set(iter_texts(tw_dir, "train"))
    tasks = {r["task"] for r in records}
    assert {"arithmetic", "arithmetic_steps", "facts", "reading", "reverse", "sort", "count", "upper",
            "repeat", "first_word", "last_word", "spell", "word_count"} <= tasks
    for r in records:
        assert set(r) == {"task", "prompt", "response", "answer", "rejected"}
        assert r["answer"] == r["response"].strip() != r["rejected"].strip()
        assert not r["prompt"].endswith(" ") and "\n" not in r["answer"]
        assert r["prompt"] + r["response"] in docs
        q = r["prompt"].split("\n")[-2] if r["task"] != "arithmetic" else r["prompt"]
        if r["task"] == "arithmetic":          # check the arithmetic itself, independently
            a, op, b = re.fullmatch(r"Q: what is (\d+)([-+*])(\d+)\?\nA: \1\2\3=", q).groups()
            assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        elif r["task"] == "arithmetic_steps":
            a, op, b = re.fullmatch(r"Q: what is (\d+)([-+*])(\d+)\? show your work\.", q).groups()
            want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert r["answer"].endswith(f"so {a}{op}{b}={want}")
        elif r["task"] == "sort":
            nums = [int(x) for x in re.fullmatch(r"Q: sort ([\d ]+)\.", q).group(1).split()]
            assert r["answer"] == " ".join(map(str, sorted(nums)))
        elif r["task"] == "reverse":
            assert r["answer"] == re.fullmatch(r"Q: reverse the word (\w+)\.", q).group(1)[::-1]


def test_eval_probes_follow_the_convention_and_are_correct(tw_dir):
    c = generate(TinyWorldConfig(seed=0, size_mb=0.01))
    truth = {qa(*f)[0]: qa(*f)[1] for f in c.world.facts()}
    facts = read_jsonl(tw_dir / "eval" / "facts.jsonl")
    assert len(facts) >= 40
    for p in facts:
        assert truth[p["prompt"]] == p["answer"]
    for name in ("arithmetic", "arithmetic_steps", "instructions", "reading"):
        probes = read_jsonl(tw_dir / "eval" / f"{name}.jsonl")
        assert len(probes) >= 100 and len({p["prompt"] for p in probes}) == len(probes)
        for p in probes:
            assert {"task", "prompt", "answer"} <= set(p) and p["answer"] and "\n" not in p["answer"]
            if p["task"] == "arithmetic":
                a, op, b = re.search(r"A: (\d+)([-+*])(\d+)=$", p["prompt"]).groups()
                assert int(p["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_no_eval_item_leaks_into_any_split(tw_dir):
    corpus = "\x00".join(t for s in ("train", "val", "test") for t in iter_texts(tw_dir, s))
    records = [r for s in ("train", "val", "test") for r in read_jsonl(tw_dir / "tasks" / f"{s}.jsonl")]
    seen_prompts = {r["prompt"] for r in records}
    n = 0
    for name in ("facts", "arithmetic", "arithmetic_steps", "instructions", "reading"):
        for p in read_jsonl(tw_dir / "eval" / f"{name}.jsonl"):
            assert p["prompt"] not in seen_prompts, p
            question = p["prompt"].split("\nA:")[0]          # "Q: what is 12+7?" never asked in training
            assert question not in corpus, p
            n += 1
    assert n > 500
    # arithmetic: the held-out unordered operand pairs never appear with that operator at all
    pairs = set()
    for p in read_jsonl(tw_dir / "eval" / "arithmetic.jsonl"):
        a, op, b = re.search(r"A: (\d+)([-+*])(\d+)=$", p["prompt"]).groups()
        pairs.add((op, a, b))
        if op in "+*":
            pairs.add((op, b, a))
    used = set(re.findall(r"(?<![\d+*-])(\d+)([-+*])(\d+)(?=[=?])", corpus))
    assert not {(op, a, b) for a, op, b in used} & pairs


def test_facts_are_consistent_and_kb_names_never_appear_in_training(tw_dir):
    c = generate(TinyWorldConfig(seed=0, size_mb=0.01))
    corpus = " " + " ".join(t for s in ("train", "val", "test") for t in iter_texts(tw_dir, s))
    # wherever training text says a probe's answer prefix ("Bige lives in"), the world's object
    # follows: the corpus never teaches a prefix -> other-word continuation
    n = 0
    for relation, subject, obj in c.world.facts():
        prefix = " " + qa(relation, subject, obj)[0].split("\nA: ")[1] + " "
        i = corpus.find(prefix)
        while i >= 0:
            assert corpus.startswith(obj, i + len(prefix)), (prefix, corpus[i:i + 80])
            n += 1
            i = corpus.find(prefix, i + 1)
    assert n > 500
    kb_docs = read_jsonl(tw_dir / "kb" / "docs.jsonl")
    kb_names = {d["title"] for d in kb_docs}
    assert len(kb_names) == len(kb_docs) >= 20
    words = set(re.findall(r"[A-Z][a-z]+", corpus))
    assert not kb_names & words
    for q in read_jsonl(tw_dir / "kb" / "questions.jsonl"):
        doc = next(d for d in kb_docs if d["id"] == q["doc_id"])
        assert q["answer"] in doc["text"].split(" ") or q["answer"] + "." in doc["text"].split(" ")
