"""The dashboard's endpoints: token spans that keep a multi-byte character whole, the next-token
distribution of the engine's sampler over the whole vocabulary (checked against softmax by
hand), and whether a model folder is chat-tuned."""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from lmstack.serve.dashboard import chat_tuned
from lmstack.tokenizer.viz import token_spans

URL = "/v1/internal/"


def test_tokenize_groups_a_character_cut_across_tokens(server):
    text = "the cat 🙂 世界"
    d = httpx.post(server.url + URL + "tokenize", json={"prompt": text}).json()
    tok = server.state.tokenizer
    ids = [t["id"] for t in d["tokens"]]
    assert [(s["text"], s["ids"]) for s in d["spans"]] == [(t, g) for t, g in token_spans(tok, ids)]
    assert "".join(s["text"] for s in d["spans"]) == text          # no U+FFFD pieces
    emoji = next(s for s in d["spans"] if s["text"] == "🙂")
    assert len(emoji["ids"]) > 1 and all("\ufffd" in d["tokens"][emoji["first"] + i]["text"]
                                         for i in range(len(emoji["ids"])))


def _reference(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """softmax(logits / T) over the top-k logits, renormalised (by hand, for the check)."""
    z = logits.double() / temperature
    cut = torch.topk(z, top_k).values[-1] if top_k else -math.inf
    z = torch.where(z >= cut, z, torch.tensor(-math.inf, dtype=z.dtype))
    return torch.softmax(z, dim=-1)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.5, 40)])
def test_distribution_is_the_samplers_over_the_whole_vocabulary(server, temperature, top_k):
    prompt = "Once upon a time"
    body = {"prompt": prompt, "top_n": 10, "temperature": temperature, "top_k": top_k}
    d = httpx.post(server.url + URL + "next_token_distribution", json=body).json()
    model = server.state.engine.model
    ids = server.state.tokenizer.encode(prompt, allowed_special="all")
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0, -1].float()
    want = _reference(logits, temperature, top_k)
    kept = want > 0
    assert d["n_vocab"] == logits.numel() and d["kept"] == int(kept.sum())
    assert d["sampled_entropy"] == pytest.approx(float(-(want[kept] * want[kept].log()).sum()), rel=1e-4)
    for t in d["tokens"]:
        assert t["p"] == pytest.approx(float(want[t["id"]]), rel=1e-4, abs=1e-7)
    assert d["entropy"] == pytest.approx(float(-(torch.softmax(logits.double(), -1) *
                                                  torch.log_softmax(logits.double(), -1)).sum()), rel=1e-4)


def test_greedy_collapses_to_one_token(server):
    d = httpx.post(server.url + URL + "next_token_distribution",
                   json={"prompt": "Once upon a time", "temperature": 0}).json()
    assert d["kept"] == 1 and d["sampled_entropy"] == 0.0
    assert d["tokens"][0]["p"] == 1.0 and all(t["p"] == 0.0 for t in d["tokens"][1:])


def test_chat_tuned_from_what_the_folder_holds(tmp_path):
    assert chat_tuned(None)[0] is None
    base = tmp_path / "base"
    (base / "checkpoints" / "step_0000010").mkdir(parents=True)
    (base / "train_config.json").write_text("{}")
    (base / "checkpoints" / "step_0000010" / "state.json").write_text("{}")
    assert chat_tuned(base)[0] is False and chat_tuned(base / "checkpoints" / "step_0000010")[0] is False
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "train_config.json").write_text("{}")
    (sft / "finetune.json").write_text("{}")
    assert chat_tuned(sft)[0] is True
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "train_config.json").write_text("{}")
    (dpo / "summary.json").write_text(json.dumps({"method": "dpo"}))
    assert chat_tuned(dpo) == (True, "aligned (dpo)")
    assert chat_tuned(tmp_path)[0] is None                            # a Hugging Face folder does not say


def test_model_info_endpoint(server):
    info = httpx.get(server.url + URL + "model_info").json()
    assert info == dict(zip(("chat_tuned", "chat_tuned_reason"), chat_tuned(server.run_dir)))
