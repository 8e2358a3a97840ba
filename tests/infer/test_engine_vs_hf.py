"""Greedy engine output equals `transformers` `generate` on imported random HF models."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmstack.infer import LLM, SamplingParams  # noqa: E402

V = 96


def hf_model(name: str, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
               tie_word_embeddings=False, eos_token_id=3, bos_token_id=1, pad_token_id=0)
    cfg.update(kw)
    config = getattr(transformers, f"{name}Config")(**cfg)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


@pytest.mark.parametrize("name,kw", [("Llama", {}), ("Qwen2", {"tie_word_embeddings": True}),
                                     ("Mistral", {"sliding_window": 8})])
def test_greedy_matches_transformers_generate(name, kw, tmp_path):
    hf = hf_model(name, **kw)
    hf.save_pretrained(tmp_path)                       # safetensors + config.json: a HF folder
    prompts = [[5, 17, 42, 8, 99 % V, 23, 61, 7, 12, 30, 2, 44], [9, 9, 4], list(range(10, 30))]
    n = 14
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    assert len({tuple(e) for e in expected}) == 3 and all(len(set(e)) > 3 for e in expected)   # non-trivial
    llm = LLM(str(tmp_path), block_size=4, kv_cache_tokens=512, max_num_batched_tokens=16)   # chunked prefill
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, min_tokens=n))
    assert [o.outputs[0].token_ids for o in outs] == expected
