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
