import json

import pytest
import torch
from pydantic import ValidationError

from segmenters.data.shapes import SHAPE_CLASSES
from segmenters.models import build_model
from segmenters.spec import ClassInfo, ModelSpec, Normalization, state_dict_digest
from segmenters.twin import load_twin, save_twin


def _spec(**changes):
    return ModelSpec(arch="unet", classes=SHAPE_CLASSES, input_size=(64, 64), dataset="shapes", **changes)


def test_spec_round_trips_through_json():
    spec = _spec(training={"loss": "semeda"})
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.num_classes == 4 and again.class_names[1] == "cube"
    assert again.palette().shape == (4, 3)
    assert json.loads(spec.to_json())["normalization"]["mean"] == [0.485, 0.456, 0.406]


def test_spec_rejects_bad_values():
    with pytest.raises(ValidationError, match="0..255"):
        ClassInfo(name="x", color=(0, 300, 0))
    with pytest.raises(ValidationError, match="at least two classes"):
        ModelSpec(arch="unet", classes=(SHAPE_CLASSES[0],), input_size=(8, 8), dataset="shapes")


def test_normalization_inverts():
    norm = Normalization()
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-6)
    assert torch.allclose(norm.normalize(x[0]), norm.normalize(x)[0])


def test_checkpoint_embeds_spec_and_detects_tampered_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", 4)
    spec = save_twin(tmp_path / "twin.pt", model, _spec())
    assert spec.checkpoint_digest == state_dict_digest(model.state_dict())
    twin = load_twin(tmp_path / "twin.pt")
    assert twin.spec == spec and not twin.model.training
    images = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(twin.logits(images), model(spec.normalization.normalize(images)))
    checkpoint = torch.load(tmp_path / "twin.pt", weights_only=True)
    checkpoint["model"]["classifier.bias"] += 1.0
    torch.save(checkpoint, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="do not match the digest"):
        load_twin(tmp_path / "tampered.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_twin(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_twin(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="expected \\(N, 3, H, W\\)"):
        twin.logits(torch.rand(3, 64, 64))
