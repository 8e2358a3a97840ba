"""SFT batches and loss: padded and packed batches give exactly the token-weighted mean of the
examples' losses computed one at a time (and the same gradients), for RoPE, learned, ALiBi
and T5 relative positions (the model's segment_ids); only assistant tokens (+ the end-of-turn
token) are trained; the batch source normalizes over the global batch (accumulation and
ranks), partitions it across ranks and resumes exactly."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.data import IGNORE_INDEX, sft_examples
from lmstack.finetune.batching import collate, pack_rows
from lmstack.finetune.sft import SFTBatches, SFTObjective
from lmstack.model import ModelConfig, Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.utils import LmstackError


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["hello world how are you today the quick brown fox " * 20], vocab_size=300)


@pytest.fixture(scope="module")
def examples(tok):
    recs = [{"prompt": "hello " * (i % 5 + 1), "response": "world " * (i % 3 + 1)} for i in range(12)]
    recs.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "more"},
                              {"role": "assistant", "content": "quick brown fox"}]})
    return sft_examples(tok, recs)


def model(tok, **kw):
    torch.manual_seed(0)
    # a large init: attention far from uniform, so a leak across examples moves the loss a lot
    cfg = dict(vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32, context_length=64, dropout=0.0, init_std=0.3)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def reference(m, exs):
    """Token-weighted mean of the examples' losses, each run alone with default positions."""
    total, n = 0.0, 0
    for ex in exs:
        x, y = ex.inputs_and_targets()
        y = torch.tensor(y)
        total += F.cross_entropy(m(torch.tensor([x]))[0], y, ignore_index=IGNORE_INDEX, reduction="sum")
        n += int((y != IGNORE_INDEX).sum())
    return total / n


@pytest.mark.parametrize("pos_emb", ["rope", "learned", "alibi", "relative"])
def test_packed_and_padded_losses_equal_per_example_losses(tok, examples, pos_emb):
    m = model(tok, pos_emb=pos_emb)
    grads = {}
    for packing in (True, False):
        rows = pack_rows([len(e) - 1 for e in examples], 40) if packing else [[i] for i in range(len(examples))]
        assert (len(rows) < len(examples)) == packing        # packing puts 2-3 examples in a row of 40
        batch = collate([[examples[i] for i in r] for r in rows], 0.0, packing)
        n = batch.n_loss_tokens
        batch.loss_scale = 1.0 / n
        m.zero_grad()
        loss, metrics = SFTObjective().loss(m, batch)
        loss.backward()
        grads[packing] = {k: p.grad.clone() for k, p in m.named_parameters()}
        m.zero_grad()
        ref = reference(m, examples)
        assert abs(loss.item() - ref.item()) < 1e-5, (packing, loss.item(), ref.item())
        ref.backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(grads[packing][k], p.grad, atol=1e-6, rtol=1e-4, msg=k)


def test_packed_loss_with_activation_checkpointing(tok, examples):
    """Recomputing a block in backward replays its attention with the same document mask."""
    from lmstack.train.distributed import enable_activation_checkpointing
    m, plain = model(tok), model(tok)
    enable_activation_checkpointing(m)
    m.train(), plain.train()
    rows = pack_rows([len(e) - 1 for e in examples], 40)
    for mod in (m, plain):
        batch = collate([[examples[i] for i in r] for r in rows], 0.01, True)
        SFTObjective().loss(mod, batch)[0].backward()
    for (k, p), q in zip(m.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=k)


def test_packing_without_segment_ids_would_differ(tok, examples):
    """The check above can fail: the same packed rows with positions but no segment_ids (no
    block-diagonal mask) let examples attend to each other, and the loss moves."""
    m = model(tok)
    rows = pack_rows([len(e) - 1 for e in examples], 40)
    batch = collate([[examples[i] for i in r] for r in rows], 1.0, True)
    with torch.no_grad():
        leaky = F.cross_entropy(m(batch.input_ids, positions=batch.positions).flatten(0, 1), batch.targets.flatten(),
                                ignore_index=IGNORE_INDEX)
        ref = reference(m, examples)
    assert abs(leaky.item() - ref.item()) > 1e-2


def test_segment_ids_need_the_shape_of_ids_and_no_cache(tok):
    from lmstack.model.cache import ContiguousKVCache
    m = model(tok)
    ids, seg = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids must have the shape of ids"):
        m(ids, segment_ids=seg[:, :5])
    cache = ContiguousKVCache(2, 2, 8, 2, 16)
    with pytest.raises(LmstackError, match="without a KV cache"):
        m(ids, cache=cache, segment_ids=seg)


def test_targets_are_assistant_tokens_and_the_end_token(tok, examples):
    end, asst = tok.special_tokens["<|end|>"], tok.special_tokens["<|assistant|>"]
    ex = examples[-1]       # system, user, assistant "the fox", user, assistant "quick brown fox"
    batch = collate([[ex]], 1.0, False)
    trained = batch.targets[0][batch.targets[0] != IGNORE_INDEX].tolist()
    want = tok.encode_ordinary("the fox") + [end] + tok.encode_ordinary("quick brown fox") + [end]
    assert trained == want
    # each trained target sits where the model has just read the token before it
    x = batch.input_ids[0].tolist()
    first = batch.targets[0].tolist().index(want[0])
    assert x[first] == asst


def test_source_normalizes_over_the_global_batch(tok, examples):
    """grad_accum=3 micro-batches of 2 rows: the sum of their losses (as the Trainer averages them)
    is the token-weighted mean over all 6 rows, however unevenly the tokens fall."""
    m = model(tok)
    acc = SFTBatches(examples, batch_size=2, seq_len=40, packing=False, grad_accum=3, seed=3)
    whole = SFTBatches(examples, batch_size=6, seq_len=40, packing=False, seed=3)
    with torch.no_grad():
        micro = [acc.next_batch() for _ in range(3)]
        parts = [SFTObjective().loss(m, b)[0] for b in micro]
        one = SFTObjective().loss(m, whole.next_batch())[0]
        means = [SFTObjective().loss(m, b)[0] * b.loss_scale ** -1 / b.n_loss_tokens for b in micro]
    assert sum(parts).item() / 3 == pytest.approx(one.item(), rel=1e-6)
    assert abs(sum(means).item() / 3 - one.item()) > 1e-2     # a mean per micro-batch would weight differently


def test_ranks_partition_the_global_batch_and_state_resumes(tok, examples):
    def ids(b):
        return sorted(tuple(r[r != 0].tolist()) for r in b.input_ids)
    single = SFTBatches(examples, batch_size=4, seq_len=40, packing=False, seed=1)
    ranks = [SFTBatches(examples, batch_size=2, seq_len=40, packing=False, seed=1, rank=r, world_size=2)
             for r in (0, 1)]
    assert single.steps_per_epoch() == 3
    for _ in range(5):         # through an epoch boundary (3 steps per epoch)
        b, b0, b1 = single.next_batch(), ranks[0].next_batch(), ranks[1].next_batch()
        assert ids(b) == sorted(ids(b0) + ids(b1))
        assert b0.loss_scale == b1.loss_scale == pytest.approx(2 * b.loss_scale)   # world_size x / N
    sd = single.state_dict()
    following = [ids(single.next_batch()) for _ in range(3)]
    again = SFTBatches(examples, batch_size=4, seq_len=40, packing=False, seed=1)
    again.load_state_dict(sd)
    assert [ids(again.next_batch()) for _ in range(3)] == following
    assert single.epoch == 2 and sd["epoch"] == 1


def test_too_long_example_and_too_little_data_are_refused(tok, examples):
    with pytest.raises(LmstackError, match=r"example #\d+: the example has \d+ tokens .* more than seq_len=8"):
        SFTBatches(examples, batch_size=1, seq_len=8)
    with pytest.raises(LmstackError, match="fewer than one global batch of 28 rows"):
        SFTBatches(examples, batch_size=7, seq_len=40, packing=False, grad_accum=2, world_size=2)
