"""The table of labs: name -> what it asks, what it shows, what it needs, where it lives.

Reading the table imports nothing heavy (no torch, no matplotlib), so `lmstack lab list` is
instant and a lab whose optional dependency is missing can still say what it would show.
Numbers follow the issue that planned the labs.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from lmstack.utils import LmstackError

# optional module -> the lmstack extra that installs it
EXTRAS = {"matplotlib": "plots", "tiktoken": "hf", "transformers": "hf", "llama_cpp": "llamacpp"}


class LabError(LmstackError):
    """An unknown lab, a missing optional dependency, or an output folder that cannot be written."""


@dataclass(frozen=True)
class LabSpec:
    name: str
    number: int
    title: str
    question: str
    shows: str                       # what the lab shows, said even when it cannot run
    module: str                      # lmstack.labs.<module> defines run(ctx) -> LabResult
    requires: tuple[str, ...] = ("matplotlib",)

    def missing(self) -> list[str]:
        """The optional modules this lab needs that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def missing_message(self) -> str | None:
        miss = self.missing()
        if not miss:
            return None
        pip = " ".join(sorted({f"'lmstack[{EXTRAS[m]}]'" if m in EXTRAS else m for m in miss}))
        return (f"lab {self.name!r} needs {', '.join(miss)} (pip install {pip}); it would show: {self.shows}")

    def load(self):
        """The lab's run(ctx) function (imports the lab module and what it uses)."""
        return importlib.import_module(f"lmstack.labs.{self.module}").run


_LABS = [
    LabSpec("tokenization", 1, "Tokenization",
            "How does byte-level BPE turn text into ids, and what does a model learn about those ids?",
            "a BPE tokenizer trained from scratch, coloured token spans, one-hot vs learned embeddings, "
            "cosine similarities of trained token embeddings, and bytes per token by script (Latin, CJK, code, "
            "emoji) for a GPT-2 split against a cl100k-style split run through tiktoken",
            "tokenization", ("matplotlib", "tiktoken")),
    LabSpec("positions", 2, "Positions",
            "What does each position scheme add, and what breaks without one?",
            "sinusoidal, learned, RoPE, ALiBi and no positions on an order-dependent task; an animated 3-D view "
            "of a toy sequence being position-encoded; attention entropy and loss with positions removed",
            "positions"),
    LabSpec("attention", 3, "Attention",
            "Is attention really softmax(QK^T/sqrt(d))V, and does the causal mask really hide the future?",
            "one token's attention computed by hand against the library's, per-head heatmaps, and the causal "
            "mask checked by perturbing a future token", "attention"),
    LabSpec("qkv", 4, "Q, K, V and stacking",
            "What do queries, keys and values each do, and what does a second block add?",
            "one block trained intact and with Q and K swapped, K and V swapped and each of Q, K, V zeroed, with "
            "the loss curves that show which breaks training; the trained block broken afterwards; one block "
            "against a stack on in-context copying", "qkv"),
    LabSpec("sampling", 5, "Sampling",
            "How do temperature, top-k, top-p and min-p trade diversity against repetition?",
            "entropy and distinct n-grams across temperatures, the repetition of temperature 0, and top-k / "
            "top-p / min-p side by side through LLM + SamplingParams, with a temperature slider", "sampling"),
    LabSpec("kv-cache", 6, "KV cache",
            "What does the KV cache save, and what does it cost?",
            "time and FLOPs per generated token with and without the cache against sequence length, cache "
            "memory against sequence length, and prefix-cache hits and misses from llm.stats()", "kv_cache"),
    LabSpec("long-context", 7, "Long context",
            "What happens past the training length, and does a sliding window help?",
            "loss against position beyond the training length for full and sliding-window attention, with the "
            "context-collapse point found and marked", "long_context"),
    LabSpec("moe", 8, "Mixture of experts",
            "What does a router buy, and what does the load-balancing loss do?",
            "2-expert and n-expert routers, expert utilisation per layer, FLOPs per token against dense models, "
            "and routing without the load-balancing loss", "moe"),
    LabSpec("gqa", 9, "Grouped-query attention",
            "How much KV cache, speed and quality does sharing K/V heads trade?",
            "an MHA model converted to GQA/MQA by mean-pooling K/V heads: cache size, decode latency and "
            "throughput at large batch, and the loss against the number of KV groups", "gqa"),
    LabSpec("norms", 10, "Normalization and activations",
            "What do the norm and the nonlinearity each do for training?",
            "LayerNorm, RMSNorm and no norm; GELU, ReLU, SwiGLU and no activation, each retrained, with "
            "activation statistics layer by layer", "norms"),
    LabSpec("objectives", 11, "Pretraining objectives",
            "What do masked, causal and prefix LM learn from the same data?",
            "masked, causal and prefix LM trained by the one Trainer on the same tokens: loss curves, the share "
            "of positions that carry a loss, and what each model writes or fills in", "objectives"),
    LabSpec("finetuning", 12, "Finetuning, instruction tuning and RLHF",
            "What does each stage after pretraining change: plain finetuning, instruction tuning, RLHF?",
            "one pretrained model finetuned on plain text, instruction-tuned on prompt/answer chats, and then "
            "trained by a tiny PPO loop against a reward model: loss on each stage's data, exact answers, the "
            "reward and KL against PPO steps, and what each model writes on the same fixed prompts", "finetuning"),
    LabSpec("scaling", 13, "Scaling laws",
            "How does loss fall with parameters and compute, and how small is too small?",
            "tiny to medium models trained alike: loss against parameters and compute with a fitted, "
            "extrapolated power law, plus memory, throughput and wall-clock per size", "scaling"),
    LabSpec("quantization", 14, "Quantization",
            "How many bits does a weight need, and does training through the rounding help?",
            "held-out loss and agreement with the float model at 16, 8, 4 and 3 bits, post-training quantization "
            "against quantization-aware training (and against the same training in float), and GGUF files "
            "(f32, f16, q8_0, q4_0) with their sizes and llama.cpp's loss on each (when llama-cpp-python is "
            "installed)", "quantization"),
    LabSpec("stacks", 15, "Stacks",
            "Does one model run the same in our engine, transformers and llama.cpp, and at what cost?",
            "one model run by lmstack's engine, by transformers (exported as a Hugging Face folder) and by "
            "llama.cpp (exported as GGUF): the same greedy tokens checked, latency per token at batch 1, "
            "throughput over a batch of prompts, and memory, side by side", "stacks",
            ("matplotlib", "transformers", "llama_cpp")),
    LabSpec("synthetic-data", 16, "Synthetic data",
            "How does generated data compare with real text, and what does noise cost?",
            "tinyworld generated, noised, deduplicated and split by lmstack.data; learning curves of synthetic "
            "against Shakespeare (when cached) and of clean against noisy training data", "synthetic_data"),
]

LABS: dict[str, LabSpec] = {spec.name: spec for spec in _LABS}


def get_lab(name: str) -> LabSpec:
    """The lab called `name` (or its number); an unknown name is an error that lists the labs."""
    if name in LABS:
        return LABS[name]
    by_number = {str(s.number): s for s in LABS.values()}
    if name in by_number:
        return by_number[name]
    raise LabError(f"unknown lab {name!r}; the labs are:\n{format_list()}")


def format_list() -> str:
    """One line per lab: number, name, question (and what is missing, if anything)."""
    lines = []
    for s in LABS.values():
        miss = s.missing()
        extra = f"  [needs {', '.join(miss)}]" if miss else ""
        lines.append(f"  {s.number:>2}  {s.name:<15} {s.question}{extra}")
    return "\n".join(lines)
