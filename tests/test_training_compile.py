"""What the training step compiles: the model on CUDA, a SEMEDA loss everywhere (its embedding term fuses well; PPCE
has nothing to fuse; Sobel's term gained nothing, it is compiled only when asked). A compiled loss steps exactly like
the eager one, and one that fails, in forward or backward, is redone eagerly instead of stopping the run."""

import pytest
import torch

from segmenters.losses import SegmentationLoss
from segmenters.losses.semeda import SemedaNet
from segmenters.models import build_model
from segmenters.spec import Normalization
from segmenters.training import CompilePlan, TrainingStep, resolve_compile

CLASSES = 4


@pytest.mark.parametrize(("request_", "device", "loss", "plan"), [
    ("auto", "cpu", "ppce", (False, False)), ("auto", "cpu", "semeda", (False, True)),
    ("auto", "cpu", "sobel", (False, False)), ("auto", "cuda", "ppce", (True, False)),
    ("auto", "cuda", "semeda", (True, True)), (True, "cpu", "ppce", (True, False)),
    (True, "cpu", "semeda", (True, True)), (True, "cpu", "sobel", (True, True)),
    (False, "cuda", "semeda", (False, False))])
def test_what_each_compile_setting_compiles(request_, device, loss, plan):
    assert resolve_compile(request_, torch.device(device), loss) == CompilePlan(*plan)


def _semeda_step(plan: CompilePlan) -> TrainingStep:
    torch.manual_seed(0)
    model = build_model("unet", CLASSES).to(memory_format=torch.channels_last).train()
    criterion = SegmentationLoss("semeda", CLASSES, lambdas=(4.0, 2.0, 0.5), semeda_net=SemedaNet(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return TrainingStep(model, criterion, optimizer, Normalization(), torch.device("cpu"), "off", plan)


def _batch():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (2, 32, 32), generator=generator)
    labels[:, :4] = 255  # ignored pixels take the prediction's own mask in S*
    return torch.rand(2, 3, 32, 32, generator=generator), labels


@pytest.mark.slow
def test_a_compiled_semeda_loss_gives_the_eager_loss_parts_and_gradients():
    images, labels = _batch()
    steps = {plan: _semeda_step(plan) for plan in (CompilePlan(False, False), CompilePlan(False, True))}
    results = {plan: step(images, labels) for plan, step in steps.items()}
    (eager_loss, eager_parts), (compiled_loss, compiled_parts) = results.values()
    eager_step, compiled_step = steps.values()
    assert compiled_step.compiled == CompilePlan(False, True) and eager_step.compiled == CompilePlan(False, False)
    assert float(compiled_loss.detach()) == pytest.approx(float(eager_loss.detach()), rel=1e-5)
    assert set(compiled_parts) == set(eager_parts) == {"ppce", "semeda_l1", "semeda_l2", "semeda_l3", "semeda"}
    for name in eager_parts:
        assert float(compiled_parts[name]) == pytest.approx(float(eager_parts[name]), rel=1e-5, abs=1e-7), name
    for (name, eager), compiled in zip(eager_step.model.named_parameters(), compiled_step.model.parameters()):
        torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-4, atol=1e-6, msg=name)


class _FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("wrong strides in a compiled backward")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_compiled_loss_that_fails_in_forward_or_backward_is_redone_eagerly(capsys, where):
    step = _semeda_step(CompilePlan(False, True))
    eager_step = _semeda_step(CompilePlan(False, False))

    def failing_compiled_loss(logits, labels):
        if where == "forward":
            raise RuntimeError("no C compiler")
        loss, parts = step.criterion(logits, labels)
        return _FailsInBackward.apply(loss), parts

    step.loss = failing_compiled_loss
    images, labels = _batch()
    loss, parts = step(images, labels)
    expected, _ = eager_step(images, labels)
    assert step.compiled == CompilePlan(False, False)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6) and parts["semeda"] > 0
    for eager, redone in zip(eager_step.model.parameters(), step.model.parameters()):
        torch.testing.assert_close(redone, eager)  # one update, from this batch's gradients only
    assert "torch.compile failed (RuntimeError: " in capsys.readouterr().out


@pytest.mark.slow
def test_a_compiled_sobel_loss_trains():
    """Replication padding's backward failed under inductor on channels-last input; the Sobel term pads by hand."""
    torch.manual_seed(0)
    model = build_model("unet", CLASSES).to(memory_format=torch.channels_last).train()
    criterion = SegmentationLoss("sobel", CLASSES)
    step = TrainingStep(model, criterion, torch.optim.AdamW(model.parameters()), Normalization(),
                        torch.device("cpu"), "off", CompilePlan(False, True))
    loss, parts = step(*_batch())
    assert step.compiled == CompilePlan(False, True) and parts["sobel"] > 0
