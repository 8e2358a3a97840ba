"""A Hugging Face folder whose tokenizer_config.json carries a Jinja chat template is served
with that template: the server's prompt ids equal transformers' apply_chat_template ids,
its greedy reply equals the offline engine's on those ids (stopping at the template's
eos_token), and a --chat-template file replaces the folder's template."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from lmstack.serve.app import create_app
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat_template import ChatTemplate
from tests.tokenizer.chat_templates import CHATML, LLAMA3, MISTRAL, SPECIALS

transformers = pytest.importorskip("transformers")

MESSAGES = [{"role": "system", "content": "You are a cat."},
            {"role": "user", "content": "Hello there, <cat> & mat!"},
            {"role": "assistant", "content": "Meow."},
            {"role": "user", "content": "Again?"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama and a byte-level BPE, saved as a Hugging Face checkpoint ships."""
    path = tmp_path_factory.mktemp("hf_llama_chat")
    tok = Tokenizer.train(["Hello there, the cat sat on the mat. Meow. Again? You are a cat.\n"] * 30,
                          vocab_size=340, special_tokens=["<|endoftext|>"] + SPECIALS)
    tok.save(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>",
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=None, eos_token_id=tok.special_tokens["<|endoftext|>"],
                                   pad_token_id=None, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():                        # sharper logits: a greedy reply that is not one token repeated
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def hf_ids(hf_tok, messages, **kw) -> list[int]:
    return list(hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False,
                                           **kw))


def server_ids(url: str, messages) -> list[int]:
    r = httpx.post(url + "/v1/internal/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["tokens"]]


def test_folder_template_renders_like_transformers_and_drives_chat(hf_dir, hf_tok, launch):
    from lmstack.infer import LLM, SamplingParams

    url, stop = launch(create_app(str(hf_dir), engine_kwargs={"max_num_seqs": 4}))
    try:
        for messages in (MESSAGES, MESSAGES[1:2]):
            assert server_ids(url, messages) == hf_ids(hf_tok, messages)
        ids = hf_ids(hf_tok, MESSAGES)
        assert hf_tok.decode(ids).endswith("<|im_start|>assistant\n")
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(ids)
        im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
        ref = LLM(str(hf_dir)).generate([ids], SamplingParams(temperature=0, max_tokens=12,
                                                               stop_token_ids=[im_end]))[0].outputs[0]
        assert body["choices"][0]["message"]["content"] == ref.text
        assert body["choices"][0]["finish_reason"] == ref.finish_reason
    finally:
        stop()


def test_a_template_refusal_is_the_clients_400(hf_dir):
    from lmstack.serve.convert import chat_prompt_ids
    from lmstack.serve.errors import APIError
    from lmstack.serve.protocol import ChatMessage

    template = ChatTemplate(MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"})
    messages = [ChatMessage(role="assistant", content="I speak first")]
    with pytest.raises(APIError) as e:
        chat_prompt_ids(messages, Tokenizer.load(hf_dir), template)
    assert e.value.status == 400 and e.value.param == "messages"
    assert "Conversation roles must alternate" in e.value.message


def test_chat_template_file_replaces_the_folders(hf_dir, hf_tok, launch, tmp_path):
    template_file = tmp_path / "llama3.jinja"
    template_file.write_text(LLAMA3)
    template = ChatTemplate.from_pretrained(hf_dir, template_file)
    url, stop = launch(create_app(str(hf_dir), chat_template=template, engine_kwargs={"max_num_seqs": 2}))
    try:
        assert server_ids(url, MESSAGES) == hf_ids(hf_tok, MESSAGES, chat_template=LLAMA3)
        assert server_ids(url, MESSAGES) != hf_ids(hf_tok, MESSAGES)
    finally:
        stop()


def test_cli_chat_template_flag_errors_in_one_line(hf_dir, tmp_path, capsys):
    from lmstack.cli.main import main

    assert main(["serve", str(hf_dir), "--chat-template", str(tmp_path / "missing.jinja")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--chat-template" in err and "not found" in err
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    assert main(["serve", str(hf_dir), "--chat-template", str(broken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not valid Jinja" in err
