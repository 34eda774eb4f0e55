import pytest
import torch
import torch.nn.functional as F

from segmenters.losses import SegmentationLoss, ppce_loss
from segmenters.losses.semeda import SemedaNet, embedding_match, one_hot_masks, pretrain_semeda_net, sobel_embeddings
from segmenters.models import MODELS, build_model


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_zoo_model_runs_forward_at_two_sizes(arch):
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    with torch.no_grad():
        for height, width in ((64, 96), (90, 130)):
            logits = model(torch.randn(2, 3, height, width))
            assert logits.shape == (2, 5, height, width)
            assert torch.isfinite(logits).all()


def test_unet_is_the_seed_000_unet():
    model = build_model("unet", 4)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    strided = [m for m in convs if m.stride == (2, 2)]
    assert [m.out_channels for m in strided] == [16, 32, 64]
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.out_channels for m in ups] == [32, 16, 8]
    assert {m.out_channels for m in convs} == {8, 16, 32, 64, 4}


def test_ladder_densenet_predicts_at_stride_4_then_upsamples():
    model = build_model("ladder_densenet121", 3).eval()
    seen = {}
    model.classifier.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 160))
    assert tuple(seen["shape"][-2:]) == (32, 40)
    blends = [model.up16.blend[2], model.up8.blend[2], model.up4.blend[2]]
    assert all(conv.kernel_size == (3, 3) for conv in blends)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'segformer'"):
        build_model("segformer", 3)


def _labels(seed=0, n=2, c=3, size=24):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for k in range(n):
        for cls in range(1, c):
            y, x = torch.randint(0, size - 8, (2,), generator=g)
            labels[k, y : y + 8, x : x + 8] = cls
    return labels


def test_semeda_net_shape_matches_the_thesis():
    net = SemedaNet(num_classes=21)
    assert [layer.out_channels for layer in net.layers] == [16, 32, 2]
    assert 7_000 < sum(p.numel() for p in net.parameters()) < 12_000  # "about 10k parameters"


def test_pretrained_semeda_net_detects_edges():
    batches = [_labels(seed=s, n=4) for s in range(60)]
    net, figures = pretrain_semeda_net(batches, 90, num_classes=3, progress=False)
    assert figures["edge_f1"] > 0.9
    assert not any(p.requires_grad for p in net.parameters())


def test_semeda_gradients_reach_the_segmenter_and_not_the_frozen_edge_net():
    torch.manual_seed(0)
    labels = _labels()
    net = SemedaNet(3)
    criterion = SegmentationLoss("semeda", 3, semeda_net=net)
    segmenter = torch.nn.Conv2d(3, 3, 3, padding=1)
    images = torch.randn(2, 3, 24, 24)
    loss, parts = criterion(segmenter(images), labels)
    loss.backward()
    assert parts["semeda"] > 0
    assert segmenter.weight.grad is not None and segmenter.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    # The SEMEDA term alone also sends gradient to the segmenter.
    segmenter.zero_grad()
    probs = segmenter(images).softmax(1)
    sum(embedding_match(net.embeddings, probs, labels, (4.0, 2.0, 1.0))).backward()
    assert segmenter.weight.grad.abs().sum() > 0


def test_semeda_and_sobel_vanish_on_a_perfect_prediction_only():
    labels = _labels()
    net = SemedaNet(3).requires_grad_(False)
    perfect = one_hot_masks(labels, 3, 255)
    for embed, lambdas in ((net.embeddings, (4.0, 2.0, 1.0)), (sobel_embeddings, (4.0,))):
        assert float(sum(embedding_match(embed, perfect, labels, lambdas))) == pytest.approx(0.0, abs=1e-7)
        wrong = perfect.roll(1, dims=1)
        assert float(sum(embedding_match(embed, wrong, labels, lambdas))) > 1e-3


def test_sobel_embeddings_are_the_sobel_operator_per_class_channel():
    """x then y gradient per class, replicate-padded to the input's size: against the 3x3 kernels written out and
    torch's own replicate padding (the loss pads by concatenation for inductor), values and gradients."""
    torch.manual_seed(3)
    masks = torch.rand(2, 3, 13, 17, requires_grad=True)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None].repeat(3, 1, 1, 1)
    expected = F.conv2d(F.pad(masks, (1, 1, 1, 1), mode="replicate"), kernels, groups=3)
    (computed,) = sobel_embeddings(masks)
    torch.testing.assert_close(computed, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(computed, masks, upstream)
    (expected_grad,) = torch.autograd.grad(expected, masks, upstream)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert sobel_embeddings(masks, 0) == []


def _eq_3_5_over_every_layer(net, probs, labels, lambdas):
    """Eq. 3.5-3.6 written out over all of g_phi's layers, in NCHW, as the thesis states it."""
    target = torch.where((labels != 255)[:, None], one_hot_masks(labels, 3, 255), probs.detach())
    weight = (labels != 255)[:, None].float()
    terms = []
    x_hat, x_star = probs, target
    for index, layer in enumerate(net.layers):
        x_hat, x_star = layer(x_hat), layer(x_star).detach()
        last = index == len(net.layers) - 1
        x_hat, x_star = (x_hat.softmax(1), x_star.softmax(1)) if last else (F.relu(x_hat), F.relu(x_star))
        diff = (x_hat - x_star).abs().mean(dim=1, keepdim=True)
        terms.append(lambdas[index] * (diff * weight).sum() / weight.sum())
    return terms


@pytest.mark.parametrize("lambdas", [(4.0, 2.0, 0.0), (0.5, 0.5, 0.5), (0.0, 3.0, 0.0), (0.0, 0.0, 0.0)])
def test_semeda_term_skips_only_layers_whose_lambda_is_zero_and_stays_exact(lambdas):
    torch.manual_seed(2)
    labels = _labels()
    labels[:, :6, :6] = 255
    net = SemedaNet(3).requires_grad_(False)
    logits = torch.randn(2, 3, 24, 24, requires_grad=True)
    computed_layers = []

    def recording_embed(masks, layers):
        computed_layers.append(layers)
        return net.embeddings(masks, layers)

    terms = embedding_match(recording_embed, logits.softmax(1), labels, lambdas)
    expected = _eq_3_5_over_every_layer(net, logits.softmax(1), labels, lambdas)
    needed = max((i + 1 for i, lam in enumerate(lambdas) if lam), default=0)
    assert computed_layers == [needed, needed]  # prediction and ground truth
    values, expected_values = [float(t.detach()) for t in terms], [float(t.detach()) for t in expected]
    assert values == pytest.approx(expected_values, rel=1e-5, abs=1e-7)
    if needed:
        (grad,) = torch.autograd.grad(sum(terms), logits)
        (expected_grad,) = torch.autograd.grad(sum(expected), logits)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_ignored_pixels_do_not_contribute():
    labels = _labels()
    labels[:, :12, :12] = 255
    net = SemedaNet(3).requires_grad_(False)
    torch.manual_seed(1)
    probs = torch.rand(2, 3, 24, 24).softmax(1)
    changed = probs.clone()
    changed[:, :, :8, :8] = torch.rand(2, 3, 8, 8).softmax(1)  # deep inside the ignored block
    for embed, lambdas in ((net.embeddings, (4.0, 2.0, 1.0)), (sobel_embeddings, (4.0,))):
        a = sum(embedding_match(embed, probs, labels, lambdas))
        b = sum(embedding_match(embed, changed, labels, lambdas))
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    logits = torch.randn(2, 3, 24, 24)
    logits2 = logits.clone()
    logits2[:, :, :8, :8] += 5.0
    assert float(ppce_loss(logits, labels)) == pytest.approx(float(ppce_loss(logits2, labels)))


def test_loss_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="unknown loss"):
        SegmentationLoss("dice", 3)
    with pytest.raises(ValueError, match="pretrained SEMEDA network"):
        SegmentationLoss("semeda", 3)
    with pytest.raises(ValueError, match="takes 3 lambda"):
        SegmentationLoss("semeda", 3, lambdas=(1.0,), semeda_net=SemedaNet(3))
    sobel = SegmentationLoss("sobel", 3)
    _, parts = sobel(torch.randn(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))
    assert set(parts) == {"ppce", "sobel_l1", "sobel"}
