"""Serving LoRA adapters over one base: the `model` field picks the adapter, each answer (plain
and streamed) equals that adapter merged and run offline, /v1/models lists base and adapters,
an unknown model is a 404 naming them, and `lmstack serve --lora` checks every folder before
it listens."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from lmstack.cli.main import main
from lmstack.finetune import LoraConfig, add_lora, load_adapter, lora_modules, merge_lora, save_adapter
from lmstack.infer import LLM, SamplingParams
from lmstack.model import ModelConfig, Transformer
from lmstack.tokenizer import Tokenizer
from tests.serve.conftest import train_tokenizer

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]
ADAPTERS = {"sql": LoraConfig(r=2, alpha=4, targets=["q", "v"]), "chat": LoraConfig(r=4, targets="all-linear")}


def base_model(n_vocab: int, n_embd: int = 64) -> Transformer:
    torch.manual_seed(0)
    # init_std=0.3: a default-init tiny model repeats one token whatever the adapter
    return Transformer(ModelConfig.preset("tiny", vocab_size=n_vocab, n_layer=2, n_head=4, n_kv_head=2,
                                          n_embd=n_embd, context_length=256, init_std=0.3))


def save_random_adapter(model: Transformer, config: LoraConfig, seed: int, out) -> None:
    add_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for p in m.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g))
    save_adapter(model, out)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_lora")
    tok = train_tokenizer()
    base_model(tok.n_vocab).save_pretrained(root / "base")
    tok.save(root / "base" / "tokenizer.json")
    out = {"base": root / "base"}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        save_random_adapter(base_model(tok.n_vocab), cfg, 20 + i, root / name)
        out[name] = root / name
    save_random_adapter(base_model(tok.n_vocab, n_embd=32), ADAPTERS["sql"], 0, root / "other")   # another base
    out["other"] = root / "other"
    return out


@pytest.fixture(scope="module")
def reference(dirs):
    """name -> (greedy completion text of PROMPT, greedy chat reply to MESSAGES), merged and offline."""
    tok = Tokenizer.load(dirs["base"] / "tokenizer.json")
    chat_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    out = {}
    for name in [None, *ADAPTERS]:
        m = Transformer.from_pretrained(dirs["base"])
        if name:
            load_adapter(m, dirs[name])
            merge_lora(m)
        llm = LLM(m, tokenizer=tok, device="cpu")
        text = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10))[0].outputs[0].text
        reply = llm.generate([chat_ids], SamplingParams(temperature=0, max_tokens=10,
                                                        stop_token_ids=[tok.special_tokens["<|end|>"]]))
        out[name] = (text, reply[0].outputs[0].text)
    assert len(set(out.values())) == len(out)     # every adapter changes the answer
    return out


@pytest.fixture(scope="module")
def server(dirs, launch):
    from lmstack.serve.app import create_app

    app = create_app(str(dirs["base"]), lora={"sql": str(dirs["sql"]), "chat": str(dirs["chat"])},
                     engine_kwargs={"max_num_seqs": 16, "kv_cache_tokens": 4096, "device": "cpu"})
    url, stop = launch(app)
    yield url
    stop()


def test_models_lists_base_and_adapters(server, dirs):
    r = httpx.get(server + "/v1/models").json()
    assert r["object"] == "list"
    assert [(m["id"], m["parent"], m["object"]) for m in r["data"]] == [("base", None, "model"),
                                                                        ("sql", "base", "model"),
                                                                        ("chat", "base", "model")]


def test_each_model_answers_as_its_adapter_merged(server, reference):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    for model, name in [("base", None), ("sql", "sql"), ("chat", "chat")]:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
        assert (r.model, r.choices[0].text) == (model, reference[name][0])
        stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                                stream=True)
        chunks = list(stream)
        assert {c.model for c in chunks} == {model}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference[name][1]


def test_unknown_model_is_a_404_naming_the_served_ones(server):
    r = httpx.post(server + "/v1/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'nope' does not exist; this server serves 'base', 'sql', 'chat'" in err["message"]


def test_serve_command_checks_adapters_before_listening(dirs, capsys, monkeypatch):
    import uvicorn

    served = []

    def fake_run(app, **kw):            # stands in for the listening server: start the app, ask it
        from fastapi.testclient import TestClient
        with TestClient(app) as c:
            served.append([m["id"] for m in c.get("/v1/models").json()["data"]])

    monkeypatch.setattr(uvicorn, "run", fake_run)
    base = str(dirs["base"])
    assert main(["serve", base, "--device", "cpu", "--lora", f"sql={dirs['sql']}", "--lora", f"x={dirs['other']}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"LoRA adapter 'x' ({dirs['other']})" in err and "another base" in err
    for bad, says in [("sql", "expected NAME=DIR"), (f"base={dirs['sql']}", "already taken"),
                      (f"a={dirs['base'] / 'missing'}", "not found")]:
        assert main(["serve", base, "--lora", bad]) == 1
        assert says in capsys.readouterr().err
    assert not served
    assert main(["serve", base, "--device", "cpu", "--kv-cache-tokens", "1024", "--lora", f"sql={dirs['sql']}",
                 "--lora", f"chat={dirs['chat']}"]) == 0
    assert served == [["base", "sql", "chat"]]
