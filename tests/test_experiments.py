"""Every experiment config (and the default job) composes and trains one fast step: tiny model, a few sessions."""

import json
from pathlib import Path

import pytest

from glm_session.config import CONFIG_DIR, RESOURCES_DIR, compose_config
from glm_session.train import train

EXPERIMENTS = sorted(
    str(p.relative_to(CONFIG_DIR / "experiment").with_suffix(""))
    for p in (CONFIG_DIR / "experiment").rglob("*.yaml")
)
RUNS = ["default", *EXPERIMENTS]  # "default": conf/train.yaml as it is, the default job
FAST = [
    "model=chatglm2-tiny",
    "data.limit=3",
    "trainer.max_steps=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=1",
    "trainer.check_val_every_n_epoch=1",
    "model.init_from=null",  # the comparison's arms start from a pretrained base ($GLM_SESSION_INIT)
    "evaluate.limit=1",
    "generation.max_new_tokens=2",
]


def test_there_are_experiments():
    arms = ("session", "split_grouped", "split_shuffled", "split_equal_compute", "session_unpacked", "pretrain")
    assert {"kdconv_session_packed", "kdconv_split_padded", *(f"comparison/smile_{arm}" for arm in arms),
            "comparison/kdconv_session", "comparison/kdconv_split_shuffled", "comparison/kdconv_pretrain",
            "unseen/pretrain", "unseen/smile_session", "unseen/smile_split_shuffled",
            "unseen/cpsycoun_session"} <= set(EXPERIMENTS)  # fmt: skip


def test_an_experiment_overrides_the_default_job():
    cfg = compose_config("train", ["experiment=kdconv_split_padded"])
    assert cfg.trainer.limit_train_batches == 1.0 and cfg.trainer.max_epochs == 5  # train.yaml: 0.125 and 3
    assert cfg.data.packing is False and cfg.data.batch_size == 8


@pytest.mark.parametrize("experiment", RUNS)
def test_experiment_runs_one_step(experiment, tmp_path, cache_dir):
    chosen = [] if experiment == "default" else [f"experiment={experiment}"]
    if "smile" in experiment or "cpsycoun" in experiment:  # not bundled: KdConv's file in their place, held out
        chosen += [f"data.path={RESOURCES_DIR / 'kdconv' / 'train.jsonl'}", "data.limit=60"]
    if "_split_" in experiment and "grouped" not in experiment:  # split arms with a budget of answer tokens:
        # a step of the arm's answer tokens (6,275) is ~100k tokens of KdConv history, whose (B, T, 16,128) logits
        # take over 20 GB on a CPU
        chosen += ["data.batch_supervised_tokens=600"]
    if experiment == "unseen/pretrain":  # zhbase is not bundled: a few plain-text documents in its place
        documents = [
            {"id": f"d{i}", "text": f"第{i}篇。天地玄黄，宇宙洪荒。\n日月盈昃，辰宿列张。"} for i in range(60)
        ]
        (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
        chosen += [f"data.path=[{tmp_path / 'docs.jsonl'}]", "data.holdout={validation: 0.2, test: 0.1}"]
    cfg = compose_config("train", [*FAST, *chosen, f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}"])
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert metrics["run_info"]["strategy"] == objects["datamodule"].strategy.name
    assert len(metrics["val_loss_by_epoch"]) == 1 and metrics["val_loss_by_turn"]
    for name in ("metrics.json", "data_stats.json", "config.yaml"):
        assert (Path(tmp_path) / name).is_file()
