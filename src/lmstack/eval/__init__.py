"""Floor 4: evaluation. Perplexity over token shards, unigram baselines, exact-match probes
(generated through the inference engine)."""
from lmstack.eval.perplexity import evaluate_loss, perplexity
from lmstack.eval.probes import (Probe, ProbeResult, engine_completer, exact_match, load_probes,
                                 majority_baseline, score_probes)
from lmstack.eval.unigram import token_counts, unigram_cross_entropy, unigram_entropy

__all__ = [
    "evaluate_loss", "perplexity", "Probe", "ProbeResult", "engine_completer", "exact_match",
    "load_probes", "majority_baseline", "score_probes", "token_counts", "unigram_cross_entropy",
    "unigram_entropy",
]
