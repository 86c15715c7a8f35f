"""Replays of FlashAttention-4's launches (attention/backends/fa4_launch.py), on a CPU stand-in of
FA4's interface whose entry points, like FA4's, allocate buffers and call "compiled" functions
through compile caches. tests/test_attention_gpu.py checks the real FA4 where installed."""

import types

import pytest
import torch

from longvit.attention import BACKENDS
from longvit.attention.backends import fa4_launch
from tests.test_attention_in_place import FakeFA4Interface
from tests.test_attention_values import SHAPES, _qkv, check_against_reference

MATH = FakeFA4Interface()  # the math of FA4's two entry points, on CPU


class _CompileCache(dict):
    pass


def _kernel_fwd(q, k, v, out, lse, scratch, scale, causal, table=None):
    """The "compiled" forward: math on (B', L, H, D) tensors; scratch is a buffer it uses,
    table a tensor it reads (unused here)."""
    MATH._flash_attn_fwd(q, k, v, scale, causal, True, out=out, lse=scratch)
    lse.copy_(scratch)


def _kernel_bwd(dout, q, k, v, out, lse, dq_accum, dk, dv, scale, causal):
    """The "compiled" backward: adds dq into a float accumulator (zero-filled by the wrapper,
    as FA4's semaphores are), writes dk and dv."""
    dq, _, _ = MATH._flash_attn_bwd(q, k, v, out, dout, lse, scale, causal, False, dk=dk, dv=dv)
    dq_accum.add_(dq)


def _kernel_post(dq_accum, dq):
    dq.copy_(dq_accum)


def make_interface(spoil_first: int = 0, extra_op: bool = False, table=None):
    """A stand-in for flash_attn.cute.interface: ``_flash_attn_fwd`` / ``_flash_attn_bwd`` with
    FA4's keyword names. spoil_first: the first calls run a PyTorch op (as a compile does);
    extra_op: every call runs one; table: the forward hands its kernel this tensor too."""
    state = {"calls": 0}

    def fwd(q, k, v, softmax_scale, causal, return_lse, out, lse):
        state["calls"] += 1
        if state["calls"] <= spoil_first or extra_op:
            torch.ones(1).add_(1)
        key = ("fwd", q.shape[-1], causal)
        if key not in fwd.compile_cache:
            fwd.compile_cache[key] = _kernel_fwd
        scratch = torch.empty_like(lse)
        fwd.compile_cache[key](
            q.detach(), k, v, out.detach(), lse, scratch, softmax_scale, causal, table=table
        )
        return out, lse

    def bwd(q, k, v, out, dout, lse, softmax_scale, causal, deterministic, dq, dk, dv):
        state["calls"] += 1
        key = ("bwd", q.shape[-1], causal)
        if key not in bwd.compile_cache:
            bwd.compile_cache[key] = _kernel_bwd
        dq_accum = torch.zeros(dq.shape, dtype=torch.float64, device=dq.device)
        bwd.compile_cache[key](dout, q, k, v, out, lse, dq_accum, dk, dv, softmax_scale, causal)
        post.compile_cache["post"](dq_accum, dq)
        return dq, dk, dv

    def post():
        pass

    fwd.compile_cache, bwd.compile_cache = _CompileCache(), _CompileCache()
    post.compile_cache = _CompileCache(post=_kernel_post)
    return types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd, _post=post, state=state)


@pytest.fixture
def fa4(monkeypatch):
    """The fa4 backend on a stand-in interface, replays on; returns a function that installs
    an interface and gives its Launches."""
    import longvit.attention.backends.fa4 as fa4_backend
    import longvit.attention.per_branch.in_place as in_place

    backend = BACKENDS["fa4"]
    monkeypatch.setattr(type(backend), "available", lambda self, *a: True)
    monkeypatch.setattr(in_place, "IN_PLACE_ELEMENTS_PER_CALL", 0)

    def install(interface):
        launches = fa4_launch.Launches(interface)
        monkeypatch.setattr(fa4_backend, "fa4_interface", lambda: interface)
        monkeypatch.setattr(fa4_backend, "fa4_launches", lambda: launches)
        return launches

    return install


def _run(*shape_args, causal=False):
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    check_against_reference(*_qkv(b, n, h, d), ws, rs, "fa4", causal=causal)


def test_replays_equal_the_reference(fa4):
    """After one step records every call signature, the next steps replay all of them, and
    every step's values and gradients equal the float64 reference."""
    interface = make_interface()
    launches = fa4(interface)
    _run()
    assert launches.records and not launches.tries
    wrapper_calls, replays = interface.state["calls"], launches.replays
    assert wrapper_calls == len(launches.records)  # one per signature, the rest replayed
    _run()
    assert interface.state["calls"] == wrapper_calls
    assert launches.replays == replays + wrapper_calls + replays
    _run(causal=True)  # new signatures: recorded, then replayed
    assert interface.state["calls"] > wrapper_calls
    kinds = {len(r.launches) for r in launches.records.values()}
    assert kinds == {1, 2}  # forward: one launch; backward: the kernel and the postprocess


def test_zero_filled_buffers_are_zero_filled_again(fa4):
    launches = fa4(make_interface())
    _run()
    backward = [r for r in launches.records.values() if len(r.launches) == 2]
    assert backward and all(r.buffers[0].zeroed for r in backward)
    forward = [r for r in launches.records.values() if len(r.launches) == 1]
    assert forward and not any(b.zeroed for r in forward for b in r.buffers)
    for _ in range(2):
        _run()  # would accumulate stale gradients if the buffer were not zeroed


def test_a_compile_spoils_only_the_first_record(fa4):
    """A wrapper that runs other PyTorch ops on its first call (a compile) is recorded on the
    next call; one that always does stays with the wrapper after MAX_TRIES tries."""
    interface = make_interface(spoil_first=1)
    launches = fa4(interface)
    _run()
    assert len(launches.tries) == 1
    _run()
    calls = interface.state["calls"]
    _run()
    assert interface.state["calls"] == calls and launches.replays > 0

    launches = fa4(make_interface(extra_op=True))
    for _ in range(fa4_launch.MAX_TRIES + 1):
        _run()
    forward_keys = [key for key in launches.tries if key[0].__name__ == "fwd"]
    assert forward_keys and all(launches.tries[k] == fa4_launch.MAX_TRIES for k in forward_keys)
    assert "the wrapper ran" in launches.last_spoiled


def test_a_tensor_from_outside_the_call_is_never_replayed(fa4):
    """A kernel argument that is neither the caller's tensor nor a buffer allocated in the call
    (a cached tensor) could be stale in a replay: such calls always run the wrapper."""
    interface = make_interface(table=torch.zeros(4))
    launches = fa4(interface)
    for _ in range(fa4_launch.MAX_TRIES + 1):
        _run()
    assert "neither the caller's nor a new buffer" in launches.last_spoiled
    assert all(key[0].__name__ == "bwd" for key in launches.records)


def test_replay_switch(monkeypatch):
    monkeypatch.delenv("LONGVIT_FA4_REPLAY", raising=False)
    assert fa4_launch.replay_enabled("4.0.0b36")
    assert not fa4_launch.replay_enabled("4.1.0")
    monkeypatch.setenv("LONGVIT_FA4_REPLAY", "1")
    assert fa4_launch.replay_enabled("4.1.0")
    monkeypatch.setenv("LONGVIT_FA4_REPLAY", "0")
    assert not fa4_launch.replay_enabled("4.0.0b36")


def test_holds_tensor():
    holder = types.SimpleNamespace(a=None, b=(1, [torch.zeros(1)]))
    assert fa4_launch._holds_tensor(holder)
    assert not fa4_launch._holds_tensor(types.SimpleNamespace(a=None, b=(1, 2.0, "x")))
