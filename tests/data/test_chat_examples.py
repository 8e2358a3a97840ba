"""Chat examples: assistant-only loss masks checked token by token against hand-built
renderings of the lmstack template; preference pairs; every refusal; JSONL readers."""
from __future__ import annotations

import json

import pytest

from lmstack.data import (IGNORE_INDEX, ChatExampleError, ChatExampleOptions, load_preference_jsonl,
                          load_sft_jsonl, preference_example, preference_examples, prompt_response_example,
                          sft_example, sft_examples)
from lmstack.tokenizer import Tokenizer
from lmstack.utils import LmstackError

SYS, U1, A1 = "Be brief.", "What is 2+2?", "It is four."
U2, A2 = "And 3+3?", "Six, of course."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = f"{SYS} {U1} {A1} {U2} {A2} the answer is four apples and pears " * 3
    return Tokenizer.train([text], vocab_size=330, min_frequency=2)   # default specials include the chat roles


def msg(role, content):
    return {"role": role, "content": content}


def turn(tok, role, content):
    """The lmstack template by hand (tokenizer/chat.py): role token, content as text, <|end|>."""
    s = tok.special_tokens
    return [s[f"<|{role}|>"], *tok.encode_ordinary(content), s["<|end|>"]]


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m])


def runs(mask):
    """[(start, stop)] of the runs of 1s."""
    out, start = [], None
    for t, m in enumerate([*mask, 0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            out.append((start, t))
            start = None
    return out


def test_single_turn_mask_token_by_token(tok):
    ex = sft_example(tok, [msg("system", SYS), msg("user", U1), msg("assistant", A1)])
    head = turn(tok, "system", SYS) + turn(tok, "user", U1) + [tok.special_tokens["<|assistant|>"]]
    body = tok.encode_ordinary(A1) + [tok.special_tokens["<|end|>"]]
    assert ex.ids == head + body
    assert ex.loss_mask == [0] * len(head) + [1] * len(body)   # not the system/user turns, not the header
    assert trained_text(tok, ex) == A1 + "<|end|>"             # content + the token that stops the turn
    assert ex.labels == [IGNORE_INDEX] * len(head) + body and len(ex) == len(ex.ids) and ex.n_trained == len(body)
    x, y = ex.inputs_and_targets()
    assert x == ex.ids[:-1] and y == [IGNORE_INDEX] * (len(head) - 1) + body   # y[t] is the label of t+1


def test_multi_turn_trains_every_assistant_turn_or_only_the_last(tok):
    chat = [msg("system", SYS), msg("user", U1), msg("assistant", A1), msg("user", U2), msg("assistant", A2)]
    ex = sft_example(tok, chat)
    expected = turn(tok, "system", SYS) + turn(tok, "user", U1) + turn(tok, "assistant", A1) \
        + turn(tok, "user", U2) + turn(tok, "assistant", A2)
    assert ex.ids == expected
    assert [tok.decode(ex.ids[a:b]) for a, b in runs(ex.loss_mask)] == [A1 + "<|end|>", A2 + "<|end|>"]
    assert ex.loss_mask == tok.render_chat(chat)[1]            # agrees with the template's own mask
    last = sft_example(tok, chat, ChatExampleOptions(train_on="last"))
    assert last.ids == ex.ids and trained_text(tok, last) == A2 + "<|end|>"
    a = len(expected) - len(turn(tok, "assistant", A2)) + 1
    assert last.loss_mask == [0] * a + [1] * (len(expected) - a)


def test_prompt_response_is_a_user_assistant_chat(tok):
    ex = prompt_response_example(tok, U1, A1)
    assert ex == sft_example(tok, [msg("user", U1), msg("assistant", A1)])
    assert sft_examples(tok, [{"prompt": U1, "response": A1, "task": "extra keys are fine"},
                              {"messages": [msg("user", U1), msg("assistant", A1)]}]) == [
        ex.__class__(ex.ids, ex.loss_mask, "example #0"), ex.__class__(ex.ids, ex.loss_mask, "example #1")]


def test_preference_pair_shares_the_prompt_and_masks_only_the_response(tok):
    prompt = [msg("user", U1), msg("assistant", A1), msg("user", U2)]   # earlier turns are context
    pair = preference_example(tok, prompt, chosen=A2, rejected=[msg("assistant", "Seven.")])
    prompt_ids = turn(tok, "user", U1) + turn(tok, "assistant", A1) + turn(tok, "user", U2) \
        + [tok.special_tokens["<|assistant|>"]]
    assert pair.prompt_len == len(prompt_ids) and pair.prompt_ids == prompt_ids
    for ex, text in ((pair.chosen, A2), (pair.rejected, "Seven.")):
        body = tok.encode_ordinary(text) + [tok.special_tokens["<|end|>"]]
        assert ex.ids == prompt_ids + body
        assert ex.loss_mask == [0] * len(prompt_ids) + [1] * len(body)
        assert trained_text(tok, ex) == text + "<|end|>"
    single = preference_examples(tok, [{"prompt": U1, "chosen": A1, "rejected": "five"}])[0]
    assert single.prompt_ids == turn(tok, "user", U1) + [tok.special_tokens["<|assistant|>"]]
    assert single.source == "example #0" and single.chosen.source == "example #0 (chosen)"


@pytest.mark.parametrize("messages, reason", [
    ([], "messages must be a non-empty list"),
    ("hello", "messages must be a non-empty list"),
    (["hi"], "message #0 must be an object"),
    ([msg("robot", "hi"), msg("assistant", "x")],
     "message #0 has unknown role 'robot'; valid roles: system, user, assistant"),
    ([{"role": "user"}, msg("assistant", "x")], "message #0 has no 'content'"),
    ([{"content": "hi"}, msg("assistant", "x")], "message #0 has no 'role'"),
    ([msg("user", "hi"), msg("assistant", 3)], "message #1 content must be a string, got int"),
    ([msg("user", "hi"), msg("assistant", None)], "message #1 content must be a string, got NoneType"),
    ([msg("user", "hi"), msg("assistant", "")], "message #1 is an empty assistant turn"),
    ([msg("user", "hi"), msg("assistant", " \n")], "message #1 is an empty assistant turn"),
    ([msg("assistant", "hi")], "message #0 is an assistant turn with no prompt before it"),
    ([msg("user", "hi"), msg("assistant", "yo"), msg("user", "and?")], "the chat ends with a user turn"),
])
def test_bad_chats_are_refused_naming_the_example(tok, messages, reason):
    with pytest.raises(ChatExampleError) as err:
        sft_example(tok, messages, source="train.jsonl:7")
    assert str(err.value).startswith("train.jsonl:7: ") and reason in str(err.value)
    assert isinstance(err.value, LmstackError)


def test_max_len_is_an_error_by_default_and_truncation_cuts_on_the_right(tok):
    chat = [msg("user", U1), msg("assistant", A1)]
    full = sft_example(tok, chat)
    n = len(full)
    assert sft_example(tok, chat, ChatExampleOptions(max_len=n)) == full
    with pytest.raises(ChatExampleError, match=f"example #3: the example is {n} tokens, longer than max_len={n - 2}"):
        sft_examples(tok, [{"prompt": "a", "response": "b"}] * 3 + [{"messages": chat}],
                     ChatExampleOptions(max_len=n - 2))
    cut = sft_example(tok, chat, ChatExampleOptions(max_len=n - 2, truncate=True))
    assert cut.ids == full.ids[:n - 2] and cut.loss_mask == full.loss_mask[:n - 2]
    assert trained_text(tok, cut) == tok.decode(tok.encode_ordinary(A1)[:-1])   # lost the last token and <|end|>
    prompt_len = len(turn(tok, "user", U1)) + 1
    with pytest.raises(ChatExampleError, match=f"loss mask is all zeros .*within {prompt_len} tokens"):
        sft_example(tok, chat, ChatExampleOptions(max_len=prompt_len, truncate=True))


def test_preference_refusals(tok):
    with pytest.raises(ChatExampleError, match="ex 1: chosen and rejected are the same response"):
        preference_example(tok, U1, "four", [msg("assistant", "four")], source="ex 1")
    with pytest.raises(ChatExampleError, match="the prompt ends with an assistant turn"):
        preference_example(tok, [msg("user", U1), msg("assistant", A1)], "four", "five")
    with pytest.raises(ChatExampleError, match="chosen must be a string or"):
        preference_example(tok, U1, 4, "five")
    with pytest.raises(ChatExampleError, match="rejected is empty"):
        preference_example(tok, U1, "four", "")
    with pytest.raises(ChatExampleError, match=r"example #0 \(rejected\): the example is \d+ tokens, longer than"):
        preference_examples(tok, [{"prompt": U1, "chosen": "four", "rejected": "four apples and pears"}],
                            ChatExampleOptions(max_len=len(prompt_response_example(tok, U1, "four"))))
    # truncation that cuts both responses before they differ leaves no preference to learn
    prompt_len = len(turn(tok, "user", U1)) + 1
    assert tok.encode_ordinary("four apples")[:len(tok.encode_ordinary("four"))] == tok.encode_ordinary("four")
    opts = ChatExampleOptions(max_len=prompt_len + len(tok.encode_ordinary("four")), truncate=True)
    with pytest.raises(ChatExampleError, match="identical after truncation to max_len"):
        preference_example(tok, U1, "four apples", "four pears", opts)


def test_end_of_turn_token_must_exist_and_be_trained(tok):
    chat = [msg("user", U1), msg("assistant", A1)]
    with pytest.raises(ChatExampleError, match="assistant turn #1 is not closed by '<|endoftext|>'"):
        sft_example(tok, chat, ChatExampleOptions(end_token="<|endoftext|>"))
    with pytest.raises(ChatExampleError, match="no special token '<|eot|>' to end a turn"):
        sft_example(tok, chat, ChatExampleOptions(end_token="<|eot|>"))
    bare = Tokenizer.train(["hello world"], vocab_size=258, special_tokens=["<|endoftext|>", "<|end|>"],
                           min_frequency=1)
    with pytest.raises(ChatExampleError, match="lacks the chat special tokens"):
        sft_example(bare, chat)


class StubTemplate:
    """A hand-written chat template over byte ids, to exercise what the lmstack one never does:
    [role] content [<|end|>] [glue...] per message."""
    END, ROLE = 300, {"user": 301, "assistant": 302, "system": 303}
    special_tokens = {"<|end|>": 300}

    def __init__(self, header=True, end=True, glue=(), count_prefix=False, assistant_only=False):
        self.header, self.end, self.glue = header, end, list(glue)
        self.count_prefix, self.assistant_only = count_prefix, assistant_only

    def render_chat(self, messages, add_generation_prompt=False):
        ids = [len(messages)] if self.count_prefix else []
        for m in messages:
            if self.assistant_only and m["role"] != "assistant":
                continue
            ids += [self.ROLE[m["role"]]] if self.header else []
            ids += list(m["content"].encode()) + ([self.END] if self.end else []) + self.glue
        ids += [self.ROLE["assistant"]] if add_generation_prompt and self.header else []
        return ids, [0] * len(ids)


def test_other_templates_glue_after_end_is_not_trained():
    ex = sft_example(StubTemplate(glue=[10]), [msg("user", "hi"), msg("assistant", "yo")])
    assert ex.ids == [301, 104, 105, 300, 10, 302, 121, 111, 300, 10]
    assert ex.loss_mask == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]


@pytest.mark.parametrize("template, reason", [
    (StubTemplate(end=False), "assistant turn #1 is not closed by '<|end|>'"),
    (StubTemplate(assistant_only=True, header=False), "the loss mask is all ones"),
    (StubTemplate(count_prefix=True), "does not render messages[:2] as a prefix of the whole chat"),
])
def test_templates_that_would_train_wrongly_are_refused(template, reason):
    with pytest.raises(ChatExampleError, match=f"example: .*{reason.replace('[', '.').replace(']', '.')}"):
        sft_example(template, [msg("user", "hi"), msg("assistant", "yo")])


@pytest.mark.parametrize("kwargs, reason", [
    ({"train_on": "first"}, "train_on='first' is not valid; use one of: all, last"),
    ({"max_len": 1}, "max_len=1 must be an integer >= 2"),
    ({"max_len": "8"}, "max_len='8' must be an integer"),
    ({"end_token": ""}, "end_token='' must be the name of a special token"),
])
def test_bad_options(kwargs, reason):
    with pytest.raises(ChatExampleError, match=reason.replace("(", r"\(")):
        ChatExampleOptions(**kwargs)


def _jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_readers_name_file_and_line(tok, tmp_path):
    chat = {"messages": [msg("user", U1), msg("assistant", A1)]}
    p = _jsonl(tmp_path / "sft.jsonl", [chat, "", {"prompt": U1, "response": A1}])
    got = load_sft_jsonl(p, tok)
    assert [e.source for e in got] == [f"{p}:1", f"{p}:3"]
    assert got[0].ids == got[1].ids == sft_example(tok, chat["messages"]).ids
    bad = [
        ([chat, "{not json"], ":2: not valid JSON"),
        ([chat, chat, {"messages": [msg("user", "x"), msg("bot", "y")]}], ":3: message #1 has unknown role 'bot'"),
        ([[1, 2]], ':1: expected {"messages": [...]} or {"prompt": ..., "response": ...}, got list'),
        ([{"prompt": "x"}], "got ['prompt']"),
    ]
    for lines, reason in bad:
        with pytest.raises(ChatExampleError) as err:
            load_sft_jsonl(_jsonl(tmp_path / "bad.jsonl", lines), tok)
        assert str(err.value).startswith(str(tmp_path / "bad.jsonl")) and reason in str(err.value), str(err.value)
    with pytest.raises(ChatExampleError, match="missing.jsonl not found"):
        load_sft_jsonl(tmp_path / "missing.jsonl", tok)


def test_preference_jsonl(tok, tmp_path):
    p = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": U1, "chosen": A1, "rejected": "five"},
                                          {"prompt": [msg("user", U2)], "chosen": A2, "rejected": "Seven."}])
    got = load_preference_jsonl(p, tok)
    assert [e.source for e in got] == [f"{p}:1", f"{p}:2"]
    assert got[1] == preference_example(tok, [msg("user", U2)], A2, "Seven.", source=f"{p}:2")
    p = _jsonl(tmp_path / "bad.jsonl", [{"prompt": U1, "chosen": A1, "rejected": "five"}, {"prompt": U1, "chosen": A1}])
    with pytest.raises(ChatExampleError, match=f"bad.jsonl:2: a preference example needs .*missing \\['rejected'\\]"):
        load_preference_jsonl(p, tok)
    p = _jsonl(tmp_path / "same.jsonl", [{"prompt": U1, "chosen": A1, "rejected": A1}])
    with pytest.raises(ChatExampleError, match="same.jsonl:1: chosen and rejected are the same response"):
        load_preference_jsonl(p, tok)


def test_ignore_index_matches_the_training_objectives():
    from lmstack.train.objectives import IGNORE_INDEX as TRAIN_IGNORE
    assert IGNORE_INDEX == TRAIN_IGNORE == -100
