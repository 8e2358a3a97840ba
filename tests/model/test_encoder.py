"""The encoder-only model: its masked-LM head and pooling written out by hand, padding that
changes nothing, a classifier finetuned on a tinyworld label task (which instruction task is
this prompt?) to well above chance, and a dense-retrieval check of the pooled output."""
import random

import pytest
import torch
import torch.nn.functional as F

from lmstack.data.tinyworld_tasks import INSTRUCTIONS, instruction
from lmstack.model import ConfigError, Encoder, ModelConfig, from_pretrained
from lmstack.model.checkpoint import state_for_saving
from lmstack.model.hf_names import stored_tensors
from lmstack.utils import LmstackError

V = 259   # bytes + 3 spare ids


def bertish(**kw) -> ModelConfig:
    base = dict(arch="encoder", vocab_size=V, n_layer=2, n_head=4, n_embd=48, intermediate_size=80, context_length=96,
                pos_emb="learned", mask="bidirectional", norm="layernorm", norm_eps=1e-12, norm_placement="post",
                mlp="gelu_exact", bias=True, qkv_bias=True, n_token_types=2, embed_norm=True)
    base.update(kw)
    return ModelConfig(**base)


def model(**kw) -> Encoder:
    torch.manual_seed(0)
    return Encoder(bertish(**kw)).eval()


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_mlm_head_and_pooling_by_hand():
    m = model()
    x = ids()
    with torch.no_grad():
        h = m.hidden_states(x)
        t = F.layer_norm(F.gelu(h @ m.head_transform.weight.T + m.head_transform.bias), (48,), m.head_norm.weight,
                         m.head_norm.bias, 1e-12)                 # exact (erf) gelu, BERT's
        want = t @ m.wte.weight.T + m.lm_head.bias                # the tied decoder, with its own bias
        assert (m(x) - want).abs().max().item() < 1e-5
        assert m.lm_head.weight is m.wte.weight
        assert torch.allclose(m.embed(x), h.mean(1), atol=1e-6)
        assert torch.allclose(m.embed(x, normalize=True).norm(dim=-1), torch.ones(2))


def test_padding_changes_nothing_for_real_tokens():
    m = model()
    a = ids(1, 12, seed=2)
    padded = torch.cat([a[:, :7], torch.full((1, 5), 3)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    types = torch.tensor([[0] * 4 + [1] * 8])
    with torch.no_grad():
        ref = m(a[:, :7], token_type_ids=types[:, :7])
        got = m(padded, attention_mask=mask, token_type_ids=types)
        assert (got[:, :7] - ref).abs().max().item() < 1e-5
        assert (m.embed(padded, mask) - m.embed(a[:, :7])).abs().max().item() < 1e-5
        # segments matter; without token_type_ids every token is segment 0
        assert (m(a) - m(a, token_type_ids=torch.ones_like(a))).abs().max().item() > 1e-3
        assert torch.equal(m(a), m(a, token_type_ids=torch.zeros_like(a)))


def test_save_load_keeps_the_classifier(tmp_path):
    m = model(n_labels=3)
    m.save_pretrained(tmp_path)
    back = from_pretrained(tmp_path)
    assert type(back) is Encoder and back.config.n_labels == 3
    x = ids()
    with torch.no_grad():
        assert torch.equal(back.classify(x), m.classify(x)) and torch.equal(back(x), m(x))
    saved = {k: tuple(v.shape) for k, v in state_for_saving(m).items()}
    assert [(e.ours, e.shape) for e in stored_tensors(m.config)] == list(saved.items())


def test_errors_name_the_field():
    with pytest.raises(LmstackError, match="n_labels=0"):
        model().classify(ids())
    with pytest.raises(LmstackError, match="n_token_types=0"):
        model(n_token_types=0)(ids(), token_type_ids=torch.zeros(2, 12, dtype=torch.long))
    with pytest.raises(LmstackError, match=r"token_type_ids must lie in \[0, n_token_types=2\)"):
        model()(ids(), token_type_ids=torch.full((2, 12), 2))
    with pytest.raises(ConfigError, match="mask='causal' with arch='encoder'"):
        bertish(mask="causal")


# ---- finetuning and retrieval on tinyworld ------------------------------------------------------
TASKS = sorted(INSTRUCTIONS)


def _examples(n: int, seed: int, T: int = 64):
    """(ids (n, T) of the prompt's bytes, attention_mask, label = index of its instruction task)."""
    rng = random.Random(seed)
    x = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    y = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        b = list(instruction(rng, lambda k: True, task)["prompt"].encode())[:T]
        x[i, :len(b)], mask[i, :len(b)], y[i] = torch.tensor(b), 1, TASKS.index(task)
    return x, mask, y



def test_classifier_learns_which_instruction_task(one_thread):
    """9 tasks (chance 11%): a one-layer encoder finetuned for 80 steps classifies held-out
    prompts (other words, other numbers) almost always right."""
    torch.manual_seed(0)
    clf = Encoder(bertish(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, context_length=64)).with_labels(9)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-2)
    x, mask, y = _examples(900, seed=0)
    tx, tmask, ty = _examples(180, seed=1)
    with torch.no_grad():
        before = (clf.eval().classify(tx, tmask).argmax(-1) == ty).float().mean().item()
    clf.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        i = torch.randint(0, len(y), (32,), generator=g)
        loss = F.cross_entropy(clf.classify(x[i], mask[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (clf.eval().classify(tx, tmask).argmax(-1) == ty).float().mean().item()
    assert before < 0.3 and acc > 0.9, (before, acc)
    # the pooled output is a retriever: the nearest neighbour of a held-out prompt (cosine) is of
    # its own task far more often than chance
    with torch.no_grad():
        q, keys = clf.embed(tx, tmask, normalize=True), clf.embed(x[:270], mask[:270], normalize=True)
        nearest = (q @ keys.T).argmax(-1)
    assert (y[:270][nearest] == ty).float().mean().item() > 0.6
