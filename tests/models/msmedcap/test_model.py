"""The model family on tiny configurations: shapes, freezing, losses, generation, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dicom_io.image_views import ImageView
from models import checkpoint
from models.config import ConfigError
from models.generation import PRESETS, GenerationPreset, select_device
from models.msmedcap.config import MedCapConfig
from models.msmedcap.model import MedCapModel
from models.msmedcap.qformer import unilm_mask
from models.msmedcap.stage1 import stage1_losses
from models.msmedcap.tiny import tiny_config
from tests.models.parts import CAPTIONS, tiny_tokenizers


@pytest.fixture(scope="module")
def tokenizers():
    return tiny_tokenizers()


def build(tokenizers, model_type="msmedcap", layout="channel", seed=0) -> MedCapModel:
    torch.manual_seed(seed)
    config = tiny_config(model_type, lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer), sam_layout=layout)
    return MedCapModel(config).eval()  # no dropout: comparisons below are exact


def pixels(model: MedCapModel, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {b: torch.randn(n, 3, 64, 64, generator=g) for b in model.config.branches}


@pytest.mark.parametrize(("model_type", "branches"), [("msmedcap", ("clip", "sam")), ("blip2", ("clip",)), ("sam_blip2", ("sam",))])
def test_family_members_are_configurations_of_one_model(tokenizers, model_type, branches):
    model = build(tokenizers, model_type)
    assert tuple(model.branches) == branches == tuple(model.encoders)
    prefix = model.soft_prompt(model.image_tokens(pixels(model)))
    assert prefix.shape == (3, 4 * len(branches), model.lm.config.hidden_size)


def test_soft_prompt_is_clip_queries_then_sam_queries(tokenizers):
    model = build(tokenizers)
    tokens = model.image_tokens(pixels(model))
    prefix = model.soft_prompt(tokens)
    assert torch.allclose(prefix[:, :4], model.branches["clip"].lm_inputs(tokens["clip"]))
    assert torch.allclose(prefix[:, 4:], model.branches["sam"].lm_inputs(tokens["sam"]))


@pytest.mark.parametrize(("layout", "tokens", "width"), [("channel", 16, 64), ("spatial", 64, 16)])
def test_sam_token_layouts(tokenizers, layout, tokens, width):
    model = build(tokenizers, "sam_blip2", layout)
    out = model.image_tokens(pixels(model))["sam"]
    assert out.shape == (3, tokens, width)  # tiny SAM neck: 16 channels on an 8x8 grid
    assert model.branches["sam"].qformer.config.encoder_hidden_size == width


def test_encoders_and_lm_are_frozen_and_stay_in_eval_mode(tokenizers):
    model = build(tokenizers)
    model.train()
    for part in [model.lm, *model.encoders.values()]:
        assert not part.training and not any(p.requires_grad for p in part.parameters())
    stage2 = {id(p) for p in model.trainable_parameters("stage2")}
    assert not stage2 & {id(p) for p in model.lm.parameters()}
    assert {id(model.branches["sam"].language_projection.weight), id(model.branches["clip"].query_tokens)} <= stage2
    stage1 = {id(p) for p in model.trainable_parameters("stage1", "sam")}
    assert id(model.branches["sam"].itm_head.weight) in stage1 and id(model.branches["clip"].query_tokens) not in stage1


def test_query_tokens_are_not_all_identical(tokenizers):
    queries = build(tokenizers).branches["sam"].query_tokens[0]
    assert not torch.allclose(queries[0], queries[1])


def test_lm_loss_ignores_prompt_and_padding(tokenizers):
    model = build(tokenizers)
    batch = tokenizers.lm_batch(CAPTIONS, "a photo of", "\n", 64)
    head = len(tokenizers.prompt_ids("a photo of"))
    assert (batch["labels"][:, :head] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    first = tokenizers.lm.decode(batch["input_ids"][0][head:][batch["attention_mask"][0][head:] == 1])
    assert first == " axial ct of the head small hyperdense lesion in the left hemisphere\n"
    loss = model(pixels(model), **batch)
    loss.backward()
    assert torch.isfinite(loss) and model.branches["clip"].query_tokens.grad is not None


def test_unilm_mask():
    mask = unilm_mask(2, 3, torch.tensor([[True, True, True, True, False]]))[0, 0]
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_stage1_losses(tokenizers):
    model = build(tokenizers)
    text = tokenizers.qformer_batch(CAPTIONS, 32)
    tokens = model.image_tokens(pixels(model))
    losses = stage1_losses(model.branches["sam"], tokens["sam"], text["input_ids"], text["attention_mask"], tokenizers.qformer_bos_id)
    assert set(losses) == {"itc", "itm", "itg", "loss"} and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.branches["sam"].temp.grad is not None and model.branches["sam"].lm_head.dense.weight.grad is not None
    with pytest.raises(ValueError, match="at least 2"):
        stage1_losses(model.branches["sam"], tokens["sam"][:1], text["input_ids"][:1], text["attention_mask"][:1], 1)


def test_generation_returns_new_tokens_only_and_is_deterministic(tokenizers):
    model = build(tokenizers)
    prompt = tokenizers.prompt_batch("a photo of", 3)
    args = (pixels(model), prompt["input_ids"], prompt["attention_mask"])
    greedy = model.generate(*args, PRESETS["fast"], tokenizers.eos_id("\n"), 1)
    assert greedy.shape[1] <= PRESETS["fast"].max_new_tokens
    assert torch.equal(greedy, model.generate(*args, PRESETS["fast"], tokenizers.eos_id("\n"), 1))
    paper = model.generate(*args, PRESETS["paper"], tokenizers.eos_id("\n"), 1)
    assert PRESETS["paper"].min_new_tokens <= paper.shape[1] <= PRESETS["paper"].max_new_tokens


def test_presets_and_devices_validate():
    assert (PRESETS["paper"].num_beams, PRESETS["paper"].repetition_penalty, PRESETS["paper"].length_penalty) == (15, 9.0, 1.2)
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationPreset("x", 1, 5, 10, 1.0, 1.0)
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda:0")
        assert select_device("auto").type == "cpu"
    with pytest.raises(ValueError):
        select_device("tpu")


def test_config_validation_names_the_field(tokenizers):
    good = tiny_config("msmedcap", lm_vocab=10, qformer_vocab=10)
    with pytest.raises(ConfigError, match="model_type"):
        good.with_model_type("gpt")
    with pytest.raises(ConfigError, match="sam_layout"):
        MedCapConfig.from_dict({**MedCapConfig.from_dict(__import__("json").loads(good.to_json())).__dict__, "sam_layout": "diagonal"})
    with pytest.raises(ConfigError, match="unknown config field"):
        MedCapConfig.from_dict({**__import__("json").loads(good.to_json()), "colour": "blue"})


def test_checkpoint_round_trip_and_strict_loading(tokenizers, tmp_path):
    model = build(tokenizers)
    sha = checkpoint.save(model, tokenizers, tmp_path / "ckpt", checkpoint.Provenance(sources=[{"part": "all", "source": "test"}]))
    loaded, toks, provenance = checkpoint.load(tmp_path / "ckpt")
    assert provenance["weights_sha256"] == sha == checkpoint.sha256_file(tmp_path / "ckpt" / "model.safetensors")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert toks.lm.get_vocab() == tokenizers.lm.get_vocab()
    assert "preliminary and unverified" in (tmp_path / "ckpt" / "MODEL_CARD.md").read_text()
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    del weights[next(k for k in weights if k.startswith("encoders.sam."))]
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="1 missing weight"):
        checkpoint.load(tmp_path / "ckpt")


def test_bf16_placement_runs_on_cpu(tokenizers, tmp_path):
    """The CUDA precision layout (bf16 encoders and LM, fp32 Q-Formers), exercised on CPU."""
    checkpoint.save(build(tokenizers), tokenizers, tmp_path / "ckpt", checkpoint.Provenance())
    model, _, _ = checkpoint.load(tmp_path / "ckpt", "cpu", torch.bfloat16)
    assert model.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert next(model.encoders["sam"].parameters()).dtype == torch.bfloat16
    assert model.branches["sam"].query_tokens.dtype == torch.float32
    prompt = tokenizers.prompt_batch("", 2)
    out = model.generate(pixels(model, 2), prompt["input_ids"], prompt["attention_mask"], PRESETS["fast"], tokenizers.eos_id("\n"), 1)
    assert out.shape[0] == 2


# -- issue 11: what toy sizes did not show ----------------------------------------------------------


def test_a_long_caption_keeps_its_end_token(tokenizers):
    """Truncation drops the caption's last words, never the EOS: otherwise the model never learns to stop."""
    long = " ".join(CAPTIONS) * 3
    batch = tokenizers.lm_batch([long, CAPTIONS[1]], "a photo of", "\n", 24)
    eos = tokenizers.eos_id("\n")
    assert batch["input_ids"].shape[1] == 24
    for row, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        last = int(mask.sum()) - 1
        assert int(row[last]) == eos and int(labels[last]) == eos
    with pytest.raises(ValueError, match="max_text_tokens"):
        tokenizers.lm_batch(CAPTIONS, "a photo of", "\n", 4)
    assert MedCapConfig.__dataclass_fields__["max_text_tokens"].default == 320  # LAVIS/MSMedCap max_txt_len


def test_stage2_trains_exactly_what_the_lm_loss_reaches(tokenizers):
    """Every stage-2 parameter gets a gradient, and the text side (no gradient from the LM loss) is not listed."""
    model = build(tokenizers)
    params = model.trainable_parameters("stage2")
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        p.requires_grad_(True)
    model(pixels(model), **tokenizers.lm_batch(CAPTIONS, "", "\n", 64)).backward()
    assert [names[id(p)] for p in params if p.grad is None or not p.grad.abs().sum() > 0] == []
    text_ffn = model.branches["sam"].qformer.encoder.layer[0].intermediate.dense.weight
    assert id(text_ffn) not in {id(p) for p in params}


def test_weight_decay_spares_biases_norms_and_the_temperature(tokenizers):
    from models.fitting import decay_groups

    model = build(tokenizers)
    groups = decay_groups(model.trainable_parameters("stage1", "sam"), 0.05)
    decayed, spared = ({id(p) for p in g["params"]} for g in groups)
    branch = model.branches["sam"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {id(branch.temp), id(branch.itm_head.bias), id(branch.qformer.layernorm.weight)} <= spared
    assert {id(branch.itm_head.weight), id(branch.query_tokens)} <= decayed


def test_stage_defaults_follow_the_paper_and_the_warm_up_starts_at_warmup_lr():
    from models.msmedcap.training import TrainSettings, lr_schedule

    stage1 = TrainSettings.for_stage("stage1", branch="sam")
    assert (stage1.epochs, stage1.warmup_steps, stage1.warmup_lr, stage1.lr, stage1.min_lr) == (3, 5000, 1e-6, 1e-4, 1e-5)
    assert TrainSettings.for_stage("stage2").warmup_steps == 2000
    assert TrainSettings.for_stage("stage1", branch="clip", epochs=1).epochs == 1
    factor = lr_schedule(TrainSettings(stage="stage2", warmup_steps=100, warmup_lr=1e-6, lr=1e-4, min_lr=1e-5), 1000)
    assert factor(0) * 1e-4 == pytest.approx(1e-6) and factor(50) * 1e-4 == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert factor(100) == pytest.approx(1.0) and factor(1000) * 1e-4 == pytest.approx(1e-5)


def test_captioning_reads_the_clip_view_at_its_evaluation_size(tokenizers, tmp_path):
    from models.captioner import Captioner
    from models.features import image_transform_for

    torch.manual_seed(0)
    config = tiny_config("blip2", lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer), eval_clip_image_size=96)
    checkpoint.save(MedCapModel(config), tokenizers, tmp_path / "ckpt", checkpoint.Provenance())
    captioner = Captioner.load(tmp_path / "ckpt", "cpu")
    assert captioner.views == (ImageView("clip", 96, "clip"),)
    image = torch.rand(64, 64).numpy()
    assert image_transform_for(captioner.model)(image)["clip"].shape[-1] == 96
    assert image_transform_for(captioner.model, training=True)(image)["clip"].shape[-1] == 64
    assert len(captioner.caption({"clip": image_transform_for(captioner.model)(image)["clip"][None]}, "fast")) == 1


def test_dtype_follows_the_devices_capability(monkeypatch):
    from models.generation import default_dtype

    assert default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert default_dtype(torch.device("cuda:0")) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100/H200
    assert default_dtype(torch.device("cuda:0")) == torch.bfloat16


def test_placement_casts_before_it_moves(tokenizers, monkeypatch):
    """Each frozen part reaches the device already in its run dtype (the GPU never holds the fp32 LM)."""
    model = build(tokenizers)
    moves: list[tuple[str, torch.dtype]] = []
    original = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        device = kwargs.get("device") or next((a for a in args if isinstance(a, torch.device)), None)
        if device is not None and self is model.lm:
            moves.append(("lm", next(self.parameters()).dtype))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    model.place(torch.device("cpu"), torch.bfloat16)
    assert moves == [("lm", torch.bfloat16)]
    assert model.branches["clip"].query_tokens.dtype == torch.float32


def test_loading_builds_no_random_copy(tokenizers, tmp_path, monkeypatch):
    """The model is built on the meta device and takes the stored tensors: no initialiser ever runs on real memory."""
    checkpoint.save(build(tokenizers), tokenizers, tmp_path / "ckpt", checkpoint.Provenance())
    real_inits = []
    original = torch.nn.init.normal_

    def spy(tensor, *args, **kwargs):
        if tensor.device.type != "meta":
            real_inits.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    model, _, _ = checkpoint.load(tmp_path / "ckpt")
    assert real_inits == [] and not any(p.device.type == "meta" for p in model.parameters())
    assert model.lm.lm_head.weight is model.lm.get_input_embeddings().weight  # ties survive
