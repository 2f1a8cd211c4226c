"""Zigzag ring attention: exact causal self-attention of one sequence sharded over many processes.

LongPO trains on 128K-512K-token inputs, whose attention no single GPU holds. Each of the W ranks of a
sequence-parallel (SP) group keeps T = N/W tokens, a zigzag shard (the same causal work on every rank).
The key/value blocks travel around the ring of ranks; each rank attends its queries to every block that
visits, and the blocks' results merge exactly by their log-sum-exp (lse). The backward runs the ring again
from the kept out and lse, the key/value gradients travelling with their block. Then: a shared prefix with
branches (LongPO's chosen and rejected answers after ONE copy of the document), decoding against a sharded
prompt, and the transformers attention "ring_attention" (a Llama / Mistral / Qwen2 model given zigzag-sharded
ids and positions runs sequence-parallel). Last, the fused block kernels (PyTorch's cuDNN and
FlashAttention-2 ops on CUDA, its fused CPU attention), each checked once against the plain kernel.

Simplifications: causal self-attention only (pad at the END of a sequence), no dropout, no sliding window;
blocks under 8 query rows or keys always run the plain kernel; where no fused kernel passes its check the
plain kernel runs everything (with its T x T scores: on a GPU, bf16 is what the fused kernels take).

Self-check and benchmark against SDPA of the whole sequence (the test file's opt-in harness):
    torchrun --nproc_per_node 2 test_longpo.py ring --threads 1     # 2 CPU processes (python: one)
    torchrun --nproc_per_node 8 test_longpo.py ring --seq-len 131072 --heads 32 --kv-heads 8 --dtype bfloat16
"""
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AttentionInterface

# Shape glossary: B batch, N whole-sequence length, W ring (SP group) size, T = N/W local tokens,
# c = T/2 tokens in one zigzag chunk, Hq query heads, Hkv key/value heads (Hq % Hkv == 0),
# G = Hq/Hkv queries per key/value head, D head dim, Tq/Tk query/key lengths of one block.


# ---------------------------------------------------------- zigzag sharding
# 2W chunks; rank r holds chunks r and 2W-1-r, an early and a late one, so every rank does the same causal
# work (a contiguous split leaves rank 0 idle while rank W-1 attends to everything).

def zigzag_shard(x, rank, world_size, dim=1):
    """Chunks `rank` and `2*world_size-1-rank` of x cut into 2*world_size equal chunks along dim."""
    n, parts = x.shape[dim], 2 * world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"zigzag_shard: rank {rank} is outside [0, {world_size})")
    if n % parts:
        raise ValueError(f"zigzag_shard: length {n} along dim {dim} is not divisible by 2*world_size = "
                         f"{parts}; pad the sequence at the end to {-(-n // parts) * parts} tokens")
    chunks = x.chunk(parts, dim)
    return torch.cat([chunks[rank], chunks[parts - 1 - rank]], dim)


def zigzag_unshard(x_local, group=None, dim=1):
    """Inverse of zigzag_shard, the full tensor in order: a collective of `group`, not differentiable."""
    firsts, seconds = zip(*(shard.chunk(2, dim) for shard in _all_gather(x_local, group)))
    return torch.cat(firsts + seconds[::-1], dim)  # chunks 0, 1, ..., W-1, then W, ..., 2W-1


# ---------------------------------------------------------- the plain block kernel
# A block kernel attends queries (B, Tq, Hq, D) to keys/values (B, Tk, Hkv, D).
#   fwd(q, k, v, scale, causal) -> block_out (B, Tq, Hq, D), block_lse (B, Hq, Tq) fp32, aux
#   bwd(dout, q, k, v, out, lse, aux, scale, causal) -> dq, dk, dv (GQA: dk, dv have Hkv heads)
# `causal` is only used with Tq == Tk (the diagonal block). In bwd, out and lse are the GLOBAL (merged)
# ones, so P = exp(q k^T * scale - lse) is this block's exact share of the full softmax. aux: what a fused
# kernel's backward needs from its forward (RNG state, bookkeeping; None for most), kept per ring step.
# The plain kernel holds a block's Tq x Tk scores; the fused ones (the file's last section) do not.

def _acc_dtype(x):
    """Accumulation dtype of out, lse, dq, dk, dv: fp32, or fp64 for fp64 inputs (tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _plain_scores(q, k, scale, causal):
    """fp32 (fp64 for fp64 inputs) scores, grouped for GQA: (B, Hkv, G, Tq, Tk)."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    qg = q.to(_acc_dtype(q)).view(B, Tq, Hkv, Hq // Hkv, D)  # head h = hkv*G + g, as repeat_interleave
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(qg.dtype)) * scale
    if causal:
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s


def plain_fwd(q, k, v, scale, causal):
    B, Tq, Hq, D = q.shape
    s = _plain_scores(q, k, scale, causal)
    lse = s.logsumexp(-1)  # (B, Hkv, G, Tq)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(s.dtype)).reshape(B, Tq, Hq, D)
    return out, lse.reshape(B, Hq, Tq), None  # fp32 (fp64 for fp64 inputs)


def plain_bwd(dout, q, k, v, out, lse, aux, scale, causal):
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    s = _plain_scores(q, k, scale, causal)
    ct = s.dtype
    p = torch.exp(s - lse.to(ct).view(B, Hkv, Hq // Hkv, Tq, 1))
    do = dout.to(ct).view(B, Tq, Hkv, Hq // Hkv, D)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)
    dp = torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(ct))
    # softmax backward: ds = p * (dp - rowsum(dout * out)), the row sum taken with the global out
    delta = (dout.to(ct) * out.to(ct)).sum(-1).view(B, Tq, Hkv, Hq // Hkv).permute(0, 2, 3, 1)
    ds = p * (dp - delta.unsqueeze(-1)) * scale
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(ct)).reshape(B, Tq, Hq, D)
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(ct).view(B, Tq, Hkv, Hq // Hkv, D))
    return dq, dk, dv


# ---------------------------------------------------------- merging blocks

def empty_acc(q):
    """The running (out, lse) of queries q before any block: nothing seen, out = 0 and lse = log 0."""
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, D, dtype=_acc_dtype(q), device=q.device)
    return out, torch.full((B, H, T), float("-inf"), dtype=out.dtype, device=q.device)


def merge_block_(out, lse, block_out, block_lse):
    """In place: fold one block's (block_out, block_lse) into the running fp32 (out, lse).

    Exact log-sum-exp merge, lse' = log(e^lse + e^block_lse) and
    out' = (e^lse * out + e^block_lse * block_out) / e^lse', written without overflow as
    out -= sigmoid(block_lse - lse) * (out - block_out);  lse = logaddexp(lse, block_lse).
    From empty_acc the first block comes out as it is. out (B, T, H, D), lse (B, H, T); views allowed."""
    block_lse = block_lse.to(lse.dtype)
    w = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)  # (B, T, H, 1)
    out.sub_(w * (out - block_out.to(out.dtype)))
    lse.copy_(torch.logaddexp(lse, block_lse))


# ---------------------------------------------------------- one block, routed by its size
# A block under SMALL_BLOCK query rows or keys runs the plain kernel, not pick_kernel's: such blocks come at
# a sequence's end (a short answer's last tokens on a rank) and in decoding (one query), where the plain
# kernel's scores are no bigger than its inputs and a fused op may refuse them or return NaN. The choice
# depends on the shapes alone, so a block's backward runs where its forward ran (with its aux).
SMALL_BLOCK = 8


def _routed(kernel, q, k):
    return KERNELS["plain" if min(q.shape[1], k.shape[1]) < SMALL_BLOCK else kernel]


def attend_block(kernel, out, lse, q, k, v, scale, causal):
    """Merge the attention of queries q to the block (k, v) into the running (out, lse) of q (views of
    larger buffers); return the kernel's aux for the block's backward."""
    block_out, block_lse, aux = _routed(kernel, q, k)[0](q, k, v, scale, causal)
    merge_block_(out, lse, block_out, block_lse)
    return aux


def add_block_grads(kernel, dq, dk, dv, dout, q, k, v, out, lse, aux, scale, causal):
    """Add one block's share of the gradients to the fp32 dq, dk, dv (views of larger buffers)."""
    grads = _routed(kernel, q, k)[1](dout, q, k, v, out, lse, aux, scale, causal)
    for grad, block_grad in zip((dq, dk, dv), grads):
        grad += block_grad  # in place: into the buffer dq, dk, dv are views of


# ---------------------------------------------------------- the ring
# Step 0 attends the local block to itself, causally. At step s the K/V block of rank j = (r - s) mod W
# visits (_visitor). The next block's send/recv is posted before the current block is computed, so the
# transfer overlaps the compute. The backward keeps the forward's final out and lse: one block's backward
# with the GLOBAL lse is its exact share of dq, dk, dv. dq stays local; dk, dv travel with their block and
# take one more hop home after the last step.

LOCAL = "local"  # a group of one: the whole sequence is in this process (SP size 1), whatever the world size


def _group_size_rank(group):
    if group == LOCAL or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _send_recv(x, group):
    """Post x -> the next rank of the group and the previous rank's -> a new buffer, and return at once a
    function that waits for both and returns the buffer. x must not change until then: the send reads it."""
    world_size, rank = _group_size_rank(group)
    recv = torch.empty_like(x)
    requests = dist.batch_isend_irecv([  # peers by their rank in the group
        dist.P2POp(dist.isend, x, group=group, group_peer=(rank + 1) % world_size),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % world_size)])

    def received():
        for request in requests:
            request.wait()
        return recv
    return received


def _all_gather(x, group):
    """Every rank's x, in rank order."""
    world_size = _group_size_rank(group)[0]
    if world_size == 1:
        return [x]
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _visitor(rank, world_size, step, c):
    """(query rows, key rows, causal): which part of the local queries (chunks of c tokens) meets which
    part of the K/V block visiting at this step."""
    source = (rank - step) % world_size  # the rank whose K/V block we hold
    if step == 0:  # our own chunks r < 2W-1-r in order: an ordinary causal block
        return slice(None), slice(None), True
    if source < rank:  # lower rank: its first chunk is in the past of all of q, its second in the future
        return slice(None), slice(0, c), False
    return slice(c, None), slice(None), False  # higher rank: all of it is in the past of our second chunk


def _ring_forward(q, k, v, scale, group, kernel, visit=None):
    """(out, lse, auxes) of the local zigzag shard: out (B, T, Hq, D) and lse (B, Hq, T) in fp32,
    auxes[step] what that block's backward needs from its forward. visit(step, kv), if given, sees
    each K/V block (2, B, T, Hkv, D) as it passes (the shared-prefix branches attend to every one)."""
    world_size, rank = _group_size_rank(group)
    kv = torch.stack([k, v])  # (2, B, T, Hkv, D): only the Hkv heads travel, in one message
    (out, lse), auxes = empty_acc(q), []
    for step in range(world_size):
        if step + 1 < world_size:
            kv_next = _send_recv(kv, group)  # in flight while we compute
        rows, keys, causal = _visitor(rank, world_size, step, q.shape[1] // 2)
        auxes.append(attend_block(kernel, out[:, rows], lse[:, :, rows], q[:, rows], *kv[:, :, keys], scale,
                                  causal))
        if visit:
            visit(step, kv)
        if step + 1 < world_size:
            kv = kv_next()
    return out, lse, auxes


def _ring_backward(dout, q, k, v, out, lse, auxes, scale, group, kernel, visit=None):
    """(dq, dk, dv) in fp32 of the local zigzag shard, given the forward's final out and lse.
    visit(step, kv, dkv), if given, adds its own share to the travelling dk/dv of each block."""
    world_size, rank = _group_size_rank(group)
    kv = torch.stack([k, v])
    dq = torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device)
    dkv_next = None  # the travelling dk/dv, posted at the end of each step
    for step in range(world_size):
        if step + 1 < world_size:
            kv_next = _send_recv(kv, group)
        rows, keys, causal = _visitor(rank, world_size, step, q.shape[1] // 2)
        # dkv: the fp32 gradient of the block we hold, summed over the ranks it has visited so
        # far. It arrived from the previous rank during our compute; add our share, pass it on.
        dkv = torch.zeros(kv.shape, dtype=_acc_dtype(q), device=q.device) if step == 0 else dkv_next()
        add_block_grads(kernel, dq[:, rows], *dkv[:, :, keys], dout[:, rows], q[:, rows], *kv[:, :, keys],
                        out[:, rows], lse[:, :, rows], auxes[step], scale, causal)
        if visit:
            visit(step, kv, dkv)
        if world_size > 1:  # after the last step this is the hop home to the block's owner
            dkv_next = _send_recv(dkv, group)
        if step + 1 < world_size:
            kv = kv_next()
    if world_size > 1:
        dkv = dkv_next()  # our own block's dk, dv, summed over every rank's queries
    return dq, dkv[0], dkv[1]


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, kernel, layout):
        if layout is None:
            (out, lse, auxes), branch_kv = _ring_forward(q, k, v, scale, group, kernel), None
        else:
            out, lse, auxes, branch_kv = _branched_forward(q, k, v, scale, group, kernel, layout)
        out = out.to(q.dtype)
        # q, k, v are the caller's, never ring buffers. The large tensors go through save_for_backward,
        # which a checkpointed layer drops after its forward; on ctx only the fused kernels' small aux.
        ctx.save_for_backward(q, k, v, out, lse, branch_kv)
        ctx.scale, ctx.group, ctx.kernel, ctx.auxes, ctx.layout = scale, group, kernel, auxes, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, branch_kv = ctx.saved_tensors
        args = (dout.to(q.dtype), q, k, v, out, lse, ctx.auxes, ctx.scale, ctx.group, ctx.kernel)
        if ctx.layout is None:
            dq, dk, dv = _ring_backward(*args)
        else:
            dq, dk, dv = _branched_backward(*args, ctx.layout, branch_kv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q, k, v, group=None, softmax_scale=None, kernel="auto", layout=None):
    """Causal self-attention of a sequence zigzag-sharded over `group` (default: the world; LOCAL: this
    process alone): q (B, T, Hq, D), k and v (B, T, Hkv, D), T the LOCAL length; (B, T, Hq, D) in q's dtype,
    softmax(q k^T * scale + causal mask) v of the unsharded sequence. layout: a BranchLayout (next section).
    kernel: auto or a name of KERNELS. Bad shapes are a ValueError (else a cryptic error or a hang)."""
    if not (q.dim() == k.dim() == 4 and k.shape == v.shape and q.shape[2] % k.shape[2] == 0
            and q.shape[:2] + q.shape[3:] == k.shape[:2] + k.shape[3:] and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"ring_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                         "be (B, T, H, D) of one dtype, alike but for H: the query heads a multiple of the "
                         "key/value heads, k and v the same shape")
    n = layout.n_prefix if layout else q.shape[1]
    if n % 2 or n < 2 or (layout and n + layout.n_branch != q.shape[1]):
        raise ValueError(f"ring_attention: the local prefix of {n} tokens (of {q.shape[1]}: prefix + branch "
                         "slice) is no zigzag shard of two equal chunks: pad the whole sequence to a "
                         "multiple of 2*world_size and cut it with zigzag_shard")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return RingAttentionFunction.apply(q, k, v, scale, group, pick_kernel(q, kernel, k.shape[2]), layout)


# ---------------------------------------------------------- shared prefix with branches
# LongPO's chosen and rejected sequences share the document: packed as [prefix | chosen | rejected], it runs
# once. The prefix runs the plain ring, whose `visit` hook lets the branch queries attend to each prefix block
# as it passes (all the prefix is in their past) and, in backward, add their share to its travelling dk/dv.
# Then the branch region's keys, gathered from all ranks (small): each query's own segment, then the diagonal.

@dataclass(frozen=True)
class BranchLayout:
    """Local tokens = [this rank's zigzag shard of the prefix (n_prefix) | its slice of the branch
    region]. The branch region, over all ranks, is `segments` (token counts, e.g. chosen, rejected,
    padding) in order; rank r holds its tokens [r * n_branch, (r + 1) * n_branch). A branch token
    sees the whole prefix and the earlier tokens of its own segment, never another segment; prefix
    tokens are causal among themselves and never see a branch."""
    n_prefix: int
    segments: tuple
    n_branch: int

    def blocks(self, rank):
        """This rank's branch blocks within the branch region, (name, local query rows, rows of the
        region, causal): per segment meeting its slice, the segment's earlier rows when there are any."""
        s0, s1, g0 = rank * self.n_branch, (rank + 1) * self.n_branch, 0
        for g, n in enumerate(self.segments):
            a, b = max(s0, g0), min(s1, g0 + n)
            if a < b:
                if a > g0:
                    yield ("past", g), slice(a - s0, b - s0), slice(g0, a), False
                yield ("diag", g), slice(a - s0, b - s0), slice(a, b), True
            g0 += n


def _branched_forward(q, k, v, scale, group, kernel, layout):
    n, rank, auxes = layout.n_prefix, _group_size_rank(group)[1], {}
    qb = q[:, n:]
    out_b, lse_b = empty_acc(qb)

    def visit(step, kv):  # the branch queries see every prefix block in full
        auxes["prefix", step] = attend_block(kernel, out_b, lse_b, qb, *kv, scale, False)
    out, lse, ring_auxes = _ring_forward(q[:, :n], k[:, :n], v[:, :n], scale, group, kernel, visit)
    kv = torch.cat(_all_gather(torch.stack([k[:, n:], v[:, n:]]), group), 2)  # (2, B, branch region, Hkv, D)
    for name, rows, keys, causal in layout.blocks(rank):
        auxes[name] = attend_block(kernel, out_b[:, rows], lse_b[:, :, rows], qb[:, rows], *kv[:, :, keys],
                                   scale, causal)
    # kv is kept for the backward (the region is small): no second gather
    return torch.cat([out, out_b], 1), torch.cat([lse, lse_b], 2), (ring_auxes, auxes), kv


def _branched_backward(dout, q, k, v, out, lse, auxes, scale, group, kernel, layout, kv):
    """The same blocks' backward with the global out and lse. The branch region's dk/dv are summed
    over the ranks and each rank keeps its slice (the gradient goes home to each key's owner)."""
    n, (ring_auxes, auxes), (world_size, rank) = layout.n_prefix, auxes, _group_size_rank(group)
    dout_b, qb, out_b, lse_b = dout[:, n:], q[:, n:], out[:, n:], lse[:, :, n:]
    dq_b = torch.zeros(qb.shape, dtype=_acc_dtype(q), device=q.device)

    def visit(step, kv, dkv):  # the branch queries' share of each prefix block's gradients
        add_block_grads(kernel, dq_b, *dkv, dout_b, qb, *kv, out_b, lse_b, auxes["prefix", step], scale,
                        False)
    dq, dk, dv = _ring_backward(dout[:, :n], q[:, :n], k[:, :n], v[:, :n], out[:, :n], lse[:, :, :n],
                                ring_auxes, scale, group, kernel, visit)
    dkv = torch.zeros(kv.shape, dtype=dq_b.dtype, device=kv.device)
    for name, rows, keys, causal in layout.blocks(rank):
        add_block_grads(kernel, dq_b[:, rows], *dkv[:, :, keys], dout_b[:, rows], qb[:, rows],
                        *kv[:, :, keys], out_b[:, rows], lse_b[:, :, rows], auxes[name], scale, causal)
    if world_size > 1:
        dist.all_reduce(dkv, group=group)
    dkv_b = dkv[:, :, rank * layout.n_branch:(rank + 1) * layout.n_branch]  # (2, B, n_branch, Hkv, D)
    return torch.cat([dq, dq_b], 1), torch.cat([dk, dkv_b[0]], 1), torch.cat([dv, dkv_b[1]], 1)


# ---------------------------------------------------------- decoding over a sharded prompt

def decode_attention(q, k, v, n_prefix, group=None, softmax_scale=None, kernel="auto"):
    """Attention of new tokens during sequence-parallel generation. This rank's k, v (B, n_prefix + n,
    Hkv, D): its part of the prompt (the prefill's zigzag shard without padding, all in the past of the
    new tokens), then the n tokens generated so far, the same on every rank and counted on the group's
    rank 0 only. q (B, Tq, Hq, D): the newest Tq of them. Each rank attends to its keys; the partial
    results merge across the group by the lse rule, as the branches merge the prefix blocks; only the
    small (out, lse) travel."""
    kernel, out, lse = pick_kernel(q, kernel, k.shape[2]), *empty_acc(q)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    first = _group_size_rank(group)[1] == 0
    n_past = k.shape[1] - q.shape[1] if first else n_prefix  # the keys in the past of every new query
    if n_past:
        attend_block(kernel, out, lse, q, k[:, :n_past], v[:, :n_past], scale, False)
    if first:  # the newest Tq tokens, causal among themselves (the generated ones: on rank 0 only)
        attend_block(kernel, out, lse, q, k[:, n_past:], v[:, n_past:], scale, True)
    # a rank holding no prompt keys adds nothing: its lse is log 0
    both = torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], -1)  # (B, Tq, Hq, D + 1): one message
    out, lse = empty_acc(q)
    for part in _all_gather(both, group):  # rank 0's first: its lse is never log 0
        merge_block_(out, lse, part[..., :-1], part[..., -1].transpose(1, 2))
    return out.to(q.dtype)


# ---------------------------------------------------------- transformers

def hf_ring_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              sliding_window=None, ring_group=None, ring_layout=None, ring_decode=None,
                              ring_kernel="auto", **kwargs):
    """transformers attention implementation "ring_attention". query (B, Hq, T, D) as transformers
    passes it; pass `ring_group=` to model(...) for an SP group other than the whole world (LOCAL
    for none), `ring_layout=` for a shared prefix with branches, and `ring_decode=` (this rank's
    number of prompt keys in the cache) for the decoding steps of sequence-parallel generation;
    `ring_kernel=` names the block kernel (pick_kernel)."""
    if attention_mask is not None or dropout or sliding_window is not None:
        raise ValueError("ring_attention is causal over the whole sequence: pass no attention_mask (pad at "
                         "the end), set config.attention_dropout = 0 and config.sliding_window = None")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, H, D)
    if ring_decode is not None:
        return decode_attention(q, k, v, ring_decode, ring_group, scaling, ring_kernel), None
    return ring_attention(q, k, v, ring_group, scaling, ring_kernel, ring_layout), None  # no attn weights


AttentionInterface.register("ring_attention", hf_ring_attention_forward)


# ============================================================================= fused block kernels
# The block kernel contract, computed without the Tq x Tk scores; `auto` tries AUTO_ORDER, fastest first:
#   cudnn       CUDA  aten._scaled_dot_product_cudnn_attention          H100 bf16 fwd+bwd: 550-590 TFLOP/s
#   sdpa_flash  CUDA  aten._scaled_dot_product_flash_attention (FA-2)   316-326; runs where cuDNN refuses
#   flash_attn  CUDA  the flash-attn package (>= 2.7), if installed       about 330-350 as published
#   cpu         CPU   aten._scaled_dot_product_flash_attention_for_cpu  tiled, flash-style
# (measured by hand). All take GQA natively; PyTorch's ops take (B, H, T, D): transposed views, no copies.

def _bhtd(*xs):
    return [x.transpose(1, 2) for x in xs]  # (B, T, H, D) <-> (B, H, T, D) views


def cpu_fwd(q, k, v, scale, causal):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *_bhtd(q, k, v), 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse, None


def cpu_bwd(dout, q, k, v, out, lse, aux, scale, causal):
    return _bhtd(*torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_bhtd(dout, q, k, v, out), lse.to(_acc_dtype(q)).contiguous(), 0.0, causal, scale=scale))


def cudnn_fwd(q, k, v, scale, causal):  # fp16/bf16; lse (B, H, T, 1) fp32
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(
        *_bhtd(q, k, v), None, True, 0.0, causal, False, scale=scale)
    aux = (*r[6:8], None, *r[2:6])  # the backward's order: philox seed/offset, no bias, cum_seq_q/k, max_q/k
    return r[0].transpose(1, 2), r[1].squeeze(-1), aux


def cudnn_bwd(dout, q, k, v, out, lse, aux, scale, causal):
    return _bhtd(*torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *_bhtd(dout, q, k, v, out), lse.contiguous().unsqueeze(-1), *aux, 0.0, causal, scale=scale))


def sdpa_flash_fwd(q, k, v, scale, causal):  # fp16/bf16; lse (B, H, T) fp32
    r = torch.ops.aten._scaled_dot_product_flash_attention(*_bhtd(q, k, v), 0.0, causal, False, scale=scale)
    return r[0].transpose(1, 2), r[1], r[2:8]  # aux: cum_seq_q/k, max_q/k, philox seed/offset


def sdpa_flash_bwd(dout, q, k, v, out, lse, aux, scale, causal):
    return _bhtd(*torch.ops.aten._scaled_dot_product_flash_attention_backward(
        *_bhtd(dout, q, k, v, out), lse.contiguous(), *aux[:4], 0.0, causal, *aux[4:], scale=scale))


def flash_attn_fwd(q, k, v, scale, causal):
    from flash_attn.flash_attn_interface import _flash_attn_forward  # the signature of flash-attn >= 2.7
    out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, scale, causal, -1, -1, 0.0, None, False)
    return out, lse, None


def flash_attn_bwd(dout, q, k, v, out, lse, aux, scale, causal):
    from flash_attn.flash_attn_interface import _flash_attn_backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_backward(dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), dq, dk, dv,
                         0.0, scale, causal, -1, -1, 0.0, None, False, None)
    return dq, dk, dv


KERNELS = {"cudnn": (cudnn_fwd, cudnn_bwd), "sdpa_flash": (sdpa_flash_fwd, sdpa_flash_bwd),
           "flash_attn": (flash_attn_fwd, flash_attn_bwd), "cpu": (cpu_fwd, cpu_bwd),
           "plain": (plain_fwd, plain_bwd)}
AUTO_ORDER = {"cuda": ("cudnn", "sdpa_flash", "flash_attn"), "cpu": ("cpu",)}


class KernelError(ValueError):
    """A block kernel asked for by name that fails the probe (the scripts print it as one line)."""


@functools.lru_cache(maxsize=None)
def probe_kernel(name, device, dtype, heads, kv_heads, head_dim):
    """None if kernel `name` gives the plain kernel's out, lse, dq, dk, dv (finite, within 5%) for this
    device, dtype and heads, in a ring of one with branches: blocks of 9 to 134 rows, odd ones too, causal
    and not, each backward with the GLOBAL out and lse. Else what went wrong, and on what."""
    gen, layout = torch.Generator(device=device).manual_seed(0), BranchLayout(134, (9, 67), 76)
    q, dout = torch.randn(2, 1, 210, heads, head_dim, generator=gen, device=device).to(dtype)
    k, v = torch.randn(2, 1, 210, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    scale, results = head_dim ** -0.5, []
    where = f"on {dtype} with {heads}/{kv_heads} heads of {head_dim} on {device.type}"
    for kernel in ("plain", name):
        try:
            out, lse, auxes, kv = _branched_forward(q, k, v, scale, LOCAL, kernel, layout)
            grads = _branched_backward(dout, q, k, v, out.to(dtype), lse, auxes, scale, LOCAL, kernel, layout,
                                       kv)
        except Exception as e:  # a private op refusing these inputs (a dtype, a head dim, the card)
            return f"fails ({str(e).splitlines()[0][:160]}) {where}"
        results.append([out, lse, *grads])
    error = float(torch.stack([(got.double() - want.double()).abs().max() / want.double().abs().max()
                               for want, got in zip(*results)]).max())  # NaN if any is: a NaN fails
    return None if error <= 0.05 else f"is wrong (max relative error {error:.2g}) {where}"


def pick_kernel(q, kernel="auto", kv_heads=None):
    """The name of the block kernel for q (B, T, Hq, D): auto, the first fused kernel of AUTO_ORDER for its
    device that passes the probe (warning of each that fails), else the plain kernel. A fused kernel asked
    for by name must pass the probe, else one line says how it failed."""
    if kernel == "plain":
        return kernel
    for name in AUTO_ORDER.get(q.device.type, ()) if kernel == "auto" else (kernel,):
        failure = probe_kernel(name, q.device, q.dtype, q.shape[2], kv_heads or q.shape[2], q.shape[3])
        if not failure:
            return name
        if kernel != "auto":
            raise KernelError(f"--attn-kernel {kernel} {failure}; use --attn-kernel auto")
        warnings.warn(f"ring_attention: kernel {name!r} {failure}; not used")
    return "plain"
