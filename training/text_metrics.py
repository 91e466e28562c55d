"""Answer-text metrics against the reference answer: BLEU-1, ROUGE-L and METEOR (exact-match variant).

Small, dependency-free implementations of the published formulas. METEOR is computed with exact unigram
matching only (no stemming or WordNet synonyms, which need data the node cannot download); on the closed
vocabulary of the model's answers these would change little.
"""

from __future__ import annotations

import math
import re
from collections import Counter


def tokens(text: str) -> list[str]:
    return [t.lower() for t in re.findall(r"\[SEG\]|\w+|[^\w\s]", text)]


def bleu1(candidate: str, reference: str) -> float:
    """Clipped unigram precision times the brevity penalty (Papineni et al. 2002, n = 1)."""
    c, r = tokens(candidate), tokens(reference)
    if not c:
        return 0.0
    matched = sum((Counter(c) & Counter(r)).values())
    brevity = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return brevity * matched / len(c)


def rouge_l(candidate: str, reference: str) -> float:
    """F-measure of the longest common subsequence (Lin 2004, beta = 1)."""
    c, r = tokens(candidate), tokens(reference)
    if not c or not r:
        return float(c == r)
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def meteor(candidate: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR (Banerjee and Lavie 2005, Lavie's default parameters) with exact matches only."""
    c, r = tokens(candidate), tokens(reference)
    if not c or not r:
        return float(c == r)
    alignment = _align(c, r)
    matches = len(alignment)
    if matches == 0:
        return 0.0
    precision, recall = matches / len(c), matches / len(r)
    f_mean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum(1 for (i, j), (k, l) in zip(alignment, alignment[1:]) if not (k == i + 1 and l == j + 1))
    penalty = gamma * (chunks / matches) ** beta
    return f_mean * (1 - penalty)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, start=1):
            current = row[j]
            row[j] = previous + 1 if x == y else max(row[j], row[j - 1])
            previous = current
    return row[-1]


def _align(c: list[str], r: list[str]) -> list[tuple[int, int]]:
    """Exact matches in order, each reference word used once (greedy, left to right)."""
    used: set[int] = set()
    pairs = []
    for i, word in enumerate(c):
        for j, other in enumerate(r):
            if j not in used and other == word:
                used.add(j)
                pairs.append((i, j))
                break
    return sorted(pairs, key=lambda p: p[0])
