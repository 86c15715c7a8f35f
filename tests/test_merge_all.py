"""strided_ops.merge_all (every branch merged in one pass) equals its spec, written here in
float64 from the row side: for each row (P, h) of out, which window element of which entry
holds it.

The Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) in a child
process, this file run as a script; plain CPU tensors take the ATen path, tested directly.
"""

import warnings

import pytest
import torch
from triton_interpreter import run_under_interpreter, skip_without_runtime_loops

from longvit import config
from longvit.attention import strided_ops
from longvit.attention.layout import BranchLayout
from longvit.attention.strided_ops import NO_KEY, MergeEntry, merge_all
from longvit.attention.windows import kernel_windows

B, N, H = 2, 128, 12


def _branch(w, r, d, dtype, gen, pieces=None, heads=None, at=0):
    """Entries of branch (w, r) over B sequences of N tokens: kernel-side o (rows, H', m, D) and
    lse (rows, H', m) (random, LSE NO_KEY at a few places), cut by kernel_windows. ``pieces``:
    segment row ranges (c0, c1), each its own entries, its kernel rows starting ``at`` rows into
    the tensors (a buffer that holds other rows first); ``heads``: (head_start, count) of a head
    chunk (the layout's runs then start mid-group)."""
    start, count = heads or (0, H)
    lay = BranchLayout.of(N, count, w, r, start, H)
    total = B * lay.num_segments
    pieces = pieces or [(0, total)]
    rows = at + sum(c1 - c0 for c0, c1 in pieces)
    o = torch.randn(rows, lay.m, count, d, generator=gen).to(dtype).transpose(1, 2)
    lse = 3 * torch.randn(rows, count, lay.m, generator=gen)
    lse[torch.rand(lse.shape, generator=gen) < 0.1] = NO_KEY
    entries = []
    for c0, c1 in pieces:
        o_wins = kernel_windows(o, lay, at, at + c1 - c0)
        l_wins = kernel_windows(lse, lay, at, at + c1 - c0)
        for (off, first, _, _), ow, lw in zip(lay.runs, o_wins, l_wins):
            entries.append(MergeEntry(ow, lw, lay.segment_length, r, off, start + first, c0))
        at += c1 - c0
    return entries


def reference(entries, d):
    """(out (B, N, H, D), lse (B, N, H), per entry the window indices of the rows it covers and
    those rows) in float64, from the spec."""
    rows = B * N
    p = torch.arange(rows)[:, None]
    h = torch.arange(H)[None, :]
    covers, values, lses, hits = [], [], [], []
    for e in entries:
        w, r = e.segment_length, e.dilation_rate
        n_c, m, groups, g_heads, _ = e.o.shape
        c, j = p // w, p % w
        u = h - e.first_head
        g = torch.div(u, g_heads, rounding_mode="floor")
        t = j - e.offset - g
        cov = (c - e.first_row >= 0) & (c - e.first_row < n_c) & (u >= 0) & (u < groups * g_heads)
        cov &= (t >= 0) & (t % r == 0) & (torch.div(t, r, rounding_mode="floor") < m)
        index = [
            (c - e.first_row).expand(rows, H)[cov],
            torch.div(t, r, rounding_mode="floor").expand(rows, H)[cov],
            g.expand(rows, H)[cov],
            (u % g_heads).expand(rows, H)[cov],
        ]
        o_e = torch.zeros(rows, H, d, dtype=torch.float64)
        lse_e = torch.full((rows, H), -torch.inf, dtype=torch.float64)
        o_e[cov] = e.o.view().double()[tuple(index)]
        lse_e[cov] = e.lse.view().double()[(*index, 0)]
        covers.append(cov)
        values.append(o_e)
        lses.append(lse_e)
        hits.append((index, cov))
    if not entries:
        return (
            torch.zeros(B, N, H, d, dtype=torch.float64),
            torch.full((B, N, H), NO_KEY).double(),
            [],
        )
    cov, o_all, lse_all = torch.stack(covers), torch.stack(values), torch.stack(lses)
    covered = cov.any(0)
    # L = log(sum exp(lse_e)), weights exp(lse_e - L), with the max taken out first: where
    # every covering lse is NO_KEY, L = NO_KEY + log(k) rounds to NO_KEY even in float64, and
    # exp(lse_e - L) would be 1 for each instead of 1 / k
    top = lse_all.amax(0)  # -inf where no entry covers the row
    top = torch.where(covered, top, 0.0)
    terms = torch.where(cov, torch.exp(lse_all - top), 0.0)
    total = terms.sum(0)
    out = (terms[..., None] * o_all).sum(0) / torch.where(covered, total, 1.0)[..., None]
    merged = torch.where(covered, top + torch.log(total), NO_KEY)
    return out.view(B, N, H, d), merged.view(B, N, H), hits


def _moved(entries, device):
    """The entries with their bases copied to device (bases shared stay shared), and
    (device base, CPU base) pairs to copy written lse windows back."""
    bases: dict = {}
    moved = []
    for e in entries:
        o = e.o._replace(base=_copy_to(e.o.base, device, bases))
        lse = e.lse._replace(base=_copy_to(e.lse.base, device, bases))
        moved.append(e._replace(o=o, lse=lse))
    return moved, list(bases.values())


def _copy_to(t, device, bases):
    """t on device, strides and all (one copy per tensor)."""
    if id(t) not in bases:
        bases[id(t)] = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                        .copy_(t), t)  # fmt: skip
    return bases[id(t)][0]


def _check_call(entries, d, out_dtype, write_back, with_lse, tol, device="cpu"):
    want_out, want_lse, hits = reference(entries, d)
    # the lse bases after a write-back: clones written at the covered rows, from the spec
    expected = {}
    for e in entries:
        expected.setdefault(id(e.lse.base), (e.lse.base, e.lse.base.clone()))
    if write_back:
        flat = want_lse.reshape(-1, H)
        for e, (index, cov) in zip(entries, hits):
            clone = expected[id(e.lse.base)][1]
            view = clone.as_strided(e.lse.shape, e.lse.strides, e.lse.offset)
            view[(*index, 0)] = flat[cov].float()
    o_before = {id(e.o.base): (e.o.base, e.o.base.clone()) for e in entries}
    out = torch.full((B, N, H, d), float("nan"), dtype=out_dtype, device=device)
    out_lse = torch.full((B, N, H), float("nan"), device=device) if with_lse else None
    if device == "cpu":
        merge_all(out, out_lse, entries, write_back)
    else:  # the kernel compiled: inputs copied there, results copied back
        moved, bases = _moved(entries, device)
        merge_all(out, out_lse, moved, write_back)
        for there, here in bases:
            here.copy_(there.cpu())
        out, out_lse = out.cpu(), None if out_lse is None else out_lse.cpu()
    atol, rtol = tol
    torch.testing.assert_close(out.double(), want_out.to(out_dtype).double(), atol=atol, rtol=rtol)
    if with_lse:
        torch.testing.assert_close(out_lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    for base, want in expected.values():
        # written at exactly the covered rows (with L, as out_lse holds it), untouched elsewhere
        torch.testing.assert_close(base, want, atol=1e-5, rtol=1e-5)
    for base, before in o_before.values():
        assert torch.equal(base, before), "o was written"
    if with_lse and write_back:
        flat = out_lse.reshape(-1, H)
        for e, (index, cov) in zip(entries, hits):
            assert torch.equal(e.lse.view()[(*index, 0)], flat[cov]), "write-back != out_lse"
    return out, out_lse


def _padded_entries(d, dtype, gen):
    """A window with elements that are no row (positions past the segment: w = 10 padded to
    12 at rate 4, a last segment row the sequence ends inside)."""
    lay = BranchLayout.of(N, H, 10, 4)  # one batch row of N: rows = B * N = 256, 26 segments
    rows = B * N // 10 + 1
    o = torch.randn(rows, H, lay.m, d, generator=gen).to(dtype)
    lse = torch.randn(rows, H, lay.m, generator=gen)
    (off, first, _, _), ow, lw = lay.runs[0], kernel_windows(o, lay, 0, rows)[0], None
    lw = kernel_windows(lse, lay, 0, rows)[0]
    assert ow.shape[:4] == (rows, 3, 4, 3)  # m = 3 positions of 12, 4 groups of 3 heads
    return [MergeEntry(ow, lw, 10, 4, off, first, 0)]


def scenarios(d, dtype, seed=0):
    """Named entry lists: every branch (every row covered), and subsets that leave rows
    uncovered, a branch split over two pieces, a head chunk, a padded window."""
    gen = torch.Generator().manual_seed(seed)
    full = _branch(32, 1, d, dtype, gen, pieces=[(0, 3), (3, 8)], at=2)  # rows 0..2 and 3..7
    rate2 = _branch(64, 2, d, dtype, gen)
    rate8 = _branch(128, 8, d, dtype, gen)  # G = 2: 6 groups, offsets 6 and 7 uncovered
    rate16 = _branch(128, 16, d, dtype, gen)  # G = 1: 12 groups of one head
    chunk = _branch(64, 4, d, dtype, gen, heads=(4, 7))  # runs: part, whole, part of groups
    assert len({e.o.base.data_ptr() for e in chunk}) == 1 and len(chunk) == 3
    return {
        "all branches": full + rate2 + rate8 + rate16,
        "holes": full[1:] + rate8 + rate16 + chunk,
        "one entry": rate16[:1],
        "padded": _padded_entries(d, dtype, gen) + rate8,
        "none": [],
    }


def check_merge_all(triton: bool) -> None:
    """merge_all against the reference: ``triton`` asserts that the kernel ran (one launch per
    call) where it applies, else that ATen did."""
    launches = []
    launch = strided_ops._merge_all_triton
    strided_ops._merge_all_triton = lambda *a: launches.append(1) or launch(*a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", strided_ops.TritonFallbackWarning)  # no quiet fallback
        try:
            _check_all(launches, triton)
        finally:
            strided_ops._merge_all_triton = launch
    print("merge_all: all checks passed")


def _check_all(launches: list, triton: bool) -> None:
    """The checks of check_merge_all; ``launches`` counts the kernel's launches."""
    cases = [
        (8, torch.bfloat16, torch.bfloat16, (1e-2, 1e-2)),
        (16, torch.float32, torch.float32, (1e-5, 1e-5)),
        (8, torch.bfloat16, torch.float32, (1e-5, 1e-5)),
    ]
    calls = 0
    for d, o_dtype, out_dtype, tol in cases:
        for name in scenarios(d, o_dtype):
            for write_back, with_lse in [(False, True), (True, True), (True, False)]:
                # fresh tensors for every call: write_back changes the lse windows
                entries = scenarios(d, o_dtype)[name]
                _check_call(entries, d, out_dtype, write_back, with_lse, tol)
                calls += bool(entries)
    assert len(launches) == (calls if triton else 0), (len(launches), calls)
    # beyond one launch's limits: ATen, with the same values
    launches.clear()
    many = scenarios(4, torch.float32)["all branches"] * 7  # rows covered several times
    many = many[: strided_ops.MAX_MERGE_ENTRIES + 1]
    want, want_lse, _ = reference(many, 4)
    out, out_lse = torch.empty(B, N, H, 4), torch.empty(B, N, H)
    merge_all(out, out_lse, many, write_back=False)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    wide = scenarios(strided_ops.MAX_MERGE_D + 8, torch.float32)["holes"][:2]
    _check_call(wide, strided_ops.MAX_MERGE_D + 8, torch.float32, True, True, (1e-5, 1e-5))
    assert not launches
    if triton:  # the kernel against the ATen path, to float32 rounding
        for write_back in (False, True):
            outs = []
            for run in (merge_all, strided_ops._merge_all_aten):
                entries = scenarios(16, torch.float32, seed=1)["holes"]
                out, out_lse = torch.empty(B, N, H, 16), torch.empty(B, N, H)
                run(out, out_lse, entries, write_back)
                outs.append((out, out_lse, *(e.lse.base for e in entries)))
            for x, y in zip(*outs):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
        assert len(launches) == 2


def test_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    skip_without_runtime_loops()
    run = run_under_interpreter(__file__)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all checks passed" in run.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda():
    """The kernel compiled, on the GPU: the spec for every scenario, one launch per call."""
    launches = []
    launch = strided_ops._merge_all_triton
    strided_ops._merge_all_triton = lambda *a: launches.append(1) or launch(*a)
    calls = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", strided_ops.TritonFallbackWarning)
            for d, o_dtype, out_dtype, tol in [
                (64, torch.bfloat16, torch.bfloat16, (1e-2, 1e-2)),
                (128, torch.float32, torch.float32, (1e-5, 1e-5)),
                (16, torch.bfloat16, torch.float32, (1e-5, 1e-5)),
            ]:
                for name in scenarios(d, o_dtype):
                    for write_back in (False, True):
                        entries = scenarios(d, o_dtype)[name]
                        _check_call(entries, d, out_dtype, write_back, True, tol, "cuda")
                        calls += bool(entries)
    finally:
        strided_ops._merge_all_triton = launch
    assert len(launches) == calls


def test_aten_path_on_cpu():
    """Without the interpreter CPU tensors take ATen's ops: the same spec."""
    if strided_ops.INTERPRET:
        pytest.skip("under the interpreter CPU tensors take the kernel")
    check_merge_all(triton=False)


def test_dtypes_and_shapes_are_checked():
    entries = scenarios(8, torch.float32)["all branches"]
    mixed = entries[:1] + [
        e._replace(o=e.o._replace(base=e.o.base.to(torch.bfloat16))) for e in entries[1:2]
    ]
    with pytest.raises(ValueError, match="o dtypes differ"):
        merge_all(torch.empty(B, N, H, 8), None, mixed, write_back=False)
    half_lse = [entries[0]._replace(lse=entries[0].lse._replace(base=entries[0].lse.base.half()))]
    with pytest.raises(ValueError, match="lse float32"):
        merge_all(torch.empty(B, N, H, 8), None, half_lse, write_back=False)
    with pytest.raises(ValueError, match=r"\(C, m, groups, G, 16\)"):
        merge_all(torch.empty(B, N, H, 16), None, entries, write_back=False)
    with pytest.raises(ValueError, match="out_lse"):
        merge_all(torch.empty(B, N, H, 8), torch.empty(B, N, H, 1), entries, write_back=False)


class _Failing:
    """A stand-in Triton kernel whose launch fails, as compiling for an unsupported GPU would."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("no compiler for this device")

        return launch


def test_a_failing_launch_falls_back_to_aten(monkeypatch):
    monkeypatch.setattr(strided_ops, "INTERPRET", True)  # CPU tensors take the kernel path
    monkeypatch.setattr(strided_ops, "_merge_all_kernel", lambda: _Failing())
    entries = scenarios(8, torch.float32)["holes"]
    try:
        with pytest.warns(strided_ops.TritonFallbackWarning, match="Triton kernel failed"):
            _check_call(entries, 8, torch.float32, True, True, (1e-5, 1e-5))
        assert not config.use_triton()
    finally:
        strided_ops.set_triton(True)


if __name__ == "__main__":
    check_merge_all(triton=True)
