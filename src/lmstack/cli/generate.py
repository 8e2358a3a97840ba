"""`lmstack generate RUN "prompt"`: stream a completion to the terminal.

    lmstack generate runs/tiny "Once upon a time" --temperature 0.8 --top-p 0.95 --max-tokens 64 --seed 0
    lmstack generate hf_dir "def add(a, b):" --temperature 0 --stop "\\n\\n" --stats true

Text is printed as it is generated (never half a character, never the stop string); with
--stats true the engine's numbers (TTFT, tokens/s, KV blocks, prefix hits) go to stderr.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from lmstack.cli.options import add_options, build_options


@dataclass
class GenerateOptions:
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = off)"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p * p(max) (0 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL repetition penalty (1 = off)"})
    max_tokens: int = field(default=128, metadata={"help": "most tokens to generate"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed (same seed -> same text)"})
    stop: str | None = field(default=None, metadata={"help": "stop string (escapes like \\n are understood)"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep going past end-of-text"})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the tokenizer's chat template"})
    speculative: str | None = field(default=None, metadata={"help": "'ngram' or a draft model directory"})
    num_speculative_tokens: int = field(default=4, metadata={"help": "draft tokens per step"})
    kv_cache_tokens: int | None = field(default=None, metadata={"help": "KV-cache capacity in tokens"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: as saved)"})
    stats: bool = field(default=False, metadata={"help": "print engine stats to stderr at the end"})


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a model, streamed",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="RUN_DIR|HF_DIR", help="run directory or Hugging Face checkpoint folder")
    p.add_argument("prompt", help="the prompt text")
    add_options(p, GenerateOptions)
    p.set_defaults(func=handler)


def handler(args) -> int:
    from lmstack.infer import LLM, SamplingParams

    opts: GenerateOptions = build_options(GenerateOptions, args)
    stop = opts.stop.encode().decode("unicode_escape") if opts.stop else None
    try:
        params = SamplingParams(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, min_p=opts.min_p,
                                repetition_penalty=opts.repetition_penalty, max_tokens=opts.max_tokens,
                                seed=opts.seed, stop=stop, ignore_eos=opts.ignore_eos)
    except ValueError as e:
        from lmstack.utils import LmstackError
        raise LmstackError(str(e)) from None
    speculative = None
    if opts.speculative == "ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": opts.num_speculative_tokens}
    elif opts.speculative:
        speculative = {"method": "draft", "model": opts.speculative,
                       "num_speculative_tokens": opts.num_speculative_tokens}
    llm = LLM(args.model, kv_cache_tokens=opts.kv_cache_tokens, device=opts.device, dtype=opts.dtype,
              speculative=speculative, max_num_seqs=1)
    prompt = args.prompt
    if opts.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    engine = llm.engine
    rid = engine.add_request(prompt, params)
    shown = 0
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write("\n")
    if opts.stats and out is not None:
        m = out.metrics
        s = engine.stats()
        print(f"[{rid[:8]}] finish={out.outputs[0].finish_reason} tokens={m['num_generated_tokens']} "
              f"ttft={m['time_to_first_token']:.3f}s tokens/s={m['tokens_per_s'] or 0:.1f} "
              f"kv_blocks={s['kv_blocks_total']} prefix_hit_rate={s['prefix_cache_hit_rate']:.2f}"
              + (f" acceptance_rate={s['spec_acceptance_rate']:.2f}" if "spec_acceptance_rate" in s else ""),
              file=sys.stderr)
    return 0
