from models import checkpoint
from models.demo import build_demo_model


def test_demo_model_is_a_loadable_msmedcap_checkpoint(tmp_path):
    out = build_demo_model(tmp_path / "demo", steps=4, train_images=40, progress=False)
    model, tokenizers, provenance = checkpoint.load(out)
    assert model.config.model_type == "msmedcap" and tuple(model.branches) == ("clip", "sam")
    assert any(h.get("stage") == "stage2" and h.get("final") for h in provenance["history"])
    assert "tiny synthetic benchmark model" in (out / "MODEL_CARD.md").read_text()
