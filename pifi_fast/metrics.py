"""Task metrics: accuracy, F1, Matthews correlation (CoLA), QA exact match / F1, BLEU."""
from __future__ import annotations

import collections
import math
import re
import string


def accuracy(pred, gold) -> float:
    return sum(int(p == g) for p, g in zip(pred, gold)) / max(1, len(gold))


def f1_binary(pred, gold, positive=1) -> float:
    tp = sum(1 for p, g in zip(pred, gold) if p == positive and g == positive)
    fp = sum(1 for p, g in zip(pred, gold) if p == positive and g != positive)
    fn = sum(1 for p, g in zip(pred, gold) if p != positive and g == positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1_macro(pred, gold) -> float:
    classes = sorted(set(gold) | set(pred))
    return sum(f1_binary(pred, gold, c) for c in classes) / max(1, len(classes))


def matthews_corrcoef(pred, gold) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); binary case is the usual MCC."""
    classes = sorted(set(gold) | set(pred))
    idx = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    conf = [[0] * k for _ in range(k)]
    for p, g in zip(pred, gold):
        conf[idx[g]][idx[p]] += 1
    t = [sum(row) for row in conf]  # true counts per class
    p_ = [sum(conf[i][j] for i in range(k)) for j in range(k)]  # predicted counts
    c = sum(conf[i][i] for i in range(k))
    s = sum(t)
    num = c * s - sum(pk * tk for pk, tk in zip(p_, t))
    den = math.sqrt((s * s - sum(x * x for x in p_)) * (s * s - sum(x * x for x in t)))
    return 0.0 if den == 0 else num / den


def classification_metrics(pred, gold) -> dict:
    out = {"accuracy": accuracy(pred, gold), "mcc": matthews_corrcoef(pred, gold),
           "f1_macro": f1_macro(pred, gold)}
    if set(gold) <= {0, 1}:
        out["f1"] = f1_binary(pred, gold)
    return out


def _normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_metrics(pred_texts, gold_texts) -> dict:
    """SQuAD exact match and token F1 (gold_texts: a list of acceptable answers per item)."""
    em = f1 = 0.0
    for pred, golds in zip(pred_texts, gold_texts):
        golds = golds if isinstance(golds, (list, tuple)) else [golds]
        p_norm = _normalize_answer(pred)
        em += max(float(p_norm == _normalize_answer(g)) for g in golds)
        best = 0.0
        for g in golds:
            p_tok, g_tok = p_norm.split(), _normalize_answer(g).split()
            common = collections.Counter(p_tok) & collections.Counter(g_tok)
            same = sum(common.values())
            if same:
                prec, rec = same / len(p_tok), same / len(g_tok)
                best = max(best, 2 * prec * rec / (prec + rec))
        f1 += best
    n = max(1, len(pred_texts))
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n}


def bleu(hypotheses, references) -> dict:
    import sacrebleu  # deferred: sacrebleu is optional (the train extra), for seq2seq only

    return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score}
