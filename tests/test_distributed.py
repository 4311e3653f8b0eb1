"""InPlaceABNSync over torch.distributed (gloo, CPU): 2 and 3 processes on uneven shards must equal one
process on the concatenated batch; sub-groups, DDP training, conversion, timeouts.

Each test spawns its processes on 127.0.0.1 with a free port; every collective and every join is
bounded, so a broken collective fails the test in seconds instead of hanging CI. The workers check
their own results against a single-process run they compute themselves; a failed assertion in any
worker fails the test with that worker's traceback.
"""

import copy
import datetime
import multiprocessing
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import inplace_abn
from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, RecomputeABN
from inplace_abn.distributed import merge_stats

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)  # a collective no peer joins fails after this
JOIN_TIMEOUT_S = 90.0  # a whole test, start-up included
# Workers fork from a server process that imported torch once: about 1 s per test instead of 5 s
# with spawn (each worker re-imports torch), and unlike fork from pytest itself, the parent is
# single-threaded and clean (no Inductor pools, no locks held by other threads).
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "inplace_abn", __name__])
TOLERANCE = dict(atol=1e-9, rtol=0.0)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ----------------------------------------------------------------------------------------------
# Process plumbing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, backend, timeout, check, args):
    os.environ["INPLACE_ABN_BACKEND"] = backend
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        check(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _run(world_size, check, *args, backend="eager", timeout=COLLECTIVE_TIMEOUT, start_method=START_METHOD):
    """Run ``check(rank, world_size, *args)`` in ``world_size`` gloo processes; fail on any error or
    when they are not done within JOIN_TIMEOUT_S."""
    context = mp.start_processes(
        _worker, args=(world_size, _free_port(), backend, timeout, check, args), nprocs=world_size,
        join=False, start_method=start_method,
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):  # raises a worker's error
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers still running after {JOIN_TIMEOUT_S:.0f} s: a collective hangs")


# ----------------------------------------------------------------------------------------------
# Helpers used inside the workers


def _shard_slice(shards, rank):
    start = sum(shards[:rank])
    return slice(start, start + shards[rank])


def _pair(config, channels=4):
    """An InPlaceABNSync layer and an identical single-process InPlaceABN (RecomputeABN for
    ``in_place=False``, with the same ``batchnorm_weight``), in float64."""
    kwargs = dict(config.get("layer", {}))
    in_place = kwargs.pop("in_place", True)
    kwargs.setdefault("batchnorm_weight", False)  # InPlaceABNSync's default (RecomputeABN's is True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relu: the not-invertible warning is tested elsewhere
        synced = InPlaceABNSync(channels, group=config.get("group"), in_place=in_place, **kwargs).double()
        single = (InPlaceABN if in_place else RecomputeABN)(channels, **kwargs).double()
    if synced.affine:
        with torch.no_grad():
            synced.weight.uniform_(-1.5, 1.5)  # negative scales exercise |w| + eps and sign(w)
            if synced.batchnorm_weight:
                synced.weight[0] = 0.0  # a zero scale, which only BatchNorm's weight has
            synced.bias.normal_()
    single.load_state_dict(synced.state_dict())
    return synced, single


def _sum_over(tensor, group=None):
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # this rank is a group of its own
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, group=group)
    return tensor


def _check_layer(synced, single, shards, rank, shape, channels_last, steps=2, group=None, dtype=torch.float64,
                 tolerance=TOLERANCE, shortcut=False):
    """Train ``steps`` steps; this rank's shard of outputs and input (and shortcut) gradients, the
    summed parameter gradients and the running statistics must equal ``single`` on the concatenated
    batch."""
    part = _shard_slice(shards, rank)
    for _ in range(steps):
        x = (torch.randn((sum(shards),) + shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
        grad = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        s = torch.randn(x.shape, dtype=torch.float64).to(dtype) if shortcut else None
        if channels_last:
            x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
        x_synced = x[part].clone().requires_grad_()
        x_single = x.clone().requires_grad_()
        s_synced = s[part].clone().requires_grad_() if shortcut else None
        s_single = s.clone().requires_grad_() if shortcut else None
        out = synced(x_synced * 1, s_synced)  # "* 1": an in-place layer must not receive a leaf
        expected = single(x_single * 1, s_single)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected[part], **tolerance)
        out.backward(grad[part])
        expected.backward(grad)
        torch.testing.assert_close(x_synced.grad, x_single.grad[part], **tolerance)
        if shortcut:
            torch.testing.assert_close(s_synced.grad, s_single.grad[part], **tolerance)
        if synced.affine:
            torch.testing.assert_close(_sum_over(synced.weight.grad, group), single.weight.grad, **tolerance)
            torch.testing.assert_close(_sum_over(synced.bias.grad, group), single.bias.grad, **tolerance)
            synced.zero_grad(), single.zero_grad()
    if synced.track_running_stats:
        torch.testing.assert_close(synced.running_mean, single.running_mean, **tolerance)
        torch.testing.assert_close(synced.running_var, single.running_var, **tolerance)
        assert int(synced.num_batches_tracked) == int(single.num_batches_tracked) == steps


# Layer configurations: activation (invertible or not), affine, momentum None, running stats off.
CONFIGS = [
    {"shape": (4, 5, 3), "channels_last": False},
    {"shape": (4, 5, 3), "channels_last": True, "layer": {"activation": "elu", "activation_param": 1.0}},
    {"shape": (4,), "channels_last": False, "layer": {"activation": "identity", "momentum": None}},
    {"shape": (4, 6), "channels_last": False, "layer": {"activation": "relu"}},  # not in place: the fallback
    {"shape": (4, 3, 2, 2), "channels_last": False, "layer": {"affine": False, "activation_param": 0.3}},
    {"shape": (4, 5), "channels_last": False, "layer": {"track_running_stats": False}},
    # the residual form, in place and in the recompute mode (in_place=False, or a lossy activation)
    {"shape": (4, 3), "channels_last": False, "shortcut": True, "layer": {"activation": "elu", "activation_param": 1.0}},
    {"shape": (4, 3), "channels_last": False, "shortcut": True, "layer": {"activation": "hardswish"}},
    {"shape": (4, 3), "channels_last": False, "shortcut": True, "layer": {"in_place": False}},
    # the recompute mode scaling by BatchNorm's weight itself (signs and zeros as they are)
    {"shape": (4, 3), "channels_last": False, "shortcut": True,
     "layer": {"in_place": False, "batchnorm_weight": True, "activation": "relu"}},
]


def _check_configs(rank, world_size, shards):
    for config in CONFIGS:
        torch.manual_seed(0)  # the same data and weights on every rank
        synced, single = _pair(config)
        _check_layer(synced, single, shards, rank, config["shape"], config["channels_last"],
                     shortcut=config.get("shortcut", False))
    # Eval mode communicates nothing: only rank 0 runs it (a collective would hang, then time out).
    if rank == 0:
        synced.eval(), single.eval()
        x = torch.randn(3, 4, 5)
        torch.testing.assert_close(synced(x.double()), single(x.double()), **TOLERANCE)


@pytest.mark.parametrize("shards", [(3, 5), (3, 5, 2)], ids=["2-ranks", "3-ranks"])
def test_matches_single_process_on_uneven_shards(shards):
    _run(len(shards), _check_configs, shards)


def _check_low_precision(rank, world_size, shards):
    # float16/bfloat16 storage, float32 statistics: as close to one process as the storage dtype allows.
    for dtype, tolerance in ((torch.bfloat16, dict(atol=0.1, rtol=0.02)), (torch.float16, dict(atol=0.02, rtol=0.005))):
        torch.manual_seed(0)
        synced, single = _pair({})
        synced.float(), single.float()  # float32 parameters and statistics, as BatchNorm under autocast
        _check_layer(synced, single, shards, rank, (4, 3, 2), True, steps=1, dtype=dtype, tolerance=tolerance)
        # The exchanged statistics are float32 however the input is stored.
        assert synced.running_var.dtype == torch.float32


def test_low_precision_inputs():
    _run(2, _check_low_precision, (3, 5))


def _counting(name, collective, calls):
    def counted(*args, **kwargs):
        calls.append(name)
        return collective(*args, **kwargs)

    return counted


def _check_collective_count(rank, world_size):
    calls = []
    for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather", "broadcast"):
        if hasattr(dist, name):  # this worker's torch.distributed only
            setattr(dist, name, _counting(name, getattr(dist, name), calls))
    layer = InPlaceABNSync(8).double()
    out = layer(torch.randn(3, 8, 4, 4, dtype=torch.float64) * 1)
    assert len(calls) == 1 and calls[0].startswith("all_gather"), calls  # all channels in one buffer
    out.backward(torch.randn_like(out))
    assert calls[1:] == ["all_reduce"], calls
    layer.eval()
    layer(torch.randn(3, 8, 4, 4, dtype=torch.float64)).sum()
    assert len(calls) == 2, calls  # eval: nothing


def test_one_collective_forward_one_backward():
    _run(2, _check_collective_count)


# ----------------------------------------------------------------------------------------------
# Groups


def _check_subgroup(rank, world_size):
    shards = (3, 5, 2)
    members = [0, 2]
    group = dist.new_group(members)  # every rank creates it; rank 1 gets a placeholder
    torch.manual_seed(0)
    synced, single = _pair({"group": group})
    torch.manual_seed(1)
    if rank in members:  # the members equal one process on their shards only
        member_shards = tuple(shards[r] for r in members)
        _check_layer(synced, single, member_shards, members.index(rank), (4, 3), False, group=group)
    else:  # not a member: an ordinary InPlaceABN on its own batch, taking part in no collective
        _check_layer(synced, single, (shards[rank],), 0, (4, 3), False, group=group)
    dist.barrier()


def _check_active_group(rank, world_size):
    # Rank 1 has no data for the layer: it opts out, and the others sync without it.
    group = inplace_abn.active_group(rank != 1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), InPlaceABNSync(4)).double()
    inplace_abn.set_active_group(model, group)
    assert model[1].group is group
    if rank != 1:
        torch.manual_seed(0)
        x = torch.randn(4, 3, dtype=torch.float64) + rank
        model(x).sum().backward()
        # The opted-in ranks hold identical running statistics, merged from both shards.
        stats = torch.stack([model[1].running_mean, model[1].running_var])
        gathered = [torch.empty_like(stats) for _ in range(2)]
        dist.all_gather(gathered, stats, group=group)
        torch.testing.assert_close(gathered[0], gathered[1], atol=0, rtol=0)
    # Nobody active: every rank gets a placeholder and the layer runs unsynchronized.
    nobody = inplace_abn.active_group(False)
    assert dist.get_world_size(nobody) == -1


def test_subgroup():
    _run(3, _check_subgroup)


def test_active_group():
    _run(3, _check_active_group)


# ----------------------------------------------------------------------------------------------
# DDP: training on equal shards equals single-process training on the whole batch


def _small_network():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False),
        InPlaceABN(6),
        torch.nn.Conv2d(6, 6, 3, padding=1, bias=False),
        ABN(6, activation="elu", activation_param=1.0),
        torch.nn.Conv2d(6, 6, 3, padding=1, bias=False),
        InPlaceABN(6, activation="identity"),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 2),
    ).double()


def _check_ddp_training(rank, world_size, per_rank, steps, compile_backend=None):
    single = _small_network()
    synced = InPlaceABNSync.convert_sync_abn(_small_network())
    assert sum(isinstance(m, InPlaceABNSync) for m in synced.modules()) == 3
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; older versions know only it
        warnings.simplefilter("ignore", FutureWarning)
        ddp = torch.nn.parallel.DistributedDataParallel(synced, broadcast_buffers=False)  # stats agree by themselves
    model = torch.compile(ddp, backend=compile_backend) if compile_backend else ddp
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (single, ddp)]
    part = _shard_slice((per_rank,) * world_size, rank)
    for step in range(steps):
        torch.manual_seed(100 + step)
        x = torch.randn(per_rank * world_size, 3, 6, 6, dtype=torch.float64)
        target = torch.randn(per_rank * world_size, 2, dtype=torch.float64)
        runs = ((single, x, target, optimizers[0]), (model, x[part], target[part], optimizers[1]))
        for network, inputs, targets, optimizer in runs:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(network(inputs), targets).backward()
            optimizer.step()
    for (name, expected), actual in zip(single.state_dict().items(), synced.state_dict().values()):
        torch.testing.assert_close(actual, expected, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_ddp_training_equals_single_process():
    _run(2, _check_ddp_training, 4, 3)


def _check_torch_compile(rank, world_size):
    # aot_eager: dynamo and AOT autograd trace the collectives into the graphs (where torch.compile
    # can go wrong), without Inductor's C++ build, which would take a minute here.
    _check_ddp_training(rank, world_size, 4, 2, "aot_eager")
    # fullgraph: both collectives trace without a graph break; uneven shards.
    torch.manual_seed(0)
    synced, single = _pair({})
    compiled = torch.compile(synced, backend="aot_eager", fullgraph=True)
    _check_layer(compiled, single, (3, 5), rank, (4, 3, 2), True)


def test_torch_compile():
    _run(2, _check_torch_compile)


def _check_compiled_backend(rank, world_size):
    torch.manual_seed(0)
    synced, single = _pair({})
    _check_layer(synced, single, (3, 5), rank, (4, 3, 2), True, steps=1)


def test_compiled_backend():
    # INPLACE_ABN_BACKEND=compiled: Inductor kernels for each rank's passes, the same collectives.
    _run(2, _check_compiled_backend, backend="compiled")


# ----------------------------------------------------------------------------------------------
# Failure modes


def _check_timeout(rank, world_size, deadline_s, done):
    # Rank 1 never runs the layer: rank 0's collective must fail within the group's timeout.
    if rank == 0:
        layer = InPlaceABNSync(4).double()
        start = time.monotonic()
        try:
            with pytest.raises(RuntimeError):
                layer(torch.randn(3, 4, dtype=torch.float64))
            assert time.monotonic() - start < deadline_s
        finally:
            done.set()
    else:
        done.wait(timeout=JOIN_TIMEOUT_S)


def test_missing_peer_fails_within_the_timeout():
    done = mp.get_context(START_METHOD).Event()
    _run(2, _check_timeout, 10.0, done, timeout=datetime.timedelta(seconds=2))


# ----------------------------------------------------------------------------------------------
# In-process: no process group, one process, conversion, the merge


def test_behaves_as_inplace_abn_without_process_group(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    assert not dist.is_initialized()
    synced, single = _pair({})
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(synced(x * 1), single(x * 1), atol=0, rtol=0)
    torch.testing.assert_close(synced.running_var, single.running_var, atol=0, rtol=0)


def test_behaves_as_inplace_abn_with_one_process(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT)
    try:
        synced, single = _pair({})
        _check_layer(synced, single, (6,), 0, (4, 3), False)
    finally:
        dist.destroy_process_group()


def test_convert_sync_abn(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 1),
            InPlaceABN(4, momentum=None, activation="elu", activation_param=0.5),
            torch.nn.Sequential(ABN(4, eps=1e-3, affine=False), InPlaceABN(4, activation="relu")),
            torch.nn.BatchNorm2d(4),
        ).double()
    model[1].train(False)
    original = copy.deepcopy(model)
    parameters = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    group = object()  # any value: the layers keep it for later
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = InPlaceABNSync.convert_sync_abn(model, group)
    assert converted is model
    layers = [converted[1], converted[2][0], converted[2][1]]
    assert all(type(layer) is InPlaceABNSync and layer.group is group for layer in layers)
    assert [layer.in_place for layer in layers] == [True, False, True]  # an ABN may still need its input
    assert (converted[1]._activation.name, converted[1]._activation.param, converted[1].momentum) == ("elu", 0.5, None)
    assert (converted[2][0].eps, converted[2][0].affine, converted[2][1]._activation.name) == (1e-3, False, "relu")
    assert not converted[1].training and converted[2][0].training
    assert type(converted[3]) is torch.nn.BatchNorm2d  # plain BatchNorm: nn.SyncBatchNorm's business
    # The same tensors, not copies: an optimizer built before the conversion keeps working.
    assert all(p is parameters[name] for name, p in converted.named_parameters())
    assert all(b is buffers[name] for name, b in converted.named_buffers())
    assert "in_place=False" in repr(converted[2][0])
    # Without a process group the converted model computes what the original did.
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(converted.state_dict(), original.state_dict(), atol=1e-12, rtol=0)
    # The former ABN keeps its input.
    hidden = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    kept = hidden.clone()
    converted[2][0](hidden)
    torch.testing.assert_close(hidden, kept, atol=0, rtol=0)


def test_merge_stats_is_exact_for_uneven_and_empty_shards():
    data = torch.randn(20, 3, dtype=torch.float64) * 3 + 7
    pieces = [data[:3], data[3:3], data[3:11], data[11:]]  # one shard is empty
    counts = torch.tensor([[float(len(p))] for p in pieces], dtype=torch.float64)
    nan = torch.full((3,), float("nan"), dtype=torch.float64)  # what var_mean gives an empty shard
    means = torch.stack([p.mean(0) if len(p) else nan for p in pieces])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else nan for p in pieces])
    count, mean, m2 = merge_stats(counts, means, m2s)
    assert float(count) == 20
    torch.testing.assert_close(mean, data.mean(0), atol=1e-13, rtol=0)
    torch.testing.assert_close(m2 / count, data.var(0, unbiased=False), atol=1e-12, rtol=0)
