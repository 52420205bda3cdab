"""``RunInfo``: the one record of how a run was made.

``train`` builds it once from the objects it trains with; the module saves it in every checkpoint (as the
``glm_session`` entry) and it is written once into ``metrics.json``. ``evaluate``, ``export``, ``analysis`` and the
experiment reports read it back (``RunInfo.from_dict``) instead of rebuilding it from config strings or folder
layouts; resuming compares it with the new run's (``differences``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# What makes a resumed run train other batches, another loss or another model than the checkpoint's.
RESUME_KEYS = (
    "template",
    "strategy",
    "supervision",
    "reduction",
    "tokenizer_fingerprint",
    "max_seq_len",
    "packing",
    "data_source",
    "batching",
    "model_shape",
    "peft",
)
# The model config keys that give its parameters their shapes.
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


@dataclass(frozen=True)
class RunInfo:
    """How a run was made.

    Attributes:
        template, strategy, reduction: the names of the sample template, construction and loss reduction.
        supervision: the supervision policy with its settings (``from_turn m=2``): which answers were trained and
            how much each turn weighed (``all`` for records written before policies existed, which trained every
            answer).
        tokenizer_fingerprint: hash of the SentencePiece model (equal fingerprints encode equally).
        tokenizer_path: the tokenizer's ``tokenizer.path`` (``None``: the bundled one).
        max_seq_len, packing: the samples' and rows' length limit, and whether rows are packed.
        data: the data group's settings (files, holdout, reading, batching), as the DataModule takes them.
        data_source: hash of the input files' content (not their paths) and of how they were read and split.
        data_summary: each split's sessions and turns as read (so that a change of data is said in words).
        model_preset: the ``model.preset`` name; ``model_config``: the full ``GlmConfig`` as a dict.
        seed: the run's seed; ``experiment``: the experiment config's name, if any.
        peft: the parameter-efficient method and its settings (``{"method": "lora", "rank": 16, ...}``; empty:
            full fine-tuning); ``init_from`` and ``base_fingerprint``: the initial weights and a hash of their
            files (a LoRA checkpoint holds the adapters only: its base must be these very weights).
    """

    template: str
    strategy: str
    reduction: str
    tokenizer_fingerprint: str
    tokenizer_path: str | None = None
    max_seq_len: int | None = None
    packing: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)
    data_source: str | None = None
    model_preset: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    experiment: str | None = None
    supervision: str = "all"  # records from before the policies: every answer was trained
    data_summary: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    base_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunInfo:
        """The record of a checkpoint or ``metrics.json`` (earlier versions wrote fewer fields)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @property
    def batching(self) -> dict[str, Any]:
        """What decides a training epoch's batches besides the samples: batch size, padding and order."""
        keys = ("batch_size", "batch_tokens", "pad_to", "shuffle", "seed")
        return {key: self.data.get(key) for key in keys}

    @property
    def model_shape(self) -> dict[str, Any]:
        return {key: self.model_config.get(key) for key in SHAPE_KEYS}

    def _data_change(self, other: RunInfo) -> str:
        """What changed in the data, in words: each split's sessions and turns, else the content hashes."""
        changes = []
        for split in ("train", "validation", "test"):
            mine, theirs = self.data_summary.get(split), other.data_summary.get(split)
            if mine and theirs and mine != theirs:
                changes.append(f"{split} {mine['sessions']:,} sessions, {mine['turns']:,} turns -> "
                               f"{theirs['sessions']:,} sessions, {theirs['turns']:,} turns")  # fmt: skip
        same = "the same number of sessions and turns, other content, file names or reading settings"
        what = "; ".join(changes) or same
        return f"data: {what} (content {self.data_source[:8]} -> {(other.data_source or '?')[:8]})"

    def moved_data(self, other: RunInfo) -> list[str]:
        """The data files that are the same content at another path: resuming from them is allowed."""
        keys = ("train_path", "validation_path", "test_path", "path")
        if self.data_source is None or self.data_source != other.data_source:
            return []
        return [f"data.{k}: {self.data[k]} -> {other.data.get(k)}" for k in keys
                if self.data.get(k) and other.data.get(k) and self.data[k] != other.data[k]]  # fmt: skip

    def differences(self, other: RunInfo, keys: tuple[str, ...] = RESUME_KEYS) -> list[str]:
        """``key: mine -> other's`` for each of ``keys`` on which the two records differ (unknown values, from
        older checkpoints, are not compared)."""
        found = []
        for key in keys:
            mine, theirs = getattr(self, key), getattr(other, key)
            if key == "data_source" and mine is not None and mine != theirs:
                found.append(self._data_change(other))
            elif key == "peft" and (not mine or not theirs) and mine != theirs:
                found.append(f"peft: {mine or 'none (full fine-tuning)'} -> {theirs or 'none (full fine-tuning)'}")
            elif key == "peft":  # every setting compared, a missing one as None (plain LoRA leaves out quantize)
                found += [f"peft.{k}: {mine.get(k)!r} -> {theirs.get(k)!r}" for k in sorted(mine.keys() | theirs.keys())
                          if mine.get(k) != theirs.get(k)]  # fmt: skip
            elif isinstance(mine, dict):
                changed = {
                    k: (mine[k], theirs.get(k)) for k in mine if mine[k] is not None and mine[k] != theirs.get(k)
                }
                found += [f"{key}.{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()]
            elif mine is not None and mine != theirs:
                found.append(f"{key}: {mine!r} -> {theirs!r}")
        return found
