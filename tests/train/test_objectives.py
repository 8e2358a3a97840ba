"""Objectives: masks and loss positions on small hand-made cases, and against the model."""
import pytest
import torch

from lmstack.train.objectives import (IGNORE_INDEX, MaskedLM, PrefixLM, attention_allowed, build_objective,
                                      token_loss)
from train_toy import tiny_model_config

I = IGNORE_INDEX


def test_masked_corrupt_hand_case():
    x = torch.tensor([[10, 11, 12, 13, 14, 15]])
    selected = torch.tensor([[False, True, False, True, True, False]])
    action = torch.tensor([[0, 0, 1, 1, 2, 0]])       # action only matters where selected
    rand = torch.tensor([[50, 51, 52, 53, 54, 55]])
    b = MaskedLM.corrupt(x, selected, action, rand, mask_id=99)
    assert b.input_ids.tolist() == [[10, 99, 12, 53, 14, 15]]
    assert b.targets.tolist() == [[I, 11, I, 13, 14, I]]
    assert b.prefix_lens is None


def test_masked_make_batch_rates():
    obj = MaskedLM(mask_id=1000, vocab_size=1000, mask_prob=0.15)
    B, T = 256, 200
    x = torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(0))
    b = obj.make_batch(x, x, torch.Generator().manual_seed(1))
    sel = b.targets != I
    assert (sel.sum(1) == 30).all()                       # exactly 15% of each row
    assert torch.equal(b.targets[sel], x[sel])            # loss predicts the original token
    assert torch.equal(b.input_ids[~sel], x[~sel])        # unselected positions untouched
    n = sel.sum().item()
    masked = (b.input_ids[sel] == 1000).sum().item() / n
    kept = (b.input_ids[sel] == x[sel]).sum().item() / n  # "keep" plus random draws that hit the original
    # 7680 draws: binomial std of a 10% rate is 0.0034; allow 5 sigma.
    assert abs(masked - 0.8) < 0.02
    assert abs(kept - (0.1 + 0.1 / 1000)) < 0.017
    assert abs((1 - masked - kept) - 0.1 * 999 / 1000) < 0.017
    # deterministic given the generator
    b2 = obj.make_batch(x, x, torch.Generator().manual_seed(1))
    assert torch.equal(b.input_ids, b2.input_ids)


def test_prefix_targets_hand_case():
    y = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    t = PrefixLM.targets_for(y, torch.tensor([3, 1]))
    # prefix of 3: position 2 (sees x0..x2) predicts x3, the first token after the prefix
    assert t.tolist() == [[I, I, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]


def test_prefix_make_batch_lengths():
    x = torch.arange(2 * 8).view(2, 8)
    b = PrefixLM().make_batch(x, x + 1, torch.Generator().manual_seed(0))
    assert ((b.prefix_lens >= 1) & (b.prefix_lens <= 7)).all()
    for r in range(2):
        L = int(b.prefix_lens[r])
        assert (b.targets[r, :L - 1] == I).all() and torch.equal(b.targets[r, L - 1:], x[r, L - 1:] + 1)


def test_reference_masks_hand_case():
    assert attention_allowed("causal", 3).int().tolist() == [[[1, 0, 0], [1, 1, 0], [1, 1, 1]]]
    assert attention_allowed("bidirectional", 2).all()
    got = attention_allowed("prefix", 4, torch.tensor([2])).int().tolist()
    assert got == [[[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]]


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
def test_model_attends_exactly_as_the_objective_needs(kind):
    from lmstack.model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(mask=kind)).eval()
    ids = torch.randint(0, 97, (2, 6))
    pl = torch.tensor([2, 4]) if kind == "prefix" else None
    att = model.introspect(ids, prefix_lens=pl)["attentions"][0]      # (B, H, T, T)
    want = attention_allowed(kind, 6, pl).expand(2, -1, -1)
    assert torch.equal(att.gt(0).all(1), want) and torch.equal(att.gt(0).any(1), want)


def test_prefix_loss_positions_never_see_their_target():
    """Changing token t+1 leaves the logits of every loss position t unchanged."""
    from lmstack.model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(mask="prefix")).eval()
    x = torch.randint(0, 97, (1, 8))
    b = PrefixLM().make_batch(x, torch.roll(x, -1, 1), torch.Generator().manual_seed(3))
    base = model(b.input_ids, prefix_lens=b.prefix_lens)
    for t in range(7):
        if b.targets[0, t] == I:
            continue
        x2 = b.input_ids.clone()
        x2[0, t + 1] = (x2[0, t + 1] + 1) % 97
        assert torch.allclose(model(x2, prefix_lens=b.prefix_lens)[0, t], base[0, t], atol=1e-6)


def test_token_loss_ignores_positions():
    logits = torch.randn(1, 3, 5)
    t = torch.tensor([[2, I, 4]])
    ref = (torch.nn.functional.cross_entropy(logits[0, 0:1], t[0, 0:1]) +
           torch.nn.functional.cross_entropy(logits[0, 2:3], t[0, 2:3])) / 2
    assert torch.allclose(token_loss(logits, t), ref)


def test_mask_token_choice():
    obj, vocab = build_objective("masked", {"<|endoftext|>": 0}, 300)
    assert obj.mask_id == 300 and vocab == 301 and obj.model_mask == "bidirectional"
    obj, vocab = build_objective("masked", {"<|mask|>": 7}, 300)
    assert obj.mask_id == 7 and vocab == 300
    with pytest.raises(ValueError, match="valid: causal"):
        build_objective("mlm", {}, 10)
