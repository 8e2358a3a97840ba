"""`lmstack generate RUN "prompt"`: stream a completion to the terminal.

    lmstack generate runs/tiny "Once upon a time" --temperature 0.8 --top-p 0.95 --max-tokens 64 --seed 0
    lmstack generate hf_dir "def add(a, b):" --temperature 0 --stop "\\n\\n" --stats true

Text is printed as it is generated (never half a character, never the stop string); with
--stats true the engine's numbers (TTFT, tokens/s, KV blocks, prefix hits) go to stderr.
With --speculative, a line on stderr says which back-off is on, how many drafts were
accepted and, when it can tell, how fast that was against plain decoding; a warning follows
when speculation cost more than it saved.
"""
from __future__ import annotations

import statistics
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
    speculative_backoff: bool | None = field(default=None, metadata={
        "help": "pause speculation while drafts keep missing (default: on for a draft model, off for ngram)"})
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
    if speculative and opts.speculative_backoff is not None:
        speculative["backoff"] = opts.speculative_backoff
    llm = LLM(args.model, kv_cache_tokens=opts.kv_cache_tokens, device=opts.device, dtype=opts.dtype,
              speculative=speculative, max_num_seqs=1)
    prompt = args.prompt
    if opts.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    engine = llm.engine
    rid = engine.add_request(prompt, params)
    meter = StepMeter(engine) if speculative else None
    shown = 0
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        if meter is not None:
            meter.after_step()
    sys.stdout.write("\n")
    if meter is not None:
        for line in speculation_report(engine.stats(), meter.plain, meter.spec, meter.spec_tokens):
            print(line, file=sys.stderr)
    if opts.stats and out is not None:
        m = out.metrics
        s = engine.stats()
        print(f"[{rid[:8]}] finish={out.outputs[0].finish_reason} tokens={m['num_generated_tokens']} "
              f"ttft={m['time_to_first_token']:.3f}s tokens/s={m['tokens_per_s'] or 0:.1f} "
              f"kv_blocks={s['kv_blocks_total']} prefix_hit_rate={s['prefix_cache_hit_rate']:.2f}"
              + (f" acceptance_rate={s['spec_acceptance_rate']:.2f}" if "spec_acceptance_rate" in s else ""),
              file=sys.stderr)
    return 0


class StepMeter:
    """Sorts the engine's decode steps into plain ones and speculative (verify) ones, with the
    engine's own time for each: the back-off's pauses are plain steps, which is what
    speculation is measured against. Steps that prefill prompt tokens are left out."""

    def __init__(self, engine):
        self.engine = engine
        self.plain: list[float] = []
        self.spec: list[float] = []
        self.spec_tokens = 0          # tokens produced by verify steps
        self._last = self._counts()

    def _counts(self) -> tuple[int, int, int]:
        e = self.engine
        return e.counters["prompt_tokens"], e.speculator.steps, e.postprocessor.num_generated_tokens

    def after_step(self) -> None:
        now, dt = self._counts(), self.engine.counters["last_step_time_s"]
        prompt, verifies, generated = (a - b for a, b in zip(now, self._last))
        self._last = now
        if prompt == 0 and verifies > 0:
            self.spec.append(dt)
            self.spec_tokens += generated
        elif prompt == 0 and generated > 0:
            self.plain.append(dt)


def speculation_report(stats: dict, plain: list[float], spec: list[float], spec_tokens: int,
                       min_steps: int = 3) -> list[str]:
    """A line saying what speculation did, and a warning when it cost more than it saved.

    Against plain decoding, from the steps of this run: with at least `min_steps` of each
    kind, speed = (tokens of verify steps + one per plain step) / their total time, over
    1 / the median plain step. Without plain steps to compare against (back-off off, drafts
    every step), a verify step that yields under 1.5 tokens is flagged as likely slower:
    checking k drafts costs a forward over k + 1 tokens, on a CPU several times one token's."""
    onoff = {True: "on", False: "off"}
    proposed, accepted = stats["spec_proposed_tokens"], stats["spec_accepted_tokens"]
    per_step = spec_tokens / len(spec) if spec else 0.0
    line = (f"speculative {stats['spec_method']} (k={stats['spec_num_speculative_tokens']}, adaptive lookahead "
            f"{onoff[stats['spec_adaptive']]}, back-off {onoff[stats['spec_backoff']]}): {accepted} of {proposed} "
            f"drafted tokens accepted ({stats['spec_acceptance_rate']:.0%}), {per_step:.2f} tokens per verify step")
    lines = [line]
    if len(plain) >= min_steps and len(spec) >= min_steps:
        plain_speed = 1.0 / statistics.median(plain)
        speed = (spec_tokens + len(plain)) / (sum(spec) + sum(plain))
        lines[0] += f"; {speed / plain_speed:.2f}x the speed of plain decoding (measured on {len(plain)} plain steps)"
        if speed < plain_speed:
            lines.append("warning: speculation cost more than it saved here; drop --speculative"
                         + ("" if stats["spec_backoff"] else " or add --speculative-backoff true"))
    elif spec and per_step < 1.5:
        fix = "drop --speculative" if stats["spec_backoff"] else \
            "add --speculative-backoff true (pauses speculation while drafts miss) or drop --speculative"
        lines.append(f"warning: only {per_step:.2f} tokens per verify step: checking "
                     f"{stats['spec_num_speculative_tokens']} drafts costs more than that saves on most CPUs, so this "
                     f"was likely slower than no speculation; {fix}")
    return lines
