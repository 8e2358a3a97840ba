"""Instruction tuning on tinyworld: records become chats (hand-checked), probes never leak into
training, "unseen" probes are about knowledge-base entities absent from the pretraining text,
the abstention trains on invented names absent from both, and a short SFT of a random tiny model raises held-out exact
match on a task above both the base and the always-the-most-common-answer baseline."""
import re

import pytest
import torch

from lmstack.data.tinyworld import TinyWorldConfig, generate
from lmstack.finetune.config import FinetuneConfig
from lmstack.finetune.instruct import ABSTAIN, TinyWorldChats, chat_completer, question, tinyworld_chats
from lmstack.finetune.run import finetune
from lmstack.data.probes import Probe, score_probes
from lmstack.utils import LmstackError
from sft_helpers import make_base


def test_prompts_become_user_turns():
    assert question("Q: reverse the word cat.\nA:") == "reverse the word cat."
    assert question("Q: what is the capital of Velmora?\nA: the capital of Velmora is") == \
        "what is the capital of Velmora?"
    assert question("Q: what is 47+38?\nA: 47+38=") == "what is 47+38?"
    assert question("Context: Bolo lives in Tinar.\nQ: where does Bolo live?\nA: Bolo lives in") == \
        "Context: Bolo lives in Tinar.\nwhere does Bolo live?"


@pytest.fixture(scope="module")
def data():
    return tinyworld_chats(TinyWorldChats(seed=0, size_mb=0.3, per_task=100, probes_per_task=1000))


def test_probes_are_held_out_and_unseen_entities_are_unseen(data):
    train_q = {r["messages"][0]["content"] for r in data.train}
    assert not train_q & {p.prompt for ps in data.probes.values() for p in ps}
    corpus = generate(TinyWorldConfig(seed=0, size_mb=0.3))
    words = set(re.findall(r"[A-Za-z]+", " ".join(corpus.docs)))
    subject = lambda q: re.search(r"\b[A-Z][a-z]+", q).group(0)  # noqa: E731  the capitalised name
    unseen = {subject(p.prompt) for p in data.probes["unseen"]}
    trained_unseen = {subject(r["messages"][0]["content"]) for r in data.train if r["task"] == "unseen"}
    kb = {d["title"] for d in corpus.kb_docs}
    assert len(unseen) >= 10 and unseen <= kb | {w for d in corpus.kb_docs for w in re.findall(r"[A-Z][a-z]+", d["text"])}
    assert len(trained_unseen) >= 50 and not unseen & trained_unseen and not kb & trained_unseen
    assert not (unseen | trained_unseen) & words    # never in the pretraining text
    assert all(p.answer == ABSTAIN for p in data.probes["unseen"])
    assert all(r["messages"][1]["content"] == ABSTAIN for r in data.train if r["task"] == "unseen")
    known = {subject(p.prompt) for p in data.probes["facts"]}
    assert known and known <= words                  # known entities: in the text
    assert {r["task"] for r in data.train} == set(data.probes)


def test_bad_task_names_are_refused():
    with pytest.raises(LmstackError, match="tinyworld tasks \\['revers'\\] are not valid"):
        TinyWorldChats(tasks=("revers",))


def test_completer_renders_chats_and_scores_the_first_line():
    class Tok:
        special_tokens = {"<|end|>": 9}

        def encode_ordinary(self, text):
            return [ord(c) % 8 for c in text]

        def render_chat(self, messages, add_generation_prompt=False):
            return [1, *self.encode_ordinary(messages[0]["content"]), 2] + ([3] if add_generation_prompt else []), None

    class FakeLLM:
        def generate(self, prompts, params):
            self.seen = prompts, params
            out = lambda text, reason: type("O", (), {"outputs": [type("C", (), {"text": text,  # noqa: E731
                                                                                "finish_reason": reason})]})
            return [out("tac", "stop"), out("I don't know.", "stop"), out("DO", "length")]
    llm = FakeLLM()
    probes = {"reverse": [Probe("reverse", "ab", "tac")], "unseen": [Probe("unseen", "c", ABSTAIN)],
              "upper": [Probe("upper", "d", "DOG")]}
    res = score_probes(probes, chat_completer(llm, Tok(), end_id=9))
    assert {t: r.correct for t, r in res.items()} == {"reverse": 1, "unseen": 1, "upper": 0}
    prompts, params = llm.seen
    assert prompts[0] == [1, ord("a") % 8, ord("b") % 8, 2, 3]              # user turn + generation prompt
    assert params[0].stop_token_ids == [9] and params[0].max_tokens == 3 + 8 and params[0].temperature == 0.0


def test_short_sft_raises_held_out_exact_match(tmp_path):
    """Full finetuning of a random 2-layer model for 150 steps on two tasks (about 20 s of one
    core): word_count goes from 0 to well above the majority answer (measured: 0.65 vs 0.35)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = make_base(tmp_path / "base")
        s = finetune(FinetuneConfig(model=str(base), method="full", data="tinyworld", out=str(tmp_path / "sft"),
                                    max_steps=150, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=10,
                                    tinyworld_mb=0.2, tinyworld_tasks=["first_word", "word_count"], per_task=300,
                                    probes_per_task=20, eval_every=0, ckpt_every=0, tensorboard=False,
                                    report=False, val_fraction=0.0, device="cpu"))
    finally:
        torch.set_num_threads(n)
    before, after = s["before"]["tasks"], s["after"]["tasks"]
    gains = {t: after[t]["accuracy"] - before[t]["accuracy"] for t in after}
    best = max(gains, key=gains.get)
    assert gains[best] >= 0.25, (before, after)
    assert after[best]["accuracy"] > after[best]["chance"], after[best]


def test_known_facts_train_like_the_unseen_ones_and_answer_in_tinyworlds_qa_form():
    """As many known-entity questions as invented ones, in the same question forms (names blanked),
    each answered with the world's true object in the statement its answer prefix starts."""
    from lmstack.data.tinyworld_world import QUESTIONS
    from lmstack.finetune.instruct import answer_start
    d = tinyworld_chats(TinyWorldChats(seed=0, size_mb=0.2, tasks=("facts", "unseen"), per_task=100,
                                       probes_per_task=5))
    known = [r["messages"] for r in d.train if r["task"] == "facts"]
    unseen = [r["messages"] for r in d.train if r["task"] == "unseen"]
    assert len(known) == len(unseen) == 100
    shape = lambda q: re.sub(r"[A-Z][a-z]+", "X", q)  # noqa: E731
    assert {shape(m[0]["content"]) for m in known} == {shape(m[0]["content"]) for m in unseen}
    world = generate(TinyWorldConfig(seed=0, size_mb=0.2)).world
    truth = {QUESTIONS[r][0].format(s=s): (QUESTIONS[r][1].format(s=s), o) for r, s, o in world.facts()}
    for user, assistant in known:
        prefix, obj = truth[user["content"]]
        assert assistant["content"] == f"{prefix} {obj}"
    for p in d.probes["facts"]:      # asked with the answer prefix, as tinyworld's plain probes are
        assert (answer_start("facts", p.prompt), p.answer) == truth[p.prompt]
    assert answer_start("grounded", "Context: [1] Bolo lives in Tinar.\nwhere does Bolo live?") == "Bolo lives in"
    assert answer_start("upper", "what is Bolo's job?") == ""


def test_grounded_chats_are_the_retrieval_prompt_with_an_answer_copied_from_a_chunk():
    """The user turn is lmstack.rag's grounded prompt (render_prompt of the listed chunks) as a
    chat question; the statement answered is in one of the chunks; the entities are invented."""
    from lmstack.finetune.instruct import GROUNDED_CHUNKS, grounded_chats
    from lmstack.rag.chunking import Chunk
    from lmstack.rag.grounded import render_prompt
    from lmstack.rag.retrieve import Hit
    corpus = generate(TinyWorldConfig(seed=0, size_mb=0.2))
    taken = corpus.world.names() | {d["title"] for d in corpus.kb_docs}
    chats = grounded_chats(0, taken, 60)
    assert len(chats) == 60
    for user, answer in chats.items():
        context, q = user.split("\n")
        texts = re.split(r" ?\[\d+\] ", context.removeprefix("Context:"))[1:]
        assert len(texts) == GROUNDED_CHUNKS
        hits = [Hit(Chunk(f"d{i}#0", f"d{i}", 0, len(t), t), 1.0, i, i) for i, t in enumerate(texts, 1)]
        assert question(render_prompt(q, hits)) == user
        assert any(answer in t for t in texts), (answer, texts)
    names = set(re.findall(r"[A-Z][a-z]+", " ".join(chats))) - {"Context"}
    assert names and not names & taken and not names & set(re.findall(r"[A-Za-z]+", " ".join(corpus.docs)))
