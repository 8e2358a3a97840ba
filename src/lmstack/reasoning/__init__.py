"""Floor 5: reasoning strategies over the inference engine, and a calculator tool.

    from lmstack.reasoning import Problem, solve, tool_calls_from_text
    res = solve(llm, [Problem(47, "+", 38)], "self_consistency", k=8)   # or direct, cot, tool

Files: calculator (a safe `ast` arithmetic evaluator), arithmetic (problem prompts in three
styles, answer extraction), tools (generation that pauses at `<calc>` calls and resumes with
the result), tool_calls (raw output -> OpenAI tool_calls, for the server), strategies
(direct, chain of thought, self-consistency, tool use, with their token and time cost).
"""
from lmstack.reasoning.arithmetic import STYLES, Problem, extract_answer
from lmstack.reasoning.calculator import CalcError, CalcResult, evaluate, run_calculator
from lmstack.reasoning.strategies import STRATEGIES, Attempt, StrategyResult, majority_vote, solve
from lmstack.tokenizer.tool_calls import (CALCULATOR_TOOL, CALL_CLOSE, CALL_OPEN, chat_message, tool_calls_from_text,
                                          tool_names)
from lmstack.reasoning.tools import ToolRun, check_prompts, generate_with_tools

__all__ = ["STYLES", "Problem", "extract_answer", "CalcError", "CalcResult", "evaluate", "run_calculator",
           "STRATEGIES", "Attempt", "StrategyResult", "majority_vote", "solve", "CALCULATOR_TOOL", "CALL_CLOSE",
           "CALL_OPEN", "chat_message", "tool_calls_from_text", "tool_names", "ToolRun", "check_prompts",
           "generate_with_tools"]
