"""``models.fitting``: one caption-loss training loop for every family — early stopping on
validation loss, the best epoch's weights kept, interrupted runs resumed exactly."""

from __future__ import annotations

import math

import pytest
import torch

from models import checkpoint
from models.cnn_lstm import tiny_cnn_lstm
from models.datasets import read_table
from models.features import encode_images, image_transform_for, view_names
from models.fitting import FitSettings, fit, validation_loss
from models.synthetic import generate_dataset


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    rows = read_table(generate_dataset(tmp_path_factory.mktemp("syn"), 16, 8, 0, size=64, seed=5))
    return [r for r in rows if r.split == "train"], [r for r in rows if r.split == "validation"]


def _model(records, seed=0):
    """A tiny CNN-LSTM: its decoder trains from scratch in seconds, so the loop's behaviour shows quickly."""
    return tiny_cnn_lstm([r.caption for r in records], image_size=32, seed=seed)


def _swapped(records):
    """The same images with other images' captions: a validation set that overfitting makes worse."""
    captions = [r.caption for r in records]
    shifted = captions[1:] + captions[:1]
    return [type(r)(r.image_path, c, "validation", r.image_id, r.source) for r, c in zip(records, shifted, strict=True)]


def test_settings_start_from_the_family_defaults_and_validate():
    lstm = FitSettings.for_model("cnn_lstm", batch_size=4)
    assert (lstm.optimizer, lstm.lr, lstm.batch_size, lstm.patience, lstm.grad_clip) == ("adam", 1e-3, 4, 2, None)
    stage2 = FitSettings.for_model("msmedcap")
    assert stage2.optimizer == "adamw" and stage2.patience is None
    with pytest.raises(ValueError, match="optimizer"):
        FitSettings(optimizer="sgd")
    with pytest.raises(ValueError, match="patience"):
        FitSettings(patience=0)
    with pytest.raises(ValueError, match="grad_clip"):
        FitSettings(grad_clip=0.0)
    with pytest.raises(ValueError, match="unknown training setting"):
        FitSettings.for_model("blip2", momentum=0.9)


def test_loss_falls_and_training_touches_only_the_trainable_parts(records, tmp_path):
    train, _ = records
    model, tokenizers = _model(train)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert frozen
    settings = FitSettings(epochs=25, batch_size=8, lr=1e-2, patience=None)
    result = fit(model, tokenizers, train, settings, tmp_path / "run", checkpoint.Provenance(), progress=False)
    assert result.steps == 50 and result.epochs == 25 and not result.stopped_early
    assert sum(s["loss"] for s in result.losses[-4:]) < 0.5 * sum(s["loss"] for s in result.losses[:4])
    reloaded, _, provenance = checkpoint.load(tmp_path / "run")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in frozen.items())
    assert provenance["history"][-1]["stage"] == "caption" and provenance["history"][-1]["final"] is True
    assert not (tmp_path / "run" / "fit_state.pt").exists()  # finished: nothing to resume


def test_early_stopping_keeps_the_best_epochs_weights(records, tmp_path):
    train, _ = records
    validation = _swapped(train)
    model, tokenizers = _model(train)
    settings = FitSettings(epochs=40, batch_size=8, lr=1e-2, patience=2)
    result = fit(
        model, tokenizers, train, settings, tmp_path / "run", checkpoint.Provenance(), validation_records=validation, progress=False
    )
    losses = [v["loss"] for v in result.validation]
    assert result.stopped_early and result.epochs < 40
    assert result.best_epoch == 1 + losses.index(min(losses)) and result.epochs == result.best_epoch + 2
    # The checkpoint holds the best epoch's weights, not the last epoch's.
    best, text, provenance = checkpoint.load(tmp_path / "run")
    features = encode_images(best, validation, image_transform_for(best, training=True), view_names(best), 8, progress=False)
    reloaded = validation_loss(best, text, features, [r.caption for r in validation], 8, torch.device("cpu"))
    assert math.isclose(reloaded, min(losses), rel_tol=1e-4)
    assert reloaded < losses[-1]
    assert provenance["history"][-1]["best_epoch"] == result.best_epoch and provenance["history"][-1]["stopped_early"] is True


def test_early_stopping_needs_validation_data(records, tmp_path):
    train, _ = records
    model, tokenizers = _model(train)
    with pytest.raises(ValueError, match="validation"):
        fit(model, tokenizers, train, FitSettings(patience=2), tmp_path / "run", checkpoint.Provenance(), progress=False)


def test_an_interrupted_run_resumes_to_the_same_weights(records, tmp_path):
    train, validation = records
    settings = FitSettings(epochs=3, batch_size=8, lr=1e-3, patience=2)
    reference, tokenizers = _model(train)
    fit(
        reference,
        tokenizers,
        train,
        settings,
        tmp_path / "reference",
        checkpoint.Provenance(),
        validation_records=validation,
        progress=False,
    )

    interrupted, tokenizers = _model(train)
    real_loss, calls = interrupted.caption_loss, []

    def loss_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # step 2 of epoch 2 (2 steps per epoch): as Ctrl-C would arrive
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    interrupted.caption_loss = loss_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        fit(
            interrupted,
            tokenizers,
            train,
            settings,
            tmp_path / "run",
            checkpoint.Provenance(),
            validation_records=validation,
            progress=False,
        )
    assert (tmp_path / "run" / "fit_state.pt").is_file()

    resumed, tokenizers, _ = checkpoint.load(tmp_path / "run")
    with pytest.raises(ValueError, match="settings differ"):
        fit(
            resumed,
            tokenizers,
            train,
            FitSettings(epochs=4, batch_size=8, lr=1e-3, patience=2),
            tmp_path / "run",
            checkpoint.Provenance(),
            validation_records=validation,
            resume=True,
            progress=False,
        )
    result = fit(
        resumed,
        tokenizers,
        train,
        settings,
        tmp_path / "run",
        checkpoint.Provenance(),
        validation_records=validation,
        resume=True,
        progress=False,
    )
    assert result.epochs == 3 and len(result.validation) == 3
    expected, _, _ = checkpoint.load(tmp_path / "reference")
    final, _, _ = checkpoint.load(tmp_path / "run")
    for key, value in expected.state_dict().items():
        assert torch.allclose(final.state_dict()[key], value, atol=1e-6), key


def test_the_msmedcap_family_trains_its_stage_2_parts_through_the_same_loop(records, tmp_path):
    from models.msmedcap.model import MedCapModel
    from models.msmedcap.tiny import tiny_config
    from models.msmedcap.tokenizers import build_small_tokenizers

    train, validation = records
    tokenizers = build_small_tokenizers([r.caption for r in train], lm_vocab=300, qformer_vocab=200)
    model = MedCapModel(tiny_config("blip2", lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer), image_size=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = FitSettings.for_model("blip2", epochs=1, batch_size=8, patience=1)
    result = fit(
        model, tokenizers, train, settings, tmp_path / "run", checkpoint.Provenance(), validation_records=validation, progress=False
    )
    assert result.steps == 2 and result.best_epoch == 1
    changed = {k for k, v in checkpoint.load(tmp_path / "run")[0].state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("branches.clip.") for k in changed)
    assert any("query_tokens" in k for k in changed) and any("language_projection" in k for k in changed)
