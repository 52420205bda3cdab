"""Evaluation: prompts are the template's inference prompts, batched generation equals one-by-one generation,
and a training checkpoint evaluates end to end."""

import json

import torch
from transformers import GlmForCausalLM

from glm_session.config import compose_config
from glm_session.data import CHATGLM2
from glm_session.data.samples import SegmentEncoder
from glm_session.evaluate import evaluate
from glm_session.evaluation.generation import build_prompts, generate_answers
from glm_session.model import chatglm2_config, padded_vocab_size
from glm_session.train import train


def test_prompts_are_the_template_prompts(tokenizer, three_turns):
    prompts, skipped = build_prompts([three_turns], CHATGLM2, tokenizer, max_prompt_tokens=1000)
    assert [p.turn for p in prompts] == [1, 2, 3] and skipped == 0
    assert (
        prompts[2].text
        == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：你知道\n\n答：知道呀\n\n[Round 3]\n\n问：谢谢\n\n答："
    )
    encode = SegmentEncoder(tokenizer)
    assert prompts[2].ids == [i for s in CHATGLM2.render_prompt("谢谢", three_turns.turns[:2]) for i in encode(s)]
    assert prompts[2].reference == "不客气"
    short, _ = build_prompts([three_turns], CHATGLM2, tokenizer, max_prompt_tokens=40)
    assert short[2].dropped_history_turns == 1 and short[2].text.startswith("[Round 1]\n\n问：你知道")


def test_batched_generation_equals_one_by_one(tokenizer, three_turns):
    torch.manual_seed(0)
    model = GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    prompts, _ = build_prompts([three_turns], CHATGLM2, tokenizer, max_prompt_tokens=1000)
    batched = generate_answers(model, prompts, tokenizer, batch_size=3, max_new_tokens=6)
    alone = [generate_answers(model, [p], tokenizer, batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and all(batched)


def test_evaluate_a_training_checkpoint(tmp_path, cache_dir):
    run = tmp_path / "run"
    fast = [
        "model=chatglm2-tiny",
        "data.limit=4",
        "trainer.max_steps=2",
        "trainer.limit_train_batches=1.0",
        "trainer.enable_progress_bar=false",
        f"data.cache_dir={cache_dir}",
    ]
    train(compose_config("train", [*fast, f"output_dir={run}"]))
    out = tmp_path / "eval"
    cfg = compose_config(
        "evaluate",
        [
            f"ckpt_path={run}/checkpoints/last.ckpt",
            "limit=2",
            "generation.max_new_tokens=4",
            f"output_dir={out}",
            f"data.cache_dir={cache_dir}",
        ],
    )
    metrics = evaluate(cfg)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["prompts"] > 10
    assert set(predictions[0]) == {"session_id", "turn", "prompt", "reference", "prediction"}
    assert metrics["template"] == "chatglm2"
    assert set(metrics["rouge"]) == {"rouge1", "rouge2", "rougeL"}
    assert set(metrics["rouge_by_turn"]) == {p["turn"] for p in predictions}
    assert set(metrics["teacher_forced"]["loss_by_turn"]) == set(metrics["rouge_by_turn"])
    assert json.loads((out / "metrics.json").read_text())["prompts"] == metrics["prompts"]
