import pytest
import torch

from abl_guard.abl.models import ARCHS, build_model, model_taps
from abl_guard.export import TapWrapper


@pytest.mark.parametrize(("arch", "c", "size"), [("small-cnn", 1, 28), ("small-cnn", 1, 8),
                                                 ("preact-resnet18", 3, 32), ("wrn-16-1", 3, 32)])
def test_forward_and_taps(arch, c, size):
    torch.manual_seed(0)
    m = build_model(arch, c, 10, size, [0.5] * c, [0.25] * c).eval()
    x = torch.rand(2, c, size, size)
    taps = model_taps(m)
    assert "penultimate" in taps
    out = TapWrapper(m, taps)(x)
    assert out[0].shape == (2, 10)
    pen = out[1 + list(taps).index("penultimate")]
    assert pen.shape == (2, m.fc.in_features)
    # the penultimate tap really is what the classifier reads
    assert torch.allclose(m.fc(pen), out[0], atol=1e-5)


def test_normalisation_is_inside_the_model():
    m = build_model("small-cnn", 1, 10, 8, [0.3], [0.2])
    assert torch.allclose(m.normalize(torch.full((1, 1, 2, 2), 0.5)), torch.full((1, 1, 2, 2), 1.0))
    assert "normalize.mean" in m.state_dict()


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg99", 1, 10, 8, [0.5], [0.5])
    assert set(ARCHS) >= {"small-cnn", "preact-resnet18", "wrn-16-1"}
