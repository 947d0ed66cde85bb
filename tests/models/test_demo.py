import io
import re

from models import checkpoint
from models.captioner import Captioner
from models.demo import DEMO_MODEL_NAME, DEMO_NOTICE, build_demo_model, is_demo


def test_demo_model_is_a_loadable_msmedcap_checkpoint_named_as_the_demo(tmp_path):
    out = build_demo_model(tmp_path / "demo", steps=4, train_images=40, progress=False)
    model, tokenizers, provenance = checkpoint.load(out)
    assert model.config.model_type == "msmedcap" and tuple(model.branches) == ("clip", "sam")
    assert any(h.get("stage") == "stage2" and h.get("final") for h in provenance["history"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "tiny synthetic benchmark model" in card and DEMO_NOTICE in card
    # the name the SRs and the review page go by
    identity = Captioner.load(out, "cpu").identity
    assert identity.name == DEMO_MODEL_NAME and is_demo(identity.name)
    assert "not for clinical use" in DEMO_MODEL_NAME and len(DEMO_MODEL_NAME) <= 64


def test_only_the_demo_is_the_demo():
    assert not is_demo("MSMedCap") and not is_demo("")


def test_demo_training_reports_each_stage_of_the_whole_run_with_the_time_left(tmp_path):
    lines = io.StringIO()
    build_demo_model(tmp_path / "demo", steps=4, train_images=40, progress=True, stages=lines)
    text = lines.getvalue().splitlines()
    names = ["synthetic training slices", "language model", "stage 1, CLIP Q-Former", "stage 1, SAM Q-Former", "stage 2, msmedcap"]
    assert [re.sub(r" \(\d+ steps\).*|, elapsed.*", "", line) for line in text[:-1]] == [f"stage {i}/5 {n}" for i, n in enumerate(names, 1)]
    assert "ETA estimating" in text[1]  # nothing trained yet
    assert all(re.search(r", ETA \d\d:\d\d$", line) for line in text[2:-1])  # a rate measured: a time left
    assert re.fullmatch(r"all 5 stages done in \d\d:\d\d", text[-1])
