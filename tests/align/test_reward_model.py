"""Reward models: the score head reads the last real token's final hidden state, survives
save/load, and Bradley-Terry training raises held-out pairwise accuracy."""
import torch

from tests.align.conftest import tiny_model
from tests.align.toy import yes_no_pairs
from lmstack.align import PairBatches, RewardObjective, pairwise_accuracy, reward_model_from, score_sequences
from lmstack.align import tokenize_pairs
from lmstack.model import Transformer
from lmstack.train import TrainConfig, Trainer


def test_score_is_a_linear_of_the_last_real_tokens_hidden_state(tmp_path):
    base = tiny_model(0, tie_embeddings=True)
    rm = reward_model_from(base).eval()
    seqs = [[5, 6, 7, 8, 9], [10, 11]]
    got = score_sequences(rm, seqs)
    for s, g in zip(seqs, got):
        with torch.no_grad():
            h = rm.introspect(torch.tensor([s]))["hidden_states"][-1][0, -1]       # after norm_f
        assert abs(float(h @ rm.lm_head.weight[0]) - float(g)) < 1e-5
    assert not base.config.tie_embeddings or rm.lm_head.weight.shape == (1, 32)
    rm.save_pretrained(tmp_path / "rm")
    again = Transformer.from_pretrained(tmp_path / "rm")
    assert torch.allclose(score_sequences(again, seqs), got, atol=1e-6)
    assert again.config.tie_embeddings is False


def test_bradley_terry_training_raises_held_out_pairwise_accuracy(tok, tmp_path):
    torch.manual_seed(0)
    rm = reward_model_from(tiny_model(1))
    train = tokenize_pairs(tok, yes_no_pairs(48, 1) + yes_no_pairs(48, 3, " maybe", " no"), "plain", 96)
    held = tokenize_pairs(tok, yes_no_pairs(24, 2), "plain", 96)
    if pairwise_accuracy(rm, held) > 0.5:           # start on the wrong side: flip the held-out pairs' roles
        held = tokenize_pairs(tok, yes_no_pairs(24, 2, " no", " yes"), "plain", 96)
        train = tokenize_pairs(tok, yes_no_pairs(48, 1, " no", " yes") + yes_no_pairs(48, 3, " no", " maybe"),
                               "plain", 96)
    before = pairwise_accuracy(rm, held)
    cfg = TrainConfig(out=str(tmp_path / "rm"), max_steps=30, batch_size=8, seq_len=96, lr=3e-3, warmup_steps=0,
                      eval_every=15, eval_batches=3, ckpt_every=0, tensorboard=False, device="cpu")
    Trainer(cfg, rm, RewardObjective(), PairBatches(train, 8),
            val_batches=PairBatches(held, 8, shuffle=False)).fit()
    assert before < 0.5 and pairwise_accuracy(rm, held) == 1.0
    loaded = Transformer.from_pretrained(tmp_path / "rm")                  # the Trainer's export loads back
    assert pairwise_accuracy(loaded, held) == 1.0
