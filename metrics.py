"""Scores of PaliGemma's answers, each task by its benchmark's own metric, computed as the
benchmark's script computes it.

A prompt's task (detections.prompt_task) picks its scorers:

    task      metrics                    as computed by
    caption   cider, bleu4               pycocoevalcap (COCO captions), on PTB-tokenized text
    answer    vqa_accuracy, anls         the official VQA evaluation (vqaEval.py), DocVQA's ANLS
              relaxed_accuracy,          where the references are numbers: ChartQA's, TallyQA's
              count_accuracy
    question  vqa_accuracy, anls         as answer (question generation)
    ocr       exact_match, anls, cer     exact text, ANLS, character error rate (jiwer's)
    detect    map50, map50_95, ap50_95   pycocotools' COCOeval (box mAP)
              repeated_boxes, malformed_answers, labels_not_in_prompt, repeated_objects: what the
              answer grammar prevents
    segment   as detect, and miou,       big_vision's RefCOCO evaluator; mask_iou over all objects
              box_acc50, mask_iou        (masks need a VQ-VAE)
    other     exact_match                lower case, no punctuation, no articles

    score            every row scored by its task: {task: {metric: value, "examples": n}}, and
                     each row's own
    flat, format_scores, HEADLINE
                     the scores as "task/metric" numbers, one line, the metric to sort by

Several references per example (VQAv2's ten answers, COCO's five captions) come from a JSONL line's
"answers"; otherwise its "suffix" is the one reference.

What it is not: a place that runs the model (answers.py does). It imports numpy and detections.py
only, so that it can score answers without torch: copy it with detections.py.
"""

import math
import re
import string
from collections import Counter
from typing import NamedTuple

import numpy as np

from detections import TASKS, answer_problems, box_iou, parse_detections, prompt_task


class Row(NamedTuple):
    """One answer to score."""
    prefix: str
    answer: str
    references: list[str]  # the line's "answers", or its suffix
    size: tuple[int, int]  # the image's (width, height), for masks


def score(rows: list[Row], vae=None) -> tuple[dict[str, dict], list[dict]]:
    """Each row scored by its prompt's task: the scores of each task present ({metric: value,
    "examples": n}, in task order), and each row's own scores (for a list of the worst answers)."""
    by_task = {}
    for i, row in enumerate(rows):
        by_task.setdefault(prompt_task(row.prefix), []).append(i)
    summary, each = {}, [{} for _ in rows]
    for task in sorted(by_task, key=TASKS.index):
        indices = by_task[task]
        totals, per_row = SCORERS[task]([rows[i] for i in indices], vae)
        summary[task] = totals | {"examples": len(indices)}
        for i, own in zip(indices, per_row):
            each[i] = own
    return summary, each


def flat(summary: dict[str, dict]) -> dict:
    """{task: {metric: value}} -> {"task/metric": value}: the names of metrics.jsonl, TensorBoard,
    W&B."""
    return {f"{task}/{name}": value
            for task, scores in summary.items() for name, value in scores.items()}


def format_scores(scores: dict) -> str:
    """One line of the numbers, and a line of AP per label for each task that has one."""
    numbers = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in scores.items() if not isinstance(v, dict))
    per_label = [f"\n  {k.replace('ap50_95', 'AP@50:95 per label')}: "
                 + ", ".join(f"{label} {ap:.3f}" for label, ap in v.items())
                 for k, v in scores.items() if isinstance(v, dict) and v]
    return numbers + "".join(per_label)


# ----------------------------------------------------------------------------------------------
# Captions: CIDEr-D and BLEU-4 as pycocoevalcap computes them, on text tokenized as its PTBTokenizer
# (Stanford CoreNLP 3.4.1, `-preserveLines -lowerCase`) tokenizes it, then its punctuation dropped


# pycocoevalcap's list; lower-cased brackets (-lrb-) are not in it, and so they stay
PTB_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
               "-", "--", "...", ";"}
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
PTB_ABBREVIATIONS = {  # words whose final period PTB keeps (its lexer knows more)
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "no", "vs", "etc", "inc", "ltd", "co",
    "corp", "gen", "gov", "sen", "rep", "rev", "ft", "lt", "sgt", "capt", "col", "ave", "blvd",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
PTB_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                   "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me"),
                   "'tis": ("'t", "is"), "'twas": ("'t", "was")}
PTB_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def ptb_tokenize(text: str) -> str:
    """A caption as pycocoevalcap compares it: lower case, PTB's tokens ("man's" -> "man 's",
    "don't" -> "do n't", brackets -> -lrb- ...), its punctuation tokens dropped, joined by single
    spaces."""
    tokens = []
    for word in text.lower().split():
        tokens += _ptb_word(word)
    return " ".join(t for t in tokens if t and t not in PTB_DROPPED)


def _ptb_word(word: str) -> list[str]:
    """PTB's tokens of one whitespace-separated word (lower case)."""
    if word in PTB_SPLIT_WORDS:
        return list(PTB_SPLIT_WORDS[word])
    head, tail = [], []
    while word and (word[0] in "\"`([{$#" or (word[0] == "'" and not re.match(
        r"'(\d0s|n'?|t(is|was))$", word))):
        head.append("``" if word[0] == '"' else PTB_BRACKETS.get(word[0], word[0]))
        word = word[1:]
    while word:
        if m := re.search(r"(\.\.\.|[?!]+|[\"',;:%)\]}`])$", word):
            if m.group(1) == "'" and re.fullmatch(r"'?n'", word):  # rock 'n' roll
                break
            tail.insert(0, "''" if m.group(1) == '"' else PTB_BRACKETS.get(m.group(1), m.group(1)))
            word = word[:m.start()]
        elif word.endswith(".") and not _ptb_abbreviation(word):
            tail.insert(0, ".")
            word = word[:-1]
        else:
            break
    if word in PTB_SPLIT_WORDS:
        return head + list(PTB_SPLIT_WORDS[word]) + tail
    middle = []
    # 1,000 and at&t stay whole
    for part in re.split(r"(--|(?<=\D),|,(?=\D)|[+=]|(?<![a-z])&|&(?![a-z]))", word):
        clitics = []
        while m := PTB_CLITIC.fullmatch(part or ""):  # we'd've -> we 'd 've
            part, clitic = m.groups()
            clitics.insert(0, clitic)
        if m := re.fullmatch(r"(\d[\d:.,]*)(am|pm|a\.m\.|p\.m\.)", part or ""):
            middle += list(m.groups())
        else:
            middle.append(part)
        middle += clitics
    return head + middle + tail


def _ptb_abbreviation(word: str) -> bool:
    """Whether PTB keeps a word's final period: letters with periods (u.s., a.m., e.g.) or a known
    abbreviation (mr., etc.)."""
    initials = re.fullmatch(r"([a-z]\.)+|[a-z]+(\.[a-z]+)+\.", word)
    return bool(initials) or word[:-1] in PTB_ABBREVIATIONS


def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + k])
                   for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_scores(answers: list[str], references: list[list[str]],
                 sigma: float = 6.0) -> list[float]:
    """Each answer's CIDEr-D (Vedantam et al., 2015, as pycocoevalcap's CiderScorer): tf-idf vectors
    of 1- to 4-grams, document frequencies from the references of the set being scored, the answer's
    tf-idf clipped at the reference's, cosine similarity times a Gaussian penalty on the length
    difference (in bigrams, as pycocoevalcap counts it), averaged over n and the references, times
    10."""
    answers = [_ngrams(ptb_tokenize(a).split()) for a in answers]
    references = [[_ngrams(ptb_tokenize(r).split()) for r in refs] for refs in references]
    df = Counter(gram for refs in references for gram in {g for r in refs for g in r})
    log_n = math.log(len(references)) if references else 0.0

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec, norm = [{} for _ in range(4)], [0.0] * 4
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = weight = tf * (log_n - math.log(max(1.0, df[gram])))
            norm[len(gram) - 1] += weight ** 2
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for answer, refs in zip(answers, references):
        vec, norm, length = vector(answer)
        total = np.zeros(4)
        for ref in refs:
            ref_vec, ref_norm, ref_length = vector(ref)
            for n in range(4):
                value = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0)
                            for g, w in vec[n].items())
                if norm[n] != 0 and ref_norm[n] != 0:
                    value /= norm[n] * ref_norm[n]
                total[n] += value * math.exp(-((length - ref_length) ** 2) / (2 * sigma ** 2))
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return scores


def cider(answers: list[str], references: list[list[str]]) -> float:
    """CIDEr-D of a set of captions, each with its references, as pycocoevalcap computes it (the
    mean of cider_scores; one caption alone scores 0, as its n-grams' document frequency is the
    whole set)."""
    return float(np.mean(cider_scores(answers, references))) if answers else 0.0


def bleu_scores(answers: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """BLEU-4 (Papineni et al., 2002) as pycocoevalcap's BleuScorer computes it ("closest" reference
    length): of the whole set, and of each answer alone."""
    tiny, small = 1e-15, 1e-9
    totals, each, test_len, ref_len = np.zeros((2, 4)), [], 0, 0
    for answer, refs in zip(answers, references):
        words, ref_words = ptb_tokenize(answer).split(), [ptb_tokenize(r).split() for r in refs]
        counts, most = _ngrams(words), Counter()
        for r in ref_words:
            most |= _ngrams(r)
        closest = min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        correct, guess = np.zeros(4), np.array([max(0, len(words) - k) for k in range(4)],
                                               dtype=float)
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(most[gram], count)
        totals += (correct, guess)
        test_len, ref_len = test_len + len(words), ref_len + closest
        each.append(_bleu4(correct, guess, len(words), closest, tiny, small))
    return _bleu4(*totals, test_len, ref_len, tiny, small), each


def _bleu4(correct, guess, test_len: int, ref_len: int, tiny: float, small: float) -> float:
    bleu = 1.0
    for c, g in zip(correct, guess):  # in pycocoevalcap's order, for the same rounding
        bleu *= (float(c) + tiny) / (float(g) + small)
    bleu **= 0.25
    ratio = (test_len + tiny) / (ref_len + small)
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


def bleu4(answers: list[str], references: list[list[str]]) -> float:
    """BLEU-4 of a set of captions, each with its references, as pycocoevalcap computes it."""
    return bleu_scores(answers, references)[0]


# ----------------------------------------------------------------------------------------------
# Answers: VQA accuracy (the official VQA evaluation, as big_vision's vqav2 evaluator runs it),
# ANLS, relaxed and counting accuracy, exact match, the character error rate

VQA_PUNCTUATION = [";", "/", "[", "]", "\"", "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                   "@", "`", ",", "?", "!"]
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
               "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_CONTRACTIONS = {  # vqaEval.py's map, words written without their apostrophe
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
COUNT_WORDS = VQA_NUMBERS | {"eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
                             "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
                             "nineteen": "19", "twenty": "20"}


def vqa_normalize(text: str) -> str:
    """vqaEval.py's processPunctuation then processDigitArticle: punctuation deleted (where the text
    has it beside a space, or has a digit,digit pattern) or made a space, periods not followed by a
    digit removed; lower case, number words to digits, articles dropped, contractions given their
    apostrophe."""
    digit_comma = re.search(r"(\d)(,)(\d)", text) is not None
    out = text
    for p in VQA_PUNCTUATION:
        out = out.replace(p, "" if digit_comma or f"{p} " in text or f" {p}" in text else " ")
    # vqaEval.py's pattern, whose look-behind never looks behind
    out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out)
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(answer: str, references: list[str]) -> float:
    """The official VQA accuracy (visualqa.org/evaluation.html): newlines and tabs made spaces;
    answer and references normalised (vqa_normalize) only when the references disagree; then the
    mean, over each reference left out in turn, of min(1, matching others / 3). With one reference,
    whose formula would always give 0, it is exact match after vqa_normalize of both."""
    clean = lambda t: t.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    answer, references = clean(answer), [clean(r) for r in references]
    if len(references) == 1:
        return float(vqa_normalize(answer) == vqa_normalize(references[0]))
    if len(set(references)) > 1:
        answer, references = vqa_normalize(answer), [vqa_normalize(r) for r in references]
    matches = [r == answer for r in references]
    return sum(min(1.0, (sum(matches) - m) / 3) for m in matches) / len(matches)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of characters."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def anls(answer: str, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity (Biten et al., 2019; DocVQA, InfoVQA, ST-VQA), as
    DocVQA's evaluation: lower case, whitespace collapsed; 1 - edit distance / the longer length, 0
    where that is `threshold` or more; the best reference (two empty strings: 1)."""
    clean = lambda t: " ".join(t.strip().lower().split())  # noqa: E731
    answer, best = clean(answer), 0.0
    for reference in map(clean, references):
        longest = max(len(answer), len(reference))
        distance = edit_distance(answer, reference) / longest if longest else 0.0
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def character_error_rate(answer: str, reference: str) -> float:
    """Edit distance / the reference's length, on the text with its outer whitespace stripped
    (jiwer.cer's); an empty reference gives 0 for an empty answer, else 1."""
    answer, reference = answer.strip(), reference.strip()
    if not reference:
        return float(bool(answer))
    return edit_distance(answer, reference) / len(reference)


def to_number(text: str) -> float | None:
    """A reference or answer read as a number, as ChartQA's relaxed accuracy reads it ("12%" is
    0.12)."""
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(answer: str, reference: str, tolerance: float = 0.05) -> float:
    """ChartQA's (Masry et al., 2022): a number within 5% of a non-zero numeric reference, else
    exact."""
    value, target = to_number(answer), to_number(reference)
    if value is not None and target:
        return float(abs(value - target) / abs(target) <= tolerance)
    return float(answer == reference)


def count_accuracy(answer: str, reference: str) -> float:
    """TallyQA's: exact, after number words (up to twenty, and "none") become digits."""
    def digits(text):
        return COUNT_WORDS.get(text.lower(), text)
    return float(digits(answer) == digits(reference))


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(answer: str, references: list[str], normalize=normalize_answer) -> float:
    """1 when the answer equals one of the references after `normalize` (of both), else 0."""
    return float(any(normalize(answer) == normalize(r) for r in references))


# ----------------------------------------------------------------------------------------------
# COCO box mAP

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's, spelled as pycocotools spells them
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def coco_iou(d, g) -> float:
    """IoU of two (x, y, w, h) boxes, in pycocotools' arithmetic (its bbIou), so that ties fall
    alike."""
    w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
    h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (d[2] * d[3] + g[2] * g[3] - w * h)


def coco_matches(detections: list, targets: list) -> np.ndarray:
    """(thresholds, detections) bool: at each IoU threshold, whether each detection (in order) takes
    a target: the one of highest IoU >= the threshold among those not yet taken (a later one on
    ties)."""
    ious = [[coco_iou(d, g) for g in targets] for d in detections]
    matched = np.zeros((len(IOU_THRESHOLDS), len(detections)), dtype=bool)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = [False] * len(targets)
        for i in range(len(detections)):
            best, m = min(threshold, 1 - 1e-10), -1
            for j in range(len(targets)):
                if not taken[j] and ious[i][j] >= best:
                    best, m = ious[i][j], j
            if m >= 0:
                taken[m], matched[t, i] = True, True
    return matched


def labelled_xywh(answer: str) -> list[tuple[tuple, str]]:
    """An answer's boxes as COCO writes them, (x, y, w, h) in units of the image, with their
    labels."""
    return [((d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]), d.label)
            for d in parse_detections(answer, 1, 1)]


def average_precision(matches: list[np.ndarray], n_targets: int) -> np.ndarray:
    """One label's precision (thresholds, recall points) over the images' matches, as COCOeval
    accumulates it: cumulative true and false positives, precision made monotone from the right,
    read at 101 recalls."""
    tp = np.cumsum(np.concatenate(matches, axis=1), axis=1).astype(float)
    fp = np.arange(1, tp.shape[1] + 1) - tp
    q = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
    for t in range(len(IOU_THRESHOLDS)):
        recall, p = tp[t] / n_targets, tp[t] / (fp[t] + tp[t] + np.spacing(1))
        p = np.maximum.accumulate(p[::-1])[::-1]
        at = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
        q[t, at < len(p)] = p[at[at < len(p)]]
    return q


def detection_map(pairs: list[tuple[str, str]]) -> dict:
    """COCO box mAP of detect answers, as pycocotools' COCOeval computes it: pairs are (predicted
    answer, target suffix), one per image. Per label: detections ranked by score (PaliGemma gives
    none, so all score 1 and rank in the order of the images, then of the boxes within an answer),
    at most 100 per image; a detection takes an unmatched target of the same label at IoU >= the
    threshold, or is a false positive (a repeated box too); precision made monotone and read at 101
    recall points, for IoU thresholds 0.50:0.05:0.95. Labels without targets are left out of the
    means, as in COCO. Returns map50, map50_95 (-1 without any target, as pycocotools) and ap50_95
    per label."""
    per_label = {}  # label -> [matches of each image, number of targets]
    for predicted, target in pairs:
        detections, targets = labelled_xywh(predicted), labelled_xywh(target)
        for label in dict.fromkeys([label for _, label in targets + detections]):
            mine = [box for box, other in detections if other == label][:100]
            theirs = [box for box, other in targets if other == label]
            entry = per_label.setdefault(label, [[], 0])
            entry[0].append(coco_matches(mine, theirs))
            entry[1] += len(theirs)
    precision = {label: average_precision(matches, n)
                 for label, (matches, n) in per_label.items() if n}
    if not precision:
        return dict(map50=-1.0, map50_95=-1.0, ap50_95={})
    every = np.stack(list(precision.values()))  # (labels, thresholds, recall points)
    return dict(map50=float(every[:, 0].mean()), map50_95=float(every.mean()),
                ap50_95={label: float(q.mean()) for label, q in sorted(precision.items())})


# ----------------------------------------------------------------------------------------------
# Masks, repeated boxes


def mask_iou(predicted: str, target: str, width: int, height: int, vae) -> float:
    """IoU of the union of an answer's masks with the union of the target's (decoded by the VQ-VAE
    too)."""
    def union(text):
        masks = np.zeros((height, width), dtype=bool)
        for d in parse_detections(text, width, height, vae):
            if d.mask is not None:
                masks |= d.mask
        return masks
    p, t = union(predicted), union(target)
    return float((p & t).sum() / max((p | t).sum(), 1))


def referring_iou(predicted: str, target: str, width: int, height: int,
                  vae=None) -> tuple[float, float] | None:
    """big_vision's RefCOCO scores of one answer: the IoU of its first object's box with the
    target's (the best of the target's boxes, where it has several), and of the first object's mask
    with the target's (all its objects' masks; None without a VQ-VAE). None for an answer without a
    whole first object (an "invalid" answer, which scores 0)."""
    objects = parse_detections(predicted, width, height, vae)
    if not objects or objects[0].codes is None:
        return None
    first, targets = objects[0], parse_detections(target, width, height, vae)
    yxyx = lambda box: (box[1], box[0], box[3], box[2])  # noqa: E731
    box = max((box_iou(yxyx(first.box), yxyx(t.box)) for t in targets), default=0.0)
    if vae is None:
        return box, None
    truth = np.zeros((height, width), dtype=bool)
    for t in targets:
        if t.mask is not None:
            truth |= t.mask
    union = (first.mask | truth).sum()
    return box, float((first.mask & truth).sum() / union) if union else 0.0


def repeated_boxes(answer: str) -> int:
    """Boxes an answer writes again (the same box and label): each is a false positive for mAP."""
    found = [(d.box, d.label) for d in parse_detections(answer, 1, 1)]
    return len(found) - len(set(found))


# ----------------------------------------------------------------------------------------------
# The scorers of each task: (rows) -> (the set's scores, each row's scores)


def score_captions(rows: list[Row], vae=None) -> tuple[dict, list[dict]]:
    answers, references = [r.answer for r in rows], [r.references for r in rows]
    each_cider = cider_scores(answers, references)
    total_bleu, each_bleu = bleu_scores(answers, references)
    return (dict(cider=float(np.mean(each_cider)), bleu4=total_bleu),
            [dict(cider=c, bleu4=b) for c, b in zip(each_cider, each_bleu)])


def score_answers(rows: list[Row], vae=None) -> tuple[dict, list[dict]]:
    """VQA accuracy and ANLS of every answer; relaxed accuracy where the first reference is a
    number, counting accuracy where it is a count (a whole number >= 0 or a number word)."""
    each = [dict(vqa_accuracy=vqa_accuracy(r.answer, r.references),
                 anls=anls(r.answer, r.references))
            for r in rows]
    for row, own in zip(rows, each):
        reference = row.references[0]
        if to_number(reference) is not None:
            own["relaxed_accuracy"] = relaxed_accuracy(row.answer, reference)
        if reference.isdigit() or reference.lower() in COUNT_WORDS:
            own["count_accuracy"] = count_accuracy(row.answer, reference)
    return _means(each), each


def score_ocr(rows: list[Row], vae=None) -> tuple[dict, list[dict]]:
    """Exact match (whitespace collapsed, nothing else), ANLS, and the character error rate of each
    answer against the first reference; the set's CER is jiwer's: all edits over all reference
    characters."""
    collapse = lambda t: " ".join(t.split())  # noqa: E731
    each = [dict(exact_match=exact_match(r.answer, r.references, collapse),
                 anls=anls(r.answer, r.references),
                 cer=character_error_rate(r.answer, r.references[0])) for r in rows]
    edits = sum(edit_distance(r.answer.strip(), r.references[0].strip()) for r in rows)
    characters = sum(len(r.references[0].strip()) for r in rows)
    return _means(each) | dict(cer=edits / characters if characters else _means(each)["cer"]), each


def score_detections(rows: list[Row], vae=None) -> tuple[dict, list[dict]]:
    """COCO box mAP over the set (and each answer's own, for sorting), repeated boxes, and what the
    answer grammar prevents."""
    pairs = [(r.answer, r.references[0]) for r in rows]
    totals = detection_map(pairs) | dict(repeated_boxes=sum(repeated_boxes(a) for a, _ in pairs))
    problems = [answer_problems(r.answer, r.prefix) for r in rows]
    totals |= {"malformed_answers" if k == "malformed" else k: sum(p[k] for p in problems)
               for k in problems[0]}
    each = []
    for pair in pairs:
        alone = detection_map([pair])["map50"]
        each.append(dict(map50=alone if alone >= 0 else float(not parse_detections(pair[0], 1, 1))))
    return totals, each


def score_segments(rows: list[Row], vae=None) -> tuple[dict, list[dict]]:
    """As detect, and big_vision's RefCOCO scores: box accuracy at IoU 0.5 of the first object and,
    with a VQ-VAE, the mean IoU of the first object's mask (invalid answers score 0) and mask_iou
    (all objects)."""
    totals, each = score_detections(rows, vae)
    found = [referring_iou(r.answer, r.references[0], *r.size, vae) for r in rows]
    for row, own, scores in zip(rows, each, found):
        own["box_acc50"] = float(scores is not None and scores[0] >= 0.5)
        if vae is not None:
            own["miou"] = scores[1] if scores else 0.0
            own["mask_iou"] = mask_iou(row.answer, row.references[0], *row.size, vae)
    totals["invalid"] = sum(scores is None for scores in found)
    return totals | _means(each, ("box_acc50", "miou", "mask_iou")), each


def score_other(rows: list[Row], vae=None) -> tuple[dict, list[dict]]:
    each = [dict(exact_match=exact_match(r.answer, r.references)) for r in rows]
    return _means(each), each


def _means(each: list[dict], names=None) -> dict:
    """The mean of each metric over the rows that have it, in the order they first appear."""
    names = names or dict.fromkeys(k for own in each for k in own)
    means = {}
    for name in names:
        values = [own[name] for own in each if name in own]
        if values:
            means[name] = sum(values) / len(values)
    return means


SCORERS = dict(caption=score_captions, answer=score_answers, question=score_answers, ocr=score_ocr,
               detect=score_detections, segment=score_segments, other=score_other)
# each task's score that lists the worst answers first
HEADLINE = dict(caption="cider", answer="vqa_accuracy", question="vqa_accuracy", ocr="anls",
                detect="map50", segment="map50", other="exact_match")
