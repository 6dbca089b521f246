import numpy as np
import pytest
import torch

from abl_guard.abl.checkpoint import load_checkpoint, save_checkpoint
from abl_guard.abl.models import build_model
from abl_guard.abl.train import ArrayBatches, TrainConfig, accuracy, augment_batch, per_example_loss, train_plain


def test_augment_shapes_and_identity():
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(augment_batch(x, "none"), x)
    y = augment_batch(x, "crop-flip", pad=2, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    # a zero-shift crop is the identity: with pad 0 the crop must return the input exactly
    assert torch.equal(augment_batch(x, "crop", pad=0), x)


def test_batches_cover_subset_once():
    imgs = np.zeros((50, 4, 4, 1), np.uint8)
    b = ArrayBatches(imgs, np.arange(50), torch.device("cpu"), 8, indices=np.arange(10, 30))
    seen = torch.cat([idx for _, _, idx in b]).numpy()
    assert sorted(seen.tolist()) == list(range(10, 30)) and len(b) == 3


@pytest.mark.slow
def test_training_learns_digits_and_checkpoint_roundtrip(tmp_path, digits_train, digits_test):
    torch.manual_seed(0)
    spec = digits_train.spec
    m = build_model("small-cnn", 1, 10, 8, spec.mean, spec.std)
    hist = train_plain(m, digits_train.images, digits_train.labels,
                       TrainConfig(epochs=6, lr=0.05, batch_size=64, device="cpu"),
                       evaluate=lambda mod: {"ca": accuracy(mod, digits_test.images, digits_test.labels, "cpu")},
                       quiet=True)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["ca"] > 0.85
    losses = per_example_loss(m, digits_test.images, digits_test.labels, torch.device("cpu"), batch_size=50)
    assert losses.shape == (len(digits_test),) and np.all(losses >= 0)
    digest = save_checkpoint(tmp_path / "m.pt", m, "small-cnn", spec)
    back, meta = load_checkpoint(tmp_path / "m.pt")
    assert len(digest) == 64 and meta["arch"] == "small-cnn" and meta["taps"]["penultimate"] == "fc:in"
    x = torch.rand(3, 1, 8, 8)
    m.eval()
    assert torch.allclose(back(x), m(x))


def test_per_example_loss_keeps_confident_examples_apart():
    # a linear model whose logit margin for class 1 is 10 x the sum of the four pixels: about 20, 30 and 40
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0] * 4, [10.0] * 4]))
        model[1].bias.zero_()
    images = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (128, 191, 255)])
    labels = np.ones(3, np.int64)
    with torch.no_grad():
        logits32 = model(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255)
    assert torch.all(torch.nn.functional.cross_entropy(logits32, torch.as_tensor(labels), reduction="none") == 0)
    losses = per_example_loss(model, images, labels, torch.device("cpu"))
    margins = logits32[:, 1].double() - logits32[:, 0].double()
    np.testing.assert_allclose(losses, torch.log1p(torch.exp(-margins)).numpy(), rtol=1e-6)
    assert losses[0] > losses[1] > losses[2] > 0
    # ordinary examples: the same numbers as cross-entropy
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    imgs = np.random.default_rng(0).integers(0, 256, (5, 2, 2, 1), dtype=np.uint8)
    ys = np.array([0, 1, 2, 1, 0])
    with torch.no_grad():
        z = lin(torch.as_tensor(imgs).permute(0, 3, 1, 2).float() / 255).double()
    np.testing.assert_allclose(per_example_loss(lin, imgs, ys, torch.device("cpu")),
                               torch.nn.functional.cross_entropy(z, torch.as_tensor(ys), reduction="none").numpy(),
                               rtol=1e-5)
