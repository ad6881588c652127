"""Tests for the text-lora task: offline loading, what is shared, determinism, data, fingerprint."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fedvault.examples import text_lora
from fedvault.fingerprint import fingerprint_task
from fedvault.privacy.dp import AccountantState, make_private
from fedvault.task_registry import load_task

MODULE = "fedvault.examples.text_lora"
TASK = text_lora.TASK


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No network: the hub is off, and any attempt to connect fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.fixture(scope="module")
def data() -> tuple[TensorDataset, TensorDataset]:
    train, test = text_lora.load_data(0)
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    return train, test


def _build(seed: int, factory: object = text_lora.build_model) -> torch.nn.Module:
    torch.manual_seed(seed)
    return factory()  # type: ignore[operator]


def test_entry_points_resolve() -> None:
    assert load_task("text-lora").task is TASK
    assert load_task("text-frozen-head").task is text_lora.BASELINE_TASK
    assert text_lora.EXAMPLE is TASK
    assert TASK.shared == "trainable" and text_lora.BASELINE_TASK.shared == "trainable"


def test_model_files_ship_in_a_package_and_load_offline() -> None:
    from transformers import AutoTokenizer

    path = text_lora.model_dir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tokenizer.pad_token_id == text_lora.PAD_ID
    model = _build(0)  # the socket patch fails this if anything goes online
    assert isinstance(model, text_lora.TextClassifier)


def test_only_lora_and_head_are_shared() -> None:
    model = _build(0)
    names = TASK.shared_names(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)
    lora = [n for n in names if not n.startswith("head.")]
    assert sorted(n for n in names if n.startswith("head.")) == ["head.bias", "head.weight"]
    # A and B of query and value in each adapted layer, nothing else.
    expected = {
        f"encoder.encoder.layer.{i}.attention.self.{target}.lora_{m}.default.weight"
        for i in text_lora.LORA_LAYERS
        for target in text_lora.LORA_TARGETS
        for m in ("A", "B")
    }
    assert set(lora) == expected
    shared_numel = sum(model.state_dict()[n].numel() for n in names)
    total = sum(v.numel() for v in model.state_dict().values())
    assert shared_numel < 0.01 * total
    baseline = _build(0, text_lora.build_frozen_baseline)
    assert text_lora.BASELINE_TASK.shared_names(baseline) == ["head.weight", "head.bias"]


def test_state_dict_keys_are_stable() -> None:
    a, b = _build(0), _build(1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [
        (k, v.shape) for k, v in b.state_dict().items()
    ]


def test_frozen_base_is_the_same_whatever_the_seed_and_lora_init_is_seeded() -> None:
    a, b, c = _build(0), _build(1), _build(0)
    shared = set(TASK.shared_names(a))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for name in sa:
        if name not in shared:
            assert torch.equal(sa[name], sb[name]), name
    for name in shared:
        assert torch.equal(sa[name], sc[name]), name  # same seed, same init
    lora_a = [n for n in shared if "lora_A" in n]
    assert all(not torch.equal(sa[n], sb[n]) for n in lora_a)  # another seed, another init
    assert all(not sa[n].eq(0).all() for n in lora_a)
    # B starts at zero: the adapted encoder starts as the pretrained one.
    assert all(sa[n].eq(0).all() for n in shared if "lora_B" in n)


def test_forward_gives_logits_and_ignores_padding(data: tuple[TensorDataset, ...]) -> None:
    ids = data[0].tensors[0][:4]
    model = _build(0).eval()
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (4, text_lora.NUM_CLASSES) and logits.dtype == torch.float32
        # The unused padding columns are trimmed: a row alone gives the same logits.
        alone = torch.cat([model(ids[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(alone, logits, rtol=1e-4, atol=1e-5)
        # Ids read as floats (the generic CSV reader) are rounded back to ids.
        torch.testing.assert_close(model(ids.float()), logits)
        # The adapters start at zero: LoRA model and frozen baseline agree at init.
        baseline = _build(0, text_lora.build_frozen_baseline).eval()
        baseline.head.load_state_dict(model.head.state_dict())
        torch.testing.assert_close(baseline(ids), logits, rtol=1e-4, atol=1e-5)


def test_data_shapes_dtypes_and_balance(data: tuple[TensorDataset, ...]) -> None:
    train, test = data
    for part, n in ((train, text_lora.NUM_TRAIN), (test, text_lora.NUM_TEST)):
        ids, labels = part.tensors
        assert ids.shape == (n, text_lora.MAX_LEN) and ids.dtype == torch.int64
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert set(labels.tolist()) == {0, 1}
        assert abs(labels.float().mean().item() - 0.5) < 0.05
        assert (ids[:, -1] == text_lora.PAD_ID).all()  # nothing was truncated
        assert (ids[:, 0] != text_lora.PAD_ID).all()
    again, _ = text_lora.load_data(0)
    other, _ = text_lora.load_data(1)
    assert torch.equal(again.tensors[0], train.tensors[0])  # type: ignore[attr-defined]
    assert not torch.equal(other.tensors[0], train.tensors[0])  # type: ignore[attr-defined]


def test_words_alone_do_not_give_the_label_away() -> None:
    texts, labels = text_lora.make_notes(400, np.random.default_rng(3))

    def count(text: str, phrases: tuple[str, ...]) -> int:
        return sum(len(re.findall(rf"\b{re.escape(p)}\b", text)) for p in phrases)

    current = [re.sub(r"\\\{[stpy]\\\}", ".+", re.escape(t)) for t in text_lora.CURRENT]
    for text, label in zip(texts, labels, strict=True):
        # One red flag and one mild complaint in every note, whatever its label;
        # exactly one clause in a current frame: the label says whether it is the red flag.
        assert count(text, text_lora.RED_FLAGS) == 1, text
        assert count(text, text_lora.MILD) == 1, text
        clauses = text.rstrip(".").split(". ")
        now = [c for c in clauses if any(re.fullmatch(p, c) for p in current)]
        assert len(now) == 1, text
        assert label == (count(now[0], text_lora.RED_FLAGS) == 1), text
    assert set(labels.tolist()) == {0, 1}


def test_opacus_trains_only_the_shared_parameters(data: tuple[TensorDataset, ...]) -> None:
    model = _build(0).train()
    assert ModuleValidator.validate(model, strict=False) == []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels = data[0].tensors
    loader = DataLoader(TensorDataset(ids[:16], labels[:16]), batch_size=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(trainable, lr=0.5),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        state=AccountantState("prv"),
    )
    for batch, target in private.data_loader:
        private.optimizer.zero_grad(set_to_none=True)
        logits = private.module(batch)
        loss = (
            torch.nn.functional.cross_entropy(logits, target) if len(target) else logits.sum() * 0
        )
        loss.backward()
        private.optimizer.step()
    after = model.state_dict()
    shared = set(TASK.shared_names(model))
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == shared


def test_fingerprint_pins_the_frozen_weights() -> None:
    first = fingerprint_task(TASK, MODULE)
    second = fingerprint_task(TASK, MODULE)
    assert re.fullmatch(r"[0-9a-f]{64}", first.frozen_sha256)
    assert first == second and first.digest == second.digest
    assert first.task == "text-lora"
    baseline = fingerprint_task(text_lora.BASELINE_TASK, MODULE)
    assert baseline.frozen_sha256 and baseline.frozen_sha256 != first.frozen_sha256
