"""Texts for tokenizer parity tests, grouped by what they exercise.

Every text here encodes to the same ids with t5core, SentencePiece and the transformers
reference; the inputs where they disagree live in tests/test_tokenizer.py as pinned cases.
"""

SENTINELS = [
    "Hello <extra_id_0>.",
    "The <extra_id_0> walks in <extra_id_1> park",
    "<extra_id_0> cute dog <extra_id_1> the <extra_id_2>",
    "<extra_id_0><extra_id_1><extra_id_2>",
    "<extra_id_0> <extra_id_1>  <extra_id_2>",
    "a<extra_id_0>b",
    "a <extra_id_0>b",
    "a<extra_id_0> b",
    "  <extra_id_99>  ",
    "<extra_id_99>",
    "x <extra_id_5>\n<extra_id_6>\ty",
    "<extra_id_0>.",
    "<extra_id_0>,<extra_id_1>!",
    "<extra_id_05> is not a sentinel",
    "<extra_id_> <extra_id_x> <extra_id_-1>",
    "<EXTRA_ID_0> <Extra_id_0>",
    "<extra_id_1<extra_id_2>>",
]

SPECIAL_STRINGS = [
    "<pad> x <unk> y",
    "<pad><pad>hello",
    "a</s>b",
    "</s> at the start",
    "<unk>",
    "<s> is not special for T5",
    "< /s> </ s> <pad",
]

WHITESPACE = [
    "",
    " ",
    "   ",
    "\n",
    "\t\t",
    " leading space",
    "trailing space ",
    "  both  ",
    "many     spaces     inside",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues",
    "\r\nwindows\r\nlines",
    "mixed \t \n whitespace",
    "nbsp\u00a0here and ideographic\u3000space",
]

UNICODE = [
    "café crème brûlée",
    "naïve coöperation",
    "Straße Größe",
    "e\u0301 vs \u00e9",  # combining acute vs precomposed
    "Ångström",
    "日本語のテキスト",
    "中文文本和标点。",
    "한국어 텍스트",
    "Русский текст",
    "Ελληνικά",
    "עברית",
    "العربية",
    "emoji 😀🎉👍🏽",
    "flags 🇩🇪🇫🇷",
    "ﬁne ligature and Ⅻ roman and ① circled",
    "fullwidth ＡＢＣ１２３",
    "math ∑∫√∞≠≤",
    "zero\u200bwidth",
]

NUMBERS_PUNCTUATION = [
    "123 4567 89012 3.14159 -42 1e10 0x1F",
    "$1,000,000.00 and 50% off!",
    "2024-01-15T10:30:00Z",
    "phone: +1 (555) 123-4567",
    "Hello, world! How are you? I'm fine... really.",
    "\"quoted\" 'single' `backtick` «guillemets» „German“",
    "a--b---c----d",
    "!!!???...,,,;;;:::",
    "(parens) [brackets] {braces} <angles>",
    "email@example.com https://example.org/path?q=1&r=2#frag",
    "#hashtag @mention",
    "zzz",
]

CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT * FROM users WHERE id = 42;",
    "<div class=\"main\">Hello</div>",
    "x = {'a': [1, 2, 3], 'b': None}",
    "if __name__ == \"__main__\":\n\tmain()",
    "lambda x: x ** 2 // 3 % 4",
    "C:\\Users\\name\\file.txt",
]

TASKS = [
    "translate English to German: The house is wonderful.",
    "summarize: studies have shown that owning a dog is good for you",
    "cola sentence: The course is jumping well.",
    "stsb sentence1: The rhino grazed on the grass. sentence2: A rhino is grazing in a field.",
    "question: What is T5? context: T5 is a text-to-text transformer.",
]

LONG = [
    " ".join(["The quick brown fox jumps over the lazy dog."] * 60),
    "word " * 400,
    "x" * 1000,
    "\n".join(f"line {i}: value={i * 7 % 13}" for i in range(120)),
]

CORPUS = SENTINELS + SPECIAL_STRINGS + WHITESPACE + UNICODE + NUMBERS_PUNCTUATION + CODE + TASKS + LONG
