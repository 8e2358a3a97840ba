"""Tool use: generation pauses at a calculator call, the tool runs, generation resumes.

    runs = generate_with_tools(llm, ["Q: what is 47+38? use the calculator.\\nA:"],
                               SamplingParams(temperature=0, max_tokens=32))
    runs[0].text      # ' <calc>47+38</calc>=85'   ('=85' was written by the tool)
    runs[0].calls     # [CalcResult('47+38', 85)]

The model writes `<calc>EXPR</calc>`. `</calc>` is a stop string, so the engine stops right
after the call; the loop evaluates EXPR with the safe calculator (calculator.py), appends
`</calc>=RESULT` (or `</calc>=error: <why>`, which the model sees and may react to), and
resumes from prompt + everything so far. Each round is one batched `LLM.generate` over the
examples still running, and the prefix cache makes the resumed prompt cheap to re-read.

An example ends when it stops for any other reason (end of text, a stop string of the
caller, the token budget, which is shared by all its rounds) or after `max_calls` calls.
A prompt that does not fit the model's context (at the start or after a result was
appended) fails that example alone: its `error` says why and the others go on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmstack.reasoning.calculator import CalcResult, run_calculator
from lmstack.tokenizer.tool_calls import CALL_CLOSE, CALL_OPEN


@dataclass
class ToolRun:
    prompt: str
    text: str = ""                       # everything after the prompt: model text + tool results
    calls: list[CalcResult] = field(default_factory=list)
    generated_tokens: int = 0            # model tokens only, over all rounds
    rounds: int = 0
    finish_reason: str | None = None     # the last round's ("stop", "length", ...), or "error"
    error: str | None = None

    @property
    def complete(self) -> bool:
        """The answer line ended (not cut by the token budget, no failure)."""
        return self.error is None and self.finish_reason != "length"


def check_prompts(llm, prompts: list[str], params) -> list[str | None]:
    """Per prompt: None if the engine would accept it, else the engine's reason (too long
    for the context, empty). Lets a batch run the good prompts and record the bad ones."""
    from lmstack.infer import RequestError

    errors: list[str | None] = []
    for p in prompts:
        try:
            llm.engine.check_request(p, params)
            errors.append(None)
        except RequestError as e:
            errors.append(str(e))
    return errors


def _call_expression(text: str) -> str | None:
    """EXPR of the call the text ends inside ('... <calc>EXPR'), None when no call is open."""
    i = text.rfind(CALL_OPEN)
    return None if i < 0 else text[i + len(CALL_OPEN):]


def generate_with_tools(llm, prompts: list[str], params, max_calls: int = 4) -> list[ToolRun]:
    """Run each prompt to its end, executing calculator calls on the way (see module doc)."""
    if max_calls < 0:
        raise ValueError(f"max_calls must be >= 0, got {max_calls}")
    budget = params.max_tokens if params.max_tokens is not None else llm.engine.max_model_len
    runs = [ToolRun(p) for p in prompts]
    active = list(range(len(runs)))
    while active:
        round_params = []
        for i in active:
            stop = list(params.stop) + ([CALL_CLOSE] if len(runs[i].calls) < max_calls else [])
            round_params.append(dataclasses.replace(params, n=1, stop=stop,
                                                    max_tokens=budget - runs[i].generated_tokens))
        texts = [runs[i].prompt + runs[i].text for i in active]
        errors = [check_prompts(llm, [t], sp)[0] for t, sp in zip(texts, round_params)]
        for i, err in zip(active, errors):
            if err is not None:
                runs[i].error, runs[i].finish_reason = err, "error"
        go = [(i, t, sp) for i, t, sp, err in zip(active, texts, round_params, errors) if err is None]
        outs = llm.generate([t for _, t, _ in go], [sp for _, _, sp in go]) if go else []
        active = []
        for (i, _, _), out in zip(go, outs):
            run, comp = runs[i], out.outputs[0]
            run.rounds += 1
            run.generated_tokens += len(comp.token_ids)
            run.text += comp.text
            run.finish_reason = comp.finish_reason
            if out.error is not None:
                run.error, run.finish_reason = out.error, "error"
                continue
            if comp.finish_reason != "stop" or comp.stop_reason != CALL_CLOSE:
                continue                                     # finished for good
            expr = _call_expression(comp.text)
            result = run_calculator(expr) if expr is not None else \
                CalcResult("", None, f"{CALL_CLOSE} without {CALL_OPEN}")
            run.calls.append(result)
            run.text += f"{CALL_CLOSE}={result.text}"
            if run.generated_tokens < budget:
                active.append(i)
            else:
                run.finish_reason = "length"
    return runs

