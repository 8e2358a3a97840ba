"""Span corruption (T5): the corruption on a hand-made case, the noise statistics, inputs and
targets that rebuild the original row, errors that name the field, and the Trainer (and
`lmstack train --objective span`) training an EncoderDecoder with it."""
import pytest
import torch

from lmstack.train.span import Seq2SeqLM, SpanCorruption, corrupt, noise_counts, noise_mask, pairs_batch
from lmstack.utils import LmstackError
from train_toy import VOCAB, ToySampler, losses, tiny_model_config, toy_config


def test_corrupt_hand_case():
    # "Thank you <X> me to your party <Y> week." -> "<X> for inviting <Y> last <Z>" (T5 paper, fig. 2)
    x = torch.arange(10, 20)
    noise = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    enc, tgt = corrupt(x, noise, vocab_size=100)
    assert enc.tolist() == [10, 11, 99, 14, 15, 16, 98, 18, 19]       # <extra_id_0> = 99, <extra_id_1> = 98
    assert tgt.tolist() == [99, 12, 13, 98, 17, 97]                    # closed by <extra_id_2> = 97


def test_noise_follows_t5_counts_and_alternates():
    g = torch.Generator().manual_seed(0)
    assert noise_counts(128, 0.15, 3.0) == (19, 6) and noise_counts(512, 0.15, 3.0) == (77, 26)
    lengths = []
    for _ in range(50):
        m = noise_mask(128, 0.15, 3.0, g)
        assert int(m.sum()) == 19 and not m[0]                        # exactly 15%, starting with kept text
        runs = torch.unique_consecutive(m, return_counts=True)
        assert runs[0].tolist() == [False, True] * 6                  # 6 spans, each between kept text
        lengths += runs[1][1::2].tolist()
    assert abs(sum(lengths) / len(lengths) - 19 / 6) < 1e-9 and min(lengths) >= 1 and max(lengths) > 3
    a, b = (noise_mask(64, 0.15, 3.0, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b)                                          # determined by the generator


def test_inputs_and_targets_rebuild_the_row():
    obj = SpanCorruption(vocab_size=VOCAB + 20, n_sentinels=20, text_vocab=VOCAB)
    x = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    b = obj.prepare((x, x), torch.Generator().manual_seed(2))
    n_noise, n_spans = noise_counts(64, 0.15, 3.0)
    assert b.input_ids.shape == (8, 64 - n_noise + n_spans) and b.targets.shape == (8, n_noise + n_spans + 1)
    assert b.decoder_input_ids[:, 0].eq(0).all() and torch.equal(b.decoder_input_ids[:, 1:], b.targets[:, :-1])
    for row in range(8):
        spans, cur = {}, None
        for t in b.targets[row].tolist():
            if t >= VOCAB:
                cur = spans.setdefault(t, [])
            else:
                cur.append(t)
        rebuilt = [tok for t in b.input_ids[row].tolist() for tok in (spans[t] if t >= VOCAB else [t])]
        assert rebuilt == x[row].tolist()


def test_errors_name_the_field():
    with pytest.raises(LmstackError, match=r"n_sentinels=30 does not fit.*vocab_size=120.*\[0, 100\)"):
        SpanCorruption(vocab_size=120, n_sentinels=30, text_vocab=100)
    with pytest.raises(LmstackError, match="noise_density=1.5"):
        SpanCorruption(vocab_size=200, noise_density=1.5)
    few = SpanCorruption(vocab_size=110, n_sentinels=4, text_vocab=100)
    with pytest.raises(LmstackError, match="seq_len=128 gives 6 noise spans.*n_sentinels=4"):
        few.prepare((torch.zeros(1, 128, dtype=torch.long),) * 2, torch.Generator())
    with pytest.raises(LmstackError, match="token id 107 collides with the sentinel ids"):
        few.prepare((torch.full((1, 16), 107),) * 2, torch.Generator())



def test_trainer_trains_an_encoder_decoder_with_span_corruption(tmp_path, one_thread):
    from lmstack.model import EncoderDecoder, from_pretrained
    from lmstack.train import Trainer
    cfg = toy_config(tmp_path, objective="span", max_steps=30, eval_every=30, ckpt_every=30, lr=1e-2)
    result = Trainer(cfg, tiny_model_config(), batches=ToySampler(4, 32),
                     val_batches=ToySampler(4, 32, seed=99)).fit()
    model = from_pretrained(tmp_path)
    assert type(model) is EncoderDecoder
    assert model.config.vocab_size == VOCAB + 100 and model.config.n_encoder_layer == model.config.n_layer == 2
    loss = losses(tmp_path)
    # step 1 is near ln(197) = 5.3, a guess; the toy stream repeats a pattern, so the dropped
    # spans (and the sentinels) become predictable from the context the encoder reads
    assert loss[("train", 1)] > 4.5 and loss[("val", 30)] < 0.65 * loss[("train", 1)], loss
    assert result["steps_run"] == 30


def test_seq2seq_pairs_objective():
    b = pairs_batch([([5, 6, 7], [8]), ([9], [10, 11])], eos_id=1)
    assert b.input_ids.tolist() == [[5, 6, 7], [9, 0, 0]] and b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.targets.tolist() == [[8, 1, -100], [10, 11, 1]]
    assert b.decoder_input_ids.tolist() == [[0, 8, 1], [0, 10, 11]]
    with pytest.raises(LmstackError, match="needs Seq2SeqBatch inputs"):
        Seq2SeqLM().prepare((torch.zeros(1, 2),) * 2, torch.Generator())


def test_cli_objective_span(tmp_path, one_thread):
    from lmstack.cli.main import main
    from lmstack.data import CorpusOptions, build_corpus, iter_texts, write_shards
    from lmstack.model import EncoderDecoder, from_pretrained
    from lmstack.tokenizer import Tokenizer
    data = tmp_path / "data"
    build_corpus(CorpusOptions(corpus="tinyworld", out=str(data), size_mb=0.05, seed=0))
    tok = Tokenizer.train(list(iter_texts(data, "train")), vocab_size=280)
    tok.save(data / "tokenizer.json")
    write_shards(data, tok, splits=("train", "val"))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--objective", "span", "--max-steps", "3",
                 "--model-overrides", "{n_layer: 1, n_embd: 32, n_head: 2, context_length: 64}", "--batch-size", "2",
                 "--seq-len", "32", "--eval-every", "3", "--eval-batches", "1", "--tensorboard", "false"]) == 0
    model = from_pretrained(out)
    assert type(model) is EncoderDecoder and model.config.vocab_size == 280 + 100
