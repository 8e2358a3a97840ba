"""The mixed test corpus (English, code, CJK, emoji, whitespace runs, numbers), in a module
with a unique name so tests can import it whatever other conftest.py files are loaded."""

ENGLISH = """It was the best of times, it was the worst of times, it was the age of wisdom,
it was the age of foolishness. We'll see; they're sure it's done -- isn't it? I've said so.
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! Don't shout, she'd say.
Naïve café résumé: coöperate with the façade; Ærøskøbing and Straße are places too.
"""
CODE = """def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

if __name__ == "__main__":
\tprint(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
    x = {"key": [1, 2.5, -3e10], 'other': None}; y = x["key"][0] ** 2 // 3 != 4
"""
CJK = """自然言語処理は人工知能の一分野です。我们今天去公园散步，天气很好。
東京は日本の首都であり、人口は約1400万人です。한국어도 조금 섞어 봅시다: 안녕하세요, 세계!
"""
EMOJI = """Great job 👍🏽!! 🎉🎉🎉 Family: 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, hearts ❤️💙💚, faces 😀😂🥲🤖
"""
WHITESPACE_NUMBERS = """Numbers: 3.14159 2718281828 1,000,000 0x1F600 -42 +7 1e-9 2024-06-01 12:30:45
   indented    with     runs		of	tabs


and blank lines\r\nwindows line\r\n  trailing spaces   \n"""

MIXED = ENGLISH + CODE + CJK + EMOJI + WHITESPACE_NUMBERS


def mixed_texts() -> list[str]:
    """A few variations so that pairs repeat and merges are learned across scripts."""
    return [MIXED, ENGLISH * 3, CODE * 2, CJK * 2, EMOJI * 2, WHITESPACE_NUMBERS * 2,
            MIXED.upper(), MIXED.replace(" ", "  ")]
