"""
Grading answers (sample.py's accuracy column): the answer in a text, a canonical form to compare
answers by, and the estimates over k samples per prompt (mean accuracy, majority vote, pass@k).

    same_answer("... The answer is 1,458.", "... #### 1458")   # (graded, correct): (True, True)
"""

import math
import re
from collections import Counter


def boxed(text):
    """The contents of the last \\boxed{...} (or \\fbox{...}) in text, nested braces included; None
    if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    i = text.find("{", start) if start >= 0 else -1
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text, pattern=""):
    """The answer in a text: answer_regex's group 1; else the last \\boxed{..}; else what follows
    "The answer is"; else what follows "####" (GSM8K); else the last number."""
    if pattern:
        m = re.search(pattern, text)
        return m.group(1).strip() if m else None
    found = boxed(text)
    if found is not None:
        return found.strip()
    for rule in (r"The answer is[:\s]*([^\n]*?)\.?\s*$", r"####\s*(.+?)\s*$"):
        m = re.search(rule, text.strip(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].rstrip(".") if numbers else None


def normalize_answer(answer):
    """A canonical form for comparing answers: no surrounding $ or spaces, \\text{..} and
    \\left/\\right unwrapped, \\dfrac as \\frac, a trailing period dropped, numbers as numbers
    (1,234 -> 1234, 1.0 -> 1)."""
    if answer is None:
        return None
    a = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer.strip().strip("$").strip())
    a = re.sub(r"\\(left|right|!|,|;)", "", a)
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    a = re.sub(r"\^\{?\\circ\}?", "", a).replace(" ", "").rstrip(".")
    number = a.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a) else a
    try:
        value = float(number)
        return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)
    except (ValueError, OverflowError):
        return a


def same_answer(text, target, pattern=""):
    """(graded, correct): whether the target has an answer, and whether text's answer equals it."""
    want = normalize_answer(extract_answer(target, pattern))
    if want is None:
        return False, False
    return True, normalize_answer(extract_answer(text, pattern)) == want


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(texts, target, pattern=""):
    """Whether the most common normalised answer among texts (ties: the first seen) is right."""
    answers = [normalize_answer(extract_answer(t, pattern)) for t in texts]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    return same_answer(max(votes, key=lambda a: (votes[a], -answers.index(a))), target, pattern)[1]


def grade(texts, target, pattern=""):
    """The scores of k answers (texts) to one prompt with a reference answer (target): None when
    the target has no answer; else {"right": how many are correct, "majority": whether the
    majority vote is}."""
    if not same_answer("", target, pattern)[0]:
        return None
    right = sum(same_answer(t, target, pattern)[1] for t in texts)
    return {"right": right, "majority": majority_correct(texts, target, pattern)}


def accuracy(texts, targets, k, pattern=""):
    """The summary's accuracy columns: texts {j: answer j's text}, answer j being answer j % k of
    prompt j // k, whose reference answer is targets[j // k] (None: ungraded). Mean accuracy over
    the graded prompts' answers, and with k > 1 maj@k and pass@k; {} when nothing is graded."""
    graded = [grade([texts[i * k + s] for s in range(k)], target, pattern)
              for i, target in enumerate(targets) if target is not None]
    graded = [g for g in graded if g is not None]
    if not graded:
        return {}
    row = {"accuracy": sum(g["right"] for g in graded) / (k * len(graded))}
    if k > 1:
        row[f"maj@{k}"] = sum(g["majority"] for g in graded) / len(graded)
        row[f"pass@{k}"] = sum(pass_at_k(k, g["right"], k) for g in graded) / len(graded)
    return row
