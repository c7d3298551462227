"""The channels-last layout of float32 CPU training (nets/layout.py): the converted networks compute the same
function with the same parameters, keep the layout through every layer, and save the same checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossmodalseg.methods import Task, get_method
from crossmodalseg.nets.layout import InstanceNorm3dChannelsLast, to_channels_last, trains_channels_last
from crossmodalseg.nets.unet import UNet, UNetConfig

CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_the_channels_last_instance_norm_is_instance_norm_forward_and_backward():
    reference = nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    norm = InstanceNorm3dChannelsLast(6, affine=True)
    norm.load_state_dict(reference.state_dict())
    x = (torch.randn(3, 6, 5, 7, 4) * torch.arange(1, 7).view(1, 6, 1, 1, 1) + 2).requires_grad_()
    x_cl = x.detach().to(memory_format=CL).requires_grad_()
    grad = torch.randn(3, 6, 5, 7, 4)
    expected, out = reference(x), norm(x_cl)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    expected.backward(grad)
    out.backward(grad.to(memory_format=CL))
    torch.testing.assert_close(x_cl.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(norm.bias.grad, reference.bias.grad, atol=1e-4, rtol=1e-5)
    # Input in the default layout: plain instance norm, default layout out.
    assert norm(x.detach()).is_contiguous()


def small_unet() -> UNet:
    return UNet(UNetConfig(2, 3, [8, 16, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3, 2, 1))


def test_a_converted_unet_computes_the_same_logits_and_gradients_and_keeps_its_state_dict():
    reference = small_unet().train()
    converted = small_unet().train()
    converted.load_state_dict(reference.state_dict())
    to_channels_last(converted)
    assert not any(type(m) is nn.InstanceNorm3d for m in converted.modules())
    assert converted.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 2, 16, 24, 24)
    norm_outputs = []
    for m in converted.modules():
        if isinstance(m, InstanceNorm3dChannelsLast):
            m.register_forward_hook(lambda module, args, out: norm_outputs.append(out))
    outputs = {}
    for name, net in (("reference", reference), ("converted", converted)):
        logits = net(x)
        assert isinstance(logits, list) and len(logits) == 2  # full resolution + one deep-supervision head
        outputs[name] = logits
        sum(o.square().mean() for o in logits).backward()
    # The layout survives every layer (PyTorch's own instance norm would hand each next convolution the default one).
    norms = sum(isinstance(m, InstanceNorm3dChannelsLast) for m in converted.modules())
    assert norms == 10 and len(norm_outputs) == norms and all(o.is_contiguous(memory_format=CL) for o in norm_outputs)
    for got, expected in zip(outputs["converted"], outputs["reference"]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    grads = dict(reference.named_parameters())
    for name, p in converted.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)
    # Saved and loaded either way: a converted network's checkpoint is an ordinary one.
    fresh = small_unet()
    fresh.load_state_dict(converted.state_dict())
    fresh.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), converted(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["single", "mkd", "maml", "cmc"])
def test_every_methods_networks_convert(name: str, tmp_path):
    """Each method's networks (segmentors, translators, discriminators, fusion modules) keep no default-layout
    instance norm once converted."""
    from crossmodalseg.data.phantom import make_phantom_dataset
    from crossmodalseg.data.plan import make_plan
    from crossmodalseg.data.spec import load_spec

    spec = load_spec(make_phantom_dataset(tmp_path, n_cases=2, seed=0, size=(24, 24, 16)).root)
    assistants = [] if name == "single" else ["mr"]
    cls = get_method(name)
    task = Task.from_spec(spec, "ct", assistants)
    plan = cls.adapt_plan(make_plan(spec, cls.inputs_for(task), "fast"))
    method = cls(task, plan).to(torch.device("cpu"), channels_last=True)
    norms = [type(m) for net in method.nets.values() for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(t is InstanceNorm3dChannelsLast for t in norms), norms
    convs = [m.weight for net in method.nets.values() for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=CL) for w in convs)


def test_a_2d_translator_stays_as_it_is():
    from crossmodalseg.nets.translator import Generator, TranslatorConfig

    generator = to_channels_last(Generator(TranslatorConfig(spatial_dims=2, filters=4)))
    assert generator(torch.randn(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_only_float32_cpu_training_uses_channels_last():
    assert trains_channels_last(torch.device("cpu"), None)
    assert not trains_channels_last(torch.device("cpu"), torch.bfloat16)
    assert not trains_channels_last(torch.device("cuda", 0), None)
