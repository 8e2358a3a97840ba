"""Floor 4: evaluation. Perplexity over token shards, unigram baselines, exact-match probes;
log-likelihood scoring through the engine (lm-eval's rules), the task harness (versioned
YAML tasks: generation, multiple choice, rolling perplexity; local models or OpenAI-compatible
endpoints) and LLM-as-judge (rubric grading, position-debiased pairwise comparison)."""
from lmstack.eval.backends import EndpointModel, LocalModel, open_model
from lmstack.eval.harness import evaluate, format_table, run_task
from lmstack.eval.judge import Judge, compare, grade, load_judge_template
from lmstack.eval.loglikelihood import loglikelihood, loglikelihood_rolling, loglikelihood_tokens
from lmstack.eval.metrics import mc_scores, normalize_answer, token_f1
from lmstack.eval.perplexity import evaluate_loss, perplexity
from lmstack.data.probes import (Probe, ProbeResult, exact_match, load_probes, majority_baseline,
                                 score_probes)
from lmstack.eval.probe_completer import engine_completer
from lmstack.eval.tasks import Example, Failure, TaskSpec, build_examples, builtin_tasks, load_task
from lmstack.eval.unigram import token_counts, unigram_cross_entropy, unigram_entropy

__all__ = [
    "evaluate_loss", "perplexity", "Probe", "ProbeResult", "engine_completer", "exact_match",
    "load_probes", "majority_baseline", "score_probes", "token_counts", "unigram_cross_entropy",
    "unigram_entropy", "loglikelihood", "loglikelihood_rolling", "loglikelihood_tokens", "evaluate",
    "format_table", "run_task", "open_model", "LocalModel", "EndpointModel", "Judge", "grade", "compare",
    "load_judge_template", "TaskSpec", "Example", "Failure", "load_task", "builtin_tasks", "build_examples",
    "mc_scores", "normalize_answer", "token_f1",
]
