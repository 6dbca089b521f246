import numpy as np
import pytest
from PIL import Image

from abl_guard.guard.preprocess import InputError, to_model_input


def test_uint8_layouts():
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    out = to_model_input(x, (3, 8, 8))
    assert out.shape == (4, 3, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 2], x[1, :, :, 2] / 255.0, rtol=1e-6)
    assert to_model_input(x[0], (3, 8, 8)).shape == (1, 3, 8, 8)
    g = x[..., 0]
    assert to_model_input(g, (1, 8, 8)).shape == (4, 1, 8, 8)


def test_float_layouts_and_pil():
    f = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(to_model_input(f, (1, 8, 8)), f)
    np.testing.assert_array_equal(to_model_input(f.transpose(0, 2, 3, 1), (1, 8, 8)), f)
    img = Image.fromarray(np.full((16, 16, 3), 255, np.uint8))
    out = to_model_input([img, img], (1, 8, 8))
    assert out.shape == (2, 1, 8, 8) and np.allclose(out, 1.0)


@pytest.mark.parametrize(("bad", "msg"), [
    (np.full((1, 1, 8, 8), np.nan, np.float32), "NaN"),
    (np.full((1, 1, 8, 8), 3.0, np.float32), r"\[0, 1\]"),
    (np.zeros((1, 9, 9, 1), np.uint8), r"\(N, 8, 8, 1\)"),
    (np.zeros((1, 8, 8, 1), np.int32), "uint8"),
    (np.zeros((0, 8, 8, 1), np.uint8), "non-empty"),
    ("not an image", "dtype"),
])
def test_bad_inputs_are_clear_errors(bad, msg):
    with pytest.raises(InputError, match=msg):
        to_model_input(bad, (1, 8, 8))
