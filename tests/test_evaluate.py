"""Evaluation: prompts are the template's inference prompts, batched generation equals one-by-one generation,
and a training checkpoint evaluates end to end."""

import json
import re

import pytest
import torch
from transformers import GlmForCausalLM

from glm_session.config import RESOURCES_DIR, compose_config
from glm_session.data import CHATGLM2, DialogueDataModule, Session, Turn
from glm_session.data.readers import read_sessions
from glm_session.data.samples import SegmentEncoder
from glm_session.errors import ConfigError
from glm_session.evaluate import evaluate
from glm_session.evaluation.evaluator import answer_token_losses, sample_sessions
from glm_session.evaluation.generation import build_prompts, generate_answers
from glm_session.evaluation.official import official_scores, pair_scores
from glm_session.evaluation.rouge import RougeByTurn
from glm_session.model import ChatGLM2Module, chatglm2_config, padded_vocab_size
from glm_session.model.loss import token_losses
from glm_session.supervision import supervised
from glm_session.train import train

KDCONV_TEST = RESOURCES_DIR / "kdconv" / "test.jsonl"


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
    # The loss covers the whole split (teacher-forced, cheap); generation the sampled sessions.
    assert set(metrics["teacher_forced"]["loss_by_turn"]) >= set(metrics["rouge_by_turn"])
    assert (
        metrics["teacher_forced"]["sessions"] == metrics["sessions"] == 90 and metrics["generated_sessions"] == 2
    )
    losses = json.loads((out / "test_losses.json").read_text())
    assert len(losses) == 90
    tokens = sum(count for turns in losses.values() for _, count in turns.values())
    assert tokens == metrics["teacher_forced"]["tokens"]
    assert set(metrics["chatglm2_official"]) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "empty_predictions"}
    assert json.loads((out / "metrics.json").read_text())["prompts"] == metrics["prompts"]
    assert set(metrics["seconds"]) == {"generation", "scoring", "teacher_forced"}
    assert all(seconds > 0 for seconds in metrics["seconds"].values())


QUESTION = (
    "请问你能不能详细地告诉我这部电影的导演、主演、上映时间以及它在国内外获得过哪些重要的奖项？"  # 23 tokens
)


def test_a_question_that_does_not_fit_is_skipped_and_counted_never_cut(tokenizer):
    session = Session("s", (Turn("你好", "你好！"), Turn(QUESTION, "可以。"), Turn("谢谢", "不客气")))
    # Turn 2's prompt alone takes 38 tokens: in a budget of 30 it is skipped; turn 3 drops its two history turns.
    prompts, skipped = build_prompts([session], CHATGLM2, tokenizer, max_prompt_tokens=30)
    assert skipped == 1
    assert [(p.turn, p.dropped_history_turns, p.text) for p in prompts] == [
        (1, 0, "[Round 1]\n\n问：你好\n\n答："),
        (3, 2, "[Round 1]\n\n问：谢谢\n\n答："),
    ]
    assert [len(p.ids) for p in prompts] == [16, 16]
    prompts, skipped = build_prompts([session], CHATGLM2, tokenizer, max_prompt_tokens=40)
    assert skipped == 0 and prompts[1].text == f"[Round 1]\n\n问：{QUESTION}\n\n答：" and len(prompts[1].ids) == 38


class PreferPaddingId:
    """A forward hook on the output layer that makes a vocabulary-padding id the most likely next token."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, module, inputs, logits):
        logits = logits.clone()
        logits[..., self.token_id] += 1e4
        return logits


def test_a_model_trained_with_flex_attention_generates_through_sdpa(tokenizer, three_turns):
    torch.manual_seed(0)
    model = GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    prompts, _ = build_prompts([three_turns], CHATGLM2, tokenizer, max_prompt_tokens=1000)
    expected = generate_answers(model, prompts, tokenizer, batch_size=3, max_new_tokens=4)
    model.config._attn_implementation = "flex_attention"  # as speed=fast trains
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: seen.append(model.config._attn_implementation)
    )
    assert generate_answers(model, prompts, tokenizer, batch_size=3, max_new_tokens=4) == expected
    assert seen and set(seen) == {"sdpa"}  # every forward of the generation
    assert model.config._attn_implementation == "flex_attention"  # and training's choice back afterwards


def test_padded_vocabulary_ids_are_never_generated(tokenizer, three_turns):
    torch.manual_seed(0)
    model = GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    assert model.config.vocab_size == 6144 and len(tokenizer) == 6005  # ids 6005..6143 decode to nothing
    model.lm_head.register_forward_hook(PreferPaddingId(len(tokenizer) + 40))
    prompts, _ = build_prompts([three_turns], CHATGLM2, tokenizer, max_prompt_tokens=1000)
    answers = generate_answers(model, prompts, tokenizer, batch_size=3, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_the_issue_repro_evaluates(tmp_path, cache_dir):
    run = tmp_path / "R"
    cfg = ["model=chatglm2-tiny", "data.limit=20", "trainer.max_steps=2", "trainer.limit_train_batches=1.0",
           "trainer.enable_progress_bar=false", f"data.cache_dir={cache_dir}", f"output_dir={run}"]  # fmt: skip
    train(compose_config("train", cfg))
    out = tmp_path / "eval"
    metrics = evaluate(compose_config("evaluate", [f"ckpt_path={run}/checkpoints/last.ckpt", "limit=2",
                                                   f"output_dir={out}", f"data.cache_dir={cache_dir}"]))  # fmt: skip
    assert metrics["prompts"] > 0 and metrics["skipped_turns"] == 0
    # A budget that leaves room for some questions only: the others are skipped and counted in metrics.json.
    metrics = evaluate(compose_config("evaluate", [f"ckpt_path={run}/checkpoints/last.ckpt", "limit=2",
                                                   "data.max_seq_len=64", "generation.max_new_tokens=24",
                                                   f"output_dir={out}", f"data.cache_dir={cache_dir}"]))  # fmt: skip
    written = json.loads((out / "metrics.json").read_text())
    assert written["skipped_turns"] == metrics["skipped_turns"] > 0
    assert written["prompts"] + written["skipped_turns"] == sum(
        len(s.turns) for s in read_sessions(KDCONV_TEST, limit=2).sessions
    )
    assert written["prompt_tokens_max"] == 40
    # limit=-2 evaluated sessions, split=foo failed with a ValueError deep in the data source: refused first.
    for override, message in [("limit=-2", "limit=-2: must be an integer >= 1 or null"),
                              ("limit=0", "limit=0: must be an integer >= 1 or null"),
                              ("split=foo", "split='foo': must be one of train, validation, test")]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate(compose_config("evaluate", [f"ckpt_path={run}/checkpoints/last.ckpt", override,
                                                 f"output_dir={out}", f"data.cache_dir={cache_dir}"]))  # fmt: skip


def test_official_metric_counts_distinct_ngrams_and_survives_empty_predictions():
    # Words as jieba cuts them (spaces keep them apart). Prediction 我 爱 你 你, reference 我 爱 他:
    # distinct unigrams {我, 爱, 你} vs {我, 爱, 他}: P = R = 2/3; bigrams {我爱, 爱你, 你你} vs {我爱, 爱他}: P 1/3,
    # R 1/2, F 0.4; LCS 2: P 2/4, R 2/3, F 4/7.
    scores = pair_scores("我 爱 你 你", "我 爱 他")
    assert (scores["rouge-1"], scores["rouge-2"], scores["rouge-l"]) == (66.6667, 40.0, 57.1429)
    assert pair_scores("今天天气很好", "今天天气很好")["bleu-4"] == 100.0
    # torchmetrics' ROUGE counts the repeated 你: unigram P 2/4, R 2/3, F 4/7.
    torchmetrics = RougeByTurn()
    torchmetrics.update(["我 爱 你 你"], ["我 爱 他"], [1])
    assert torchmetrics.compute()["overall"]["rouge1"] == pytest.approx(400 / 7, abs=1e-3)
    # ChatGLM2's script crashes on an empty prediction; here it scores 0 and is counted.
    summary = official_scores(["", "我 爱 你 你"], ["我 爱 他", "我 爱 他"])
    assert summary["empty_predictions"] == 1 and summary["rouge-1"] == pytest.approx(66.6667 / 2)


def test_generation_samples_sessions_by_id_hash():
    sessions = [Session(f"s{i}", (Turn("q", "a"),)) for i in range(10)]
    chosen = sample_sessions(sessions, 3)
    assert [s.id for s in chosen] == ["s5", "s7", "s8"]  # the 3 first by sha256 (s7, s8, s5), in file order
    assert sample_sessions(list(reversed(sessions)), 3) == list(reversed(chosen))  # whatever the file order
    assert sample_sessions(sessions, None) == sessions


@pytest.mark.parametrize("lm_head_adapter", [False, True])
def test_the_teacher_forced_losses_are_the_whole_logits_losses_without_the_logits(tokenizer, cache_dir,
                                                                                  lm_head_adapter):  # fmt: skip
    """Packed rows of session samples (padding beside them), 7 trained positions a chunk: the losses of every
    position equal ``token_losses`` of the model's whole logits, also through a LoRA on the output layer."""
    peft = {"method": "lora", "rank": 4, "target_modules": ["q_proj", "lm_head"]} if lm_head_adapter else None
    module = ChatGLM2Module.from_preset("chatglm2-tiny", len(tokenizer), optimizer=torch.optim.SGD, peft=peft)
    torch.manual_seed(0)
    module.configure_model()
    model = module.model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # drawn, so that the adapters change the output
                parameter.normal_(std=0.5)
    data = DialogueDataModule(tokenizer, "chatglm2", "session", test_path=str(KDCONV_TEST), limit=6, packing=True,
                              batch_size=None, batch_tokens=3072, max_seq_len=1024, cache_dir=cache_dir)  # fmt: skip
    batch = next(iter(data.dataloader("test")))
    assert batch["input_ids"].shape[0] > 1 and (batch["position_ids"][:, 1:] == 0).any()  # rows hold several samples
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    whole = token_losses(logits, batch["labels"])  # the pass before: its whole (B, T, V) logits
    chunked = answer_token_losses(model, batch, chunk_tokens=7)
    trained = supervised(batch["labels"])
    assert trained.sum() > 7 and (chunked[~trained] == 0).all() and (whole[~trained] == 0).all()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    if lm_head_adapter:  # the output layer's adapter counts in the chunked pass (zeroed, the losses move)
        with torch.no_grad():
            for name, parameter in model.lm_head.named_parameters():
                if "lora_B" in name:
                    parameter.zero_()
        assert (answer_token_losses(model, batch, chunk_tokens=7) - chunked)[trained].abs().max() > 1e-2
