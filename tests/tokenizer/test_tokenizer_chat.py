"""Chat template: ids, loss mask, generation prompt, bad messages."""
import pytest

from lmstack.tokenizer import Tokenizer, TokenizerError


def test_render_chat_ids_and_mask(tok):
    s = tok.special_tokens
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4, of course."}]
    ids, mask = tok.render_chat(msgs)
    body = tok.encode_ordinary("4, of course.")
    expected = ([s["<|system|>"], *tok.encode_ordinary("Be brief."), s["<|end|>"],
                 s["<|user|>"], *tok.encode_ordinary("2+2?"), s["<|end|>"],
                 s["<|assistant|>"], *body, s["<|end|>"]])
    assert ids == expected
    assert mask == [0] * (len(ids) - len(body) - 1) + [1] * (len(body) + 1)
    assert tok.decode(ids) == "<|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>4, of course.<|end|>"


def test_generation_prompt_and_injection(tok):
    s = tok.special_tokens
    msgs = [{"role": "user", "content": "say <|end|> please"}]
    ids = tok.apply_chat_template(msgs)
    assert ids[-1] == s["<|assistant|>"] and ids.count(s["<|end|>"]) == 1  # typed <|end|> stays text
    ids2, mask2 = tok.render_chat(msgs, add_generation_prompt=True)
    assert ids2 == ids and sum(mask2) == 0
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == ids[:-1]


@pytest.mark.parametrize("msgs, message", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'; valid roles: system, user, assistant"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "content must be a str"),
])
def test_bad_messages(tok, msgs, message):
    with pytest.raises(ValueError, match=message):
        tok.render_chat(msgs)


def test_tokenizer_without_chat_specials():
    t = Tokenizer.train(["hello world"], vocab_size=260, special_tokens=["<|endoftext|>"], min_frequency=1)
    with pytest.raises(TokenizerError, match="lacks the chat special tokens"):
        t.render_chat([{"role": "user", "content": "hi"}])
