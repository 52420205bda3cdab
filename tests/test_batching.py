"""Packing, rows, collation and batch order, on hand-made inputs."""

import pytest
import torch

from glm_session.data.batching import RowBatchSampler
from glm_session.data.collator import ROW_FIELDS, Collator
from glm_session.data.packing import pack_first_fit_decreasing


def test_first_fit_decreasing_by_hand():
    # Sorted: 5(#0) 4(#1) 3(#2) 3(#3) 2(#4) 1(#5). 5 -> row 0; 4 -> row 1; 3 -> row 0 (full); 3 -> row 1;
    # 2 -> row 2 (row 1 has 1 left); 1 -> row 1.
    assert pack_first_fit_decreasing([5, 4, 3, 3, 2, 1], capacity=8) == [[0, 2], [1, 3, 5], [4]]
    assert pack_first_fit_decreasing([], capacity=8) == []
    with pytest.raises(ValueError, match="a sample of 9 tokens does not fit in rows of 8"):
        pack_first_fit_decreasing([9], capacity=8)


def test_packing_is_a_partition_within_capacity():
    lengths = [(i * 37) % 500 + 1 for i in range(2000)]
    rows = pack_first_fit_decreasing(lengths, capacity=1024)
    assert sorted(i for row in rows for i in row) == list(range(2000))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert sum(lengths) / (1024 * len(rows)) > 0.99


def test_collator_pads_at_the_end_and_continues_positions():
    rows = [
        {  # two packed samples: 3 + 2 tokens
            "input_ids": [7, 8, 9, 10, 11], "labels": [-100, 8, 9, -100, 11], "turn_ids": [0, 1, 1, 0, 2],
            "position_ids": [0, 1, 2, 0, 1], "session_index": [4, 4, 4, 5, 5], "sample_index": [0, 0, 0, 3, 3],
            "turn_weights": [[0.0, 1.0], [0.0, 0.0, 2.0]],
        },
        {
            "input_ids": [7, 8, 9], "labels": [-100, -100, 9], "turn_ids": [0, 1, 1],
            "position_ids": [0, 1, 2], "session_index": [6, 6, 6], "sample_index": [1, 1, 1],
            "turn_weights": [[0.0, 0.5]],
        },
    ]  # fmt: skip
    batch = Collator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11], [7, 8, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 8, 9, -100, 11], [-100, -100, 9, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["turn_ids"].tolist() == [[0, 1, 1, 0, 2], [0, 1, 1, 0, 0]]
    assert batch["session_index"].tolist() == [[4, 4, 4, 5, 5], [6, 6, 6, -1, -1]]
    assert batch["sample_index"].tolist() == [[0, 0, 0, 3, 3], [1, 1, 1, -1, -1]]
    assert all(batch[name].dtype == torch.long for name in ROW_FIELDS)
    assert batch["loss_weight"].tolist() == [[0.0, 1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.5, 0.0, 0.0]]
    # Computed on the CPU for the loss: trained positions 1..T-1 are, in row 0, sample 0 (turn 1, weight 1) twice
    # and sample 3 (turn 2, weight 2) once; in row 1, sample 1 (turn 1, weight 0.5) once.
    assert batch["token_weight"].tolist() == [[1.0, 1.0, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0]]
    assert batch["sample_weight"].tolist() == [[0.5, 0.5, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0]]
    assert batch["turn_weight"].tolist() == [[0.5, 0.5, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0]]
    assert batch["loss_counts"].tolist() == [4, 3, 3]  # trained tokens, samples, turns
    assert batch["sample_lengths"] == [3, 2, 3] and batch["supervised_tokens"] == 4
    assert Collator(pad_id=0, width=8)(rows)["input_ids"].shape == (2, 8)
    assert Collator(pad_id=0, pad_to_multiple_of=4)(rows)["input_ids"].shape == (2, 8)


def test_batch_order_is_deterministic_and_new_every_epoch():
    lengths = list(range(1, 101))
    sampler = RowBatchSampler(lengths, batch_size=8, shuffle=True, seed=3)
    first = list(sampler)
    assert first == list(RowBatchSampler(lengths, batch_size=8, shuffle=True, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert sorted(i for b in first for i in b) == list(range(100))
    assert list(RowBatchSampler(lengths, batch_size=8))[0] == list(range(8))  # no shuffle: file order


def test_ranks_share_the_batches():
    lengths = [5] * 50
    shards = [
        list(RowBatchSampler(lengths, batch_size=4, shuffle=True, num_replicas=3, rank=r, drop_last=True))
        for r in range(3)
    ]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))


def test_evaluation_batches_are_even_across_ranks():
    """Without drop_last, ranks short of a batch get a ghost batch (rows -1 - i), so every rank runs as many
    forward passes."""
    lengths = [5] * 10
    shards = [list(RowBatchSampler(lengths, batch_size=4, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[[0, 1, 2, 3], [8, 9]], [[4, 5, 6, 7], [-9, -10]]]


def test_ghost_rows_train_nothing():
    import datasets

    from glm_session.data.build import FEATURES
    from glm_session.data.collator import RowDataset

    sample = {
        "input_ids": [1, 2, 3],
        "labels": [-100, 2, 3],
        "turn_ids": [0, 1, 1],
        "turn_weights": [0.0, 1.0],
        "session_index": 0,
        "length": 3,
    }
    samples = datasets.Dataset.from_list([{**{k: 0 for k in FEATURES}, **sample}], features=FEATURES)
    rows = RowDataset(samples, [[0]])
    assert rows[-1]["input_ids"] == rows[0]["input_ids"]
    assert rows[0]["turn_weights"] == [[0.0, 1.0]] and rows[-1]["turn_weights"] == []
    assert rows[-1]["labels"] == [-100] * 3 and rows[-1]["sample_index"] == [-1] * 3
    ghosts = Collator(pad_id=0)([rows[-1], rows[-1]])  # a rank's share padded with ghosts only
    assert ghosts["loss_weight"].tolist() == [[0.0] * 3] * 2 and ghosts["loss_counts"].tolist() == [0, 0, 0]


def test_token_budget():
    lengths = [(i * 53) % 300 + 20 for i in range(500)]
    batches = list(RowBatchSampler(lengths, batch_tokens=1024, shuffle=True, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    fixed = list(RowBatchSampler(lengths, batch_tokens=1024, fixed_width=320))
    assert all(len(b) * 320 <= 1024 for b in fixed)
    with pytest.raises(
        ValueError, match=r"data.batch_tokens=100: must be at least the longest row \(319 tokens\)"
    ):
        RowBatchSampler(lengths, batch_tokens=100)


def test_resume_skips_batches_already_trained():
    sampler = RowBatchSampler(list(range(1, 41)), batch_size=4, shuffle=True)
    full = list(sampler)
    sampler.resume_at = (0, 3)
    assert len(sampler) == len(full)  # an epoch's length; Lightning knows how many were trained
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # the skip is for one pass only
    sampler.resume_at = (0, 3)
    sampler.set_epoch(1)  # a state saved at the end of epoch 0 skips nothing in epoch 1
    assert list(sampler) == list(RowBatchSampler(list(range(1, 41)), batch_size=4, shuffle=True).all_batches(1))
