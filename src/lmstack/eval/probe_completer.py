"""The inference engine as a probe completer (`lmstack.data.probes.score_probes`)."""
from __future__ import annotations

from lmstack.data.probes import Completer, Probe


def engine_completer(llm, max_tokens: int | None = None, slack: int = 8) -> Completer:
    """Greedy completions through the inference engine (`lmstack.infer.LLM`).

    Generation stops at the first newline: only the first line is scored. The token budget is
    `max_tokens`, or per task the longest answer of that task in tokens plus `slack` (so a
    one-number answer does not pay for 60-token worked solutions)."""
    from lmstack.infer import SamplingParams

    def complete(batch: list[Probe]) -> list[tuple[str, bool]]:
        budget: dict[str, int] = {}
        if max_tokens is None:
            for p in batch:
                n = len(llm.tokenizer.encode_ordinary(p.answer)) + slack
                budget[p.task] = max(budget.get(p.task, 0), n)
        params = [SamplingParams(temperature=0.0, max_tokens=max_tokens or budget[p.task], stop=["\n"])
                  for p in batch]
        outs = llm.generate([p.prompt for p in batch], params)
        return [(o.outputs[0].text, o.outputs[0].finish_reason != "length") for o in outs]

    return complete
