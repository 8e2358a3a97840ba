"""See how a tokenizer cuts text: coloured token spans (terminal or HTML) and
bytes-per-token per script.

    lmstack tokenizer viz "Hello 世界 🌍" --tokenizer runs/x/tokenizer.json [--html out.html]

Scripts. Every token is labelled by the characters it covers, in this priority:
emoji > cjk > latin > other, where emoji = the pictograph/symbol blocks (U+2300-27BF,
U+2B00-2BFF, U+1F000-1FAFF, joiners and variation selectors), cjk = Han, kana, Hangul and
CJK punctuation/full-width forms, latin = Latin letters (ASCII, Latin-1, Latin Extended),
other = any other letters. Tokens with no letters (spaces, digits, punctuation) take the
dominant script of their line. "code" is a line label: a line is code when it shows at
least two code signals (indentation, a leading keyword such as def/class/return/import,
a trailing ":" "{" or ";", >= 10% operator/bracket/punctuation characters); all tokens on it
count as code. `--script NAME` overrides the guess and labels the whole text NAME.
"""
from __future__ import annotations

import html
import re
from collections import defaultdict

from lmstack.tokenizer.tokenizer import Tokenizer

SCRIPTS = ("latin", "cjk", "code", "emoji", "other")
_PRIORITY = ("emoji", "cjk", "latin", "other")

# A few lines in each script, for the demo tokenizer used when no --tokenizer is given.
SAMPLE_TEXT = """The tokenizer turns text into integers. Byte pair encoding starts from the 256 bytes
and merges the most frequent adjacent pair again and again, so common words become one token
while rare words are spelled from pieces. The quick brown fox jumps over the lazy dog.
def encode(text: str) -> list[int]:
    ids = list(text.encode("utf-8"))
    for pair, new_id in merges.items():
        ids = merge(ids, pair, new_id)
    return ids
if (x > 0 && y < 10) { total += x * y; }
自然言語処理は人工知能の一分野です。我们今天去公园散步，天气很好。東京は日本の首都です。
안녕하세요, 세계! 오늘 날씨가 좋습니다.
Emoji: 😀😂🤖👍🏽🎉❤️ 👨‍👩‍👧 🇯🇵 — numbers 3.14159, 2024-06-01, 1,000,000.
"""

_KEYWORDS = re.compile(r"^\s*(def|class|return|import|from|for|while|if|elif|else|try|except|with|"
                       r"function|const|let|var|public|private|static|void|int|#include|#define|fn|"
                       r"struct|package|func)\b")
_OPERATORS = set("{}[]()<>=;+-*/%&|^~:#,.\\\"'`$@!")


def is_code_line(line: str) -> bool:
    body = line.strip()
    if not body:
        return False
    signals = 0
    signals += line[:1] in ("\t",) or line.startswith("    ")
    signals += bool(_KEYWORDS.match(line))
    signals += body[-1] in ":{;" and not body.endswith("::")
    signals += sum(c in _OPERATORS for c in body) >= 0.10 * len(body)
    return signals >= 2


def char_script(ch: str) -> str | None:
    """Script of one character, or None for characters with no script (space, digit, punctuation)."""
    o = ord(ch)
    if (0x1F000 <= o <= 0x1FAFF or 0x2300 <= o <= 0x27BF or 0x2B00 <= o <= 0x2BFF or o in (0x200D, 0xFE0F)
            or 0xE0020 <= o <= 0xE007F):
        return "emoji"
    if (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0xF900 <= o <= 0xFAFF
            or 0xFF00 <= o <= 0xFFEF or 0x20000 <= o <= 0x3FFFF):
        return "cjk"
    if ch.isalpha():
        return "latin" if o < 0x250 or 0x1E00 <= o <= 0x1EFF else "other"
    return None


def token_spans(tok: Tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """Group tokens into printable spans: a character cut across tokens (a CJK character
    or emoji split into byte pieces) is shown once, with all the ids that make it."""
    spans: list[tuple[str, list[int]]] = []
    buf, group = b"", []
    for i in ids:
        buf += tok.token_bytes(i)
        group.append(i)
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and len(group) < 8:
                continue  # wait for the rest of the character
            text = buf.decode("utf-8", errors="replace")
        spans.append((text, group))
        buf, group = b"", []
    if group:
        spans.append((buf.decode("utf-8", errors="replace"), group))
    return spans


def token_scripts(tok: Tokenizer, text: str, ids: list[int], script: str | None = None) -> list[str]:
    """One script label per token of `ids` (= tok.encode(text, allowed_special="all"))."""
    if script is not None:
        return [script] * len(ids)
    # per byte of the text: its character's script, and its line's label
    char_labels: list[str | None] = []
    line_labels: list[str] = []
    for line in text.splitlines(keepends=True):
        labels = [char_script(c) for c in line]
        counts: dict[str, int] = defaultdict(int)
        for lab in labels:
            if lab:
                counts[lab] += 1
        line_label = "code" if is_code_line(line) else max(counts, key=counts.get) if counts else "other"
        for c, lab in zip(line, labels):
            n = len(c.encode("utf-8"))
            char_labels.extend([None if line_label == "code" else lab] * n)
            line_labels.extend([line_label] * n)
    out, pos = [], 0
    for i in ids:
        n = len(tok.token_bytes(i))
        found = {lab for lab in char_labels[pos:pos + n] if lab}
        first = next((p for p in _PRIORITY if p in found), None)
        out.append(first or (line_labels[pos] if pos < len(line_labels) else "other"))
        pos += n
    return out


def script_stats(tok: Tokenizer, text: str, script: str | None = None) -> list[dict]:
    """Rows {script, tokens, bytes, bytes_per_token} for each script present, plus 'all'."""
    ids = tok.encode(text, allowed_special="all")
    labels = token_scripts(tok, text, ids, script)
    tokens: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    for i, lab in zip(ids, labels):
        tokens[lab] += 1
        nbytes[lab] += len(tok.token_bytes(i))
    rows = [{"script": s, "tokens": tokens[s], "bytes": nbytes[s], "bytes_per_token": nbytes[s] / tokens[s]}
            for s in [*SCRIPTS, *sorted(set(tokens) - set(SCRIPTS))] if tokens.get(s)]
    total_t, total_b = sum(tokens.values()), sum(nbytes.values())
    rows.append({"script": "all", "tokens": total_t, "bytes": total_b,
                 "bytes_per_token": total_b / total_t if total_t else 0.0})
    return rows


def format_stats(rows: list[dict]) -> str:
    lines = [f"{'script':<8} {'tokens':>8} {'bytes':>9} {'bytes/token':>12}"]
    lines += [f"{r['script']:<8} {r['tokens']:>8} {r['bytes']:>9} {r['bytes_per_token']:>12.2f}" for r in rows]
    return "\n".join(lines)


_ANSI_BG = [44, 42, 45, 46, 43, 41]   # blue, green, magenta, cyan, yellow, red


def _visible(text: str) -> str:
    return text.replace("\t", "→").replace("\r", "␍").replace("\n", "↵\n")


def render_ansi(spans: list[tuple[str, list[int]]]) -> str:
    parts = []
    for k, (text, _) in enumerate(spans):
        colour = f"\x1b[30;{_ANSI_BG[k % len(_ANSI_BG)]}m"
        # colour each line of the span separately so the background never runs past a newline
        parts.append("\n".join(f"{colour}{line}\x1b[0m" if line else "" for line in _visible(text).split("\n")))
    ids = " ".join("+".join(map(str, g)) for _, g in spans)
    return "".join(parts) + "\n\nids: " + ids


_HTML_COLORS = ["#cfe2ff", "#d1e7dd", "#f8d7da", "#fff3cd", "#e2d9f3", "#cff4fc"]


def render_html(spans: list[tuple[str, list[int]]], rows: list[dict], title: str) -> str:
    body = "".join(
        f'<span style="background:{_HTML_COLORS[k % len(_HTML_COLORS)]}" title="id {"+".join(map(str, g))}">'
        f"{html.escape(_visible(text))}</span>" for k, (text, g) in enumerate(spans))
    table = "".join(f"<tr><td>{r['script']}</td><td>{r['tokens']}</td><td>{r['bytes']}</td>"
                    f"<td>{r['bytes_per_token']:.2f}</td></tr>" for r in rows)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} .tokens{{font-family:monospace;white-space:pre-wrap;
line-height:1.9;border:1px solid #ccc;padding:1em}} .tokens span{{border-radius:3px;padding:1px 0;
margin-right:1px}} table{{border-collapse:collapse;margin-top:1em}} td,th{{border:1px solid #ccc;
padding:4px 10px;text-align:right}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{sum(len(g) for _, g in spans)} tokens. Hover a span to see its token id(s).</p>
<div class="tokens">{body}</div>
<table><tr><th>script</th><th>tokens</th><th>bytes</th><th>bytes/token</th></tr>{table}</table>
</body></html>
"""


def demo_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A small tokenizer trained on SAMPLE_TEXT, for `viz` without --tokenizer."""
    return Tokenizer.train([SAMPLE_TEXT], vocab_size=vocab_size, pattern="gpt4", min_frequency=2)
