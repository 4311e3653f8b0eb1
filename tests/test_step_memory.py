"""MemoryProbe against allocation patterns known in advance, against SavedTensorMeter where everything
held after a forward is saved for backward, and on checkpointing, whose peak a saved-tensor meter misses."""

import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from inplace_abn import InPlaceABN
from inplace_abn.memory import MemoryProbe, SavedTensorMeter

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_sizes(count, low=1000, high=20000):
    # Multiples of 128 float32 elements (512 bytes): CUDA's caching allocator rounds blocks to 512 bytes.
    return [int(n) * 128 for n in torch.randint(low // 128, high // 128, (count,))]


@pytest.mark.parametrize("device", DEVICES)
def test_peak_marks_and_end_of_a_known_allocation_pattern(device):
    a, b, c, d = random_sizes(4)
    before = torch.empty(random_sizes(1)[0], device=device)  # allocated before: not counted
    with MemoryProbe(device) as probe:
        x = torch.empty(a, device=device)
        y = torch.empty(b, device=device)
        probe.mark("a and b")
        del x
        probe.mark("b")
        z = torch.empty(c, device=device)
        w = torch.empty(d, device=device)
        del y, w
    bytes_ = [4 * n for n in (a, b, c, d)]
    assert probe.marks == {"a and b": bytes_[0] + bytes_[1], "b": bytes_[1]}
    assert probe.peak_bytes == max(bytes_[0] + bytes_[1], bytes_[1] + bytes_[2] + bytes_[3])
    assert probe.end_bytes == bytes_[2]
    del before, z


def test_an_operators_own_temporaries_count_towards_the_peak():
    # The profiler's per-operator view (prof.events()) would net this region's temporary out.
    scratch, result = random_sizes(2)
    with MemoryProbe() as probe:
        with torch.profiler.record_function("operator_with_scratch_space"):
            temporary = torch.empty(scratch)
            output = torch.empty(result)
            del temporary
    assert probe.peak_bytes == 4 * (scratch + result)
    assert probe.end_bytes == 4 * result
    del output


def test_backward_allocations_are_seen():
    (n,) = random_sizes(1)
    x = torch.randn(n, requires_grad=True)  # created before the probe and kept: not counted
    with MemoryProbe() as probe:
        y = x.exp()  # keeps its output for backward
        loss = y.sum()
        probe.mark("forward")
        loss.backward()  # a 4-byte seed gradient, then exp's input gradient, which becomes x.grad
        del y, loss
    scalar = 4
    assert probe.marks["forward"] == 4 * n + scalar
    assert probe.peak_bytes == 4 * n + scalar + scalar + 4 * n
    assert probe.end_bytes == x.grad.nbytes == 4 * n


def conv_net(norm_act, depth=3, channels=8):
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), *norm_act(channels)]
    return nn.Sequential(*layers, nn.Conv2d(channels, 4, 1))


NORM_ACTS = {
    "BatchNorm + ReLU": lambda c: [nn.BatchNorm2d(c), nn.ReLU()],
    "InPlaceABN": lambda c: [InPlaceABN(c)],
}


@pytest.mark.parametrize("norm_act", NORM_ACTS)
def test_held_after_forward_is_what_autograd_saves_plus_the_outputs(monkeypatch, norm_act):
    """Two independent counts of one thing: in a plain conv net, everything alive after the forward
    that was not there before is a tensor saved for backward, the output or the loss."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    model = conv_net(NORM_ACTS[norm_act])
    images = torch.randn(2, 8, *torch.randint(8, 17, (2,)).tolist())
    model(images).sum().backward()  # gradients allocated before the probe, as in training
    meter = SavedTensorMeter([*model.parameters(), *model.buffers(), images])
    with MemoryProbe() as probe:
        with meter:
            output = model(images)
            loss = output.sum()
        probe.mark("forward")
        loss.backward()
        del output, loss
    output_bytes = 2 * 4 * images[0, 0].numel() * 4  # (2, 4, H, W) float32
    assert meter.bytes > 0
    assert probe.marks["forward"] == meter.bytes + output_bytes + 4
    assert probe.peak_bytes > probe.marks["forward"]
    assert probe.end_bytes == 0  # gradients accumulate into the existing .grad buffers


def test_whole_model_selective_checkpointing_holds_less_but_peaks_as_high():
    """Saving only convolution outputs halves what the forward holds, but the backward recomputes the
    rest all at once: the peak is no lower than everything the plain model held."""
    model = conv_net(NORM_ACTS["BatchNorm + ReLU"], depth=4)
    images = torch.randn(2, 8, 16, 16)
    model(images).sum().backward()
    save_convolutions = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.convolution.default])
    forwards = {
        "plain": lambda: model(images),
        "checkpointed": lambda: checkpoint(model, images, use_reentrant=False, context_fn=save_convolutions),
    }
    held, peak = {}, {}
    for name, forward in forwards.items():
        with MemoryProbe() as probe:
            loss = forward().sum()
            probe.mark("forward")
            loss.backward()
            del loss
        held[name], peak[name] = probe.marks["forward"], probe.peak_bytes
    # conv outputs are 4 of the 4 + 2 * 4 full-size activations the plain net keeps (BN and ReLU outputs)
    assert held["checkpointed"] < 0.6 * held["plain"]
    assert peak["checkpointed"] >= held["plain"]
    assert peak["checkpointed"] >= 0.95 * peak["plain"]


def test_misuse_is_refused_with_a_message():
    probe = MemoryProbe()
    with pytest.raises(RuntimeError, match="inside the probe's with-block"):
        probe.mark("forward")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        MemoryProbe("meta")
    with pytest.raises(ValueError, match="already set"):
        with MemoryProbe() as probe:
            probe.mark("forward")
            probe.mark("forward")


def test_training_memory_still_exports_the_meter():
    from inplace_abn.training import memory

    assert memory.SavedTensorMeter is SavedTensorMeter
