"""Chinese ROUGE: jieba words, no deleted characters, hand-computed values."""

import pytest

from glm_session.evaluation.rouge import RougeByTurn, chinese_rouge, jieba_words


def f(metric, prediction, reference, key):
    return metric([prediction], [reference])[f"{key}_fmeasure"].item()


def test_jieba_words():
    assert jieba_words("今天天气很好") == ["今天天气", "很", "好"]
    assert jieba_words("今天天气不错") == ["今天天气", "不错"]


def test_hand_computed_scores():
    # One shared word of 3 predicted and 2 reference words: P 1/3, R 1/2, F = 2PR/(P+R) = 0.4; no shared bigram.
    assert f(chinese_rouge(), "今天天气很好", "今天天气不错", "rouge1") == pytest.approx(0.4)
    assert f(chinese_rouge(), "今天天气很好", "今天天气不错", "rouge2") == 0.0
    assert f(chinese_rouge(), "今天天气很好", "今天天气不错", "rougeL") == pytest.approx(0.4)
    # 我/喜欢/猫 vs 他/讨厌/狗: nothing shared, 0 (not the 1.0 of a normaliser that deletes Chinese).
    assert f(chinese_rouge(), "我喜欢猫", "他讨厌狗", "rouge1") == 0.0
    # 我/喜欢/猫 vs 我/喜欢/狗: 2 of 3 words, and the bigram 我喜欢: R1 = 2/3, R2 = 1/2, RL = 2/3.
    assert f(chinese_rouge(), "我喜欢猫", "我喜欢狗", "rouge1") == pytest.approx(2 / 3)
    assert f(chinese_rouge(), "我喜欢猫", "我喜欢狗", "rouge2") == pytest.approx(1 / 2)
    assert f(chinese_rouge(), "我喜欢猫", "我喜欢狗", "rougeL") == pytest.approx(2 / 3)


def test_empty_prediction_scores_zero():
    assert f(chinese_rouge(), "", "今天天气不错", "rouge1") == 0.0


def test_by_turn_is_x100_and_averages_pairs():
    rouge = RougeByTurn()
    rouge.update(["今天天气很好", "我喜欢猫", ""], ["今天天气不错", "我喜欢狗", "你好"], [1, 2, 2])
    scores = rouge.compute()
    assert scores["by_turn"][1]["rouge1"] == pytest.approx(40.0)
    assert scores["by_turn"][2]["rouge1"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert scores["overall"]["rouge1"] == pytest.approx(100 * (0.4 + 2 / 3 + 0) / 3)
