"""The per-branch path of dilated attention: every branch is one dense attention, merged by LSE.

Forward: for each branch (segment length w, dilation rate r) gather its tokens as
(B * segments, H, w / r, D) (a view for r == 1), run a dense kernel that returns (out, lse),
and merge into a float32 accumulator in place, through strided views of it, with weights
exp(lse_i - logsumexp_j lse_j).

The files, in the order a forward takes them:

- ``attention.py``: ``per_branch_forward`` / ``per_branch_backward`` and the autograd Function
  ``PerBranchAttention``; the plan (``attention/plan.py``) says which branches and backend.
- ``steps.py``: the branches' work in order. A branch with no padding and no key mask (the usual
  case) is a ``Call`` (``call.py``): its positions are strided windows of the (B, N, H, D)
  tensors, computed from sizes and strides (``attention/windows.py``), that the Triton kernels
  read and write directly; branches with the same tokens per segment and head run as one
  kernel call on one gather buffer.
- ``windowed.py``: running calls, their merges (all at once by ``merge_all`` when every branch
  is a Call and the inputs are small enough to keep every call's output until the end of the
  forward) and their backward.
- ``in_place.py``: a backend that reads strided windows (FlashAttention-4) gets large calls'
  positions in place instead, one kernel call per head group, no gather.
- ``general.py``: padded or masked branches, and inputs whose batch and sequence axes do not
  merge, through views built per call (``rows.py``, shared with sequence parallelism, whose
  branches spanning ranks also take this way: ``attention/sequence_parallel.py``).

Backward: exact. The merged function is softmax(q k^T * scale + log M) v, whose gradient per
branch is what a flash-style backward computes when it is given the *merged* output and LSE
(as ring attention does); the per-branch results are added into dq, dk, dv through the same
views. Only q, k, v, the merged output and the merged LSE are saved; branch tensors are
gathered again in the backward.

Nothing here is imported by this ``__init__``: import the modules themselves.
"""
