"""Test suite of LongPO-ref: numerical oracles, multi-process gloo tests, smoke runs.

Every check compares against an independent slow reference (float64, written out here in the
most direct form) on fresh random inputs, forward AND gradients. Distributed checks spawn gloo
processes on CPU with a free port and a timeout, each doing several checks because start-up
dominates. Run:  python -m pytest -q test_longpo.py
"""
import copy
import datetime
import functools
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import ring_attention as ra
from ring_attention import ring_attention, zigzag_shard, zigzag_unshard

# ----------------------------------------------------------------------------- helpers

# Tolerances on max|got - want| / max|want| against float64. fp32: unit roundoff 6e-8, a few
# hundred operations per output, so 1e-5 leaves a wide margin for a real bug to stand out (a wrong
# mask or merge gives errors of order 1e-1). bf16 keeps 8 significant bits (unit roundoff 2^-9 =
# 2e-3): inputs are rounded in the test itself (the reference sees the same rounded values), but
# the output is rounded once more, the fused kernel rounds P to bf16 before P @ V, and each of the
# W block gradients is rounded before the fp32 ring accumulation. Measured: about 4e-3 at W = 1-4;
# bound 1.5e-2. fp16 has 11 bits, 8x finer: measured 7e-4, bound 2e-3.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def assert_close(got, want, tol, what):
    err = rel_err(got, want)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.1e}"


def reference_attention(q, k, v, scale=None, causal=True):
    """float64 softmax(q k^T * scale + mask) v, layout (B, T, H, D); GQA by repeating K/V heads;
    the causal mask aligned at the end (query i sees keys <= i + Tk - Tq)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        tq, tk = q.shape[1], k.shape[1]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1 + tk - tq), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def reference_with_grads(q, k, v, dout):
    """Reference output and (dq, dk, dv) by float64 autograd on the same (possibly rounded) values."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def random_qkv(gen, batch, length, heads, kv_heads, head_dim, dtype):
    """Random q, dout (B, N, Hq, D) and k, v (B, N, Hkv, D), rounded to dtype."""
    q, dout = (torch.randn(batch, length, heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(batch, length, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, dout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        fn(rank, world_size, *args)
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=240):
    """Run fn(rank, world_size, *args) in world_size gloo processes; fail on any error or hang."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline, failures = time.time() + timeout, []
    try:
        for _ in range(world_size):
            rank, error = results.get(timeout=max(1.0, deadline - time.time()))
            if error:
                failures.append(f"rank {rank}:\n{error}")
                break  # the other ranks may now wait forever on this one
    except queue.Empty:
        failures.append(f"no answer from every rank within {timeout}s: a hang")
    finally:
        for p in procs:
            p.join(timeout=0 if failures else 10)
            if p.is_alive():
                p.kill()
    if failures:
        pytest.fail("\n".join(failures))


# ----------------------------------------------------------------------------- ring attention

def test_zigzag_shard_layout_and_errors():
    for world_size in (1, 2, 3, 4):
        chunk = 3
        x = torch.arange(2 * world_size * chunk).view(1, -1)
        shards = [zigzag_shard(x, r, world_size) for r in range(world_size)]
        for r, shard in enumerate(shards):
            want = list(range(r * chunk, (r + 1) * chunk))
            want += list(range((2 * world_size - 1 - r) * chunk, (2 * world_size - r) * chunk))
            assert shard[0].tolist() == want, f"W={world_size} rank {r}: {shard[0].tolist()}"
        assert sorted(torch.cat(shards, 1)[0].tolist()) == x[0].tolist()
    y = torch.randn(2, 3, 12, 5)  # another dim
    assert torch.equal(zigzag_shard(y, 1, 2, dim=2), torch.cat([y[:, :, 3:6], y[:, :, 6:9]], 2))
    with pytest.raises(ValueError, match=r"not divisible by 2\*world_size = 4.*pad .* to 12"):
        zigzag_shard(torch.zeros(1, 10), 0, 2)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        zigzag_shard(torch.zeros(1, 8), 2, 2)


@pytest.mark.parametrize("kernel", ["plain", "torch"])
def test_block_kernels_and_merge(kernel):
    """Each kernel alone, and the property the ring rests on: blocks merged by log-sum-exp equal
    attention over the union, and each block's backward with the GLOBAL out/lse sums to the
    full gradients."""
    gen = torch.Generator().manual_seed(1)
    fwd, bwd = ra.KERNELS[kernel]
    B, Tq, Hq, Hkv, D, scale = 2, 12, 6, 2, 16, 0.3
    q = torch.randn(B, Tq, Hq, D, generator=gen)
    dout = torch.randn(B, Tq, Hq, D, generator=gen)
    k1, v1 = (torch.randn(B, 20, Hkv, D, generator=gen) for _ in range(2))  # past: seen fully
    k2, v2 = (torch.randn(B, Tq, Hkv, D, generator=gen) for _ in range(2))  # diagonal: causal
    # keys [k1; k2] with the mask aligned at the end = k1 fully visible, k2 causal
    k, v = torch.cat([k1, k2], 1), torch.cat([v1, v2], 1)
    want = reference_attention(q, k, v, scale)

    out1, lse1 = fwd(q, k1, v1, scale, False)
    assert_close(out1, reference_attention(q, k1, v1, scale, causal=False), 1e-5, "block out")
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k1.double().repeat_interleave(3, 2)) * scale
    assert_close(lse1, s.logsumexp(-1), 1e-5, "block lse")
    out2, lse2 = fwd(q, k2, v2, scale, True)
    out, lse = out1.float().clone(), lse1.float().clone()
    ra.merge_(out, lse, out2, lse2)
    assert_close(out, want, 1e-5, "merged out")

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    reference_attention(qd, kd, vd, scale).backward(dout.double())
    dq1, dk1, dv1 = bwd(dout, q, k1, v1, out, lse, scale, False)
    dq2, dk2, dv2 = bwd(dout, q, k2, v2, out, lse, scale, True)
    assert_close(dq1 + dq2, qd.grad, 1e-5, "dq")
    assert_close(torch.cat([dk1, dk2], 1), kd.grad, 1e-5, "dk")
    assert_close(torch.cat([dv1, dv2], 1), vd.grad, 1e-5, "dv")


def check_ring_against_reference(rank, world_size, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """out, dq, dk, dv of the ring on this rank equal the float64 full attention's shard."""
    shard = functools.partial(zigzag_shard, rank=rank, world_size=world_size)
    for kernel in ("plain", "torch"):
        for heads, kv_heads in ((4, 4), (8, 2)):
            for dtype in dtypes:
                gen = torch.Generator().manual_seed(100 * heads + kv_heads)  # same on every rank
                q, k, v, dout = random_qkv(gen, 2, 2 * world_size * 8, heads, kv_heads, 16, dtype)
                want = reference_with_grads(q, k, v, dout)
                q_l, k_l, v_l = (shard(t).requires_grad_() for t in (q, k, v))
                out = ring_attention(q_l, k_l, v_l, kernel=kernel)
                out.backward(shard(dout))
                assert out.dtype == dtype and q_l.grad.dtype == dtype
                for name, got, ref in zip(("out", "dq", "dk", "dv"),
                                          (out, q_l.grad, k_l.grad, v_l.grad), want):
                    assert_close(got, shard(ref), TOL[dtype],
                                 f"W={world_size} rank {rank} {kernel} {heads}/{kv_heads} heads "
                                 f"{dtype} {name}")


def check_causal_at_chunk_borders(rank, world_size):
    """Perturb the first token of each chunk: every earlier output stays bit-identical, every
    later one moves (so the check can fail)."""
    shard = functools.partial(zigzag_shard, rank=rank, world_size=world_size)
    chunk = 4
    gen = torch.Generator().manual_seed(7)
    q, k, v, _ = random_qkv(gen, 1, 2 * world_size * chunk, 4, 2, 8, torch.float32)
    for kernel in ("plain", "torch"):
        base = zigzag_unshard(ring_attention(shard(q), shard(k), shard(v), kernel=kernel))
        for border in range(1, 2 * world_size):
            p = border * chunk
            k2, v2 = k.clone(), v.clone()
            k2[:, p] += torch.randn(k2[:, p].shape, generator=gen)
            v2[:, p] += torch.randn(v2[:, p].shape, generator=gen)
            moved = zigzag_unshard(ring_attention(shard(q), shard(k2), shard(v2), kernel=kernel))
            assert torch.equal(moved[:, :p], base[:, :p]), f"{kernel}: a query before {p} saw token {p}"
            changed = (moved[:, p:] - base[:, p:]).abs().amax(dim=(0, 2, 3))
            assert (changed > 0).all(), f"{kernel}: queries at or after {p} did not see token {p}"


def check_zigzag_round_trip(rank, world_size):
    x = torch.randn(2, 2 * world_size * 5, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(zigzag_unshard(zigzag_shard(x, rank, world_size)), x)
    assert torch.equal(zigzag_unshard(zigzag_shard(x, rank, world_size, dim=1), dim=1), x)


def ring_worker(rank, world_size):
    check_zigzag_round_trip(rank, world_size)
    check_ring_against_reference(rank, world_size)
    check_causal_at_chunk_borders(rank, world_size)


def test_ring_single_process():
    ring_worker(0, 1)  # no process group: world size 1, no communication


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_distributed(world_size):
    run_distributed(ring_worker, world_size)


def test_ring_bad_inputs():
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    cases = [
        ((torch.randn(1, 7, 4, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)), "odd.*pad"),
        ((q, k, torch.randn(1, 8, 2, 8)), "same shape"),
        ((q, torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)), "must agree"),
        ((q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16)), "not a multiple of 3"),
        ((q[0], k[0], k[0]), "4-D"),
        ((q, k.double(), k.double()), "dtype"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ring_attention(*args)
    with pytest.raises(ValueError, match="flash-attn"):
        ring_attention(q, k, k, kernel="flash")
    with pytest.raises(ValueError, match="choose one of"):
        ring_attention(q, k, k, kernel="triton")
    module = torch.nn.Module()
    hq, hk = q.transpose(1, 2), k.transpose(1, 2)  # transformers' (B, H, T, D)
    with pytest.raises(ValueError, match="sliding_window = None"):
        ra.hf_ring_attention_forward(module, hq, hk, hk, None, sliding_window=4)
    with pytest.raises(ValueError, match="attention mask"):
        ra.hf_ring_attention_forward(module, hq, hk, hk, torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="dropout"):
        ra.hf_ring_attention_forward(module, hq, hk, hk, None, dropout=0.1)
    out, _ = ra.hf_ring_attention_forward(module, hq, hk, hk, None, sliding_window=8)  # >= N: full
    assert_close(out, reference_attention(q, k, k), 1e-5, "hf wrapper")


# ----------------------------------------------------------------------------- transformers models

def tiny_hf_config(family):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**common)


def hf_ring_worker(rank, world_size):
    """A tiny model with ring attention on zigzag shards gives the same logits and the same
    gradient of every parameter (summed over ranks) as sdpa on the whole sequence."""
    from transformers import AutoModelForCausalLM
    shard = functools.partial(zigzag_shard, rank=rank, world_size=world_size)
    for family in ("mistral", "llama", "qwen2"):
        torch.manual_seed(0)  # same weights on every rank
        model = AutoModelForCausalLM.from_config(tiny_hf_config(family), attn_implementation="sdpa")
        model = model.double()
        with torch.no_grad():  # biases (Qwen2) start at 0: make them matter
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        ring_model = copy.deepcopy(model)
        ring_model.set_attn_implementation("ring_attention")
        gen = torch.Generator().manual_seed(5)
        n = 2 * world_size * 8
        input_ids = torch.randint(0, 96, (2, n), generator=gen)
        position_ids = torch.arange(n).expand(2, n)
        weights = torch.randn(2, n, 96, generator=gen, dtype=torch.float64)

        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        (logits * weights).sum().backward()
        ring_logits = ring_model(input_ids=shard(input_ids), position_ids=shard(position_ids),
                                 use_cache=False).logits
        (ring_logits * shard(weights)).sum().backward()
        assert_close(ring_logits, shard(logits), 1e-10, f"{family} logits rank {rank}")
        for (name, p), p_ring in zip(model.named_parameters(), ring_model.parameters()):
            grad = p_ring.grad.clone()
            dist.all_reduce(grad)
            assert_close(grad, p.grad, 1e-9, f"{family} grad {name} rank {rank}")


def test_hf_models_ring_equals_sdpa():
    run_distributed(hf_ring_worker, 2)
