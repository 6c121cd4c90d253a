"""Metrics against values derived by hand from the original ChatGLM-6B definitions.

Conventions used in the derivations below:

* ROUGE (``rouge_chinese``): n-grams are counted as *sets* (each distinct n-gram once).
  P = overlap / #hyp n-grams, R = overlap / #ref n-grams, F = 2PR / (P + R + 1e-8).
  ROUGE-L: P = LCS / #hyp words, R = LCS / #ref words, same F. Then x 100, rounded to 4 decimals.
  The 1e-8 only moves the 7th decimal or later, e.g. F = 1 gives 99.9999995 -> 100.0.
* BLEU-4 (nltk, character level): p_n = clipped matching n-grams / max(1, #hyp n-grams);
  method3 replaces the k-th zero numerator (k = 1, 2, ...) by p_n = 1 / (2^k * denominator);
  BP = 1 if c > r, else exp(1 - r / c) (c, r: hypothesis and reference lengths);
  BLEU = BP * (p_1 p_2 p_3 p_4)^(1/4), x 100, rounded to 4 decimals.
"""

import subprocess
import sys

import jieba
import pytest

from ptuning.evaluation.metrics import compute_metrics, score_sample

ZERO = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_jieba_segmentation_used_below():
    # The ROUGE derivations depend on these word splits.
    assert jieba.lcut("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert jieba.lcut("天安门我爱北京") == ["天安门", "我", "爱", "北京"]
    assert jieba.lcut("北京北京北京") == ["北京", "北京", "北京"]
    # Spaces come back as words of their own; Rouge re-splits on whitespace, so they vanish.
    assert jieba.lcut("the cat") == ["the", " ", "cat"]
    assert jieba.lcut("hello") == ["hello"]


def test_identical_prediction_scores_100():
    # ROUGE: every set of n-grams matches, P = R = 1, F = 2 / (2 + 1e-8) -> 99.9999995 -> 100.0.
    # BLEU: 7 characters; p_1..p_4 = 7/7, 6/6, 5/5, 4/4, BP = exp(1 - 7/7) = 1 -> 100.
    assert score_sample("我爱北京天安门", "我爱北京天安门") == {
        "bleu-4": 100.0,
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
    }


def test_identical_single_character_is_not_100():
    # The original's definitions, kept as they are, do not give 100 to a one-word, one-character match.
    # BLEU: p_1 = 1/1; no 2/3/4-grams exist, so each is 0 / max(1, 0) and method3 makes them
    #   1/2, 1/4, 1/8. BLEU = (1 * 1/2 * 1/4 * 1/8)^(1/4) = 2^(-6/4) = 0.35355339 -> 35.3553.
    # ROUGE-1: {好} vs {好}: F -> 100.0. ROUGE-2: the hypothesis has no bigram, P = R = 0 -> 0.
    # ROUGE-L: LCS 1 of 1 word -> 100.0.
    assert score_sample("好", "好") == {"bleu-4": 35.3553, "rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0}


def test_english_pair_the_bat_vs_the_cat():
    # BLEU over characters, prediction "the bat" (7), reference "the cat" (7):
    #   1-grams t,h,e,' ',b,a,t: all but b are in the reference (t twice in both) -> p_1 = 6/7
    #   2-grams th,he,"e "," b",ba,at: th,he,"e ",at match -> p_2 = 4/6
    #   3-grams the,"he ","e b"," ba",bat: the,"he " match -> p_3 = 2/5
    #   4-grams "the ","he b","e ba"," bat": "the " matches -> p_4 = 1/4
    #   BP = exp(1 - 7/7) = 1; BLEU = (6/7 * 4/6 * 2/5 * 1/4)^(1/4) = (2/35)^(1/4)
    #   2/35 = 0.057142857; sqrt = 0.239045722; sqrt = 0.488923022 -> 48.8923.
    # ROUGE words [the, bat] vs [the, cat]:
    #   ROUGE-1: overlap {the}, P = R = 1/2, F = 0.5 / (1 + 1e-8) -> 49.9999995 -> 50.0
    #   ROUGE-2: {the bat} vs {the cat}, no overlap -> 0
    #   ROUGE-L: LCS [the] = 1, P = R = 1/2 -> 50.0
    assert score_sample("the bat", "the cat") == {
        "bleu-4": 48.8923,
        "rouge-1": 50.0,
        "rouge-2": 0.0,
        "rouge-l": 50.0,
    }


def test_english_brevity_penalty_and_one_smoothed_order():
    # Prediction "help" (4 characters), reference "hello" (5):
    #   p_1: h,e,l match, p does not -> 3/4;  p_2: he,el match, lp not -> 2/3
    #   p_3: hel matches, elp not -> 1/2;     p_4: help not -> 0/1, method3 k=1 -> 1/(2*1) = 1/2
    #   BP = exp(1 - 5/4) = exp(-0.25) (the prediction is shorter)
    #   BLEU = exp(-0.25) * (3/4 * 2/3 * 1/2 * 1/2)^(1/4) = exp(-0.25) * 2^(-3/4)
    #        = exp(-0.25 - 0.75 * 0.693147181) = exp(-0.769860386) = 0.463077716 -> 46.3078
    # ROUGE: one word each, "help" vs "hello", nothing in common -> 0.
    assert score_sample("help", "hello") == {
        "bleu-4": 46.3078,
        "rouge-1": 0.0,
        "rouge-2": 0.0,
        "rouge-l": 0.0,
    }


def test_english_two_smoothed_orders_and_short_hypothesis():
    # Prediction "tac", reference "cat" (3 characters each, BP = 1):
    #   p_1: t,a,c all match -> 3/3
    #   p_2: ta,ac vs ca,at -> 0/2, method3 k=1 -> 1/(2*2) = 1/4
    #   p_3: tac vs cat -> 0/1, k=2 -> 1/(4*1) = 1/4
    #   p_4: no 4-gram in 3 characters, 0 / max(1, 0), k=3 -> 1/(8*1) = 1/8
    #   BLEU = (1 * 1/4 * 1/4 * 1/8)^(1/4) = 2^(-7/4) = 0.297301779 -> 29.7302
    assert score_sample("tac", "cat")["bleu-4"] == 29.7302


def test_chinese_reordered_pair():
    # Words: hypothesis [天安门, 我, 爱, 北京], reference [我, 爱, 北京, 天安门].
    #   ROUGE-1: the same 4 distinct words, P = R = 1 -> 100.0
    #   ROUGE-2: {天安门我, 我爱, 爱北京} vs {我爱, 爱北京, 北京天安门}: overlap 2,
    #            P = R = 2/3, F = 2/3 -> 66.6666662 -> 66.6667
    #   ROUGE-L: LCS [我, 爱, 北京] = 3, P = R = 3/4 -> 74.9999995 -> 75.0
    # BLEU over 7 characters each, BP = 1:
    #   p_1 = 7/7 (the same characters)
    #   p_2: 天安,安门,门我,我爱,爱北,北京 -> all but 门我 -> 5/6
    #   p_3: 天安门,安门我,门我爱,我爱北,爱北京 -> 天安门,我爱北,爱北京 -> 3/5
    #   p_4: 天安门我,安门我爱,门我爱北,我爱北京 -> 我爱北京 -> 1/4
    #   BLEU = (1 * 5/6 * 3/5 * 1/4)^(1/4) = (1/8)^(1/4) = 0.594603558 -> 59.4604
    assert score_sample("天安门我爱北京", "我爱北京天安门") == {
        "bleu-4": 59.4604,
        "rouge-1": 100.0,
        "rouge-2": 66.6667,
        "rouge-l": 75.0,
    }


def test_chinese_repeated_words_use_distinct_ngrams_and_clipping():
    # Words: hypothesis [北京, 北京, 北京], reference [我, 爱, 北京, 天安门].
    #   ROUGE-1: sets {北京} vs 4 words: overlap 1, P = 1/1, R = 1/4,
    #            F = 2 * 1/4 / (5/4) = 0.4 -> 40.0 (counting repeats would give P = 1/3 instead)
    #   ROUGE-2: {北京北京} vs the reference bigrams: no overlap -> 0
    #   ROUGE-L: LCS [北京] = 1, P = 1/3, R = 1/4, F = 2 * (1/12) / (7/12) = 2/7 -> 28.5714
    # BLEU, hypothesis 北京北京北京 (6 characters), reference 我爱北京天安门 (7):
    #   p_1: 北 x3 and 京 x3, each clipped to 1 -> 2/6 = 1/3
    #   p_2: 北京 x3 clipped to 1, 京北 x2 absent -> 1/5
    #   p_3: 4 trigrams, none match -> k=1 -> 1/(2*4) = 1/8
    #   p_4: 3 four-grams, none match -> k=2 -> 1/(4*3) = 1/12
    #   BP = exp(1 - 7/6) = exp(-1/6)
    #   BLEU = exp(-1/6) * (1/1440)^(1/4); ln 1440 = 7.272398, /4 = 1.818100, + 1/6 = 1.984766
    #        exp(-1.984766) = 0.137413 -> 13.7413
    assert score_sample("北京北京北京", "我爱北京天安门") == {
        "bleu-4": 13.7413,
        "rouge-1": 40.0,
        "rouge-2": 0.0,
        "rouge-l": 28.5714,
    }


def test_empty_prediction_scores_zero_and_is_counted():
    # The original crashed in rouge_chinese ("Hypothesis is empty.") on an empty prediction.
    result = compute_metrics([""], ["我爱北京天安门"])
    assert result == {**ZERO, "num_samples": 1, "num_empty_predictions": 1}


def test_whitespace_prediction_scores_zero_even_where_bleu_would_not():
    # Left to nltk, " " against "the cat" would score: p_1 = 1/1 (the space matches), p_2..p_4
    # smoothed to 1/2, 1/4, 1/8, BP = exp(1 - 7/1) = 0.00248, BLEU = 0.00248 * 2^(-6/4) -> 0.0876;
    # a blank answer must score 0.
    result = compute_metrics([" ", "\n\t\u3000"], ["the cat", "我爱北京天安门"])
    assert result == {**ZERO, "num_samples": 2, "num_empty_predictions": 2}


def test_blank_reference_scores_zero_without_counting_as_empty_prediction():
    result = compute_metrics(["the cat", "the cat"], ["", "  "])
    assert result == {**ZERO, "num_samples": 2, "num_empty_predictions": 0}


def test_average_over_samples_of_per_sample_rounded_scores():
    predictions = ["the bat", "我爱北京天安门", "", "help"]
    references = ["the cat", "我爱北京天安门", "anything", "hello"]
    result = compute_metrics(predictions, references)
    # Per sample (derived in the tests above): the bat 48.8923/50/0/50, identical 100/100/100/100,
    # empty 0/0/0/0, help 46.3078/0/0/0.
    # BLEU mean of the rounded values: (48.8923 + 100 + 0 + 46.3078) / 4 = 195.2001 / 4 = 48.800025.
    # Averaging the unrounded 48.89230224 and 46.30777162 would give 48.80001847 instead.
    assert result["bleu-4"] == pytest.approx(48.800025, abs=1e-9)
    assert result["rouge-1"] == pytest.approx((50 + 100 + 0 + 0) / 4, abs=1e-9)  # 37.5
    assert result["rouge-2"] == pytest.approx((0 + 100 + 0 + 0) / 4, abs=1e-9)  # 25.0
    assert result["rouge-l"] == pytest.approx((50 + 100 + 0 + 0) / 4, abs=1e-9)  # 37.5
    assert result["num_samples"] == 4
    assert result["num_empty_predictions"] == 1
    assert all(type(result[name]) is float for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"))


def test_long_identical_texts_do_not_hit_the_recursion_limit():
    # 1,100 words is past Python's default recursion limit of 1,000, which a recursive LCS would hit.
    text = " ".join(f"w{i}" for i in range(1100))
    assert score_sample(text, text) == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


def test_mismatched_lengths_name_both():
    with pytest.raises(ValueError, match="3 predictions and 2 references"):
        compute_metrics(["a", "b", "c"], ["a", "b"])


def test_no_samples_is_an_error_not_nan():
    with pytest.raises(ValueError, match="no samples"):
        compute_metrics([], [])


def test_jieba_initialises_without_writing_to_stderr():
    # A fresh interpreter, so jieba has not been initialised by another test.
    code = "from ptuning.evaluation.metrics import compute_metrics; print(compute_metrics(['你好'], ['你好'])['rouge-1'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "100.0"
    assert proc.stderr == ""
