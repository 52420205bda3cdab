"""The fixed-answer references beside every generation metric (glm_session/evaluation/references.py)."""

from glm_session.evaluation.references import fixed_answers, generation_scores


def test_generation_scores_of_exact_answers_are_100_and_of_unrelated_ones_0():
    exact = generation_scores([{"prediction": "你好，世界", "reference": "你好，世界", "turn": 1}])
    assert exact["chatglm2_official"]["rouge-1"] == 100.0 and exact["chatglm2_official"]["bleu-4"] == 100.0
    unrelated = generation_scores([{"prediction": "天气", "reference": "电影", "turn": 1}])
    assert unrelated["chatglm2_official"]["rouge-1"] == 0.0
    assert exact["prediction_chars_mean"] == 5.0 and unrelated["reference_chars_mean"] == 2.0


def test_fixed_answers_are_the_most_frequent_training_answer_and_the_question():
    # KdConv's training split answers "不客气！" 19 times, more than any other answer; test session
    # kdconv-film-dev-009 opens with "你知道艾玛·斯通吗？".
    prompts = [{"session_id": "kdconv-film-dev-009", "turn": 1, "reference": "你知道艾玛·斯通吗？"},
               {"session_id": "kdconv-film-dev-009", "turn": 2, "reference": "不客气！"}]  # fmt: skip
    scores = fixed_answers([], prompts)  # the bundled KdConv (data=kdconv)
    frequent, copy = scores["most_frequent_answer"], scores["question_copy"]
    assert frequent["answer"] == "不客气！" and frequent["count_in_training"] == 19
    assert frequent["rouge"] == generation_scores([{**prompts[0], "prediction": "不客气！"},
                                                   {**prompts[1], "prediction": "不客气！"}])["rouge"]  # fmt: skip
    # each fixed answer is exact on one pair (the question copied on turn 1, the frequent answer on turn 2) and
    # shares no word with the other
    assert copy["chatglm2_official"]["rouge-1"] == 50.0
    assert frequent["chatglm2_official"]["rouge-1"] == 50.0
