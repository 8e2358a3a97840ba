"""Hugging Face chat templates (Jinja) render exactly as transformers' apply_chat_template:
same text and same ids, for ChatML-, Llama-3- and Mistral-style templates, on a folder that
`AutoTokenizer.from_pretrained` reads."""
from __future__ import annotations

import json

import pytest

from chat_templates import CHATML, LLAMA3, MISTRAL, SPECIALS
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat_template import ChatTemplate, ChatTemplateError

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

CHATS = [
    [{"role": "user", "content": "hello <cat> & \"mat\" — café 🐈"}],
    [{"role": "system", "content": "  Be terse.\n"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
]


def hf_folder(tmp_path, template: str, bos: str, eos: str):
    tok = Tokenizer.train(["hello world, the cat sat on the mat. Today Date: 01 Jan 2025 <>&\n"] * 20,
                          vocab_size=330, special_tokens=SPECIALS)
    tok.save(tmp_path / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
              "bos_token": {"__type": "AddedToken", "content": bos, "special": True}, "eos_token": eos}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok, transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name,template,bos,eos", [("chatml", CHATML, "<|end_of_text|>", "<|im_end|>"),
                                                   ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>")])
@pytest.mark.parametrize("gen", [True, False])
def test_renders_like_transformers(tmp_path, name, template, bos, eos, gen):
    tok, hf = hf_folder(tmp_path, template, bos, eos)
    ours = ChatTemplate.from_pretrained(tmp_path)
    assert ours.eos_token == eos
    for messages in CHATS:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        text = ours.render(messages, add_generation_prompt=gen)
        assert text == want
        want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert tok.encode(text, allowed_special="all") == list(want_ids)
    assert ours.render(CHATS[0]).startswith(bos if name == "llama3" else "<|im_start|>system\nYou are")


def test_mistral_style_alternation_generation_block_and_tojson(tmp_path):
    tok, hf = hf_folder(tmp_path, MISTRAL, "<s>", "</s>")
    ours = ChatTemplate.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c", "name": "Zoë <3"}]
    assert ours.render(chat, add_generation_prompt=True) == hf.apply_chat_template(chat, tokenize=False,
                                                                                   add_generation_prompt=True)
    assert '"Zoë <3"' in ours.render(chat)                      # tojson keeps non-ASCII and '<'
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(i)} for i in range(12)]
    assert ours.render(long) == hf.apply_chat_template(long, tokenize=False)   # {% break %} after 4 turns
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(Exception, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="refused these messages: Conversation roles must alternate"):
        ours.render(bad)


def test_where_the_template_comes_from(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}))
    assert ChatTemplate.from_pretrained(tmp_path).render(CHATS[0]) == "D</s>"      # the "default" entry
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert ChatTemplate.from_pretrained(tmp_path).render(CHATS[1]) == "J4"         # the file wins, as in HF
    override = tmp_path / "mine.jinja"
    override.write_text("{% for m in messages %}{{ m.role[0] }}{% endfor %}{{ eos_token }}")
    assert ChatTemplate.from_pretrained(tmp_path, override).render(CHATS[1]) == "suau</s>"
    assert ChatTemplate.from_pretrained(tmp_path / "nothing-here") is None
    empty = tmp_path / "plain"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_pretrained(empty) is None


def test_bad_templates_fail_in_one_line(tmp_path):
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "a", "template": "x"}]}))
        ChatTemplate.from_pretrained(tmp_path)
    with pytest.raises(ChatTemplateError, match="refused"):      # the sandbox blocks attribute escapes
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(CHATS[0])
    with pytest.raises(ChatTemplateError, match="cannot read the chat template file"):
        ChatTemplate.from_pretrained(tmp_path, tmp_path / "missing.jinja")
