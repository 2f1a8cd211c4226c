"""Test suite of LongPO-ref: numerical oracles, multi-process gloo tests, smoke runs.

Every check compares against an independent slow reference (float64, written out here in the
most direct form) on fresh random inputs, forward AND gradients. Distributed checks spawn gloo
processes on CPU with a free port and a timeout, each doing several checks because start-up
dominates. Tests that need a CUDA GPU are skipped without one, with the reason shown.
Run:  python -m pytest -q -rs test_longpo.py
"""
import ast
import contextlib
import glob
import importlib.util
import copy
import dataclasses
import datetime
import functools
import gc
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import os
import queue
import re
import resource
import socket
import string
import time
import traceback
import weakref


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


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread in this process, as in every process the tests start: the tensors are tiny, and
    a second thread costs more than it saves (on a busy machine, 10x: it spins waiting for a core)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_process_group_left():
    """A script's main run in-process leaves its process group to run_cli to close: close it here."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def load_model_and_tokenizer(name, dtype=torch.float32, rope_theta=0.0):
    return longpo.load_model(name, dtype, rope_theta), longpo.load_tokenizer(name)


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


def _worker(rank, world_size, port, fn, args, results, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        fn(rank, world_size, *args)
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=240, backend="gloo"):
    """Run fn(rank, world_size, *args) in world_size processes (gloo; nccl for CUDA tests); fail on
    any error or hang. Start-up: gloo's processes fork from one server that imported this module (torch,
    transformers, the scripts: seconds of CPU) once per session, with the environment it started with;
    nccl's are spawned fresh."""
    ctx = mp.get_context("spawn" if backend == "nccl" else "forkserver")
    if backend != "nccl":
        ctx.set_forkserver_preload([__name__])  # read when the server starts, with this sys.path
        with pytest.MonkeyPatch.context() as monkeypatch:  # gloo's tests are CPU tests, even on a GPU node
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # (and a fork cannot use CUDA its parent touched)
            forkserver.ensure_running()
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, backend), daemon=True)
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


# ----------------------------------------------------------------------------- the code's shape

# Who may import whom: each script imports only scripts on lower floors, never one above it or
# itself (so no cycle either), not even inside a function; nothing imports the test file.
FLOORS = {"ring_attention": 1, "longpo": 2, "data_gen": 3, "eval": 4, "test_longpo": 5}


def project_imports(source):
    """[(module, line)] of every project module `source` imports: import and from-import statements
    at any depth (functions, branches), and importlib.import_module / __import__ of a constant name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        found += [(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in FLOORS]
    return found


def import_problems(sources):
    """Upward (or self) imports of {module: source}, and the modules on a cycle of the import graph."""
    graph = {module: {target for target, _ in project_imports(source)} for module, source in sources.items()}
    problems = [f"{module}.py:{line} imports {target}, which is not below it"
                for module, source in sources.items()
                for target, line in project_imports(source) if FLOORS[target] >= FLOORS[module]]

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,)))
                   for nxt in graph.get(start, ()))
    problems += [f"{module} is on an import cycle" for module in graph if reaches(module, module)]
    return problems


def test_imports_point_down_only():
    scripts = {module: open(os.path.join(os.path.dirname(os.path.abspath(__file__)), module + ".py")).read()
               for module in FLOORS if module != "test_longpo"}
    assert import_problems(scripts) == []
    # the check itself: an upward import inside a function (and the cycle it closes), and a dynamic one
    problems = import_problems({**scripts, "longpo": scripts["longpo"] + "\n\ndef late():\n    import data_gen\n"})
    assert any(p.startswith("longpo.py:") and "imports data_gen" in p for p in problems), problems
    assert "longpo is on an import cycle" in problems, problems
    dynamic = {**scripts, "ring_attention": scripts["ring_attention"] + "\nimportlib.import_module('eval')\n"}
    assert any("ring_attention.py" in p and "imports eval" in p for p in import_problems(dynamic))


def test_readme_gpu_commands_parse():
    """Every script command of the README's GPU section (shell variables filled in) parses with that
    script's arguments: a flag given to the wrong script would stop a job on the node."""
    import shlex
    text = open(os.path.join(HERE, "README.md")).read()
    section = text[text.index("## On a GPU node"):text.index("## Code map")]
    block = "\n".join(line[4:] for line in section.splitlines() if line.startswith("    ")).replace("\\\n", " ")
    configs = {"longpo.py": longpo.TrainConfig, "data_gen.py": data_gen.DataGenConfig, "eval.py": evaluation.EvalConfig}
    shell, parsed = {}, []
    for part in (p.strip() for line in block.splitlines() for p in line.split("; ")):
        for name, value in sorted(shell.items(), key=lambda kv: -len(kv[0])):
            part = part.replace("$" + name, value)
        assignment = re.fullmatch(r'(\w+)="?([^"]*)"?', part)
        if assignment:
            shell[assignment.group(1)] = assignment.group(2)
            continue
        args = shlex.split(part) if part.startswith(("python ", "torchrun ")) and " -c " not in part else []
        script = next((a for a in args if a in configs), None)
        if script:
            try:
                longpo.config_from_cli(configs[script], args[args.index(script) + 1:])
            except SystemExit:
                pytest.fail(f"the README's command does not parse: {part}")
            parsed.append(script)
    assert parsed.count("data_gen.py") >= 4 and parsed.count("longpo.py") >= 4 and parsed.count("eval.py") >= 2


def test_script_sizes_and_lines():
    """The scripts stay a minimal reference: no line over 110 characters, and (README's code map) their
    sizes; the limits are the ones this version meets, to be lowered, never raised."""
    limits = {"ring_attention": 520, "longpo": 1331, "data_gen": 749, "eval": 500}
    for module, most in limits.items():
        lines = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), module + ".py")).read().splitlines()
        long = [i for i, line in enumerate(lines, 1) if len(line) > 110]
        assert not long, f"{module}.py: lines over 110 characters: {long}"
        assert len(lines) <= most, f"{module}.py: {len(lines)} lines, more than {most}"
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    for name, count in re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", readme, re.M):  # the code map's counts
        real = len(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)).read().splitlines())
        assert int(count) == real, f"README: {name} has {count} lines, the file {real}"


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


CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run this suite on one to check the GPU path)")
BLOCK_KERNELS = [("plain", "cpu", torch.float32), ("cpu", "cpu", torch.float32), ("plain", "cuda", torch.bfloat16),
                 ("cudnn", "cuda", torch.bfloat16), ("sdpa_flash", "cuda", torch.bfloat16),
                 ("flash_attn", "cuda", torch.bfloat16)]


@pytest.mark.parametrize("kernel,device,dtype", BLOCK_KERNELS, ids=lambda x: str(x).replace("torch.", ""))
def test_block_kernels_and_merge(kernel, device, dtype):
    """Each kernel alone (out, lse, dq, dk, dv; GQA; a causal diagonal and a rectangular block),
    and the property the ring rests on: blocks merged by log-sum-exp equal attention over the
    union, and each block's backward with the GLOBAL (merged) out/lse sums to the full gradients.
    Against float64 on the same (dtype-rounded) inputs."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    if kernel == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    gen = torch.Generator().manual_seed(1)
    fwd, bwd = ra.KERNELS[kernel]
    B, Tq, Hq, Hkv, D, scale = 2, 48, 8, 2, 64, 0.3
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    q, dout = (torch.randn(B, Tq, Hq, D, generator=gen).to(device, dtype) for _ in range(2))
    k1, v1 = (torch.randn(B, 80, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))  # past: seen fully
    k2, v2 = (torch.randn(B, Tq, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))  # diagonal: causal
    # keys [k1; k2] with the mask aligned at the end = k1 fully visible, k2 causal
    k, v = torch.cat([k1, k2], 1), torch.cat([v1, v2], 1)
    want = reference_attention(q, k, v, scale)

    out1, lse1, aux1 = fwd(q, k1, v1, scale, False)
    assert_close(out1, reference_attention(q, k1, v1, scale, causal=False), tol, f"{kernel} block out")
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k1.double().repeat_interleave(Hq // Hkv, 2)) * scale
    assert_close(lse1, s.logsumexp(-1), 1e-5, f"{kernel} block lse")  # fp32 in every kernel
    out2, lse2, aux2 = fwd(q, k2, v2, scale, True)
    out, lse = out1.float().clone(), lse1.float().clone()
    ra.merge_block_(out, lse, out2, lse2)
    assert_close(out, want, tol, f"{kernel} merged out")

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    reference_attention(qd, kd, vd, scale).backward(dout.double())
    out = out.to(dtype)
    dq1, dk1, dv1 = bwd(dout, q, k1, v1, out, lse, aux1, scale, False)
    dq2, dk2, dv2 = bwd(dout, q, k2, v2, out, lse, aux2, scale, True)
    assert dk1.shape == k1.shape and dv2.shape == v2.shape  # GQA: gradients of the Hkv heads only
    assert_close(dq1.double() + dq2.double(), qd.grad, 2 * tol, f"{kernel} dq")
    assert_close(torch.cat([dk1, dk2], 1), kd.grad, 2 * tol, f"{kernel} dk")
    assert_close(torch.cat([dv1, dv2], 1), vd.grad, tol, f"{kernel} dv")


def test_cuda_kernels_on_fake_cuda_tensors(monkeypatch):
    """PyTorch's fused CUDA attention ops as the ring calls them (private aten signatures), run on fake CUDA
    tensors (shapes and dtypes, no data: no card needed), so a changed signature or lse layout fails here:
    each block shape the ring gives (1x1, 1xN, Nx1, odd, causal and not), GQA and not, bf16 and fp16: out
    like q, lse (B, Hq, Tq) fp32 as merge_block_ takes it, dq/dk/dv like q/k/v. Then the ring itself over a
    fake world of 4 (a packed pair's branches included, backward too) and decoding, each with the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    shapes = [(1, 1, True), (1, 1, False), (1, 67, False), (67, 1, False), (67, 67, True), (67, 131, False),
              (131, 67, False), (128, 128, True)]
    monkeypatch.setattr(ra, "probe_kernel", lambda *args: None)  # the probe needs real values
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        with FakeTensorMode():
            for name, dtype, (hq, hkv) in itertools.product(("cudnn", "sdpa_flash"), (torch.bfloat16, torch.float16),
                                                            ((32, 8), (4, 4))):
                fwd, bwd = ra.KERNELS[name]
                what = f"{name} {dtype} {hq}/{hkv} heads"
                for tq, tk, causal in shapes:
                    q = torch.empty(1, tq, hq, 128, device="cuda", dtype=dtype)
                    k, v = (torch.empty(1, tk, hkv, 128, device="cuda", dtype=dtype) for _ in range(2))
                    out, lse, aux = fwd(q, k, v, 0.1, causal)
                    assert (out.shape, out.dtype) == (q.shape, dtype), f"{what} {tq}x{tk}: out {out.shape}"
                    assert (lse.shape, lse.dtype) == ((1, hq, tq), torch.float32), f"{what}: lse {lse.shape}"
                    merged = out.float(), lse + 1.0  # the backward gets the merged out and lse of all blocks
                    grads = bwd(out, q, k, v, merged[0].to(dtype), merged[1], aux, 0.1, causal)
                    assert [(g.shape, g.dtype) for g in grads] == [(t.shape, dtype) for t in (q, k, v)], what
                # The ring with the kernel, forward and backward, over the fake world (on fake CPU tensors: the
                # ops' shape functions are the same, and a CPU-only build cannot index a CUDA tensor): the
                # prefix's 34 tokens on this rank, then 8 of the branch region (2 answers and padding, 4 ranks)
                q, k, v = (torch.empty(1, 42, h, 128, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv))
                group = dist.group.WORLD
                for layout in (None, ra.BranchLayout(34, (19, 11, 2), 8)):
                    n = 42 if layout else 34
                    out = ra.ring_attention(q[:, :n], k[:, :n], v[:, :n], group, kernel=name, layout=layout)
                    assert (out.shape, out.dtype) == (q[:, :n].shape, dtype), what
                    q.grad = k.grad = None
                    out.float().sum().backward()
                    assert [(t.grad.shape, t.grad.dtype) for t in (q, k, v)] == [(t.shape, dtype) for t in (q, k, v)]
                with torch.no_grad():
                    out = ra.decode_attention(q[:, -1:], k, v, 34, group=group, kernel=name)
                assert (out.shape, out.dtype) == (q[:, -1:].shape, dtype), what
    finally:
        dist.destroy_process_group()


def fake_kernels():
    """Fused kernels as they fail on a card: everywhere NaN; NaN in dv alone; NaN only in the backward of
    blocks of one row or key (as cuDNN is reported to do on Hopper); off by O(1) only on such blocks;
    reversed rows; a backward that takes the block's own lse instead of the ring's global one."""
    def nan_fwd(q, k, v, scale, causal):
        out, lse, aux = ra.plain_fwd(q, k, v, scale, causal)
        return out * float("nan"), lse, aux

    def dv_nan_bwd(dout, q, k, v, out, lse, aux, scale, causal):
        dq, dk, dv = ra.plain_bwd(dout, q, k, v, out, lse, aux, scale, causal)
        return dq, dk, dv * float("nan")

    def row_nan_bwd(dout, q, k, v, out, lse, aux, scale, causal):
        dq, dk, dv = ra.plain_bwd(dout, q, k, v, out, lse, aux, scale, causal)
        return (dq * float("nan") if 1 in (q.shape[1], k.shape[1]) else dq), dk, dv

    def row_wrong_fwd(q, k, v, scale, causal):
        out, lse, aux = ra.plain_fwd(q, k, v, scale, causal)
        return (out + 1 if 1 in (q.shape[1], k.shape[1]) else out), lse, aux

    def flipped_fwd(q, k, v, scale, causal):
        out, lse, aux = ra.plain_fwd(q, k, v, scale, causal)
        return out.flip(1), lse, aux

    def own_lse_bwd(dout, q, k, v, out, lse, aux, scale, causal):
        return ra.plain_bwd(dout, q, k, v, out, ra.plain_fwd(q, k, v, scale, causal)[1], aux, scale, causal)
    return {"nan": (nan_fwd, ra.plain_bwd), "dv_nan": (ra.plain_fwd, dv_nan_bwd), "row_nan": (ra.plain_fwd, row_nan_bwd),
            "row_wrong": (row_wrong_fwd, ra.plain_bwd), "flipped": (flipped_fwd, ra.plain_bwd),
            "own_lse": (ra.plain_fwd, own_lse_bwd)}


def test_kernel_probe_skips_nan_and_routes_small_blocks(monkeypatch):
    """auto takes the first kernel of its device's list that the probe passes (a ring of one with branches:
    odd lengths, causal and not, backward with a global lse): one returning NaN anywhere, or wrong, is
    skipped, with a warning; with none, the plain kernel. Blocks under 8 query rows or keys always run the
    plain kernel, so a kernel wrong only there passes and the branches' 1-token segments and decoding's one
    query stay exact. Asked for by name, a failing kernel (or an unknown one) is one line."""
    for name, pair in fake_kernels().items():
        monkeypatch.setitem(ra.KERNELS, name, pair)
    ra.probe_kernel.cache_clear()
    q = torch.randn(1, 64, 4, 16, dtype=torch.float64)
    monkeypatch.setitem(ra.AUTO_ORDER, "cpu", ("nan", "dv_nan", "flipped", "own_lse", "row_nan", "cpu"))
    with pytest.warns(UserWarning) as caught:
        assert ra.pick_kernel(q, "auto", 2) == "row_nan"
    said = " | ".join(str(w.message) for w in caught)
    for name in ("nan", "dv_nan", "flipped", "own_lse"):
        assert f"'{name}' is wrong (max relative error " in said, said
    assert "'nan' is wrong (max relative error nan) on torch.float64 with 4/2 heads of 16 on cpu" in said, said
    for name in ("nan", "dv_nan", "flipped", "own_lse", "triton"):
        failure = "fails ('triton')" if name == "triton" else "is wrong"
        with pytest.raises(ra.KernelError, match=rf"^--attn-kernel {name} {re.escape(failure)}.* on torch.float64 "
                                                 "with 4/2 heads of 16 on cpu; use --attn-kernel auto$"):
            ra.pick_kernel(q, name, 2)

    # small blocks run the plain kernel: exact where they occur (1-token branch segments; decoding)
    gen = torch.Generator().manual_seed(3)
    for name in ("row_wrong", "row_nan"):
        assert ra.pick_kernel(q, name, 2) == name  # the probe passes it: it is right on every other block
        monkeypatch.setitem(ra.AUTO_ORDER, "cpu", (name,))
        n_prefix, segments = 12, (1, 8, 2, 1)
        layout = ra.BranchLayout(n_prefix, segments, sum(segments))
        qkv = [t.requires_grad_() for t in random_qkv(gen, 1, n_prefix + sum(segments), 4, 2, 16, torch.float64)[:3]]
        grads = []
        for kernel in ("auto", "plain"):
            out = ring_attention(*qkv, group=ra.LOCAL, kernel=kernel, layout=layout)
            grads.append([out, *torch.autograd.grad(out.sum(), qkv)])
        for what, got, want in zip(("out", "dq", "dk", "dv"), *grads):
            assert_close(got, want, 1e-12, f"{name} routed: {what}")
        q_, k, v = (t.detach() for t in qkv)
        for tq in (1, 8):  # 1 new query: every block is small; 8: 8 x 16 older keys, a causal 8 x 8
            got = ra.decode_attention(q_[:, -tq:], k, v, k.shape[1] - tq - 1, group=ra.LOCAL)
            assert_close(got, reference_attention(q_[:, -tq:], k, v), 1e-12, f"{name} routed: decoding {tq}")

    monkeypatch.setitem(ra.AUTO_ORDER, "cpu", ("flipped",))
    with pytest.warns(UserWarning, match="'flipped' is wrong"):
        assert ra.pick_kernel(q, "auto", 2) == "plain"  # none passes: the plain kernel
    ra.probe_kernel.cache_clear()


def check_ring_against_reference(rank, world_size, group=None, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """out, dq, dk, dv of the ring on this rank equal the float64 full attention's shard."""
    shard = functools.partial(zigzag_shard, rank=rank, world_size=world_size)
    for kernel in ("plain", "cpu"):
        for heads, kv_heads in ((4, 4), (8, 2)):
            for dtype in dtypes:
                gen = torch.Generator().manual_seed(100 * heads + kv_heads)  # same on every rank
                q, k, v, dout = random_qkv(gen, 2, 2 * world_size * 8, heads, kv_heads, 16, dtype)
                want = reference_with_grads(q, k, v, dout)
                q_l, k_l, v_l = (shard(t).requires_grad_() for t in (q, k, v))
                out = ring_attention(q_l, k_l, v_l, group=group, kernel=kernel)
                out.backward(shard(dout))
                assert out.dtype == dtype and q_l.grad.dtype == dtype
                for name, got, ref in zip(("out", "dq", "dk", "dv"),
                                          (out, q_l.grad, k_l.grad, v_l.grad), want):
                    assert_close(got, shard(ref), TOL[dtype],
                                 f"W={world_size} rank {rank} {kernel} {heads}/{kv_heads} heads "
                                 f"{dtype} {name}")


def check_causal_at_chunk_borders(rank, world_size, group=None):
    """Perturb the first token of each chunk: every earlier output stays bit-identical, every
    later one moves (so the check can fail)."""
    shard = functools.partial(zigzag_shard, rank=rank, world_size=world_size)
    chunk = 4
    gen = torch.Generator().manual_seed(7)
    q, k, v, _ = random_qkv(gen, 1, 2 * world_size * chunk, 4, 2, 8, torch.float32)
    for kernel in ("plain", "cpu"):
        base = zigzag_unshard(ring_attention(shard(q), shard(k), shard(v), group, kernel=kernel), group)
        for border in range(1, 2 * world_size):
            p = border * chunk
            k2, v2 = k.clone(), v.clone()
            k2[:, p] += torch.randn(k2[:, p].shape, generator=gen)
            v2[:, p] += torch.randn(v2[:, p].shape, generator=gen)
            moved = zigzag_unshard(ring_attention(shard(q), shard(k2), shard(v2), group, kernel=kernel), group)
            assert torch.equal(moved[:, :p], base[:, :p]), f"{kernel}: a query before {p} saw token {p}"
            changed = (moved[:, p:] - base[:, p:]).abs().amax(dim=(0, 2, 3))
            assert (changed > 0).all(), f"{kernel}: queries at or after {p} did not see token {p}"


def check_zigzag_round_trip(rank, world_size, group=None):
    x = torch.randn(2, 2 * world_size * 5, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(zigzag_unshard(zigzag_shard(x, rank, world_size), group), x)
    assert torch.equal(zigzag_unshard(zigzag_shard(x.mT, rank, world_size, dim=2), group, dim=2), x.mT)


def branch_mask(n_prefix, segments):
    """The dense mask of a shared prefix with branches: prefix causal; a branch token sees the whole
    prefix and its own segment's past; nothing else (written out directly, as the reference)."""
    seg = [-1] * n_prefix + [g for g, n in enumerate(segments) for _ in range(n)]
    pos = list(range(n_prefix)) + [n_prefix + i for n in segments for i in range(n)]
    N = len(seg)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        for j in range(N):
            mask[i, j] = (seg[j] == -1 and (seg[i] != -1 or j <= i)) or (seg[j] == seg[i] != -1 and pos[j] <= pos[i])
    return mask


def check_ring_with_branches(rank, world_size, group=None):
    """out, dq, dk, dv of the ring with a BranchLayout on this rank equal dense masked attention of
    the whole packed sequence (float64), for two branch splits and both CPU kernels, MHA and GQA."""
    cases = [((7, 5), "cpu", (8, 2)), ((1, 3 * world_size + 2, 2), "plain", (4, 4))]
    if world_size == 1:
        cases += [((7, 5), "plain", (8, 2)), ((1, 8, 2), "cpu", (4, 4))]
    for segments, kernel, (heads, kv_heads) in cases:
        n_branch = -(-sum(segments) // world_size)
        segments_padded = segments + (world_size * n_branch - sum(segments),)
        n_prefix = 2 * world_size * 3
        gen = torch.Generator().manual_seed(sum(segments) + heads)
        N = n_prefix + world_size * n_branch
        q, k, v, dout = random_qkv(gen, 2, N, heads, kv_heads, 16, torch.float64)
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
        groups = heads // kv_heads
        scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(groups, 2)) * 16 ** -0.5
        scores = scores.masked_fill(~branch_mask(n_prefix, segments_padded), float("-inf"))
        want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vd.repeat_interleave(groups, 2))
        want.backward(dout)

        def local(t):  # this rank's zigzag shard of the prefix, then its slice of the branch region
            return torch.cat([zigzag_shard(t[:, :n_prefix], rank, world_size),
                              t[:, n_prefix + rank * n_branch:n_prefix + (rank + 1) * n_branch]], 1)
        layout = ra.BranchLayout(n_prefix // world_size, segments_padded, n_branch)
        q_l, k_l, v_l = (local(t).requires_grad_() for t in (q, k, v))
        out = ring_attention(q_l, k_l, v_l, group=group, kernel=kernel, layout=layout)
        out.backward(local(dout))
        for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, q_l.grad, k_l.grad, v_l.grad),
                                  (want, qd.grad, kd.grad, vd.grad)):
            assert_close(got, local(ref), 1e-10, f"branches {segments} W={world_size} rank {rank} {kernel} "
                         f"{heads}/{kv_heads} heads {name}")


def ring_worker(rank, world_size, group=None):
    check_zigzag_round_trip(rank, world_size, group)
    check_ring_against_reference(rank, world_size, group, (torch.float32, torch.bfloat16) if world_size == 4 else
                                 (torch.float32, torch.bfloat16, torch.float16))
    check_causal_at_chunk_borders(rank, world_size, group)
    check_ring_with_branches(rank, world_size, group)


def ring_worlds_worker(rank, world_size):
    """The ring checks on groups of the last 2, 3 and 4 of the processes (a group's ranks are not the
    world's: the ring sends by group rank), then transformers models over the whole world."""
    for size in (2, 3, 4):
        ranks = list(range(world_size - size, world_size))
        group = dist.new_group(ranks)  # every process takes part in making it
        if rank in ranks:
            ring_worker(ranks.index(rank), size, group)
    hf_ring_worker(rank, world_size)


def test_ring_single_process():
    ring_worker(0, 1)  # no process group: world size 1, no communication
    check_ring_with_branches(0, 1, group=ra.LOCAL)
    q, k, v = (torch.randn(1, 16, 4, 8, dtype=torch.float64) for _ in range(3))  # a scale not 1/sqrt(D)
    out, _ = ra.hf_ring_attention_forward(None, *(x.transpose(1, 2) for x in (q, k, v)), None, scaling=0.3,
                                          ring_group=ra.LOCAL)  # the hook takes (B, H, T, D)
    assert_close(out, reference_attention(q, k, v, scale=0.3), 1e-12, "the hook's scaling")


def test_ring_distributed_and_hf_models():
    """The exact ring at W = 2, 3, 4 and a Llama, Mistral and Qwen2 model running it: one spawn of 4
    processes, since starting them costs more than the checks."""
    run_distributed(ring_worlds_worker, 4)


@needs_cuda
def test_ring_on_cuda_equals_full_attention_without_quadratic_memory():
    """W = 1 on a GPU, the auto kernel, bf16, Mistral-7B's heads (32 query / 8 KV of 128) at 16K
    tokens: out and gradients against an fp32 SDPA reference, a fused kernel chosen, and a peak far
    below one head's 16K x 16K fp32 scores (1 GiB; all heads: 32 GiB)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (t.cuda() for t in random_qkv(gen, 1, 16384, 32, 8, 128, torch.bfloat16))
    ref = sdpa_fwd_bwd(*(t.float().transpose(1, 2).contiguous() for t in (q, k, v, dout)), repeat_kv=True)
    ref = [t.transpose(1, 2) for t in ref]
    assert ra.pick_kernel(q, "auto", 8) != "plain"
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = ring_attention(q, k, v)
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), ref):
        assert_close(got, want, TOL[torch.bfloat16] * (1 if name == "out" else 2), f"cuda ring {name}")
    assert peak < 2**30, f"peak {peak / 2**30:.2f} GiB: something materialised T x T scores"


def test_ring_bad_inputs():
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    layout = ra.BranchLayout(6, (3, 2), 5)
    cases = [
        ((torch.randn(1, 7, 4, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)), {}, "prefix of 7 .* pad"),
        ((q, k, k), {"layout": layout}, r"prefix of 6 tokens \(of 8"),  # 6 + 5 is not 8
        ((q, k, torch.randn(1, 8, 2, 8)), {}, "k and v the same shape"),
        ((q, torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)), {}, "alike but for H"),
        ((q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16)), {}, "a multiple of the key/value heads"),
        ((q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2)), {}, r"\(B, T, H, D\)"),  # (B, H, T, D)
        ((q[0], k[0], k[0]), {}, r"\(B, T, H, D\)"),
        ((q, k.double(), k.double()), {}, "of one dtype"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ring_attention(*args, **kwargs)
    with pytest.raises(ValueError, match="--attn-kernel cudnn fails .* on torch.float32 with 4/2 heads"):
        ring_attention(q, k, k, kernel="cudnn")  # a CUDA kernel, CPU tensors
    module = torch.nn.Module()
    hq, hk = q.transpose(1, 2), k.transpose(1, 2)  # transformers' (B, H, T, D)
    for kwargs in ({"sliding_window": 8}, {"attention_mask": torch.ones(1, 1, 8, 8)}, {"dropout": 0.1}):
        with pytest.raises(ValueError, match="no attention_mask .*attention_dropout = 0 and config.sliding_window"):
            ra.hf_ring_attention_forward(module, hq, hk, hk, **{"attention_mask": None, **kwargs})
    out, _ = ra.hf_ring_attention_forward(module, hq, hk, hk, None, sliding_window=None, dropout=0.0)
    assert_close(out, reference_attention(q, k, k), 1e-5, "hf wrapper")
    for flags, message in (({"seq_len": 0}, "--seq-len 0 must be >= 1"), ({"seq_len": 9}, "multiple of 2 x 1"),
                           ({"dtype": "float65"}, "--dtype float65"), ({"kv_heads": 3}, "multiple of --kv-heads")):
        with pytest.raises(longpo.UsageError, match=message):  # the self-check's flags, before any work
            check_ring_bench(RingBench(**flags), 1)
    rows = ring_bench(RingBench(seq_len=64, dtype="float64", iters=1, heads=4))  # the harness runs, float64 valid
    assert len(rows) == 1 and max(rows[0][1:5]) <= TOL[torch.float64], rows  # its out, dq, dk, dv errors


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



# ----------------------------------------------------------------------------- longpo: the objective

import itertools
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch.nn.functional as F  # noqa: E402

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import longpo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "alpha beta gamma delta river stone light north market garden signal copper winter".split()


def make_records(n, seed, paragraphs=4, words=25, turns=2, with_ref=False):
    """Preference records in the README's format, built in code (data_gen.py writes real ones)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        doc = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(paragraphs))
        rec = {"id": f"doc-{i}", "document": doc, "turns": []}
        for _ in range(turns):
            start = rng.randrange(0, len(doc) // 2)
            rec["turns"].append({
                "instruction": f"Based on the text above, where is the {rng.choice(WORDS)}?",
                "chunk": [start, start + rng.randrange(40, 120)],
                "chosen": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9))),
                "rejected": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))})
        if with_ref:
            rec["ref_chosen_logp"], rec["ref_rejected_logp"] = -rng.uniform(50, 90), -rng.uniform(50, 90)
        records.append(rec)
    return records


def write_jsonl(path, records):
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return str(path)


def test_longpo_loss_by_hand():
    pc, pr = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.5, -1.0])
    losses, chosen_r, rejected_r = longpo.longpo_loss(pc, pr, rc, rr, beta=0.1)
    for i in range(2):
        z = 0.1 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert math.isclose(losses[i].item(), math.log(1 + math.exp(-z)), rel_tol=1e-6)
        assert math.isclose(chosen_r[i].item(), 0.1 * (pc[i] - rc[i]).item(), rel_tol=1e-6)
        assert math.isclose(rejected_r[i].item(), 0.1 * (pr[i] - rr[i]).item(), rel_tol=1e-6)
    # policy = reference on both answers: no preference yet, loss log 2
    same = torch.tensor([-7.0, -20.0])
    assert torch.allclose(longpo.longpo_loss(same, same - 1, same, same - 1, 0.1)[0], torch.full((2,), math.log(2)))
    # descending the loss raises the chosen log-prob and lowers the rejected one
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-6.0], requires_grad=True)
    longpo.longpo_loss(pc, pr, torch.tensor([-5.5]), torch.tensor([-6.5]), 0.1)[0].sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    # Eq. 14: lam * L_pref (its batch mean) + NLL
    pref, nll = torch.tensor([0.6, 0.8]), torch.tensor(2.0)
    assert math.isclose(longpo.total_loss(pref, nll, 0.01).item(), 0.01 * 0.7 + 2.0, rel_tol=1e-6)


def test_token_logps_match_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 37), generator=gen)
    mask = torch.rand(2, 37, generator=gen) < 0.6
    for chunk in (5, 16, 1000):  # chunks that do not divide the labelled count, and one chunk
        got = longpo.token_logps(hidden, weight, targets, mask.reshape(-1).nonzero().squeeze(-1), chunk)
        want = -F.cross_entropy((hidden @ weight.T).transpose(1, 2), targets, reduction="none") * mask
        assert_close(got, want, 1e-12, f"log-probs, chunk {chunk}")
        g_got = torch.autograd.grad((got * 1.3).sum(), (hidden, weight))
        g_want = torch.autograd.grad((want * 1.3).sum(), (hidden, weight))
        for a, b in zip(g_got, g_want):
            assert_close(a, b, 1e-12, f"log-prob gradients, chunk {chunk}")
    assert longpo.token_logps(hidden, weight, targets, torch.zeros(0, dtype=torch.long), 8).abs().sum() == 0


def test_format_dialogue_labels_and_short_inputs():
    tokenizer = longpo.tiny_tokenizer()
    rec = make_records(1, seed=3, turns=3)[0]
    ex = longpo.build_example(rec, tokenizer)
    for side in ("chosen", "rejected"):
        ids, is_answer = ex[side]["ids"], ex[side]["is_answer"]
        answer_text = tokenizer.decode([t for t, a in zip(ids, is_answer) if a])
        assert answer_text == "".join(t[side] + "</s>" for t in rec["turns"]), answer_text
        prompt_text = tokenizer.decode([t for t, a in zip(ids, is_answer) if not a])
        assert prompt_text.count(rec["document"]) == 1  # Eq. 13: the document appears once
        for turn in rec["turns"]:
            assert turn["instruction"] in prompt_text and turn[side] not in prompt_text
        assert tokenizer.decode(ids).startswith("<s>[INST] " + rec["document"])
        for turn in rec["turns"]:  # the short input of Eq. 13's reference: the turn's chunk, not the document
            chunk = rec["document"][turn["chunk"][0]:turn["chunk"][1]]
            text = tokenizer.decode(longpo.short_dialogue(tokenizer, rec, turn, side)[0])
            assert text == f"<s>[INST] {chunk}\n\n{turn['instruction']} [/INST]{turn[side]}</s>"
    # and what the reference scores there, against full logits on the chat template's own rendering
    model = perturbed_tiny(0.05, 4)[0]
    got = longpo.short_reference_logps(model, tokenizer, rec)
    want = [direct_short_logp(model, tokenizer, rec, side) for side in ("chosen", "rejected")]
    assert got[0] != got[1] and all(math.isclose(g, w, rel_tol=1e-9) for g, w in zip(got, want)), (got, want)
    targets, mask = longpo.shifted_targets([5, 6, 7, 8], [False, False, True, True])
    assert targets.tolist()[:3] == [6, 7, 8] and mask.tolist() == [False, True, True, False]


# ----------------------------------------------------------------------------- real chat templates
# The chat templates that instruct checkpoints ship (public text, as in their tokenizer_config.json;
# Llama-3.1 and Qwen2.5 without their tool-calling branches), the tokenizer kind each family uses, and
# what the template renders for an assistant answer `a`: the span the model writes after the
# generation prompt, up to its end-of-turn marker (written out by hand, independent of longpo).

MISTRAL_V01 = (  # Mistral-7B-Instruct-v0.1 as first released
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
MISTRAL_V02 = (  # Mistral-7B-Instruct-v0.1 / v0.2 (current)
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n"
    "{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n{%- endfor %}\n")
MISTRAL_V03 = (  # Mistral-7B-Instruct-v0.3 ([INST] and [/INST] are control tokens)
    "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n"
    "{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- else %}\n        {{- raise_exception(\"Only user and assistant roles are supported!\") }}\n    {%- endif %}\n{%- endfor %}\n")
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA31 = (
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n")
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
SMOLLM2 = QWEN2.replace("You are a helpful assistant.", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3 = (  # appends eos after the last turn unless a generation prompt follows: not turn by turn
    "{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# name: (template, tokenizer kind, specials (bos first, eos second), answer span the template renders)
TEMPLATES = {
    "mistral-v0.1": (MISTRAL_V01, "byte", ["<s>", "</s>"], lambda a: a + "</s>"),
    "mistral-v0.2": (MISTRAL_V02, "byte", ["<s>", "</s>"], lambda a: " " + a + "</s>"),
    "mistral-v0.3": (MISTRAL_V03, "byte", ["<s>", "</s>", "[INST]", "[/INST]"], lambda a: " " + a.strip() + "</s>"),
    "llama-2": (LLAMA2, "byte", ["<s>", "</s>"], lambda a: " " + a.strip() + " </s>"),
    "llama-3": (LLAMA3, "llama3", LLAMA3_SPECIALS, lambda a: a.strip() + "<|eot_id|>"),
    "llama-3.1": (LLAMA31, "llama3", [LLAMA3_SPECIALS[0], "<|eot_id|>"] + LLAMA3_SPECIALS[1:4],
                  lambda a: a.strip() + "<|eot_id|>"),
    "qwen2": (QWEN2, "llama3", [None, "<|im_end|>", "<|im_start|>", "<|endoftext|>"], lambda a: a + "<|im_end|>"),
    "qwen2.5": (QWEN25, "llama3", [None, "<|im_end|>", "<|im_start|>", "<|endoftext|>"], lambda a: a + "<|im_end|>"),
    "smollm2": (SMOLLM2, "byte", [None, "<|im_end|>", "<|im_start|>", "<|endoftext|>"], lambda a: a + "<|im_end|>"),
    "zephyr": (ZEPHYR, "byte", ["<s>", "</s>"], lambda a: a + "</s>"),
    "gemma": (GEMMA, "byte", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], lambda a: a.strip() + "<end_of_turn>"),
}
# Llama-3 / Qwen2 pre-tokenizer: newlines are one piece, so '\n\n' before a word stays '\n\n'.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_CORPUS = [f"[INST] The answer is {w}. {w.title()} and {v} are near the {u}.\n\nWhat is the {v}? [/INST]\n\n"
                    for w in WORDS for v in WORDS[:5] for u in WORDS[5:8]]


def wrap_tokenizer(core, specials, template, cls=None, **kwargs):
    from transformers import PreTrainedTokenizerFast
    bos, eos, *extra = specials
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos,
                                  additional_special_tokens=extra, **kwargs)
    tok.chat_template = template
    return tok


@functools.lru_cache(maxsize=None)
def byte_level_tokenizer(kind, specials, template):
    """A small trained byte-level BPE: GPT-2's pre-tokenizer ('byte', as SmolLM2) or Llama-3's
    split regex ('llama3', as Llama-3 and Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "byte")
    core.pre_tokenizer = byte_level if kind == "byte" else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), byte_level])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(TOKENIZER_CORPUS, trainers.BpeTrainer(
        vocab_size=700, special_tokens=[s for s in specials if s], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return wrap_tokenizer(core, list(specials), template)


@functools.lru_cache(maxsize=None)
def sentencepiece_tokenizer(template, legacy=True, prefix_space=True, specials=("<s>", "</s>")):
    """A small SentencePiece-style BPE ('▁' for spaces, byte fallback) in transformers' own Llama
    tokenizer class, as Mistral and Llama-2 checkpoints load: legacy puts the dummy '▁' before every
    segment, non-legacy only at the start of the text; prefix_space=False is Gemma's kind."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.train_from_iterator(TOKENIZER_CORPUS, trainers.BpeTrainer(
        vocab_size=700, show_progress=False,
        special_tokens=["<unk>", *specials[:2]] + [f"<0x{i:02X}>" for i in range(256)]))
    model = json.loads(core.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=legacy,
                         add_prefix_space=prefix_space, bos_token=specials[0], eos_token=specials[1],
                         additional_special_tokens=list(specials[2:]))
    tok.chat_template = template
    return tok


def template_tokenizer(name):
    template, kind, specials, _ = TEMPLATES[name]
    return byte_level_tokenizer(kind, tuple(specials), template)


DIALOGUE = {"document": "Alpha and beta are near the river.\n\nGamma keeps the light.", "turns": [
    {"instruction": "Based on the text above, what is near the river?", "answer": "Alpha and beta are.\n"},
    {"instruction": "What does gamma keep?", "answer": "The light, as the text says."}]}


def answer_spans(is_answer):
    """[(start, end)] of each run of answer tokens."""
    starts = [i for i in range(len(is_answer)) if is_answer[i] and (i == 0 or not is_answer[i - 1])]
    return [(i, i + is_answer[i:].index(False) if False in is_answer[i:] else len(is_answer)) for i in starts]


def check_template(tokenizer, render_span, exact=True):
    """format_dialogue on a 2-turn dialogue against the tokenizer's own encoding of the whole
    rendered dialogue: answer spans where the template renders them, prompts as generated."""
    doc, turns = DIALOGUE["document"], DIALOGUE["turns"]
    ids, is_answer = longpo.format_dialogue(tokenizer, doc, turns, "answer")
    messages = [{"role": "user", "content": f"{doc}\n\n{turns[0]['instruction']}"},
                {"role": "assistant", "content": turns[0]["answer"]},
                {"role": "user", "content": turns[1]["instruction"]},
                {"role": "assistant", "content": turns[1]["answer"]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    runs = answer_spans(is_answer)
    assert len(runs) == 2, f"expected 2 answer spans, got {len(runs)}"
    spans = []
    for i, (turn, (start, end)) in enumerate(zip(turns, runs)):
        prompt = tokenizer.apply_chat_template(messages[:2 * i + 1], tokenize=False, add_generation_prompt=True)
        span = render_span(turn["answer"])
        assert text[len(prompt):].startswith(span), (text[len(prompt):], span)  # the hand-written expectation
        spans.append((len(prompt), len(prompt) + len(span)))
        # the prompt part is the generation prompt, token for token (turn 0: what data_gen generates
        # from); a later turn's prompt holds earlier answers, cut as continuations (exact: the same)
        want = tokenizer.apply_chat_template(messages[:2 * i + 1], add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
        if exact or i == 0:
            assert ids[:start] == want, f"turn {i}: the tokens before the answer are not the generation prompt"
        else:  # byte-level tokens decode to exactly their text
            assert tokenizer.decode(ids[:start]) == prompt, f"turn {i}: the text before the answer is not the prompt"
        got = tokenizer.decode(ids[start:end])
        assert got.strip() == span.strip(), (got, span)  # the answer plus the end-of-turn marker
    gen = longpo.format_dialogue(tokenizer, doc, turns[:1])[0]
    assert gen == ids[:runs[0][0]], "generation prompt and training sequence differ before the answer"
    if exact:  # every token, and which are answers, as the tokenizer cuts the whole dialogue
        want_answer = [any(a <= s and e <= b for a, b in spans) and e > s for s, e in enc["offset_mapping"]]
        assert ids == enc["input_ids"], "tokens differ from the tokenizer's encoding of the whole dialogue"
        assert is_answer == want_answer, "answer marks differ from the template's answer spans"
    return ids, is_answer, runs


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_format_dialogue_real_chat_templates(name):
    tokenizer = template_tokenizer(name)
    check_template(tokenizer, TEMPLATES[name][3])
    # generation stops at the template's end-of-turn token even where it is not the eos
    eot = {"llama-3": "<|eot_id|>", "gemma": "<end_of_turn>", "qwen2": "<|im_end|>"}.get(name)
    if eot:
        assert tokenizer.convert_tokens_to_ids(eot) in data_gen.stop_token_ids(tokenizer)


def test_format_dialogue_sentencepiece_no_lone_space():
    """Mistral / Llama-2 / Zephyr / Gemma kinds on a SentencePiece-style tokenizer: ' The' after
    '[/INST]' is the one token '▁The' (encoding the template's space on its own would give a lone
    '▁'); after a newline an answer starts without the dummy '▁'."""
    for legacy in (True, False):
        tok = sentencepiece_tokenizer(MISTRAL_V02, legacy)
        ids, is_answer, runs = check_template(tok, TEMPLATES["mistral-v0.2"][3])
        pieces = tok.convert_ids_to_tokens(ids)
        for start, _ in runs:
            assert pieces[start].startswith("\u2581") and pieces[start] != "\u2581", pieces[start:start + 3]
            assert pieces[start - 1].endswith("]"), pieces[start - 3:start + 1]  # [/INST] right before
        naive = tok(" ", add_special_tokens=False)["input_ids"] + tok("Alpha", add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(naive)[0] == "\u2581"  # the trap this avoids is real here
        for name in ("llama-2", "mistral-v0.1", "zephyr"):
            tok = sentencepiece_tokenizer(TEMPLATES[name][0], legacy)
            ids, is_answer, runs = check_template(tok, TEMPLATES[name][3])
        assert tok.convert_ids_to_tokens(ids)[runs[0][0]] == "Alpha"  # Zephyr: no dummy prefix after "\\n"
    tok = sentencepiece_tokenizer(MISTRAL_V03, False, specials=("<s>", "</s>", "[INST]", "[/INST]"))
    check_template(tok, TEMPLATES["mistral-v0.3"][3])
    tok = sentencepiece_tokenizer(GEMMA, prefix_space=False, specials=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"))
    check_template(tok, TEMPLATES["gemma"][3])


def test_format_dialogue_prompt_token_changes_at_the_border():
    """GPT-2's pre-tokenizer cuts '\\n\\n' before a word as '\\n' + '\\n': the whole dialogue's
    encoding differs from prompt + answer there. The prompt keeps the tokens generation saw."""
    tok = byte_level_tokenizer("byte", tuple(LLAMA3_SPECIALS), LLAMA3)
    with pytest.raises(AssertionError, match="turn 1: the tokens before the answer"):
        check_template(tok, TEMPLATES["llama-3"][3])
    ids, is_answer, runs = check_template(tok, TEMPLATES["llama-3"][3], exact=False)
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": "user", "content": f"{DIALOGUE['document']}\n\n{DIALOGUE['turns'][0]['instruction']}"},
         {"role": "assistant", "content": DIALOGUE["turns"][0]["answer"]},
         {"role": "user", "content": DIALOGUE["turns"][1]["instruction"]},
         {"role": "assistant", "content": DIALOGUE["turns"][1]["answer"]}], tokenize=False)


CONTROL_TEXT = "<|im_end|> <|im_start|> </s> [INST] <|eot_id|> <s>"  # special tokens' literals, as text


def skeleton(tokenizer, ids, is_answer):
    """A dialogue reduced to its special ids, and between them 'A' for a run of answer text and 'P' for
    one of prompt text: what the content may never change."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out = []
    for token, answer in zip(ids, is_answer):
        symbol = token if token in special else "A" if answer else "P"
        if not out or symbol != out[-1] or symbol not in ("A", "P"):
            out.append(symbol)
    return out


@pytest.mark.parametrize("name", ["smollm2", "llama-3", "mistral-v0.2"])
def test_special_token_text_in_content_stays_text(name):
    """A document, an instruction and an answer quoting special tokens' literal texts (a paper about chat
    models does) give exactly the clean dialogue's special ids at the same places relative to the
    answers, on ChatML, Llama-3 and SentencePiece (Mistral) tokenizers: content is text."""
    tok = sentencepiece_tokenizer(MISTRAL_V02, False) if name == "mistral-v0.2" else template_tokenizer(name)
    doc, turns = DIALOGUE["document"], DIALOGUE["turns"]
    quoted = [{"instruction": f"{t['instruction']} Mind {CONTROL_TEXT}.", "answer": f"{t['answer']} {CONTROL_TEXT}."}
              for t in turns]
    clean = longpo.format_dialogue(tok, doc, turns, "answer")
    dirty = longpo.format_dialogue(tok, f"{CONTROL_TEXT}\n{doc} {CONTROL_TEXT}", quoted, "answer")
    assert skeleton(tok, *clean) == skeleton(tok, *dirty), (skeleton(tok, *clean), skeleton(tok, *dirty))
    prompt = longpo.format_dialogue(tok, f"{CONTROL_TEXT} {doc}", quoted[:1])[0]  # what generation reads
    assert skeleton(tok, prompt, [False] * len(prompt)) == skeleton(tok, *clean)[:skeleton(tok, *clean).index("A")]
    ids, is_answer = dirty
    runs = answer_spans(is_answer)
    assert len(runs) == len(quoted), runs
    for turn, (start, end) in zip(quoted, runs):  # each answer, its quoted literals as text, then the real marker
        assert CONTROL_TEXT in tok.decode(ids[start:end]) and turn["answer"].split()[0] in tok.decode(ids[start:end])
    if name != "mistral-v0.2":  # byte-level: the tokens spell the rendered dialogue exactly
        messages = [{"role": "user", "content": f"{CONTROL_TEXT}\n{doc} {CONTROL_TEXT}\n\n{quoted[0]['instruction']}"},
                    {"role": "assistant", "content": quoted[0]["answer"]},
                    {"role": "user", "content": quoted[1]["instruction"]}, {"role": "assistant", "content": quoted[1]["answer"]}]
        assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)


def test_format_dialogue_templates_it_cannot_split():
    doc, turns = DIALOGUE["document"], DIALOGUE["turns"]
    upper = byte_level_tokenizer("byte", ("<s>", "</s>"), MISTRAL_V02.replace("message['content'] + eos_token",
                                                                            "message['content'] | upper + eos_token"))
    with pytest.raises(ValueError, match="alters the assistant text"):
        longpo.format_dialogue(upper, doc, turns, "answer")
    phi3 = byte_level_tokenizer("byte", ("<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"), PHI3)
    with pytest.raises(ValueError, match="turn by turn"):
        longpo.format_dialogue(phi3, doc, turns, "answer")
    ids, is_answer = longpo.format_dialogue(phi3, doc, turns[:1], "answer")  # one turn is fine
    assert phi3.decode([t for t, a in zip(ids, is_answer) if a]).startswith(turns[0]["answer"])


def test_bad_records_name_line_and_field(tmp_path):
    good = make_records(2, seed=1)
    cases = {
        "turns[0].chosen": lambda r: r["turns"][0].pop("chosen"),
        "turns[1].chunk": lambda r: r["turns"][1].__setitem__("chunk", [10, len(r["document"]) + 5]),
        "'turns'": lambda r: r.__setitem__("turns", []),
        "document": lambda r: r.pop("document"),
        "ref_chosen_logp": lambda r: r.__setitem__("ref_chosen_logp", "high"),
        "turns[0].chunk": lambda r: r["turns"][0].__setitem__("chunk", [5, 5]),  # empty
        "ref_rejected_logp": lambda r: r.__setitem__("ref_rejected_logp", float("nan")),  # JSON's NaN
    }
    for field_name, spoil in cases.items():
        records = copy.deepcopy(good)
        spoil(records[1])
        path = write_jsonl(tmp_path / "bad.jsonl", records)
        with pytest.raises(ValueError, match=r"bad.jsonl:2: field .*" + re.escape(field_name)):
            longpo.Records(path)
    (tmp_path / "broken.jsonl").write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        longpo.Records(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="python data_gen.py"):
        longpo.Records(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- longpo: SP = 2 vs SP = 1

def one_process(device):
    """The Parallel of work done whole in this process: an SP group of one."""
    return longpo.Parallel(0, 1, 1, ra.LOCAL, device)


def perturbed_tiny(scale, seed):
    """The tiny model in float64 with its weights moved a little (so policy != reference): a copy of its
    own each call (tests train, shard and reconfigure it), built once per process (a copy takes 1/10th)."""
    model, tokenizer = built_perturbed_tiny(scale, seed)
    return copy.deepcopy(model), tokenizer


@functools.lru_cache(maxsize=None)
def built_perturbed_tiny(scale, seed):
    model, tokenizer = load_model_and_tokenizer("tiny", torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, tokenizer


def exact_norms():
    """transformers' RMSNorm computes in fp32 even in a float64 model, which rounds each token's
    gradient to fp32 on its way through: the direct way (whole sequences) and the packed pair
    then differ by ~1e-8 for that reason alone. Here the norm computes in its input's dtype when that
    is finer than fp32 (float64 tests only; fp32 and bf16 are unchanged), so the comparisons below
    see our machinery's error alone (~1e-14)."""
    from transformers.models.mistral import modeling_mistral

    def forward(self, hidden):
        x = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden.dtype)
    modeling_mistral.MistralRMSNorm.forward = forward


@pytest.fixture
def float64_norms(monkeypatch):
    from transformers.models.mistral import modeling_mistral
    monkeypatch.setattr(modeling_mistral.MistralRMSNorm, "forward", modeling_mistral.MistralRMSNorm.forward)
    exact_norms()  # undone by monkeypatch after the test


def one_micro_step(loss, par, model, ref_model, example, refs, fsdp, context_weight=1.0):
    cfg = longpo.resolve_defaults(longpo.TrainConfig(loss=loss, beta=0.5, lam=0.3, grad_accum=1,
                                                     sp_size=par.sp_size, nll_context_weight=context_weight))
    if fsdp:
        model = longpo.setup_model(model, par, torch.float64, grad_checkpointing=True)
        if ref_model is not None:
            ref_model = longpo.setup_model(ref_model, par, torch.float64, False, trainable=False)
    else:
        for m in (model, ref_model):
            if m is not None:
                m.set_attn_implementation("ring_attention")
    metrics = longpo.micro_step(model, ref_model, longpo.step_inputs([example], cfg, par, 0), refs, cfg, par)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        if not fsdp and par.world_size > 1:  # what FSDP's reduction does: the mean over all ranks
            dist.all_reduce(g)
            g /= par.world_size
        grads[name] = g
    return metrics, grads


def live_refs(example, shifts=(1.0, -1.0)):
    """LongPO reference log-probs a nat from the policy's own (perturbed_tiny(0.02, 1)'s, one device),
    the chosen one above, the rejected one below: margins of -1 at beta 0.5, so the preference term
    is O(1) and its gradient live (records' random references, tens of nats away, leave it ~1e-28)."""
    model, single = perturbed_tiny(0.02, 1)[0], one_process(torch.device("cpu"))
    with torch.no_grad():
        return tuple(longpo.sequence_logps(model, longpo.prepare_sequence(example[side]["ids"], {
            side: example[side]["is_answer"]}, single, 0), single, 64)[side].item() + shift
            for side, shift in zip(("chosen", "rejected"), shifts))


def assert_preference_live(pref_loss, pref_norm, total_norm, what):
    """The guard: the preference term counts in the loss and in the gradient being compared."""
    assert 0.1 < pref_loss < 5 and pref_norm > 0.01 * total_norm, f"{what}: preference term not live: " \
        f"pref_loss {pref_loss:.3g}, |grad lam * pref| {pref_norm:.3g} of |grad| {total_norm:.3g}"


def direct_loss_and_grads(loss, model, ref_model, example, refs, beta=0.5, lam=0.3, context_weight=1.0):
    """Eq. 12-14 computed the direct way, independent of longpo's machinery: full-vocabulary
    logits of both long sequences in one graph, F.cross_entropy, one backward; the NLL's non-answer
    tokens weigh context_weight. Also checks that the preference term is live (longpo, dpo)."""
    def logps(m, seq):
        ids = torch.tensor([seq["ids"]])
        token = -F.cross_entropy(m(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        answer = torch.tensor(seq["is_answer"][1:], dtype=token.dtype)
        return (token * answer).sum(), token, answer
    logp_c, token_c, answer_c = logps(model, example["chosen"])
    if loss == "sft":
        total = -(token_c * answer_c).sum() / answer_c.sum()
    else:
        if loss == "dpo":
            with torch.no_grad():
                refs = (logps(ref_model, example["chosen"])[0], logps(ref_model, example["rejected"])[0])
        logp_r = logps(model, example["rejected"])[0]
        ref_c, ref_r = (torch.as_tensor(ref, dtype=torch.float64) for ref in refs)  # not fp32: 1e-5 at 240 nats
        pref = -F.logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))  # Eq. 12
        weight = answer_c + context_weight * (1 - answer_c)  # NLL over the whole chosen sequence
        total = lam * pref.mean() - (token_c * weight).sum() / weight.sum()
        params = [p for p in model.parameters() if p.requires_grad]
        norm = lambda grads: math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))  # noqa: E731
        pref_norm = norm(torch.autograd.grad(lam * pref.mean(), params, retain_graph=True, allow_unused=True))
        total_norm = norm(torch.autograd.grad(total, params, retain_graph=True, allow_unused=True))
        assert_preference_live(pref.item(), pref_norm, total_norm, loss)
    total.backward()
    return total.item(), {name: p.grad for name, p in model.named_parameters()}


def sp_equivalence_worker(rank, world_size):
    exact_norms()
    tokenizer = longpo.tiny_tokenizer()
    records = make_records(2, seed=11, with_ref=True)
    single = one_process(torch.device("cpu"))
    sp2 = longpo.setup_parallel(2, rank, world_size, torch.device("cpu"))
    for loss in ("longpo", "dpo", "sft"):
        example = longpo.build_example(records[0], tokenizer)
        refs = live_refs(example)  # dpo: its reference model's, on the long inputs
        fresh = lambda: (perturbed_tiny(0.02, seed=1)[0], perturbed_tiny(0.0, seed=2)[0])  # noqa: E731
        want_metrics, want_grads = one_micro_step(loss, single, *fresh(), example, refs, fsdp=False)
        direct_loss, direct_grads = direct_loss_and_grads(loss, *fresh(), example, refs)
        assert math.isclose(want_metrics["loss"], direct_loss, rel_tol=1e-10), f"{loss}: loss"
        for name, g in direct_grads.items():
            assert_close(want_grads[name], g, 1e-9, f"{loss}: SP=1 vs direct grad {name}")
        for fsdp in (False, True):  # ring attention alone, then ring attention + FSDP2 sharding
            metrics, grads = one_micro_step(loss, sp2, *fresh(), example, refs, fsdp=fsdp)
            for key, value in want_metrics.items():
                assert math.isclose(metrics[key], value, rel_tol=1e-9, abs_tol=1e-12), \
                    f"{loss} fsdp={fsdp} rank {rank}: {key} {metrics[key]} != {value}"
            for name, g in want_grads.items():
                assert_close(grads[name], g, 1e-9, f"{loss} fsdp={fsdp} rank {rank} grad {name}")
    packing_worker(rank, world_size)  # multi-turn packed pairs at SP = 2 against the direct way
    # DP = 2 (sp 1): each rank its own sample; FSDP's gradient is the mean over the two samples
    dp2 = longpo.setup_parallel(1, rank, world_size, torch.device("cpu"))
    examples, refs, mean = two_samples(seed=11)
    _, grads = one_micro_step("longpo", dp2, perturbed_tiny(0.02, 1)[0], None, examples[rank], refs[rank], True)
    for name, g in grads.items():
        assert_close(g, mean[name], 1e-9, f"dp=2 grad {name}")


def two_samples(seed):
    """Two tiny preference samples, their reference log-probs, and the mean of their one-process
    LongPO gradients: what any way of batching the two must reproduce."""
    tokenizer = longpo.tiny_tokenizer()
    records = make_records(2, seed=seed, with_ref=True)
    examples = [longpo.build_example(r, tokenizer) for r in records]
    refs = [live_refs(ex, shifts) for ex, shifts in zip(examples, ((1.0, -1.0), (0.5, -2.0)))]
    single = one_process(torch.device("cpu"))
    for ex, rf in zip(examples, refs):  # the guard, on the direct computation of each sample
        direct_loss_and_grads("longpo", perturbed_tiny(0.02, 1)[0], None, ex, rf)
    grads = [one_micro_step("longpo", single, perturbed_tiny(0.02, 1)[0], None, ex, rf, False)[1]
             for ex, rf in zip(examples, refs)]
    return examples, refs, {name: (grads[0][name] + grads[1][name]) / 2 for name in grads[0]}


def test_grad_accumulation_averages_samples(float64_norms):
    examples, refs, mean = two_samples(seed=12)
    model = perturbed_tiny(0.02, 1)[0]
    model.set_attn_implementation("ring_attention")
    cfg = longpo.TrainConfig(beta=0.5, lam=0.3, grad_accum=2, sp_size=1)
    single = one_process(torch.device("cpu"))
    for ex, rf in zip(examples, refs):
        longpo.micro_step(model, None, longpo.step_inputs([ex], cfg, single, 0), rf, cfg, single)
    for name, p in model.named_parameters():
        assert_close(p.grad, mean[name], 1e-10, f"accumulated grad {name}")


def test_sft_micro_batch_is_the_same_step(float64_norms):
    """--micro-batch: sft samples of different lengths, right-padded into one forward, give the
    gradient and metrics of the same samples one at a time (each one's own token-mean NLL)."""
    tokenizer = longpo.tiny_tokenizer()
    records = [make_records(1, seed=20 + i, paragraphs=1 + i, turns=1 + i % 2)[0] for i in range(4)]
    examples = [longpo.build_example(r, tokenizer, ("chosen",)) for r in records]
    assert len({len(ex["chosen"]["ids"]) for ex in examples}) == 4  # padding is exercised
    cfg = longpo.TrainConfig(loss="sft", nll_target="sequence", nll_context_weight=0.1, grad_accum=4,
                             sp_size=1)
    single = one_process(torch.device("cpu"))
    results = []
    for groups in ([[ex] for ex in examples], [examples[:2], examples[2:]], [examples]):
        model = perturbed_tiny(0.02, 1)[0]
        model.set_attn_implementation("ring_attention")
        sums = {}
        for group in groups:
            metrics = longpo.micro_step(model, None, longpo.step_inputs(group, cfg, single, 0), None, cfg, single)
            sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
        results.append((sums, {name: p.grad.clone() for name, p in model.named_parameters()}))
    for sums, grads in results[1:]:
        for key in sums:
            assert abs(sums[key] - results[0][0][key]) < 1e-9, key
        for name in grads:
            assert_close(grads[name], results[0][1][name], 1e-10, f"micro-batch grad {name}")
    assert results[0][0]["nll"] > 0


def mixed_precision_worker(rank, world_size, device):
    """One LongPO micro-step of the tiny model as one process trains on a GPU: FSDP2 mixed precision
    on a process group of one (bf16 compute, fp32 master weights and gradients), against the same
    step in fp32 on the CPU. Tolerance: bf16 keeps 8 significant bits (unit roundoff 2e-3) and every
    matmul input is rounded to it; the head and log-softmax stay fp32. Measured with bf16 on the CPU
    (791 tokens, 63 answer tokens, the preference term live): 1.3e-4 relative on the loss, 2e-5 on the
    log-probs (rounding errors average out over the sums), 1.3e-3 on pref_loss, 2.3e-2 on the worst
    gradient (max error / max entry; median 1.1e-2). Bounds 1e-2 and 6e-2 leave room for GPU kernels
    that round attention probabilities to bf16; a wrong
    mask, scaling or dropped term moves these by O(1). The dtype checks fail for pure-bf16 weights
    or fp32 compute."""
    tokenizer = longpo.tiny_tokenizer()
    rec = make_records(1, seed=5, with_ref=True)[0]
    example = longpo.build_example(rec, tokenizer)
    refs = live_refs(example)  # the preference term live in both precisions
    cfg = longpo.TrainConfig(beta=0.5, lam=0.3, grad_accum=1, sp_size=1)
    cpu = one_process(torch.device("cpu"))
    want_model = perturbed_tiny(0.02, seed=1)[0].float()
    want_model.set_attn_implementation("ring_attention")  # as setup_model does
    want = longpo.micro_step(want_model, None, longpo.step_inputs([example], cfg, cpu, 0), refs, cfg, cpu)
    par = longpo.setup_parallel(1, rank, world_size, torch.device(device))
    model = longpo.setup_model(perturbed_tiny(0.02, seed=1)[0].float(), par, torch.bfloat16, True)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    got = longpo.micro_step(model, None, longpo.step_inputs([example], cfg, par, 0), refs, cfg, par)
    assert seen and set(seen) == {torch.bfloat16}, f"compute dtype {set(seen)}"
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, f"{name}: master {p.dtype}"
    for key in ("loss", "nll", "pref_loss", "logps/chosen", "logps/rejected"):
        assert math.isclose(got[key], want[key], rel_tol=1e-2), f"{key}: {got[key]} vs fp32 {want[key]}"
    for (name, p), (_, p32) in zip(model.named_parameters(), want_model.named_parameters()):
        assert_close(p.grad.full_tensor().cpu(), p32.grad, 6e-2, f"mixed-precision grad {name}")


def test_mixed_precision_in_one_process():
    run_distributed(mixed_precision_worker, 1, "cpu")


@needs_cuda
def test_mixed_precision_on_cuda_against_fp32_on_cpu():
    run_distributed(mixed_precision_worker, 1, "cuda", backend="nccl")


def test_sp2_equals_sp1_losses_and_every_gradient():
    run_distributed(sp_equivalence_worker, 2, timeout=400)


def packing_worker(rank, world_size):
    """The packed pair (one copy of the document, then the chosen and rejected branches) at SP =
    world_size in float64 against the direct way (both sequences whole, full logits): loss, NLL and
    every parameter gradient, for longpo and dpo (its NLL with context weight 0.3), multi-turn records,
    reference log-probs close to the policy's so that the rejected branch's gradient is live."""
    exact_norms()
    tokenizer = longpo.tiny_tokenizer()
    par = longpo.setup_parallel(world_size, rank, world_size, torch.device("cpu"))  # world 1: a group of one
    for turns, loss, context_weight in ((3, "longpo", 1.0), (2, "dpo", 0.3)):  # 0.3: context tokens weigh 0.3
        rec = make_records(1, seed=20 + turns, turns=turns)[0]
        example = longpo.build_example(rec, tokenizer)
        refs = live_refs(example)
        want, want_grads = direct_loss_and_grads(loss, perturbed_tiny(0.02, 1)[0], perturbed_tiny(0.0, 2)[0],
                                                 example, refs, context_weight=context_weight)
        got, got_grads = one_micro_step(loss, par, perturbed_tiny(0.02, 1)[0], perturbed_tiny(0.0, 2)[0], example,
                                        refs, False, context_weight=context_weight)
        assert math.isclose(got["loss"], want, rel_tol=1e-9), f"{loss} SP={world_size}: loss {got['loss']} != {want}"
        for name, g in want_grads.items():
            assert_close(got_grads[name], g, 1e-9, f"{loss} SP={world_size} rank {rank}: packed grad {name}")


def test_shared_prefix_packing_equals_the_direct_way():
    packing_worker(0, 1)
    run_distributed(packing_worker, 3, timeout=300)  # SP = 2: in sp_equivalence_worker


def hf_greedy(model, tokenizer, prompt, max_new_tokens):
    """transformers' own greedy generate: the independent reference of our decoding loops."""
    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=data_gen.stop_token_ids(tokenizer, model))
    new = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         generation_config=config)[0, len(prompt):]
    return [tokenizer.decode(new, skip_special_tokens=True).strip()], len(new)


def watch_decoding(monkeypatch, model):
    """Record each decoding step's logits and the cache's key buffer at that step, and count the model's
    prefills (decoder calls that are not decoding steps)."""
    steps, caches, prefills, room_cache, pick = [], [], [0], data_gen.room_cache, data_gen.next_token
    monkeypatch.setattr(data_gen, "room_cache", lambda *args: caches.append(room_cache(*args)) or caches[-1])

    def next_token(logits, *args):
        steps.append((logits.clone(), pick(logits, *args), caches[-1].layers[0].keys.data_ptr()))
        return steps[-1][1]
    monkeypatch.setattr(data_gen, "next_token", next_token)
    model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: prefills.__setitem__(0, prefills[0] + ("ring_decode" not in kwargs)),
        with_kwargs=True)
    return steps, caches, prefills


def check_steps_against_full_model(model, prompt, steps, what):
    """Every step's logits equal the one-process model's on the prompt and the tokens so far (float64);
    one key buffer from the first step to the last: nothing copied the cache."""
    new = [token for _, token, _ in steps]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + new[:-1]])).logits[0, len(prompt) - 1:]
    for k, (logits, _, _) in enumerate(steps):
        assert_close(logits, full[k], 1e-10, f"{what}: step {k} logits")
    assert len({ptr for _, _, ptr in steps}) == 1, f"{what}: the cache moved while decoding"
    return new


def sp_generation_worker(rank, world_size):
    """generate_long over the whole world (world 1: one process), float64, on one document's turns (their
    prompts share the document; two turns alike): the document is prefilled ONCE for all turns; the
    logits of EVERY decoding step of every turn equal the one-process model's on that turn's whole
    prompt and the tokens so far (1e-10), with and without a raised RoPE theta; greedy answers equal
    transformers' generate on each prompt alone, sampled ones each prompt decoded alone with its seed
    (the per-turn path); each rank caches exactly its share of the prefix (no padding), once over the
    group, and decodes in its reserved room. The one-process batched loop (short prompts): the same
    checks, left-padded beside another prompt."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        par = longpo.setup_parallel(world_size, rank, world_size, torch.device("cpu"))
        tokenizer = longpo.tiny_tokenizer()
        for theta in (0.0, 1e6):
            model = load_model_and_tokenizer("tiny", torch.float64, theta)[0]
            steps, caches, prefills = watch_decoding(monkeypatch, model)
            text = " ".join(WORDS[:9] if theta else WORDS * 2)
            while not shared_length(tokenizer, text) % (2 * world_size):  # a prefix not a multiple of 2 x W
                text += "!"
            asks = ["Go on?", "Tell me more about the river.", "Go on?"]
            prompts = [longpo.format_dialogue(tokenizer, text, [{"instruction": a}])[0] for a in asks]
            n = data_gen.common_prefix(prompts)
            assert 0 < n < min(map(len, prompts)) and prompts[0][:n] == prompts[1][:n]
            for temperature, seeds in ((0.0, [0, 0, 0]), (1.0, [5, 6, 7])):
                steps.clear()
                prefills[0] = 0
                got = data_gen.generate_long(model, tokenizer, prompts, 12, par, temperature, 0.9, seeds)
                assert prefills[0] == 1, f"{prefills[0]} prefills for one document"
                share = n // (2 * world_size) * 2  # the prefilled prefix, cut to a multiple of 2 x W: no padding
                assert {layer.length for layer in caches[-1].layers} == {share}  # cut back to its prefix share
                turn_steps, k = [], 0
                for _, new_tokens in got:  # the steps of each turn in order
                    turn_steps.append(steps[k:k + new_tokens])
                    k += new_tokens
                assert k == len(steps) and all(got), got
                for prompt, (answer, _), seed, mine in zip(prompts, got, seeds, turn_steps):
                    what = f"W={world_size} theta={theta} T={temperature} rank {rank}"
                    new = check_steps_against_full_model(model, prompt, mine, what)
                    assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()
                    alone = (hf_greedy(model, tokenizer, prompt, 12)[0][0] if temperature == 0 else
                             data_gen.generate_long(model, tokenizer, [prompt], 12, par, 1.0, 0.9, [seed])[0][0])
                    assert answer == alone, f"{what}: {answer!r} != the prompt decoded alone {alone!r}"
            steps.clear()  # one process, left-padded beside a shorter prompt, each row its own seed
            texts, _ = data_gen.generate(model, tokenizer, [prompts[0][:-5], prompts[1]], 12, 1.0, 0.9, seeds=[7, 6])
            assert texts[1] == got[1][0] and len({ptr for _, _, ptr in steps}) == 1
            assert data_gen.generate(model, tokenizer, [prompts[0]], 12) == hf_greedy(model, tokenizer, prompts[0], 12)
        unrelated = [[5, 6, 7], [8, 9], [10]]  # no shared prefix, a one-token prompt: all decoded
        got = data_gen.generate_long(model, tokenizer, unrelated, 6, par)
        assert [text for text, _ in got] == data_gen.generate(model, tokenizer, unrelated, 6)[0]


def shared_length(tokenizer, text):
    one, two = (longpo.format_dialogue(tokenizer, text, [{"instruction": a}])[0] for a in ("Go on?", "Tell me"))
    return data_gen.common_prefix([one, two])


def test_sequence_parallel_generation():
    sp_generation_worker(0, 1)
    run_distributed(sp_generation_worker, 2)
    run_distributed(sp_generation_worker, 3)


def test_pack_pair_layout():
    tokenizer = longpo.tiny_tokenizer()
    rec = make_records(1, seed=4, turns=2)[0]
    example = longpo.build_example(rec, tokenizer)
    c, r = example["chosen"], example["rejected"]
    nll = [1.0] * len(c["ids"])  # the NLL weights of the chosen sequence (--nll-target sequence)
    packed = longpo.pack_pair(example, 2, 0, nll)
    layout, first = packed["layout"], c["is_answer"].index(True)
    n = 2 * layout.n_prefix
    assert n % 4 == 0 and first - 4 <= n < first  # the longest multiple of 2*sp leaving the last prompt token
    lc, lr, pad = layout.segments
    assert (lc, lr) == (len(c["ids"]) - n, len(r["ids"]) - n) and (lc + lr + pad) == 2 * layout.n_branch and pad < 2
    ids = packed["input_ids"].tolist()
    assert ids[:n + lc] == c["ids"] and ids[n + lc:n + lc + lr] == r["ids"][n:]
    assert packed["position_ids"][n + lc:n + lc + lr].tolist() == list(range(n, len(r["ids"])))
    assert int(packed["chosen"].sum()) == sum(c["is_answer"][1:]) and int(packed["rejected"].sum()) == sum(r["is_answer"][1:])
    assert int(packed["nll"].sum()) == len(c["ids"]) - 1  # the chosen sequence's NLL targets, once each
    assert longpo.shared_prefix(example, (first - 1) // 2 + 1) == 0  # prompt < 2*sp + 1 tokens: nothing shared


def test_each_step_reads_distinct_samples_and_an_sp_group_one():
    """The samples of a step: the SP ranks of a DP group read the same ones, the DP groups different ones,
    and the steps of an epoch read each record once (grad_accum 3 x dp 2 = 6 a step, 12 records)."""
    cfg, cpu = longpo.TrainConfig(grad_accum=3, seed=5), torch.device("cpu")
    ranks = [longpo.Parallel(r, 4, 2, ra.LOCAL, cpu) for r in range(4)]  # dp 2 x sp 2
    draws = {(step, par.rank): longpo.step_samples(step, 12, cfg, par) for step in (0, 1, 2) for par in ranks}
    assert all(draws[step, 0] == draws[step, 1] and draws[step, 2] == draws[step, 3] for step in (0, 1, 2))
    assert all(len(d) == 3 for d in draws.values())  # grad_accum samples each
    assert sorted(draws[0, 0] + draws[0, 2] + draws[1, 0] + draws[1, 2]) == list(range(12)), draws
    assert sorted(draws[2, 0] + draws[2, 2]) != sorted(draws[0, 0] + draws[0, 2])  # epoch 1: a new order


def dp_sp_worker(rank, world_size, examples, refs, mean):
    """world 4 = dp 2 x sp 2: ranks {0, 1} and {2, 3} each ring over one sample; FSDP2 over all four
    gives the mean of the two samples' gradients (two_samples', made once by the test, not by each rank)."""
    exact_norms()
    par = longpo.setup_parallel(2, rank, world_size, torch.device("cpu"))
    assert (par.dp_rank, par.sp_rank) == divmod(rank, 2) and dist.get_world_size(par.sp_group) == 2
    _, grads = one_micro_step("longpo", par, perturbed_tiny(0.02, 1)[0], None, examples[par.dp_rank],
                              refs[par.dp_rank], True)
    for name, g in grads.items():
        assert_close(g, mean[name], 1e-9, f"dp2 x sp2 grad {name} rank {rank}")


def sharded_loading_worker(rank, world_size, path, out):
    """load_for_training at world 2 (fp32 masters of a bf16 checkpoint): only rank 0 reads the weights;
    each rank's shards equal those of a one-process load, the rotary frequencies too. save_final writes
    the base model's dtype (bf16) with the same weights."""
    from torch.distributed.tensor import distribute_tensor
    from_pretrained, reads = longpo.AutoModelForCausalLM.from_pretrained, []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(longpo.AutoModelForCausalLM, "from_pretrained",
                            lambda name, **kwargs: reads.append(name) or from_pretrained(name, **kwargs))
        par = longpo.setup_parallel(1, rank, world_size, torch.device("cpu"))
        model = longpo.load_for_training(path, par, (torch.float32, torch.float32))
    assert reads == ([path] if rank == 0 else []), f"rank {rank} read {reads}"
    want = from_pretrained(path, dtype=torch.float32)  # one process: the whole model
    for name, p in model.named_parameters():
        shard = distribute_tensor(want.get_parameter(name).detach(), p.device_mesh, p.placements).to_local()
        assert p.dtype == torch.float32 and torch.equal(p.to_local(), shard), f"rank {rank} {name}"
    assert torch.equal(model.get_decoder().rotary_emb.inv_freq, want.get_decoder().rotary_emb.inv_freq)
    tokenizer = longpo.load_tokenizer(path)
    for save_dtype, dtype in (("auto", torch.bfloat16),):
        cfg = longpo.TrainConfig(model=path, output_dir=os.path.join(out, save_dtype))
        longpo.save_final(model, tokenizer, cfg, par, 100)
        saved = from_pretrained(os.path.join(cfg.output_dir, "final"), dtype="auto")
        assert saved.config.dtype == dtype and all(p.dtype == dtype for p in saved.parameters())
        for name, p in want.named_parameters():
            assert torch.equal(saved.get_parameter(name).float(), p), f"{save_dtype}: {name}"


def test_only_rank_0_reads_the_weights_and_final_keeps_their_dtype(tmp_path):
    model, tokenizer = load_model_and_tokenizer("tiny")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    run_distributed(sharded_loading_worker, 2, str(tmp_path / "bf16"), str(tmp_path))


def test_dp2_by_sp2_gradients(float64_norms):
    run_distributed(dp_sp_worker, 4, *two_samples(seed=13), timeout=400)


# ----------------------------------------------------------------------------- longpo: end to end

def run_script(args, nproc=1, timeout=300, **env):
    """Run one of the project's scripts as a user would (torchrun for nproc > 1), env added to ours."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    result = subprocess.run(launcher + args, cwd=HERE, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def train_here(args):
    """longpo.py with these arguments, through its own command line and run_cli, in this process: what a
    run computes and writes, without the seconds of a process's start-up (run_script keeps that for the
    checks that need a process of their own)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["longpo.py"] + args)
        longpo.run_cli(longpo.main, longpo.TrainConfig)


def train_worker(rank, world_size, args):
    """longpo.py's main on each rank of run_distributed's world, as torchrun would start it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    longpo.main(longpo.config_from_cli(longpo.TrainConfig, args))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


METRIC_KEYS = {"step", "loss", "nll", "pref_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "grad_norm", "lr", "tokens", "tokens_per_s", "tokens_per_s_per_gpu"}


def test_train_cli_sp2_smoke_checkpoint_and_resume(tmp_path):
    """torchrun --nproc_per_node 2 longpo.py --sp-size 2: metrics, a final model that reloads and
    equals the sharded checkpoint, every parameter trained; a run resumed from its checkpoint of step 2
    (main on two ranks of run_distributed, no second start-up) gives the same metrics and weights as the
    uninterrupted one. A run's folder refused without --resume: test_finished_runs_are_never_overwritten..."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM
    data = write_jsonl(tmp_path / "data.jsonl", make_records(6, seed=5))  # no ref log-probs: computed
    args = ["longpo.py", "--data", data, "--sp-size", "2", "--max-steps", "4", "--grad-accum", "1",
            "--lr", "1e-3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script(args + ["--output-dir", full, "--save-every", "2"], nproc=2, CUDA_VISIBLE_DEVICES="")  # CPU as
    shutil.copytree(full, part, ignore=shutil.ignore_patterns("final", "checkpoint-4"))  # as if stopped at 2
    run_distributed(train_worker, 2, args[1:] + ["--output-dir", part, "--resume"])  # resumed: gloo's ranks

    metrics = read_metrics(full)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    tokenizer = longpo.tiny_tokenizer()
    examples = [longpo.build_example(rec, tokenizer) for rec in map(json.loads, open(data))]
    trained = {longpo.trained_length(ex) for ex in examples}  # the packed pair: the document once
    assert trained.isdisjoint(len(ex["chosen"]["ids"]) + len(ex["rejected"]["ids"]) for ex in examples)
    for m in metrics:
        assert METRIC_KEYS <= set(m) and all(math.isfinite(m[k]) for k in METRIC_KEYS)
        assert m["tokens"] in trained and math.isclose(m["tokens_per_s_per_gpu"] * 2, m["tokens_per_s"])
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]  # lr 1e-3 learns fast
    resumed = read_metrics(part)
    assert len(resumed) == 4
    for a, b in zip(metrics, resumed):
        for key in METRIC_KEYS - {"tokens_per_s", "tokens_per_s_per_gpu"}:
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), f"step {a['step']} {key}: {a[key]} vs {b[key]}"

    final = AutoModelForCausalLM.from_pretrained(os.path.join(full, "final"))
    resumed_final = AutoModelForCausalLM.from_pretrained(os.path.join(part, "final"))
    initial, _ = load_model_and_tokenizer("tiny")
    from_ckpt, _ = load_model_and_tokenizer("tiny")
    state = from_ckpt.state_dict()
    dcp.load({"model": state}, checkpoint_id=os.path.join(full, "checkpoint-4"))
    from_ckpt.load_state_dict(state)
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = final(input_ids=ids).logits
        assert_close(from_ckpt(input_ids=ids).logits, logits, 1e-6, "final model vs sharded checkpoint")
        assert_close(resumed_final(input_ids=ids).logits, logits, 1e-5, "resumed vs uninterrupted")
    for (name, p), p0 in zip(final.named_parameters(), initial.parameters()):
        assert not torch.equal(p, p0), f"parameter {name} did not change"


def test_non_finite_loss_or_gradient_stops_with_checkpoint_intact(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", make_records(4, seed=6, with_ref=True))
    out = str(tmp_path / "run")
    args = ["--data", data, "--output-dir", out, "--max-steps", "4",
            "--grad-accum", "1", "--lr", "1e30", "--save-every", "1"]  # weights blow up after step 1
    with pytest.raises(FloatingPointError) as stop:
        train_here(args)
    found = re.search(r"non-finite loss or gradient norm at step (\d+) \(records '([^']+)' of (\d+) tokens "
                      r"on rank 0\).* The last good checkpoint is (\S+):.*another --attn-kernel.*lower --lr",
                      str(stop.value))
    assert found, str(stop.value)
    records = {rec["id"]: rec for rec in map(json.loads, open(data))}
    length = longpo.trained_length(longpo.build_example(records[found.group(2)], longpo.tiny_tokenizer()))
    assert int(found.group(3)) == length  # the record named, with the length it trains
    step, checkpoint = int(found.group(1)), found.group(4)
    assert step >= 2 and checkpoint == longpo.last_checkpoint(out)
    assert checkpoint.endswith(f"checkpoint-{step - 1}")
    assert not os.path.exists(os.path.join(out, f"checkpoint-{step}")) and len(read_metrics(out)) == step - 1
    assert not os.path.exists(os.path.join(out, "final"))


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    tokenizer = longpo.tiny_tokenizer()
    tokenizer.pad_token = None  # as Mistral's and Llama's tokenizers ship
    tokenizer.save_pretrained(tmp_path)
    loaded = longpo.load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_resume_refuses_each_run_defining_change(tmp_path):
    """--resume continues a run only with the arguments that define it: each of them changed is
    refused, naming it (the list here is written out, not taken from longpo's own)."""
    data = write_jsonl(tmp_path / "data.jsonl", make_records(2, seed=3, with_ref=True))
    other = write_jsonl(tmp_path / "other.jsonl", make_records(2, seed=4, with_ref=True))
    base = longpo.TrainConfig(data=data, output_dir=str(tmp_path / "run"), resume=True, lr=1e-4, grad_accum=1,
                              max_length=500)
    os.makedirs(base.output_dir)
    with open(os.path.join(base.output_dir, "config.json"), "w") as f:
        json.dump({"identity": longpo.run_identity(base, 2, 2, longpo.Records(data))}, f)
    open(os.path.join(base.output_dir, "metrics.jsonl"), "w").close()
    assert longpo.check_output_dir(base, longpo.run_identity(base, 2, 2, longpo.Records(data))) == "resume"
    changes = {"model": "org/other-7b", "ref_model": "org/ref-7b", "data": other, "loss": "dpo", "beta": 0.2,
               "lam": 0.5, "nll_target": "responses", "nll_context_weight": 0.5, "lr": 1e-3, "warmup_ratio": 0.2,
               "max_grad_norm": 2.0, "max_steps": 9, "grad_accum": 2, "max_length": 999,  # raised

               "rope_theta": 1e6, "dtype": "float64", "seed": 7}
    for key, value in changes.items():
        changed = dataclasses.replace(base, **{key: value})
        with pytest.raises(longpo.UsageError, match=f"other arguments \\({key}: "):
            longpo.check_output_dir(changed, longpo.run_identity(changed, 2, 2, longpo.Records(changed.data)))
    for world, sp in ((4, 2), (2, 1)):
        with pytest.raises(longpo.UsageError, match="world_size|sp_size"):
            longpo.check_output_dir(base, longpo.run_identity(base, world, sp, longpo.Records(data)))
    for limit in (0, 400, 999):  # any other limit would change the record set: refused
        with pytest.raises(longpo.UsageError, match="max_length: 500 there"):
            changed = dataclasses.replace(base, max_length=limit)
            longpo.check_output_dir(changed, longpo.run_identity(changed, 2, 2, longpo.Records(data)))


def test_default_learning_rates_follow_the_paper():
    lr = {loss: longpo.resolve_defaults(longpo.TrainConfig(model="org/any-7b", loss=loss)).lr
          for loss in ("longpo", "dpo", "sft")}
    assert lr == {"longpo": 5e-7, "dpo": 5e-7, "sft": 2e-5}, lr  # paper: SFT baseline at 2e-5
    assert longpo.resolve_defaults(longpo.TrainConfig(loss="sft", lr=3e-6)).lr == 3e-6  # a given lr wins


def rope_theta(config):
    params = getattr(config, "rope_parameters", None)  # transformers 5.x; 4.x: an attribute
    return params["rope_theta"] if isinstance(params, dict) else config.rope_theta


def test_rope_theta_applies_to_the_policy_only():
    policy, _ = load_model_and_tokenizer("tiny", rope_theta=1e7)
    reference, _ = load_model_and_tokenizer("tiny")
    assert rope_theta(policy.config) == 1e7 and rope_theta(reference.config) == 1e4
    inv_freq = policy.model.rotary_emb.inv_freq  # theta ** (-2i / D): the slowest frequency moves
    assert torch.isclose(inv_freq[-1], torch.tensor(1e7) ** (-(inv_freq.numel() - 1) / inv_freq.numel()), rtol=1e-4)
    assert not torch.allclose(inv_freq, reference.model.rotary_emb.inv_freq)


def test_expandable_segments_unless_the_user_set_an_allocator_config(monkeypatch):
    names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    for chosen in (None, *names):  # nothing set; the user's config under either name
        for name in names:
            monkeypatch.delenv(name, raising=False)
        if chosen:
            monkeypatch.setenv(chosen, "max_split_size_mb:64")
        longpo.init_distributed()  # one process: no process group
        want = {chosen: "max_split_size_mb:64"} if chosen else {names[0]: "expandable_segments:True"}
        assert {name: os.environ[name] for name in names if name in os.environ} == want, chosen


MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "sliding_window": None,
              "tie_word_embeddings": False}


# The tracker's kinds of memory, in the plan's categories
TRACED = {"params": ("Sharded Param", "Unsharded Param", "All Gather", "Buffer"),
          "grads": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter"), "optimizer": ("OptState",),
          "activations": ("Activation",), "temporaries": ("Temp", "Inputs")}


@contextlib.contextmanager
def fake_world(c, world_size, sp_size):
    """(par, fake mode) of rank 0 in a fake process group of world_size ranks, to trace model config c's
    step on fake tensors (shapes, no data). The CPU's fused attention stands in for the card's (the same
    out and lse); its probe needs real values, so it runs here, before the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        par = longpo.setup_parallel(sp_size, 0, world_size, torch.device("cpu"))
        d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        ra.probe_kernel("cpu", par.device, torch.bfloat16, c.num_attention_heads,
                        c.num_key_value_heads, d)
        yield par, FakeTensorMode(allow_non_fake_inputs=True)
    finally:
        dist.destroy_process_group()


def with_layers(c, n):
    fields = {key: value for key, value in c.to_dict().items() if key != "layer_types"}  # one per layer
    return type(c).from_dict({**fields, "num_hidden_layers": n})


def trace_step(c, cfg, branch=4608):
    """Rank 0's peak memory by category (bytes) in a LongPO step of model config c at cfg's length, world
    and SP size: longpo's micro_step and AdamW on fake tensors in a fake process group, FSDP's and
    autograd's memory recorded by PyTorch's FSDPMemTracker; a micro-step after the first of an
    accumulation (the gradients exist), AdamW's states made: the steady state's peak. The pair: answers
    of `branch` tokens after one prompt, packed to --max-length tokens."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    cfg = dataclasses.replace(cfg, loss="longpo", grad_accum=2)
    prompt = cfg.max_length - 2 * branch + 1
    is_answer = [False] * prompt + [True] * branch
    example = {"chosen": {"ids": [1] * prompt + [2] * branch, "is_answer": is_answer},
               "rejected": {"ids": [1] * prompt + [3] * branch, "is_answer": is_answer}}
    with fake_world(c, cfg.plan, cfg.sp_size) as (par, fake):
        _ = par.mesh  # FSDP's mesh, made on real tensors
        seq = longpo.step_inputs([example], cfg, par, pad_id=0)  # on the host, as training makes them
        with fake:
            model = AutoModelForCausalLM.from_config(c, dtype=torch.float32, attn_implementation="sdpa")
            model = longpo.setup_model(model, par, torch.bfloat16, cfg.grad_checkpointing)
            optimizer = torch.optim.AdamW(model.parameters())
            for p in model.parameters():  # gradients accumulated by an earlier micro-step
                p.grad = torch.zeros_like(p)
            tracker = FSDPMemTracker(model, optimizer)
            with tracker:
                optimizer.step()  # AdamW's states, as from the first step on
                longpo.micro_step(model, None, seq, (0.0, 0.0), cfg, par)
            peak = tracker.get_tracker_snapshot("peak")[par.device]
    return {name: sum(peak.get(kind, 0) for kind in kinds) for name, kinds in TRACED.items()}


def traced_peak(c, cfg, layers=(3, 4)):
    """trace_step's peak for c's depth, from traces of 3 and 4 decoder layers: from 3 on memory grows
    linearly with the depth (32 layers take half a minute to trace and agree within 0.01 GiB)."""
    few, more = (trace_step(with_layers(c, n), cfg) for n in layers)
    return {name: few[name] + (more[name] - few[name]) * (c.num_hidden_layers - layers[0]) for name in few}


def trace_prefill(c, cfg):
    """Rank 0's peak memory (bytes by category) in data_gen's prefill of a --max-doc-len prompt over
    --sp-size ranks, on fake tensors, recorded by PyTorch's MemTracker; --max-new-tokens' room reserved."""
    from torch.distributed._tools.mem_tracker import MemTracker
    with fake_world(c, cfg.sp_size, cfg.sp_size) as (par, fake):
        n = cfg.max_doc_len // (2 * cfg.sp_size) * 2 * cfg.sp_size
        seq = longpo.prepare_sequence([1] * n, {}, par, 0)  # on the host, as generate_long makes it
        with fake:
            model = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
            model.set_attn_implementation("ring_attention")
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker, torch.no_grad():
                data_gen.prefill(model, seq, cfg.max_doc_len - n + cfg.max_new_tokens, par)
            peak = tracker.get_tracker_snapshot("peak")[par.device]
    params = peak.get("Parameter", 0) + peak.get("Buffer", 0)
    return {"params": params, "cache and temporaries": peak["Total"] - params}


def planned(rows):
    totals = {}
    for category, _, b in rows:
        totals[category] = totals.get(category, 0) + b
    return totals


def test_memory_plans_agree_with_the_step_traced_on_fake_tensors(tmp_path):
    """--plan against longpo's own step traced on fake tensors (a fake world of 8, FSDP2, bf16 over fp32,
    checkpointed layers, the ring over SP 8, the packed pair, chunked log-probs, AdamW): Mistral-7B at 512K
    (64K tokens per GPU) and 128K, the peak within 10% and each category within 15%. A row missed or a
    tensor kept past its time fails: the branch K/V once held by the ring's ctx (not save_for_backward)
    outlived each checkpointed layer's forward, 2.2 GiB at 128K. The rows add up; the verdicts. The
    generation plan against generate_long's prefill traced the same way (4 layers: seconds)."""
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))
    c, peaks = transformers.AutoConfig.from_pretrained(tmp_path), {}
    for length in (524288, 131072):
        cfg = longpo.TrainConfig(model=str(tmp_path), max_length=length, plan=8, sp_size=8)
        lines, rows = longpo.plan_rows(c, cfg)
        plan, traced = planned(rows), traced_peak(c, cfg)
        for name, got in traced.items():
            assert abs(plan[name] - got) <= 0.15 * got, f"{length}: {name} planned {plan[name]}, traced {got}"
        total = sum(traced.values())
        assert abs(sum(plan[name] for name in traced) - total) <= 0.10 * total, (plan, traced)
        text = longpo.memory_plan(cfg)
        peak = float(re.search(r"peak per GPU: ([\d.]+) GiB of 79.1 GiB usable: fits", text).group(1))
        gib = re.findall(r"^ +([\d.]+) GiB  (.*)$", text, re.M)
        assert abs(sum(float(g) for g, _ in gib) - peak) < 0.01 * len(gib), gib  # the rows add up
        peaks[length] = peak
    assert "7.24B parameters" in text and "16384 tokens per GPU" in text
    assert 40 < peaks[524288] < 79.1 and peaks[131072] < peaks[524288]
    assert (peaks[524288], peaks[131072]) == (55.12, 30.93), "the plans' figures moved: say why in the commit"
    half = longpo.memory_plan(longpo.TrainConfig(model=str(tmp_path), max_length=131072, plan=8, sp_size=4))
    assert "dp 2 x sp 4, 32768 tokens per GPU" in half and "31 layer inputs below, 32768 tokens" in half
    huge = longpo.memory_plan(longpo.TrainConfig(model=str(tmp_path), max_length=4 * 524288, plan=8))
    assert "DOES NOT FIT" in huge
    with pytest.raises(longpo.UsageError, match="--sp-size 3 must divide the number of processes 8"):
        longpo.memory_plan(longpo.TrainConfig(model=str(tmp_path), max_length=8192, plan=8, sp_size=3))
    (tmp_path / "config.json").write_text(json.dumps({**MISTRAL_7B, "num_hidden_layers": 4}))
    cfg = data_gen.DataGenConfig(model=str(tmp_path), max_doc_len=524288, sp_size=8, max_new_tokens=1024)
    generation = data_gen.generation_plan(cfg)
    assert "K/V: 8.00 GiB" in generation  # 524288 tokens x 2 x 4 layers x 8 heads x 128 x 2 B
    # this GPU's K/V: (65536 prompt + 1024 generated tokens) x 16384 B
    assert "1.02 GiB  K/V cache: 65536 prompt tokens + 1024 generated" in generation
    gib = dict((what, float(g)) for g, what in re.findall(r"^ +([\d.]+) GiB  (.*)$", generation, re.M))
    traced = trace_prefill(transformers.AutoConfig.from_pretrained(tmp_path), cfg)
    plan_params = sum(g for what, g in gib.items() if what.startswith("bf16 weights"))
    plan_rest = sum(g for what, g in gib.items() if what.startswith(("K/V", "prefill")))
    for name, plan in (("params", plan_params), ("cache and temporaries", plan_rest)):
        assert abs(plan - traced[name] / 2**30) <= 0.10 * traced[name] / 2**30, (name, plan, traced[name] / 2**30)


# ----------------------------------------------------------------------------- data_gen

import hashlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402

import data_gen  # noqa: E402

ONE = one_process(torch.device("cpu"))  # an SP group in this process: a group of one


def one_record(doc, model, tokenizer, cfg):
    """data_gen's steps 1-6 for one document (make_turns, make_record), its long inputs decoded in this process."""
    draft = data_gen.make_turns(doc, 0, model, tokenizer, cfg)
    rejected = data_gen.long_answers(model, tokenizer, cfg, ONE, doc, draft["turns"])
    return data_gen.make_record(draft, rejected, model, tokenizer, cfg)


def token_starts(tokenizer, text):
    return [a for a, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def test_chunker_spans_budget_and_boundaries():
    tokenizer = longpo.tiny_tokenizer()
    rng = random.Random(4)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 60))) for _ in range(30)]
    paragraphs[7] = "\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(20))  # long, many lines
    paragraphs[15] = "x" * 3000  # one line longer than a chunk: cut between tokens
    text = "\n\n".join(paragraphs)
    starts = token_starts(tokenizer, text)
    para_starts = {0} | {m.end() for m in re.finditer(r"\n\n", text)}
    chunk_min, chunk_max = 300, 700
    chunks = data_gen.chunk_document(text, starts, chunk_min, chunk_max)
    assert len(chunks) >= 8
    for (a, b), (c, _) in zip(chunks, chunks[1:]):
        assert b <= c, "chunks overlap"
    for a, b in chunks:
        assert 0 <= a < b <= len(text)
        n = len(tokenizer(text[a:b], add_special_tokens=False)["input_ids"])
        assert chunk_min <= n <= chunk_max, f"chunk [{a}, {b}) has {n} tokens"
        inside_long = text.find("x" * 3000) <= a < text.find("x" * 3000) + 3000
        line_start = a == 0 or text[a - 1] == "\n"
        assert a in para_starts or line_start or inside_long, f"chunk starts mid-line at {a}"
    assert any(a in para_starts for a, _ in chunks)
    text = "a" * 50 + "\n\n" + "b" * 30  # a token a byte: paragraphs of 52 and 30 tokens
    starts = token_starts(tokenizer, text)
    assert data_gen.chunk_document(text, starts, 30, 60) == [(0, 52), (52, 82)]  # chunk_min exactly: kept
    assert data_gen.chunk_document(text, starts, 31, 60) == [(0, 52)]  # one token short: dropped


def test_next_token_greedy_and_top_p():
    """Greedy at temperature 0; else top-p keeps the smallest set of tokens whose mass reaches p."""
    g, probs = torch.Generator().manual_seed(0), torch.tensor([0.5, 0.3, 0.2])
    assert {data_gen.next_token(torch.tensor([0.2, 0.45, 0.35]).log(), 0.0, 1.0, g) for _ in range(50)} == {1}
    assert {data_gen.next_token(probs.log(), 0.05, 1.0, g) for _ in range(100)} == {0}  # cold: nearly greedy
    assert set(data_gen.next_token(probs.log(), 1.0, 0.6, g) for _ in range(400)) == {0, 1}  # 0.5 + 0.3
    assert set(data_gen.next_token(probs.log(), 1.0, 1.0, g) for _ in range(400)) == {0, 1, 2}
    assert {data_gen.next_token(torch.tensor([0.9, 0.05, 0.05]).log(), 1.0, 0.6, g) for _ in range(50)} == {0}


def test_question_parser_and_filters():
    assert data_gen.parse_questions("1. A?\n2. B?\n3. C?\n4. D?") == ["A?", "B?", "C?", "D?"]
    messy = ("Here are four questions:\n\n**1.** Why does the author compare\nthe two cities?\n"
             "2) What changed?\nQ3: How?\nQuestion 4 - Which one?\n5. Extra?\nHope this helps!")
    assert data_gen.parse_questions(messy) == [
        "Why does the author compare the two cities?", "What changed?", "How?", "Which one?", "Extra?"]
    assert len(data_gen.parse_questions("1. Only one?\n2. And two?\nThat is all.")) == 2
    assert data_gen.parse_questions("No list at all.") == []
    assert data_gen.parse_questions("2. starts at two?\n3. no") == []  # numbering must start at 1
    assert data_gen.filter_reason("  ") == "empty"
    assert data_gen.filter_reason("I'm sorry, but I cannot help with that.") == "refusal"
    assert data_gen.filter_reason("As an AI, I can't know.") == "refusal"
    for answer in ("Hawaii cannot be reached by road.", "It served as an aid to sailors."):  # words, not parts
        assert data_gen.filter_reason(answer) is None, answer
    assert data_gen.filter_reason("the cat sat " * 30) == "repetition"
    assert data_gen.filter_reason("ab" * 100) == "repetition"
    assert data_gen.filter_reason("The archive keeps 412 maps, more than any other building in the port.") is None
    assert data_gen.with_lead_in("Based on the text above,", "How many?") == "Based on the text above, how many?"
    assert data_gen.with_lead_in("Based on the text above,", "Kestrel keeps what?").endswith(" Kestrel keeps what?")


def test_bad_document_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n{oops\n" + json.dumps({"id": "x", "body": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"docs.jsonl:2: .*fix or remove the line"):
        data_gen.read_docs(str(path))
    for line in ('{"text": 5}', '{"text": null}', '["a"]'):
        path.write_text(json.dumps({"text": "a"}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=r"docs.jsonl:2: needs a string field 'text'; fix or remove"):
            data_gen.read_docs(str(path))
    path.write_text(json.dumps({"text": "a"}) + "\n\n")
    key = "sha1-" + hashlib.sha1(b"a").hexdigest()[:16]  # no id: a hash of the text, wherever the line moves
    assert data_gen.read_docs(str(path)) == [{"id": key, "text": "a"}]
    path.write_text("\n".join(json.dumps({"text": t, "id": None}) for t in ("new", "a", "b")) + "\n")
    docs = data_gen.read_docs(str(path), mine=lambda i: i != 1)  # another rank's document: its id, no text
    assert docs[1] == {"id": key, "text": None} and len({d["id"] for d in docs}) == 3 and docs[2]["text"] == "b"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ("a", "b", "a")) + "\n")
    with pytest.raises(ValueError, match="documents 1 and 3 have the same id"):
        data_gen.read_docs(str(path))
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    assert data_gen.read_docs(str(folder)) == [{"id": "a", "text": "first"}, {"id": "b", "text": "second"}]
    assert data_gen.read_docs(str(folder), mine=lambda i: i == 1)[0] == {"id": "a", "text": None}
    with pytest.raises(ValueError, match="no such file or folder"):
        data_gen.read_docs(str(tmp_path / "nothing"))


def direct_short_logp(model, tokenizer, rec, side):
    """Reference log-prob by full logits and cross entropy, turn by turn on the chunk."""
    total = 0.0
    for turn in rec["turns"]:
        chunk = rec["document"][turn["chunk"][0]:turn["chunk"][1]]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{chunk}\n\n{turn['instruction']}"}],
                                               tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(turn[side] + "</s>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = -F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        total += logp[len(p_ids) - 1:].sum().item()
    return total


def test_data_gen_end_to_end_resume_and_ranks(tmp_path, monkeypatch):
    """A run on the demo corpus (answers SAMPLED, the tiny default): schema-valid records whose
    reference log-probs equal a direct recomputation. The data is a function of the seed and the
    documents alone: a run killed after its first record (a line torn) and resumed on 2 ranks that decode
    each long input together (--sp-size 2) writes the same records (each choice and answer draws from its
    own seeded stream); a resume with other arguments is refused."""
    args = ["--max-new-tokens", "16", "--turns", "2"]
    main = lambda *argv: data_gen.main(longpo.config_from_cli(data_gen.DataGenConfig, args + list(argv)))  # noqa: E731
    out = str(tmp_path / "full")
    assert main("--out", out) == {"records": 4, "dropped": {}, "turns_filtered": {}}
    records = longpo.Records(out, need_ref=True)  # the schema training validates
    assert len(records) == 4 and all(len(r["turns"]) == 2 for r in records)
    assert json.load(open(f"{out}/args.json"))["docs"] == "demo"
    model, tokenizer = load_model_and_tokenizer("tiny")
    for rec in records.select(range(2)):
        assert (rec["ref_chosen_logp"], rec["ref_rejected_logp"]) == longpo.short_reference_logps(model, tokenizer, rec)
        for side in ("chosen", "rejected"):
            assert math.isclose(rec[f"ref_{side}_logp"], direct_short_logp(model, tokenizer, rec, side), rel_tol=1e-5)
        for turn in rec["turns"]:
            assert turn["instruction"].split(",")[0] + "," in data_gen.LEAD_INS
            thing, place = re.search(r"how many (\w+) are there at (\w+)\?", turn["instruction"]).groups()
            chunk = rec["document"][turn["chunk"][0]:turn["chunk"][1]]
            assert re.search(rf"At {place} \d+ {thing} were counted\.", chunk), "the fact is in the chunk"

    # a run killed after its first record: what it flushed stays, its last line torn by the kill
    killed, real = str(tmp_path / "killed"), data_gen.make_turns

    def kill(doc, doc_index, *rest):
        if doc_index == 1:
            raise KeyboardInterrupt  # not an error of the document's: the run stops, as at a kill
        return real(doc, doc_index, *rest)
    monkeypatch.setattr(data_gen, "make_turns", kill)
    with pytest.raises(KeyboardInterrupt):
        main("--out", killed)
    monkeypatch.setattr(data_gen, "make_turns", real)
    part = killed + "/rank0.jsonl"
    assert open(part).read().count("\n") == 1
    with open(part, "a") as f:
        f.write('{"id": "demo-3", "document": "torn li')  # as if killed in the middle of a write
    with pytest.raises(longpo.UsageError, match="other arguments"):
        main("--out", killed, "--turns", "3")
    run_script(["data_gen.py", "--out", killed, "--sp-size", "2"] + args, nproc=2)  # 2 ranks, one SP group
    assert folder_lines(killed) == folder_lines(out)
    ids = [json.loads(line)["id"] for rank in (0, 1) for line in open(killed + f"/rank{rank}.jsonl")]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 4, ids


def folder_lines(folder):
    """The records of a data_gen.py --out folder, its lines in document order (as longpo.py reads them)."""
    lines = [line for path in sorted(glob.glob(os.path.join(folder, "rank*.jsonl"))) for line in open(path)]
    return sorted(lines, key=lambda line: json.loads(line)["meta"]["doc_index"])


def test_data_gen_resume_follows_documents_not_lines(tmp_path, monkeypatch, capsys):
    """A continued run recognises finished documents by their id (a hash of the text when they have
    none), not by their line: with a new document inserted before them and the rest reordered, the
    finished records are not done again, the new one is, and every id appears once."""
    # the tiny model writes no list of 4 questions: give every chunk four, so that records are kept
    monkeypatch.setattr(data_gen, "parse_questions", lambda reply: [f"What is fact {i}?" for i in range(4)])
    texts = [doc["text"] for doc in data_gen.demo_corpus(4, 2, seed=31)]
    monkeypatch.setattr(data_gen, "QUESTION_TOKENS", 8)
    docs, out = tmp_path / "docs.jsonl", str(tmp_path / "out")
    args = ["--docs", str(docs), "--out", out, "--turns", "2",
            "--max-new-tokens", "4", "--min-doc-len", "1", "--chunk-min", "8", "--chunk-max", "200"]
    main = lambda: data_gen.main(longpo.config_from_cli(data_gen.DataGenConfig, args))  # noqa: E731
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    main()
    part = out + "/rank0.jsonl"
    first = open(part).read().splitlines()
    assert len(first) == 3 and not any("dropped" in json.loads(line) for line in first), first
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in [texts[3], texts[2], texts[0], texts[1]]))
    capsys.readouterr()
    main()
    assert "4 documents, 3 already done" in capsys.readouterr().out
    lines = open(part).read().splitlines()
    assert lines[:3] == first and len(lines) == 4, "finished documents were done again"
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted({data_gen.text_id(t) for t in texts}), ids  # each once, the new one too
    assert json.loads(lines[3])["id"] == data_gen.text_id(texts[3])


def test_data_gen_model_questions_path(tmp_path, monkeypatch):
    """Documents of one's own (here demo texts in a JSONL): the model writes the questions. The tiny
    random model cannot write a numbered list of 4, so every chunk is dropped and counted: the path runs
    (the model is asked for each chunk's questions), nothing passes silently."""
    out, docs = str(tmp_path / "q"), tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in data_gen.demo_corpus(2)))
    monkeypatch.setattr(data_gen, "QUESTION_TOKENS", 32)
    asked, generate = [], data_gen.generate
    monkeypatch.setattr(data_gen, "generate", lambda model, tokenizer, prompts, *args, **kwargs: asked.extend(
        tokenizer.decode(p) for p in prompts) or generate(model, tokenizer, prompts, *args, **kwargs))
    summary = data_gen.main(data_gen.DataGenConfig(docs=str(docs), out=out, turns=2))
    assert summary == {"records": 0, "dropped": {"questions": 2}, "turns_filtered": {"questions": 4}}
    assert len(asked) == 4 and all(data_gen.QUESTION_PROMPT in prompt for prompt in asked)


# ----------------------------------------------------------------------------- eval

import eval as evaluation  # noqa: E402  (the project's eval.py)


def test_ruler_prompts_have_length_and_needle_depth():
    tokenizer = longpo.tiny_tokenizer()
    for task in evaluation.RULER_TASKS:
        for length in (700, 1500):
            for depth in (0.0, 0.5, 1.0):
                rng = random.Random(f"{task}{length}{depth}")
                needles, question, expected, _ = evaluation.ruler_sample(task, rng)
                ids, context = evaluation.build_ruler_prompt(tokenizer, needles, depth, question, length, rng)
                assert length - 4 <= len(ids) <= length, f"{task} {length}: {len(ids)} tokens"
                assert all(n in context for n in needles) and question in tokenizer.decode(ids)
                for e in expected:
                    assert e in context, f"{task}: the answer {e} is not in the context"
                if task == "niah_single":
                    where = context.index(needles[0]) / len(context)
                    assert abs(where - depth) < 0.1, f"needle at {where:.2f}, asked {depth}"
    with pytest.raises(ValueError, match="not a length"):
        evaluation.parse_lengths("4k,lots")
    assert evaluation.parse_lengths("4k, 1000") == [4096, 1000]


def test_eval_scorers_on_hand_made_cases(monkeypatch):
    assert evaluation.token_f1("The cat sat", "cat sat on the mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert evaluation.token_f1("dog", "cat") == 0.0 and evaluation.token_f1("A cat!", "the cat") == 1.0
    assert evaluation.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
    assert evaluation.rouge_l("", "x") == 0.0
    options = ["Paris", "London", "Rome", "Oslo"]
    assert evaluation.parse_option("B", options) == 1
    assert evaluation.parse_option("The answer is (C).", options) == 2
    assert evaluation.parse_option("Answer: D", options) == 3
    assert evaluation.parse_option("I think it is london", options) == 1
    assert evaluation.parse_option("no idea", options) is None
    assert evaluation.parse_option("A good guess is Rome.", options) == 2  # an article, not option A
    assert evaluation.parse_option("The answer is a city: Oslo", options) == 3
    assert evaluation.parse_option("(A)", options) == 0 and evaluation.parse_option("C) Rome", options) == 2
    assert evaluation.recall_score("numbers 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert evaluation.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert evaluation.truncate_middle([1, 2], 4) == [1, 2]
    seen = []  # an InfiniteBench book is cut from the middle: the prompt and its answer fit the length
    monkeypatch.setattr(data_gen, "generate", lambda m, t, prompts, n, par=None: seen.append(len(prompts[0]) + n)
                        or [["Aurora"]])
    book = {"context": "The ship was called Aurora. " * 100, "input": "Ship?", "answer": ["Aurora"]}
    assert evaluation.eval_infbench(None, longpo.tiny_tokenizer(), {"en_qa": [book]}, 300) == {"en_qa": 1.0}
    assert 296 <= seen[0] <= 300, seen
    # RULER average as the paper reports it: the mean of the NIAH, VT and QA categories, NIAH being
    # the mean of its four needle tasks (a plain mean of six tasks would give NIAH 4/6 of the weight)
    ruler = {t: {"avg": 1.0} for t in evaluation.RULER_TASKS if t.startswith("niah")}
    ruler.update(vt={"avg": 0.0}, qa={"avg": 0.5})
    row = evaluation.summary_row({"ruler": ruler})
    assert row["ruler/niah"] == 1.0 and row["ruler/vt"] == 0.0 and row["ruler/avg"] == pytest.approx(0.5)


class BiasedLM(torch.nn.Module):
    """A stand-in LM whose next-token distribution is a fixed softmax(bias) at every position."""
    device = torch.device("cpu")  # as a transformers model says where it is

    def __init__(self, vocab, favourite):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite] = 5.0

    def forward(self, input_ids, logits_to_keep=None):  # logits_to_keep: positions, as transformers takes
        n = input_ids.shape[1] if logits_to_keep is None else len(logits_to_keep)
        return type("Out", (), {"logits": self.bias.expand(input_ids.shape[0], n, -1)})()


def test_copy_task_scores_a_copier_at_one_and_others_below(monkeypatch):
    """eval's copy task on held-out lists: a model that repeats the list scores 1.0 (exact and per word),
    one that skips a word or stops halfway scores what a direct count says; the real decoding runs."""
    tokenizer, cfg = longpo.tiny_tokenizer(), evaluation.EvalConfig()
    monkeypatch.setattr(evaluation, "COPY_LISTS", 8)
    lists = [d["text"] for d in data_gen.copy_corpus(8, seed=1 << 30)]  # held out: no training seed is near

    def answer(model, tokenizer, prompts, max_new_tokens, par=None):  # `model` maps the list to its answer
        text = next(t for t in lists if t in tokenizer.decode(prompts[0]))
        assert max_new_tokens >= len(tokenizer(text, add_special_tokens=False)["input_ids"])  # room to copy
        return [[model(text)]]
    monkeypatch.setattr(data_gen, "generate", answer)
    assert evaluation.eval_copy(lambda text: text, tokenizer, cfg) == {"exact": 1.0, "words": 1.0}
    skips = evaluation.eval_copy(lambda text: " ".join(text.split()[:1] + text.split()[2:]), tokenizer, cfg)
    assert skips == {"exact": 0.0, "words": pytest.approx(sum(1 / len(t.split()) for t in lists) / 8)}
    halfway = evaluation.eval_copy(lambda text: " ".join(text.split()[:len(text.split()) // 2]), tokenizer, cfg)
    assert halfway == {"exact": 0.0, "words": pytest.approx(sum(len(t.split()) // 2 / len(t.split())
                                                                for t in lists) / 8)}
    monkeypatch.undo()
    monkeypatch.setattr(evaluation, "COPY_LISTS", 2)
    model, _ = load_model_and_tokenizer("tiny")
    random_model = evaluation.eval_copy(model, tokenizer, cfg)
    assert random_model["exact"] == 0.0 and 0.0 <= random_model["words"] < 1.0


def test_mc_scorer_and_kl():
    tokenizer = longpo.tiny_tokenizer()
    seven = tokenizer("7", add_special_tokens=False)["input_ids"][0]
    items = [{"question": "Pick one.", "choices": ["3", "7", "5"], "answer": 1},
             {"question": "Pick one.", "choices": ["7", "3"], "answer": 1}]
    result = evaluation.eval_mc(BiasedLM(len(tokenizer), seven), tokenizer, items)
    assert result == {"acc": 0.5, "acc_norm": 0.5}  # picks "7" both times: right, then wrong
    longer = [{"question": "Pick one.", "choices": ["77", "7"], "answer": 0}]  # per character "77" wins
    assert evaluation.eval_mc(BiasedLM(len(tokenizer), seven), tokenizer, longer) == {"acc": 0.0, "acc_norm": 1.0}
    accents = [{"question": "Pick one.", "choices": ["7é", "ee"], "answer": 1}]  # "é": 2 tokens, 1 character
    assert evaluation.eval_mc(BiasedLM(len(tokenizer), seven), tokenizer, accents)["acc_norm"] == 1.0  # not per token
    model, _ = load_model_and_tokenizer("tiny")
    prompt, continuation = "Question: Pick one.\nAnswer:", " 37 and 5"  # token by token, each from its prefix
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    want = 0.0
    for token in tokenizer(continuation, add_special_tokens=False)["input_ids"]:
        want += model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)[token].item()
        ids.append(token)
    assert math.isclose(evaluation.continuation_logp(model, tokenizer, prompt, continuation), want, rel_tol=1e-5)
    other, _ = perturbed_tiny(0.05, seed=3)
    records = make_records(2, seed=2, with_ref=True)
    same = evaluation.eval_kl(model, model, tokenizer, records)
    assert same["kl"] == 0.0 and same["logp_change"] == 0.0 and same["tokens"] > 0
    moved = evaluation.eval_kl(other.float(), model, tokenizer, records)
    assert moved["kl"] > 1e-4 and moved["logp_change"] != 0.0
    # two models with known distributions p (the policy) and q (the reference) at every position:
    # the mean per-token KL is sum_v p log(p / q), not its mirror, and the log-prob change is
    # log p(t) - log q(t) averaged over the answer tokens t
    policy, reference = BiasedLM(len(tokenizer), seven), BiasedLM(len(tokenizer), seven + 1)
    with torch.no_grad():
        policy.bias[seven + 2] = 2.0
    p, q = (m.bias.detach().double().log_softmax(-1) for m in (policy, reference))
    got = evaluation.eval_kl(policy, reference, tokenizer, records)
    want = float((p.exp() * (p - q)).sum())
    assert math.isclose(got["kl"], want, rel_tol=1e-6), (got["kl"], want, float((q.exp() * (q - p)).sum()))  # fp32
    targets = [t for rec in records for turn in rec["turns"] for t, a in zip(*map(
        lambda x: x[1:], longpo.format_dialogue(tokenizer, rec["document"][slice(*turn["chunk"])], [turn], "chosen")))
               if a]
    change = sum(float(p[t] - q[t]) for t in targets) / len(targets)
    assert got["tokens"] == len(targets) and math.isclose(got["logp_change"], change, abs_tol=1e-6), (got, change)


def test_eval_end_to_end(tmp_path, monkeypatch, capsys):
    """eval.py (through run_cli in this process: starting Python costs seconds; one depth, answers of 4
    tokens) prints the table (each model's row and the delta from the baseline) and writes the JSON. The
    facts and copy columns: test_miniature_recipe_end_to_end."""
    baseline = str(tmp_path / "baseline")
    for part in perturbed_tiny(0.05, 3):
        part.save_pretrained(baseline)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_records(3, seed=8, paragraphs=6, with_ref=True))
    infb = tmp_path / "infbench"
    infb.mkdir()
    context = " ".join(["The lighthouse keeper counted ships."] * 60) + " The ship was called Aurora."
    (infb / "longbook_qa_eng.jsonl").write_text(json.dumps({"context": context, "input": "Name of the ship?", "answer": ["Aurora"]}) + "\n")
    (infb / "longbook_choice_eng.jsonl").write_text(json.dumps({"context": context, "input": "Ship?", "options": ["Aurora", "Vega", "Nova", "Lyra"], "answer": ["Aurora"]}) + "\n")
    (infb / "longbook_sum_eng.jsonl").write_text(json.dumps({"context": context, "answer": "A keeper counted ships."}) + "\n")
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "2 + 6?", "choices": ["6", "8"], "answer": 1}) + "\n")
    out = str(tmp_path / "eval.json")
    monkeypatch.setattr(evaluation, "DEPTHS", (0.5,))
    sample = evaluation.ruler_sample
    monkeypatch.setattr(evaluation, "ruler_sample", lambda task, rng: sample(task, rng)[:3] + (4,))
    for task, (name, template, _) in evaluation.INFBENCH.items():
        monkeypatch.setitem(evaluation.INFBENCH, task, (name, template, 4))
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--baseline", baseline, "--pref-data", data,
                                      "--lengths", "300", "--tasks", "ruler,infbench,mc,kl,pref",
                                      "--infbench", str(infb), "--mc", str(tmp_path / "mc.jsonl"), "--out", out])
    longpo.run_cli(evaluation.main, evaluation.EvalConfig)
    printed = capsys.readouterr().out
    assert "ruler/avg" in printed and "delta" in printed and "pref/acc" in printed and "mc/acc_norm" in printed
    scores = json.load(open(out))
    assert scores["complete"] is True
    tiny = scores["results"]["tiny"]
    assert list(scores["table"]) == [baseline, "tiny", "delta"]
    assert set(tiny["infbench"]) == {"en_qa", "en_mc", "en_sum"} and set(tiny["ruler"]) == set(evaluation.RULER_TASKS)
    assert scores["results"][baseline]["kl"]["kl"] == 0.0 < tiny["kl"]["kl"]  # KL from the baseline, its own 0
    table = scores["table"]
    assert set(table["delta"]) == set(table["tiny"]) and table["delta"]["kl"] > 0 and table["delta"]["pref/margin"]
    for column, value in table["delta"].items():
        assert value == table["tiny"][column] - table[baseline][column], column  # the model minus the baseline


def test_eval_loads_each_model_as_its_turn_comes(tmp_path, monkeypatch):
    """eval holds kl's reference (the first model) and, as the next loads, the one before it: 3 models at
    most, not every --model at once (4 x 14.5 GB of 7B weights would not leave room on an 80 GB card)."""
    names = [str(tmp_path / f"model{k}") for k in range(4)]
    for k, name in enumerate(names):
        for part in perturbed_tiny(0.05, k):
            part.save_pretrained(name)
    live, held, load = weakref.WeakSet(), [], data_gen.load_for_inference

    def counted(name, device):
        gc.collect()
        model, tokenizer = load(name, device)
        live.add(model)
        held.append(len(live))
        return model, tokenizer
    monkeypatch.setattr(data_gen, "load_for_inference", counted)
    monkeypatch.setattr(evaluation, "DEPTHS", (0.5,))
    sample = evaluation.ruler_sample
    monkeypatch.setattr(evaluation, "ruler_sample", lambda task, rng: sample(task, rng)[:3] + (4,))
    cfg = evaluation.EvalConfig(model=",".join(names[1:]), baseline=names[0], tasks="ruler", lengths="200",
                                out=str(tmp_path / "eval.json"))
    evaluation.main(cfg)
    assert held == [1, 2, 3, 3], held
    assert list(json.load(open(cfg.out))["table"]) == names


def test_eval_pref_skips_pairs_too_short_to_share_as_training_does():
    """A pair whose prompt cannot be shared over the ring is skipped (pack_pair would refuse it), not fatal."""
    model, tokenizer = load_model_and_tokenizer("tiny")
    records = make_records(2, seed=2, with_ref=True)
    wide = longpo.Parallel(0, 1, 10**6, ra.LOCAL, torch.device("cpu"))  # no prompt spans 2 x 10^6 tokens
    model.set_attn_implementation("eager")
    assert evaluation.eval_pref(model, tokenizer, records, wide, 0.1) == {"reward_accuracy": 0.0,
                                                                          "reward_margin": 0.0}
    assert model.config._attn_implementation == "eager"  # the attention it found, back after the ring's


def eval_sp_worker(rank, world_size):
    """eval with an SP group of 2: RULER's generation decodes each prompt sequence-parallel (generate_long)
    to the text one process writes (the decoding itself: test_sequence_parallel_generation, 1e-10), and the
    pref scores (a packed pair over the ring) equal those of one process."""
    model, tokenizer = load_model_and_tokenizer("tiny", torch.float64)  # no near-tie of fp32 flips a token
    par = longpo.setup_parallel(2, rank, world_size, torch.device("cpu"))
    texts, sp_calls, generate, generate_long = [], [], data_gen.generate, data_gen.generate_long
    data_gen.generate = lambda *args, **kw: texts.append(generate(*args, **kw)[0][0]) or [[texts[-1]]]
    data_gen.generate_long = lambda *args, **kw: sp_calls.append(args[2]) or generate_long(*args, **kw)
    evaluation.DEPTHS = (0.5,)  # a spawned process: nothing to restore
    sample = evaluation.ruler_sample
    evaluation.ruler_sample = lambda task, rng: sample(task, rng)[:3] + (8,)  # answers of 8 tokens
    try:
        for p in (None, par):
            prompts = evaluation.long_prompts(tokenizer, "ruler", [300], evaluation.EvalConfig())
            evaluation.eval_prompts(model, tokenizer, prompts, evaluation.recall_score, p)
    finally:
        data_gen.generate, data_gen.generate_long = generate, generate_long
    n = len(evaluation.RULER_TASKS)
    assert len(texts) == 2 * n and texts[:n] == texts[n:] and any(texts), texts
    assert len(sp_calls) == n and all(len(prompt) >= 300 for (prompt,) in sp_calls), "not decoded sequence-parallel"
    records = make_records(3, seed=8, paragraphs=6, with_ref=True)
    sp, one = (evaluation.eval_pref(model, tokenizer, records, p, 0.1) for p in (par, one_process(par.device)))
    assert sp["reward_accuracy"] == one["reward_accuracy"], (sp, one)
    assert math.isclose(sp["reward_margin"], one["reward_margin"], rel_tol=1e-9) and one["reward_margin"], (sp, one)


def test_eval_sequence_parallel_decoding_and_scoring():
    run_distributed(eval_sp_worker, 2)


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_train_cli_baselines(tmp_path, loss):
    data = write_jsonl(tmp_path / "data.jsonl", make_records(2, seed=9))
    out = str(tmp_path / loss)
    train_here(["--data", data, "--output-dir", out, "--loss", loss, "--max-steps", "2"])
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    if loss == "dpo":  # the reference is the initial policy itself: rewards start at exactly 0
        assert metrics[0]["rewards/chosen"] == 0.0 and metrics[0]["pref_loss"] == pytest.approx(math.log(2))
    else:
        assert "pref_loss" not in metrics[0] and metrics[0]["loss"] == metrics[0]["nll"]
    assert os.path.exists(os.path.join(out, "final", "config.json"))


def test_attn_kernel_reaches_the_ring_of_every_layer(tmp_path, monkeypatch):
    """--attn-kernel is the block kernel the model's ring attention runs (Parallel.kernel, passed with the
    model's inputs), fused or plain; auto picks the fused CPU kernel here."""
    data = write_jsonl(tmp_path / "data.jsonl", make_records(1, seed=9, with_ref=True))
    for kernel, want in (("plain", {"plain"}), ("auto", {"cpu"})):
        ran = set()
        for name, (fwd, bwd) in list(ra.KERNELS.items()):
            monkeypatch.setitem(ra.KERNELS, name, (lambda *a, _f=fwd, _n=name: ran.add(_n) or _f(*a), bwd))
        train_here(["--data", data, "--output-dir", str(tmp_path / kernel), "--max-steps", "1",
                    "--attn-kernel", kernel])
        assert ran - {"plain"} == want - {"plain"} and want <= ran, (kernel, ran)  # auto: its probe runs plain


def test_max_length_filter_and_lazy_records(tmp_path):
    records = make_records(3, seed=14, with_ref=True)
    records[1]["document"] *= 3  # the long one (its chunk spans stay inside)
    path = write_jsonl(tmp_path / "data.jsonl", records)
    tokenizer = longpo.tiny_tokenizer()
    single = one_process(torch.device("cpu"))
    examples = [longpo.build_example(r, tokenizer) for r in records]
    packed = [packed_length(r, tokenizer) for r in records]
    longer = [max(len(ex["chosen"]["ids"]), len(ex["rejected"]["ids"])) for ex in examples]
    assert all(p > n for p, n in zip(packed, longer)) and packed[1] > max(packed[0], packed[2])

    def kept_ids(limit, loss="longpo"):
        cfg = longpo.TrainConfig(data=path, max_length=limit, grad_accum=1, loss=loss)
        return [r["id"] for r in longpo.prepare_data(longpo.Records(path), cfg, single, tokenizer, torch.float32)]
    assert kept_ids(max(packed[0], packed[2])) == ["doc-0", "doc-2"]  # the packed pair's length
    assert kept_ids(max(packed[0], packed[2]) - 1) == [["doc-0"], ["doc-2"]][packed[0] > packed[2]]
    chosen = [len(ex["chosen"]["ids"]) for ex in examples]
    assert kept_ids(max(chosen[0], chosen[2]), "sft") == ["doc-0", "doc-2"]  # sft: the chosen sequence's
    cfg = longpo.TrainConfig(data=path, max_length=max(packed[0], packed[2]), grad_accum=1)
    # a prompt too short to share over the SP ranks (under 2 sp + 1 tokens) is skipped like a long record
    firsts = [ex["chosen"]["is_answer"].index(True) for ex in examples]
    wide = longpo.Parallel(0, 1, (firsts[0] - 1) // 2 + 1, None, torch.device("cpu"))  # sp: record 0's too short
    assert firsts[0] < firsts[2] and longpo.shared_prefix(examples[2], wide.sp_size) > 0
    short = longpo.prepare_data(longpo.Records(path), cfg, wide, tokenizer, torch.float32)
    assert [r["id"] for r in short] == ["doc-2"]
    kept = longpo.prepare_data(longpo.Records(path), cfg, single, tokenizer, torch.float32)
    assert [r["id"] for r in kept] == ["doc-0", "doc-2"] and len(kept) == 2
    assert kept.refs == [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in (records[0], records[2])]
    assert kept[1] == records[2] and list(kept)[-1:] == [records[2]]  # read back from the file on demand


def test_records_between_blank_lines_and_crlf(tmp_path):
    """A preference file with blank lines between records and Windows line ends: every record is read
    back, each from where it starts."""
    records = make_records(4, seed=17, with_ref=True)
    lines = [json.dumps(r) for r in records]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(("\n\n".join(lines[:2]) + "\r\n\r\n" + "\r\n".join(lines[2:]) + "\r\n\n").encode())
    got = longpo.Records(str(path), need_ref=True)
    starts = [path.read_bytes()[offset:].split(b"\n")[0].strip().decode() for _, offset in got.offsets]
    assert starts == lines, "a record's offset is not where its line starts"
    assert list(got) == records and got.refs == [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in records]
    assert got.select([3, 1])[0] == records[3]


def test_several_data_files_are_one_set(tmp_path):
    """--data a,b: the records of both files, in order, read back lazily from the right file; the run
    identity changes with either file; a missing or empty file in the list is named."""
    first, second = make_records(2, seed=15, with_ref=True), make_records(3, seed=16)
    a, b = write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl", second)
    both = longpo.Records(f"{a},{b}")
    assert len(both) == 5 and list(both) == first + second and both[3] == second[1]
    assert both.refs == [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in first] + [(None, None)] * 3
    assert list(both.select([4, 0])) == [second[2], first[0]]
    ident = lambda data: longpo.run_identity(longpo.TrainConfig(data="same"), 1, 1, longpo.Records(data))
    together = ident(f"{a},{b}")
    assert ident(a)["data_sha256"] != together["data_sha256"]
    write_jsonl(tmp_path / "b.jsonl", second[:1] + second[2:] + second[1:2])  # b's records moved
    assert ident(f"{a},{b}")["data_sha256"] != together["data_sha256"]
    changed = copy.deepcopy(second)
    changed[2]["turns"][0]["rejected"] = changed[2]["turns"][0]["rejected"][::-1]  # the same size
    write_jsonl(tmp_path / "b.jsonl", changed)
    assert ident(f"{a},{b}")["data_sha256"] != together["data_sha256"]
    with pytest.raises(longpo.UsageError, match=f"--data {tmp_path / 'c.jsonl'} does not exist"):
        longpo.Records(f"{a},{tmp_path / 'c.jsonl'}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(longpo.UsageError, match="empty.jsonl holds no records"):
        longpo.Records(f"{a},{tmp_path / 'empty.jsonl'}")
    # a data_gen.py folder: its ranks' files read as one, in document order, whichever rank wrote what
    folder = tmp_path / "out"
    folder.mkdir()
    marked = [{**r, "meta": {"doc_index": i}} for i, r in enumerate(second)]
    write_jsonl(folder / "rank0.jsonl", marked[1:2])
    write_jsonl(folder / "rank1.jsonl", [marked[2], marked[0]])
    (folder / "rank0.dropped").write_text('{"id": "x", "dropped": "questions"}\n')  # not a record
    assert list(longpo.Records(f"{a},{folder}")) == first + marked
    (tmp_path / "none").mkdir()
    with pytest.raises(longpo.UsageError, match="none: the folder holds no .jsonl files"):
        longpo.Records(str(tmp_path / "none"))


def test_data_gen_long_rotary_equals_a_second_model_and_answers_only_the_long_inputs(monkeypatch):
    """--rope-theta: the one model with its rotary embedding swapped for the long-input passes (long_input)
    gives the logits and answers of a second model loaded with that theta; the chosen answers and the
    reference log-probs keep the model's own theta, which comes back after the swap."""
    model, tokenizer = load_model_and_tokenizer("tiny")
    second, _ = load_model_and_tokenizer("tiny", rope_theta=1e6)
    ids = torch.randint(3, 200, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(input_ids=ids).logits
        with data_gen.long_input(model, 1e6) as long_model:
            raised = long_model(input_ids=ids).logits
        assert torch.equal(raised, second(input_ids=ids).logits) and torch.equal(model(input_ids=ids).logits, own)
        assert rel_err(raised, own) > 1e-3  # the theta matters at this length
    cfg = data_gen.resolve(data_gen.DataGenConfig(turns=2, max_new_tokens=16, temperature=0.0))  # greedy
    doc = data_gen.demo_corpus(1, 10)[0]
    same = one_record(doc, model, tokenizer, cfg)
    short = model.get_decoder().rotary_emb
    seen, forward = {"long": [], "short": []}, type(short).forward  # the last position each rotary was asked for

    def watched(rotary, x, position_ids):
        seen["short" if rotary is short else "long"].append(int(position_ids.max()))
        return forward(rotary, x, position_ids)
    monkeypatch.setattr(type(short), "forward", watched)
    mixed = one_record(doc, model, tokenizer, dataclasses.replace(cfg, rope_theta=1e6))
    assert seen["long"] and seen["short"] and min(seen["long"]) > mixed["meta"]["doc_tokens"] > max(seen["short"])
    assert [t["chosen"] for t in same["turns"]] == [t["chosen"] for t in mixed["turns"]]
    assert same["ref_chosen_logp"] == mixed["ref_chosen_logp"]
    turns = mixed["turns"]
    assert len(turns) == cfg.turns  # none filtered: the answers line up with the second model's
    want = data_gen.ask(second, tokenizer, [doc["text"]] * len(turns), [t["instruction"] for t in turns],
                        data_gen.seeds(cfg, doc, len(turns), "rejected"),
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # each turn alone
    assert [t["rejected"] for t in turns] == want


# ----------------------------------------------------------------------------- user mistakes

def test_mistakes_are_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    """Each script as a user runs it: a bad flag or input prints ONE line `error: ...` naming it, exits 2,
    no traceback, before any model is loaded. A process per script (a typo'd or foreign flag: the flag
    meant is named; within 10 s of CPU time, as wall time on a shared 2-core machine depends on its other
    load); the other mistakes through the same run_cli in this process (starting Python costs seconds)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "hay.jsonl").write_text('{"question": "Green?", "choices": [1, 2], "answer": 0}\n{"body": "none"}\n')
    cases = [["longpo.py", "--data", str(tmp_path / "folder")],
             ["longpo.py", "--data", "data/a.jsonl,,data/b.jsonl"],
             ["data_gen.py", "--docs", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
             ["data_gen.py", "--chunk-min", "800", "--chunk-max", "8", "--out", str(tmp_path / "o")],
             ["eval.py", "--lengths", "0", "--model", "tiny", "--out", str(tmp_path / "e.json")],
             ["eval.py", "--mc", str(tmp_path / "hay.jsonl"), "--model", "tiny", "--tasks", "mc"],
             ["longpo.py", "--attn-kernel", "cudnn"],  # no CUDA here
             ["data_gen.py", "--out", str(tmp_path / "folder" / "..")],  # a folder no run of ours filled
             ["eval.py", "--attn-kernel", "fast", "--model", "tiny", "--out", str(tmp_path / "e.json")],
             ["longpo.py", "--lr", "fast"], ["longpo.py", "--world-size", "8"]]  # a flag that went
    spawned = [["longpo.py", "--learning-rate", "1e-5"],  # a TRL user's habit: the flag meant is named
               ["data_gen.py", "--max-lenght", "4096"], ["eval.py", "--taks", "ruler"]]
    meant = {"--learning-rate": "did you mean --lr?", "--max-lenght": "did you mean --max-length?",
             "--taks": "did you mean --tasks?", "--lr": "invalid float value: 'fast'",
             "--world-size": "did you mean --plan?"}
    modules = {"longpo.py": (longpo, longpo.TrainConfig), "data_gen.py": (data_gen, data_gen.DataGenConfig),
               "eval.py": (evaluation, evaluation.EvalConfig)}

    def check(args, code, err):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert args[1] in lines[0] and "Traceback" not in err, (args, err)
        assert "hay" not in args[2] or "hay.jsonl:2: field 'question' is missing" in lines[0], lines
        assert meant.get(args[1], "") in lines[0], lines
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [subprocess.Popen([sys.executable] + args, cwd=HERE, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in spawned]
    monkeypatch.chdir(HERE)
    for args in cases:
        module, config = modules[args[0]]
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as stop:
            longpo.run_cli(module.main, config)
        check(args, stop.value.code, capsys.readouterr().err)
    for args, proc in zip(spawned, procs):
        err = proc.communicate(timeout=120)[1]
        check(args, proc.returncode, err)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 10 * len(spawned), f"{cpu:.0f} s of CPU time for {len(spawned)} mistakes: not each within 10 s"


def test_longpo_refuses_bad_models_records_and_flags(tmp_path):
    UsageError = longpo.UsageError
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for name, message in [(str(tmp_path / "runs" / "nothing"), "no such folder"),
                          (str(tmp_path / "ckpt"), "no config.json.*final/.*--resume"),
                          (str(tmp_path / "empty"), "no config.json")]:
        with pytest.raises(UsageError, match=f"--model .*({message})"):
            longpo.check_model(name)
    for config, setting in [(transformers.Gemma2Config(), "attn_logit_softcapping = 50.0"),
                            (transformers.CohereConfig(), "logit_scale = 0.0625")]:  # math this code lacks
        config.save_pretrained(tmp_path / config.model_type)
        with pytest.raises(UsageError, match=f"{config.model_type}: {setting}, which this code does not apply"):
            longpo.load_config(str(tmp_path / config.model_type))
    with pytest.raises(UsageError, match="gemma2: attn_logit_softcapping"):  # training: before reading any data
        longpo.main(longpo.config_from_cli(longpo.TrainConfig, ["--model", str(tmp_path / "gemma2"), "--data", "-"]))
    transformers.LlamaConfig().save_pretrained(tmp_path / "llama")
    assert longpo.load_config(str(tmp_path / "llama")).model_type == "llama"  # none of them: loads
    for field_name, spoil in {"turns[0]": lambda r: r.__setitem__("turns", [7]),
                              "ref_chosen_logp": lambda r: r.__setitem__("ref_chosen_logp", True)}.items():
        records = make_records(2, seed=1)
        spoil(records[1])
        path = write_jsonl(tmp_path / "bad.jsonl", records)
        with pytest.raises(UsageError, match=r"bad.jsonl:2: field '" + re.escape(field_name)):
            longpo.Records(path)
    for flags, message in [({"beta": 0.0}, "--beta"), ({"warmup_ratio": 2.0}, "--warmup-ratio"),
                           ({"lr": float("nan")}, "--lr"),
                           ({"loss": "sft", "grad_accum": 6, "micro_batch": 4}, "--micro-batch 4 must .* divide"),
                           ({"grad_accum": 4, "micro_batch": 4}, "--micro-batch 4 is for --loss sft")]:
        with pytest.raises(UsageError, match=message):
            longpo.check_config(longpo.resolve_defaults(longpo.TrainConfig(**flags)))


def test_finished_runs_are_never_overwritten_and_resume_checks_the_run(tmp_path, monkeypatch):
    """A finished run is refused without --resume; --resume of it does nothing and rewrites nothing;
    --resume with another lr, data file or world size names the difference."""
    data = write_jsonl(tmp_path / "data.jsonl", make_records(2, seed=3, with_ref=True))
    out = str(tmp_path / "run")
    argv = ["--data", data, "--output-dir", out, "--max-steps", "1"]
    train_here(argv)
    before = {name: open(os.path.join(out, name)).read() for name in ("config.json", "metrics.jsonl")}
    main = lambda *extra: longpo.main(longpo.config_from_cli(longpo.TrainConfig, argv + list(extra)))  # noqa: E731
    with pytest.raises(longpo.UsageError, match="holds an earlier run; pass --resume to continue it"):
        main()
    assert main("--resume") is None  # finished: nothing to do, before any process group
    with pytest.raises(longpo.UsageError, match=r"lr: 0.0001 there, 0.002 now"):
        main("--resume", "--lr", "2e-3")
    with open(data, "a") as f:
        f.write(json.dumps(make_records(1, seed=4, with_ref=True)[0]) + "\n")
    with pytest.raises(longpo.UsageError, match="data_sha256"):
        main("--resume")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(longpo.UsageError, match="world_size: 1 there, 2 now"):
        main("--resume", "--data", write_jsonl(tmp_path / "data.jsonl", make_records(2, seed=3, with_ref=True)))
    assert {name: open(os.path.join(out, name)).read() for name in before} == before
    assert not dist.is_initialized()


def test_data_gen_protects_results_and_drops_by_length(tmp_path):
    UsageError = longpo.UsageError
    out = tmp_path / "pairs"
    for existing in ("file", "folder"):  # work no run of ours started is never touched
        (out / "x").mkdir(parents=True) if existing == "folder" else out.write_text("finished work\n")
        cfg = data_gen.resolve(data_gen.DataGenConfig(out=str(out)))
        with pytest.raises(UsageError, match="exists and is no data_gen.py output folder"):
            data_gen.check_out(cfg)
        shutil.rmtree(out) if existing == "folder" else out.unlink()
    data_gen.start_out(cfg, data_gen.check_out(cfg), ONE)  # a run with these arguments owns it now
    data_gen.check_out(cfg)  # another may not continue it
    with pytest.raises(UsageError, match="other arguments \\(turns: 4 there, 2 now\\)"):
        data_gen.check_out(dataclasses.replace(cfg, turns=2))
    with pytest.raises(UsageError, match="--sp-size 3 must divide the number of processes 1"):
        data_gen.resolve(data_gen.DataGenConfig(sp_size=3))
    model, tokenizer = load_model_and_tokenizer("tiny")
    with pytest.raises(data_gen.Dropped, match="doc_length"):
        one_record({"id": "long", "text": "x" * 32769}, model, tokenizer, cfg)
    with pytest.raises(data_gen.Dropped, match="doc_length"):
        one_record({"id": "small", "text": "short"}, model, tokenizer, cfg)


def test_eval_rewards_take_the_trained_runs_beta(tmp_path):
    """eval's reward margins use the beta the run was trained with (its config.json); a run's base
    model is the baseline."""
    model, tokenizer = load_model_and_tokenizer("tiny")
    model.save_pretrained(tmp_path / "run" / "final")
    tokenizer.save_pretrained(tmp_path / "run" / "final")
    data = write_jsonl(tmp_path / "pairs.jsonl", make_records(2, seed=8, with_ref=True))
    results = {}
    for n, beta in ((0, 0.05), (2, 0.1)):
        (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "tiny", "beta": beta}))
        out = str(tmp_path / f"eval{n}.json")
        evaluation.main(longpo.config_from_cli(evaluation.EvalConfig, ["--model", str(tmp_path / "run" / "final"),
                                                                   "--tasks", "pref", "--pref-data", data,
                                                                   "--out", out]))
        results[n] = json.load(open(out))
    assert results[0]["settings"]["beta_resolved"] == 0.05 and results[2]["settings"]["beta_resolved"] == 0.1
    assert results[0]["settings"]["baseline_resolved"] == "tiny"
    margins = [results[n]["results"]["tiny"]["pref"]["reward_margin"] for n in (0, 2)]
    assert margins[1] != 0 and math.isclose(margins[0] * 2, margins[1], rel_tol=1e-9), margins


def test_eval_checks_inputs_first_and_saves_each_task(tmp_path, monkeypatch):
    UsageError = longpo.UsageError
    base = dict(model="tiny", baseline="", out=str(tmp_path / "eval.json"))
    other = tmp_path / "other"  # a model whose tokenizer has one token more than tiny's
    tokenizer = longpo.tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    longpo.tiny_config(len(tokenizer)).save_pretrained(other)
    for flags, message in [({"lengths": "0"}, "--lengths"), ({"samples": 0}, "--samples"),
                           ({"mc": str(tmp_path / "no.jsonl")}, "no.jsonl does not exist"),
                           ({"tasks": "infbench", "infbench": str(tmp_path / "nope")}, "--infbench .* none of"),
                           ({"tasks": "ruler", "out": str(tmp_path)}, "--out .* is a folder"),
                           ({"model": "tiny,"}, "--model : no such folder"),
                           ({"model": f"tiny,{other}", "tasks": "ruler"}, "the models' tokenizers differ"),
                           ({"tasks": "facts", "lengths": "20"}, "--lengths 20: the facts task's prompts take"),
                           ({"tasks": "facts", "lengths": "64k"}, r"--lengths 65536: .* to about \d+ tokens")]:
        with pytest.raises(UsageError, match=message):
            evaluation.prepare_inputs(evaluation.EvalConfig(**{**base, **flags}), (flags.get("tasks") or "ruler,mc").split(","))
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "2 + 6?", "choices": ["6", "8", "10", "4"], "answer": 1}) + "\n"
                  + json.dumps({"question": "Pick B", "choices": ["x", "y"], "answer": "B"}) + "\n"
                  + json.dumps({"question": "Index", "choices": ["x", "y"], "answer": 0}) + "\n")
    assert [ex["answer"] for ex in evaluation.load_mc(str(mc))["mc"]] == [1, 1, 0]  # index, letter, index
    with open(mc, "a") as f:
        f.write("{broken\n")
    with pytest.raises(UsageError, match="mc.jsonl:4: not valid JSON"):
        evaluation.load_mc(str(mc))
    for answer in (2, "C"):  # of 2 choices
        mc.write_text(json.dumps({"question": "?", "choices": ["x", "y"], "answer": answer}) + "\n")
        with pytest.raises(UsageError, match="example 1: 'choices' must be a list and 'answer' the index"):
            evaluation.load_mc(str(mc))
    # each finished task is on disk at once: a late failure keeps the finished ones
    monkeypatch.setattr(evaluation, "eval_copy", lambda *a: (_ for _ in ()).throw(RuntimeError("late failure")))
    monkeypatch.setattr(evaluation, "DEPTHS", (0.5,))
    cfg = evaluation.EvalConfig(**{**base, "tasks": "ruler,copy", "lengths": "200"})
    with pytest.raises(RuntimeError, match="late failure"):
        evaluation.main(cfg)
    saved = json.load(open(cfg.out))
    assert saved["complete"] is False and set(saved["results"]["tiny"]) == {"ruler"}


# ----------------------------------------------------------------------------- a week-long job on a cluster

def slow_rank_worker(rank, world_size, port, out):
    """data_gen over 2 ranks whose rank 1 finishes ~4 s after rank 0, with a 2 s process-group timeout;
    the records made without generating (what is tested is the ranks' pace, not the records)."""
    dist.destroy_process_group()  # the harness's group; data_gen makes its own
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_PORT=str(port))
    longpo.TIMEOUT = datetime.timedelta(seconds=2)  # this process only

    def make_turns(doc, doc_index, *rest):  # the whole record at once
        time.sleep(4 if doc_index == 1 else 0)  # rank 1's first document
        turn = {"instruction": "Why?", "chunk": [0, 9], "chosen": "Because.", "rejected": "No."}
        return {"id": doc["id"], "document": doc["text"], "turns": [turn],
                "meta": {"doc_index": doc_index, "filtered_turns": {}}}
    data_gen.make_turns, data_gen.group_answers = make_turns, lambda *args: None
    data_gen.make_record = lambda record, *rest: record
    data_gen.main(data_gen.DataGenConfig(out=out, demo_docs=4))


def test_data_gen_ranks_never_wait_on_each_other(tmp_path):
    """A rank that finishes early never waits on the others (a barrier would fail after the timeout and
    stop every rank): both write all their records, which longpo.py reads in document order."""
    out = str(tmp_path / "gold")
    run_distributed(slow_rank_worker, 2, _free_port(), out)
    assert [json.loads(line)["meta"]["doc_index"] for line in folder_lines(out)] == [0, 1, 2, 3]
    assert [r["meta"]["doc_index"] for r in longpo.Records(out)] == [0, 1, 2, 3]


def test_data_gen_drops_a_failing_document_and_goes_on(tmp_path, monkeypatch, capsys):
    """An error inside the generation for one document (here out of memory, in its long-input answers) drops
    it with its reason and the error's first line; the run completes; a rerun leaves it alone, unless its
    line in rank0.dropped is removed."""
    cfg = data_gen.DataGenConfig(out=str(tmp_path / "pairs"), demo_docs=3, turns=1, max_new_tokens=8)
    real, second = data_gen.generate_long, data_gen.demo_corpus(3)[1]["text"]

    def failing(model, tokenizer, prompts, *args, **kwargs):  # the long-input answers of one document
        if any(second[:200] in tokenizer.decode(p) for p in prompts):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(model, tokenizer, prompts, *args, **kwargs)
    monkeypatch.setattr(data_gen, "generate_long", failing)
    summary = data_gen.main(cfg)
    assert [r["id"] for r in longpo.Records(cfg.out)] == ["demo-0", "demo-2"] and summary["dropped"] == {"error": 1}
    dropped = open(os.path.join(cfg.out, "rank0.dropped")).read()
    assert json.loads(dropped)["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "document 'demo-1' dropped: OutOfMemoryError" in capsys.readouterr().out
    monkeypatch.setattr(data_gen, "generate_long", real)  # the cause gone
    data_gen.main(cfg)
    assert "3 documents, 3 already done" in capsys.readouterr().out  # not retried
    os.remove(os.path.join(cfg.out, "rank0.dropped"))
    assert data_gen.main(cfg) == {"records": 1, "dropped": {}, "turns_filtered": {}}
    assert [r["id"] for r in longpo.Records(cfg.out)] == ["demo-0", "demo-1", "demo-2"]

    def out_of_memory(*args):  # in the SP group's decoding of the long inputs
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(data_gen, "group_answers", out_of_memory)
    model, tokenizer = data_gen.load_for_inference("tiny", torch.device("cpu"))
    doc, cfg = data_gen.demo_corpus(3)[1], data_gen.resolve(cfg)
    alone = data_gen.one_document(doc, 1, model, tokenizer, cfg, ONE)
    assert alone["dropped"] == "error" and alone["error"].startswith("OutOfMemoryError")
    with pytest.raises(torch.OutOfMemoryError):  # in an SP group it stops the run: the others wait on it
        data_gen.one_document(doc, 1, model, tokenizer, cfg, longpo.Parallel(0, 2, 2, ra.LOCAL, ONE.device))


def test_data_gen_filters_turns_and_counts_the_chunks_kept():
    """Step 5 after the long inputs' answers (make_record): a turn with an unusable rejected answer (here
    empty, the first of 3) is left out and counted; the meta gives each turn kept its chunk's tokens,
    counted directly."""
    model, tokenizer = load_model_and_tokenizer("tiny")
    cfg = data_gen.resolve(data_gen.DataGenConfig(turns=3, max_new_tokens=8))
    doc = data_gen.demo_corpus(1)[0]
    draft = data_gen.make_turns(doc, 0, model, tokenizer, cfg)
    turns = copy.deepcopy(draft["turns"])
    rejected = ["", "The first usable answer.", "Another usable answer."]
    rec = data_gen.make_record(draft, rejected, model, tokenizer, cfg)
    assert len(turns) == 3 and rec["turns"] == [{**t, "rejected": r} for t, r in zip(turns[1:], rejected[1:])]
    assert rec["meta"]["filtered_turns"] == {"empty": 1}
    starts = token_starts(tokenizer, doc["text"])
    assert rec["meta"]["chunk_tokens"] == [sum(a <= s < b for s in starts) for a, b in (t["chunk"] for t in turns[1:])]


def packed_length(record, tokenizer):
    """Tokens of the packed pair counted directly: both sequences, less their common prompt (up to the first
    answer) but its last token, which predicts each side's first answer token."""
    (c, is_answer), (r, _) = (longpo.format_dialogue(tokenizer, record["document"], record["turns"], side)
                              for side in ("chosen", "rejected"))
    prompt = is_answer.index(True)
    assert c[:prompt] == r[:prompt]
    return len(c) + len(r) - (prompt - 1)


def test_data_gen_max_length_trims_and_drops_before_generating(tmp_path, monkeypatch):
    """--max-length (training's), on both sides of each boundary: the long-input answers are asked only for
    the first turns whose pair fits with --max-new-tokens + 2 tokens a turn left for them, a pair of exactly
    the limit fitting, one token over not; then the record keeps the first of those that fit with the real
    answers (here longer than that: decoded text re-tokenized), counted directly; documents without one are
    dropped, cut turns counted; a document of --max-length tokens is dropped before any generation, one a
    token shorter is not."""
    tokenizer, asked, long_asked = longpo.tiny_tokenizer(), [], {}

    def letters(seeds, n):  # one byte-level token a letter
        return ["".join(random.Random(seed).choices(string.ascii_letters, k=n)) for seed in seeds]

    def ask(model, tokenizer, contexts, instructions, seeds, max_new_tokens, **sampling):
        asked.append(len(contexts))
        return letters(seeds, max_new_tokens)

    def long_answers(model, tokenizer, cfg, par, doc, turns):
        long_asked[doc["id"]] = len(turns)
        return letters(data_gen.seeds(cfg, doc, len(turns), "rejected"), cfg.max_new_tokens + 8)
    monkeypatch.setattr(data_gen, "ask", ask)
    monkeypatch.setattr(data_gen, "long_answers", long_answers)

    def run(limit):
        long_asked.clear()
        cfg = data_gen.DataGenConfig(out=str(tmp_path / str(limit)), max_length=limit)
        summary = data_gen.main(cfg)
        return {r["id"]: r for r in map(json.loads, folder_lines(cfg.out))}, summary
    whole, _ = run(0)
    room = 64 + 2  # the tiny profile's --max-new-tokens, and 2 spare
    placeholder = {i: [packed_length({**r, "turns": [{**t, "rejected": "."} for t in r["turns"][:n]]}, tokenizer)
                       + n * room for n in range(1, len(r["turns"]) + 1)] for i, r in whole.items()}
    real = {i: [packed_length({**r, "turns": r["turns"][:n]}, tokenizer) for n in range(1, len(r["turns"]) + 1)]
            for i, r in whole.items()}
    first, second = sorted(whole)[:2]
    for limit in (placeholder[first][2], placeholder[first][2] - 1, real[second][1], real[second][1] - 1):
        ask_long = {i: sum(n <= limit for n in lengths) for i, lengths in placeholder.items()}
        keep = {i: sum(n <= limit for n in real[i][:ask_long[i]]) for i in whole}
        got, summary = run(limit)
        assert {i: n for i, n in long_asked.items() if n} == {i: n for i, n in ask_long.items() if n}, limit
        assert {i: len(r["turns"]) for i, r in got.items()} == {i: n for i, n in keep.items() if n}, limit
        assert all(r["turns"] == whole[i]["turns"][:keep[i]] for i, r in got.items())
        assert summary["dropped"] == ({"max_length": sum(n == 0 for n in keep.values())} if 0 in keep.values() else {})
        cut = sum(len(whole[i]["turns"]) - n for i, n in keep.items() if n)  # a dropped document's: not counted
        assert summary["turns_filtered"] == {"max_length": cut}
    doc = data_gen.demo_corpus()[0]
    n_tokens = len(tokenizer(doc["text"], add_special_tokens=False)["input_ids"])
    model = load_model_and_tokenizer("tiny")[0]
    for limit, generated in ((n_tokens, 0), (n_tokens + 1, 1)):
        asked.clear()
        cfg = data_gen.resolve(data_gen.DataGenConfig(max_length=limit))
        with pytest.raises(data_gen.Dropped, match="max_length"):
            one_record(doc, model, tokenizer, cfg)
        assert len(asked) == generated, (limit, asked)


def test_stop_signal_checkpoints_and_resumes_to_the_same_weights(tmp_path):
    """SIGUSR1 mid-run: a checkpoint at the end of the step in flight, exit 0; --resume ends with the
    weights of the uninterrupted run, as does a resume from that run's own checkpoint-5. A run killed
    after step 5 holds its checkpoint of step 3 whole. The final config carries the trained length
    (--max-length) and the RoPE theta trained with. The signalled and the killed run are processes of their
    own, started together (their start-ups overlap); the other runs are train_here's."""
    from transformers import AutoModelForCausalLM
    base = tmp_path / "base"  # tiny, but its config says 512 positions, as a 32K model says 32768
    model, tokenizer = load_model_and_tokenizer("tiny")
    model.config.max_position_embeddings = 512
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = write_jsonl(tmp_path / "data.jsonl", make_records(4, seed=6, with_ref=True))
    args = ["--model", str(base), "--data", data, "--max-steps", "6", "--grad-accum", "1",
            "--lr", "1e-3", "--max-length", "4000", "--rope-theta", "1e5"]
    full, part, timed_out, killed = (str(tmp_path / name) for name in ("full", "part", "timed", "killed"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    signalled, doomed = (subprocess.Popen([sys.executable, "-u", "longpo.py"] + args + more, cwd=HERE,
                                          text=True, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
                         for more in (["--output-dir", part], ["--output-dir", killed, "--save-every", "3"]))
    next(line for line in signalled.stdout if line.startswith("step 1 |"))
    signalled.send_signal(signal.SIGUSR1)
    next(line for line in doomed.stdout if line.startswith("step 5 |"))
    doomed.kill()
    doomed.communicate()
    assert longpo.checkpoint_steps(killed) == [3]
    log = signalled.communicate(timeout=300)[0]
    assert signalled.returncode == 0 and "SIGUSR1: stopped at step" in log, log[-2000:]
    steps = longpo.checkpoint_steps(part)
    assert len(steps) == 1 and 1 <= steps[0] < 6 and not os.path.exists(os.path.join(part, "final"))
    train_here(args + ["--output-dir", part, "--resume"])
    train_here(args + ["--output-dir", full, "--save-every", "5"])
    assert longpo.checkpoint_steps(full) == [5]
    config = AutoModelForCausalLM.from_pretrained(os.path.join(full, "final")).config
    assert config.max_position_embeddings == 4000 and rope_theta(config) == 1e5
    shutil.copytree(full, timed_out, ignore=shutil.ignore_patterns("final"))
    train_here(args + ["--output-dir", timed_out, "--save-every", "5", "--resume"])  # from checkpoint-5
    want = AutoModelForCausalLM.from_pretrained(os.path.join(full, "final")).state_dict()
    for run in (part, timed_out):
        got = AutoModelForCausalLM.from_pretrained(os.path.join(run, "final")).state_dict()
        for name in want:
            assert_close(got[name], want[name], 1e-6, f"{name} after a {run} checkpoint and --resume")


def rank_pid(parent, rank):
    """The pid of torchrun's worker of this RANK (a child of the torchrun process `parent`)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


def test_stop_signal_on_one_rank_stops_every_rank(tmp_path):
    """SIGUSR1 to ONE rank of two (a scheduler may signal one node): both finish the step in flight, write
    one checkpoint together and exit 0, through the step's metrics reduction (no rank left waiting)."""
    data = write_jsonl(tmp_path / "data.jsonl", make_records(4, seed=6, with_ref=True))
    out = str(tmp_path / "run")
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "longpo.py",
                            "--data", data, "--output-dir", out, "--max-steps", "8", "--grad-accum", "1"],
                           cwd=HERE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    next(line for line in run.stdout if line.startswith("step 1 |"))
    os.kill(rank_pid(run.pid, 1), signal.SIGUSR1)
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 0 and "SIGUSR1: stopped at step" in log, log[-2000:]
    steps = longpo.checkpoint_steps(out)
    assert len(steps) == 1 and 1 <= steps[0] < 8 and not os.path.exists(os.path.join(out, "final")), steps


def test_log_probs_keep_only_the_last_hidden_state():
    """sequence_logps reads the decoder's last hidden state without asking the model for every layer's:
    the same log-probs as from output_hidden_states=True, bit for bit, and equal to a full log-softmax."""
    model, tokenizer = load_model_and_tokenizer("tiny")
    rec = make_records(1, seed=7)[0]
    ids, is_answer = longpo.format_dialogue(tokenizer, rec["document"], rec["turns"], "chosen")
    seq = longpo.prepare_sequence(ids, {"chosen": is_answer}, one_process(torch.device("cpu")), 0)
    asked = []
    forward = model.forward
    model.forward = lambda *a, **kw: asked.append(kw.get("output_hidden_states")) or forward(*a, **kw)
    with torch.no_grad():
        got = longpo.sequence_logps(model, seq, one_process(torch.device("cpu")), 64)["chosen"]
        out = forward(input_ids=seq.input_ids, position_ids=seq.position_ids, output_hidden_states=True)
        before = longpo.token_logps(out.hidden_states[-1], model.lm_head.weight, seq.targets, seq.labelled, 64)
        full = torch.log_softmax(out.logits.double(), -1).gather(-1, seq.targets.unsqueeze(-1))[..., 0]
    assert asked == [None], "the model was asked for every layer's hidden states"
    assert torch.equal(got, (before * seq.chosen).sum(-1))
    assert math.isclose(got.item(), (full * seq.chosen).sum().item(), rel_tol=1e-6)


# ----------------------------------------------------------------------------- the miniature reproduction

@functools.lru_cache(maxsize=1)
def small_model():
    """The miniature's untrained model, made once per session by save_small_model."""
    import tempfile
    path = os.path.join(tempfile.mkdtemp(prefix="longpo-small-"), "small")
    save_small_model(path)
    return path


def save_small_model(path):
    """`python test_longpo.py small --out DIR`: the miniature's untrained model as a folder: a Mistral of
    4 layers of 128 (1.1M parameters, weights from a fixed seed) and an 817-token byte-level BPE trained
    here on the demo corpus (its names and numbers single tokens: documents ~4x shorter than in bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    docs = data_gen.demo_corpus(n_docs=8, paragraphs=24, seed=12345)
    names = " ".join(f"{p} {n}" for p in data_gen.PLACES for n in range(10, 100))  # every name and number
    texts = [names] * 3 + [d["text"] + "\n\n" + " ".join(data_gen.with_lead_in(lead, f["question"])
                                                         for lead in data_gen.LEAD_INS for f in d["facts"][:4])
                           for d in docs]
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=longpo.PRESET_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tokenizer = longpo.tiny_tokenizer(core)
    config = longpo.tiny_config(len(tokenizer), hidden=128, intermediate=384, layers=4, kv_heads=4)
    with torch.random.fork_rng(devices=[]):  # random weights from a fixed seed, as longpo's tiny
        torch.manual_seed(1234)
        model = longpo.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"the miniature's untrained model ({sum(p.numel() for p in model.parameters())} parameters): {path}")


def test_demo_corpus_and_facts_prompts_are_answerable():
    """Every demo fact is in its document once, with one answer per question (no place twice); the
    facts task's prompts fit their length, hold the asked fact, and move it with the depth."""
    for doc in data_gen.demo_corpus(6, "1-30", seed=5):
        places = [re.search(r"at (\w+)\?", f["question"]).group(1) for f in doc["facts"]]
        assert len(places) == len(set(places)) and 2 <= len(places) <= 60
        for f in doc["facts"]:
            thing, place = re.search(r"How many (\w+) are there at (\w+)\?", f["question"]).groups()
            assert re.findall(rf"At {place} (\d+) \w+ were counted\.", doc["text"]) == [f["answer"]]
            assert f"At {place} {f['answer']} {thing} were counted." == f["sentence"] and f["place"] == place
    tokenizer = longpo.load_tokenizer(small_model())
    for length in (200, 700, 1500):
        where = []
        for depth in (0.0, 0.5, 1.0):
            ids, expected = evaluation.facts_prompt(tokenizer, length, depth, seed=11)
            text = tokenizer.decode(ids)
            assert length - 120 < len(ids) <= length  # within one paragraph of the length
            place = re.search(r"are there at (\w+)\?", text).group(1)
            fact = f"At {place} {expected} "
            assert text.count(fact) == 1
            where.append(text.index(fact) / len(text))
        assert where == sorted(where) and where[-1] - where[0] > 0.5, where
    facts, paragraphs = (data_gen.demo_corpus(1, data_gen.MAX_DEMO_PARAGRAPHS, 11)[0][key] for key in ("facts", "text"))
    for length in (200, 300, 400, 500, 600, 700):  # k paragraphs, 2k facts: depth 0.25 asks fact round((2k - 1) / 4)
        text = tokenizer.decode(evaluation.facts_prompt(tokenizer, length, 0.25, seed=11)[0])
        k = sum(p in text for p in paragraphs.split("\n\n"))
        assert f"are there at {facts[round(0.25 * (2 * k - 1))]['place']}?" in text, (length, k)
    with pytest.raises(longpo.UsageError, match="--demo-paragraphs '0-3'"):
        data_gen.demo_corpus(1, "0-3")


def test_gold_questions_in_random_order(tmp_path):
    """The miniature's gold data asks a document's facts in random order. In document order (as the chunks come)
    the second question is always the other fact of the first one's paragraph: a model trained on that
    answers by elimination instead of matching question to fact (README, the miniature)."""
    out = tmp_path / "gold"
    mini_data("gold", longpo.config_from_cli(MiniData, ["--model", small_model(), "--docs", "64", "--out", str(out)]))
    orders = set()
    for rec in longpo.Records(str(out)):
        places = re.findall(r"At (\w+) \d+ ", rec["document"])
        asked = [places.index(re.search(r"at (\w+)\?", t["instruction"]).group(1)) for t in rec["turns"]]
        assert sorted(asked) == [0, 1, 2, 3]  # every fact asked once
        orders.add(tuple(asked))
    assert len(orders) >= 16, orders  # of the 24 orders of 4 facts (in document order: 4)


def check_gold_records(path):
    """gold: a turn per fact of the chunk, the planted answer chosen, the place with another
    number of the document rejected; no reference log-probs (no model ran)."""
    for rec in longpo.Records(path):
        assert "ref_chosen_logp" not in rec and len(rec["turns"]) == 2 * rec["document"].count("\n\n") + 2
        for turn in rec["turns"]:
            place = re.search(r"at (\w+)\?", turn["instruction"]).group(1)
            right = re.findall(rf"At {place} (\d+) ", rec["document"])
            wrong = re.fullmatch(rf"At {place} (\d+)\.", turn["rejected"]).group(1)
            assert [turn["chosen"]] == [f"At {place} {n}." for n in right] and wrong != right[0]
            assert re.search(rf"At \w+ {wrong} ", rec["document"]), "the rejected number is another fact's"


def check_copy_records(path):
    """copy: repeat "Words:" and 16-32 random words of the corpus, each ONE token of
    the small tokenizer, distinct (each word's earlier copy is unique, so copying by content is
    well defined), of varied lengths (no fixed distance to copy from)."""
    tokenizer = longpo.load_tokenizer(small_model())
    lengths = set()
    for rec in longpo.Records(path):
        (turn,) = rec["turns"]
        words = rec["document"].split()
        assert turn["instruction"] == "Repeat the text above." and turn["chosen"] == rec["document"]
        assert turn["rejected"].split() == words[::-1] and words[0] == "Words:" and len(set(words)) == len(words)
        assert data_gen.COPY_WORDS[0] <= len(words) - 1 <= data_gen.COPY_WORDS[1]
        lengths.add(len(words))
    assert len(lengths) > 1
    drawn = {w for doc in data_gen.copy_corpus(300) for w in doc["text"].split()[1:]}  # the whole pool, all but surely
    assert len(drawn) > 250 and all(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in drawn)


def test_miniature_recipe_end_to_end(tmp_path, monkeypatch):
    """The README's miniature reproduction at toy scale, every step in-process with the README's flags:
    copy data -> the small model trained from scratch on it (sft) -> gold short data -> sft from there
    on copy and gold records together (the short-context model) -> its own short-to-long pairs ->
    longpo, sft and dpo -> one eval table (facts accuracy per length, KL, reward accuracy)."""
    def run(module, config, *argv):
        return module.main(longpo.config_from_cli(config, [str(a) for a in argv]))
    gold, pairs, heldout, out = (tmp_path / f for f in ("gold", "pairs", "heldout", "eval.json"))
    copy = tmp_path / "copy-data"  # the run trained on it writes to tmp_path / "copy"
    small = tmp_path / "small"
    save_small_model(small)
    (m1, t1), (m2, t2) = (load_model_and_tokenizer(str(path)) for path in (small, small_model()))
    assert t1.get_vocab() == t2.get_vocab() and all(  # made the same each time: tokenizer and weights
        torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    mini_data("copy", longpo.config_from_cli(MiniData, ["--model", str(small), "--docs", "6", "--out", str(copy)]))
    check_copy_records(str(copy))
    run(longpo, longpo.TrainConfig, "--model", small, "--loss", "sft", "--data", copy, "--output-dir",
        tmp_path / "copy", "--lr", "1e-5", "--grad-accum", 2, "--micro-batch", 2, "--max-steps", 1, "--no-grad-checkpointing")
    mini_data("gold", longpo.config_from_cli(MiniData, ["--model", str(small), "--docs", "12", "--paragraphs", "1-2",
                                                         "--out", str(gold)]))
    check_gold_records(str(gold))
    base = tmp_path / "base"
    run(longpo, longpo.TrainConfig, "--model", tmp_path / "copy" / "final", "--loss", "sft", "--data", f"{copy},{gold}", "--output-dir", base,
        "--lr", "1e-5", "--grad-accum", 2, "--micro-batch", 2, "--max-steps", 1, "--no-grad-checkpointing")  # non-empty answers
    model = base / "final"
    long_pairs = ["--model", model, "--demo-docs", 2, "--demo-paragraphs", 6, "--chunk-min", 40, "--chunk-max", 100,
                  "--min-doc-len", 1, "--max-doc-len", 4096, "--max-new-tokens", 4, "--temperature", 0]
    run(data_gen, data_gen.DataGenConfig, *long_pairs, "--out", pairs)
    run(data_gen, data_gen.DataGenConfig, *long_pairs, "--seed", 1, "--out", heldout)
    train, held = longpo.Records(str(pairs), need_ref=True), longpo.Records(str(heldout), need_ref=True)
    assert len(train) == len(held) == 2 and {r["document"] for r in train}.isdisjoint(r["document"] for r in held)
    finals = []
    for loss in ("longpo", "sft", "dpo"):
        run(longpo, longpo.TrainConfig, "--model", model, "--loss", loss, "--data", pairs, "--output-dir",
            tmp_path / loss, "--lr", "1e-3", "--grad-accum", 1, "--max-steps", 2, "--rope-theta", "1e5")
        finals.append(str(tmp_path / loss / "final"))
    monkeypatch.setattr(evaluation, "DEPTHS", (0.0, 1.0))
    monkeypatch.setattr(evaluation, "COPY_LISTS", 4)
    run(evaluation, evaluation.EvalConfig, "--model", ",".join(finals), "--baseline", model, "--tasks",
        "facts,copy,kl,pref", "--lengths", "128,512", "--pref-data", heldout, "--out", out)
    scores = json.load(open(out))
    assert scores["complete"] and list(scores["table"]) == [str(model)] + finals
    for name, row in scores["table"].items():
        assert {"facts/128", "facts/512", "copy/exact", "copy/words", "pref/acc", "pref/margin"} <= set(row), row
        assert (row["kl"] == 0) == (name == str(model)), (name, row["kl"])  # trained models moved, the base did not
    assert rope_theta(longpo.load_config(finals[0])) == 1e5  # the policy keeps its raised theta


# ============================================================================= opt-in benchmark harness
# Not tests: the measurements behind the README's numbers, run by hand (any device):
#   python test_longpo.py ring --seq-len 4096            torchrun --nproc_per_node 2 test_longpo.py ring --threads 1
#   python test_longpo.py train --tokens 16384                 (torchrun ... train --sp-size 2 for SP = 2)
#   python test_longpo.py generate --tokens 16384 --max-new-tokens 64    (torchrun ... generate --sp-size 2)
#   python test_longpo.py record --tokens 16384 --turns 4                 (torchrun ... record --sp-size 2)
#   python test_longpo.py probe --dtype bfloat16                          (each fused kernel: ok or its failure)

from dataclasses import dataclass, field  # noqa: E402


@dataclass
class RingBench:
    """Ring attention's errors against an fp32 reference and its time against SDPA in one process."""
    seq_len: int = field(default=16384, metadata={"help": "whole-sequence tokens N (all ranks)"})
    batch: int = field(default=1, metadata={"help": "sequences per batch B"})
    heads: int = field(default=8, metadata={"help": "query heads Hq"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads Hkv (GQA when < heads)"})
    head_dim: int = field(default=64, metadata={"help": "head dimension D"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 | float64"})
    kernel: str = field(default="auto", metadata={"help": "auto | cudnn | sdpa_flash | flash_attn | cpu | plain"})
    iters: int = field(default=2, metadata={"help": "timed iterations (after one warm-up)"})
    threads: int = field(default=0, metadata={"help": "torch threads per process (0: default)"})
    seed: int = field(default=0, metadata={"help": "seed of the random inputs (same on all ranks)"})


def check_ring_bench(cfg, world_size):
    if cfg.dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise longpo.UsageError(f"--dtype {cfg.dtype}: choose one of float32, bfloat16, float16, float64")
    if cfg.kernel != "auto" and cfg.kernel not in ra.KERNELS:
        raise longpo.UsageError(f"--kernel {cfg.kernel}: choose one of auto, {', '.join(ra.KERNELS)}")
    longpo.check_at_least(cfg, ("seq_len", "batch", "heads", "kv_heads", "head_dim", "iters"), 1)
    if cfg.seq_len % (2 * world_size):
        raise longpo.UsageError(f"--seq-len {cfg.seq_len} must be a multiple of 2 x {world_size} processes "
                                f"(zigzag chunks), e.g. {-(-cfg.seq_len // (2 * world_size)) * 2 * world_size}")
    if cfg.heads % cfg.kv_heads:
        raise longpo.UsageError(f"--heads {cfg.heads} must be a multiple of --kv-heads {cfg.kv_heads}")


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - t0


def sdpa_fwd_bwd(q, k, v, dout, repeat_kv=False):
    """F.scaled_dot_product_attention (causal) forward and backward on (B, H, N, D) tensors: what a
    user runs without sequence parallelism. repeat_kv repeats the K/V heads instead of enable_gqa
    (PyTorch's memory-efficient kernel takes fp32 but not GQA: the fp32 reference at 128K on a GPU)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    kk, vv = (k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)) if repeat_kv else (k, v)
    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not repeat_kv)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def gather_rows(row, device):
    """Every rank's row of numbers, on every rank (in rank order)."""
    row = torch.tensor(row, dtype=torch.float64, device=device)  # nccl takes no CPU tensors
    rows = [row.clone() for _ in range(dist.get_world_size() if dist.is_initialized() else 1)]
    if len(rows) > 1:
        dist.all_gather(rows, row)
    return [r.tolist() for r in rows]


def ring_bench(cfg):
    check_ring_bench(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # before any process group or allocation
    rank, world_size, device = longpo.init_distributed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    longpo.print0(f"config: {dataclasses.asdict(cfg)}  world_size={world_size}  device={device}  "
              f"threads/process={torch.get_num_threads()}")
    dtype, gen = getattr(torch, cfg.dtype), torch.Generator().manual_seed(cfg.seed)  # the same on every rank
    q, k, v, dout = random_qkv(gen, cfg.batch, cfg.seq_len, cfg.heads, cfg.kv_heads, cfg.head_dim, dtype)
    q, k, v, dout = (t.to(device) for t in (q, k, v, dout))
    shard = functools.partial(zigzag_shard, rank=rank, world_size=world_size)
    kernel = ra.pick_kernel(shard(q), cfg.kernel, cfg.kv_heads)
    bhnd = [t.transpose(1, 2).contiguous() for t in (q, k, v, dout)]
    ref_dtype = torch.promote_types(dtype, torch.float32)
    ref = [t.transpose(1, 2) for t in sdpa_fwd_bwd(*(t.to(ref_dtype) for t in bhnd), repeat_kv=True)]
    full_times = [timed(lambda: sdpa_fwd_bwd(*bhnd), device)[1] for _ in range(cfg.iters + 1)][1:]
    bhnd = None  # freed before the ring runs
    q_l, k_l, v_l = (shard(t).detach().requires_grad_() for t in (q, k, v))
    fwd_times, bwd_times = [], []
    for _ in range(cfg.iters + 1):
        if dist.is_initialized():
            dist.barrier()
        q_l.grad = k_l.grad = v_l.grad = None
        out_l, t_fwd = timed(lambda: ring_attention(q_l, k_l, v_l, kernel=cfg.kernel), device)
        bwd_times.append(timed(lambda: out_l.backward(shard(dout)), device)[1])
        fwd_times.append(t_fwd)
    errors = [rel_err(a, shard(b)) for a, b in zip((out_l, q_l.grad, k_l.grad, v_l.grad), ref)]
    rows = gather_rows([rank, *errors, min(fwd_times[1:]), min(bwd_times[1:]), min(full_times)], device)
    flops = 3.5 * 2 * 2 * cfg.batch * cfg.heads * cfg.seq_len ** 2 / 2 * cfg.head_dim  # causal fwd + 2.5x bwd
    longpo.print0(f"kernel={kernel}  dtype={cfg.dtype}  N={cfg.seq_len}  W={world_size}  (errors: max|ring - "
              f"{ref_dtype} reference| / max|reference|; times: best of {cfg.iters}, s; full = SDPA, one process)")
    longpo.print0(f"{'rank':>4} {'err out':>9} {'err dq':>9} {'err dk':>9} {'err dv':>9} {'ring fwd':>9} {'ring bwd':>9} "
              f"{'ring f+b':>9} {'full f+b':>9} {'ring/(full/W)':>13} {'ring TFLOP/s':>12} {'full TFLOP/s':>12}")
    for r in rows:
        ring_total = r[5] + r[6]
        longpo.print0(f"{int(r[0]):>4} {r[1]:9.2e} {r[2]:9.2e} {r[3]:9.2e} {r[4]:9.2e} {r[5]:9.3f} {r[6]:9.3f} "
                  f"{ring_total:9.3f} {r[7]:9.3f} {ring_total / (r[7] / world_size):13.3f} "
                  f"{flops / world_size / ring_total / 1e12:12.2f} {flops / r[7] / 1e12:12.2f}")
    return rows


def synthetic_record(tokenizer, n_tokens, seed=0):
    """One preference record whose long sequences have about n_tokens tokens."""
    rng = random.Random(seed)
    words = "the river stone light north market garden signal copper winter".split()
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    doc = sentence(64)
    per_char = len(tokenizer(doc, add_special_tokens=False)["input_ids"]) / len(doc)
    paragraphs = [sentence(60) for _ in range(int(n_tokens / per_char / 360) + 1)]
    doc = "\n\n".join(paragraphs)[:int(n_tokens / per_char) - 100]
    turn = {"instruction": "Based on the text above, which word comes most often?",
            "chunk": [0, min(len(doc), 2000)], "chosen": sentence(12), "rejected": sentence(12)}
    return {"id": "bench", "document": doc, "turns": [turn], "ref_chosen_logp": -50.0, "ref_rejected_logp": -50.0}


def step_memory(fn, device):
    """Peak memory one call of fn adds: CUDA, torch's peak allocated bytes; CPU, the rise of the
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before the call,
    after returning freed heap to the OS, so it counts what the step really touches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - before
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


@dataclass
class TrainBench(longpo.TrainConfig):
    """One LongPO optimiser step on a synthetic pair: per-rank time and peak memory (longpo.py's flags)."""
    tokens: int = field(default=16384, metadata={"help": "tokens of each long sequence of the pair"})


def train_bench(cfg):
    """Per-rank time of one LongPO optimiser step (median of --max-steps or 3, after a warm-up) and the
    peak memory one more step adds on top of the loaded model and optimiser state."""
    cfg = dataclasses.replace(longpo.resolve_defaults(cfg), grad_accum=1)
    longpo.check_config(cfg)
    longpo.check_model(cfg.model)
    rank, world_size, device = longpo.init_distributed(group_of_one=True)
    par = longpo.setup_parallel(cfg.sp_size, rank, world_size, device, cfg.attn_kernel)
    torch.manual_seed(cfg.seed)
    master_dtype, compute_dtype = longpo.resolve_dtypes(cfg, par.device)
    policy, tokenizer = load_model_and_tokenizer(cfg.model, master_dtype, cfg.rope_theta)
    rec = synthetic_record(tokenizer, cfg.tokens)
    example, refs = longpo.build_example(rec, tokenizer), (rec["ref_chosen_logp"], rec["ref_rejected_logp"])
    policy = longpo.setup_model(policy, par, compute_dtype, cfg.grad_checkpointing)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)

    def step():
        longpo.micro_step(policy, None, longpo.step_inputs([example], cfg, par, tokenizer.pad_token_id), refs, cfg, par)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    times = []
    for _ in range((cfg.max_steps or 3) + 1):
        longpo.barrier(par)
        times.append(timed(step, par.device)[1])
    longpo.barrier(par)
    peak = step_memory(step, par.device)
    rows = gather_rows([par.rank, sorted(times[1:])[len(times[1:]) // 2], peak / 1e6], par.device)
    longpo.print0(f"train step: {cfg.model}, long sequences of {len(example['chosen']['ids'])} (chosen) and "
              f"{len(example['rejected']['ids'])} (rejected) tokens, packed, world {par.world_size}, "
              f"sp {par.sp_size}, {torch.get_num_threads()} threads per process")
    kind = "peak allocated" if par.device.type == "cuda" else "peak RSS rise"
    longpo.print0(f"{'rank':>4} {'step time (s)':>14} {kind + ' in a step (MB)':>30}")
    for r in rows:
        longpo.print0(f"{int(r[0]):>4} {r[1]:14.3f} {r[2]:30.1f}")


@dataclass
class GenerateBench:
    """Sequence-parallel greedy generation after one synthetic prompt: each rank's cache and times."""
    model: str = field(default="tiny", metadata={"help": "hub id, local dir, or 'tiny'"})
    tokens: int = field(default=16384, metadata={"help": "prompt tokens"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    sp_size: int = field(default=0, metadata={"help": "ranks that decode the prompt together (0: all)"})


def generate_bench(cfg):
    longpo.check_sp_size(cfg.sp_size)
    rank, world_size, device = longpo.init_distributed()
    par = longpo.setup_parallel(cfg.sp_size, rank, world_size, device)
    model, tokenizer = data_gen.load_for_inference(cfg.model, device)
    rec = synthetic_record(tokenizer, cfg.tokens)
    prompt = longpo.format_dialogue(tokenizer, rec["document"], [{"instruction": rec["turns"][0]["instruction"]}])[0]
    data_gen.generate_long(model, tokenizer, [prompt[:256]], 4, par)  # warm-up
    prefill, caches = data_gen.prefill, []

    def timed_prefill(*args):  # the prefill's time and cache, seen from outside generate_long
        (cache, seconds) = timed(lambda: prefill(*args), device)
        caches.append((cache, seconds))
        return cache
    data_gen.prefill = timed_prefill
    ((_, new_tokens),), total = timed(lambda: data_gen.generate_long(model, tokenizer, [prompt], cfg.max_new_tokens, par),
                                      device)
    data_gen.prefill = prefill
    cache, prefill_s = caches[0]
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    rows = gather_rows([par.rank, cache_bytes / 1e6, prefill_s, new_tokens, total - prefill_s], device)
    longpo.print0(f"generation: {cfg.model}, prompt of {len(prompt)} tokens, sp {par.sp_size}, "
              f"{torch.get_num_threads()} threads per process")
    longpo.print0(f"{'rank':>4} {'cache (MB)':>11} {'prefill (s)':>12} {'new tokens':>11} {'decode tokens/s':>16}")
    for r in rows:
        longpo.print0(f"{int(r[0]):>4} {r[1]:11.2f} {r[2]:12.3f} {int(r[3]):>11} {r[3] / max(r[4], 1e-9):16.1f}")
    if par.world_size == 1:  # the batched one-process loop (data_gen's short prompts, eval without SP)
        calls, forward = [], model.forward
        model.forward = lambda *args, **kwargs: calls.append(timed(lambda: forward(*args, **kwargs), device)) or \
            calls[-1][0]
        n = data_gen.generate(model, tokenizer, [prompt], cfg.max_new_tokens)[1]
        model.forward = forward
        steps = sorted(t for _, t in calls[1:])
        print(f"one-process generate: prefill {calls[0][1]:.3f} s, {n} new tokens, decode "
              f"{len(steps) / sum(steps):.1f} tokens/s (median step {steps[len(steps) // 2] * 1e3:.2f} ms)")


@dataclass
class RecordBench:
    """data_gen's steps 1-6 for one synthetic document (one_document): its wall time (SP under torchrun)."""
    tokens: int = field(default=16384, metadata={"help": "document tokens"})
    turns: int = field(default=4, metadata={"help": "turns (chunks) of the record"})
    max_new_tokens: int = field(default=64, metadata={"help": "answer length limit"})
    sp_size: int = field(default=1, metadata={"help": "ranks that decode each long answer together"})


def record_bench(cfg):
    """A demo document (planted facts: template questions) padded with filler paragraphs to --tokens,
    cut into --turns chunks; greedy answers of the tiny model; data_gen.one_document (its SP group at --sp-size)."""
    rank, world_size, device = longpo.init_distributed()
    tokenizer = longpo.tiny_tokenizer()
    doc = data_gen.demo_corpus(1, 64, seed=3)[0]
    filler = " ".join(data_gen.FILLER)
    while len(tokenizer(doc["text"])["input_ids"]) < cfg.tokens:
        doc["text"] += "\n\n" + filler
    chunk = len(tokenizer(doc["text"])["input_ids"]) // cfg.turns - 1
    gen_cfg = data_gen.resolve(data_gen.DataGenConfig(
        chunk_min=chunk // 2, chunk_max=chunk, max_doc_len=2 * cfg.tokens, turns=cfg.turns,
        max_new_tokens=cfg.max_new_tokens, temperature=0.0, sp_size=cfg.sp_size))
    model, _ = data_gen.load_for_inference("tiny", device)
    par = longpo.setup_parallel(cfg.sp_size, rank, world_size, device)
    make = lambda: data_gen.one_document(doc, 0, model, tokenizer, gen_cfg, par)  # noqa: E731
    make()  # warm-up
    rec, seconds = timed(make, device)
    if "dropped" in rec:  # the demo document alone is about 5K tokens
        sys.exit(f"record: the document was dropped ({rec['dropped']}); use --tokens 8192 or more")
    longpo.print0(f"record: {cfg.tokens}-token document, {len(rec['turns'])} turns, sp {cfg.sp_size}, "
              f"{torch.get_num_threads()} threads: {seconds:.2f} s")


@dataclass
class ProbeBench:
    """The kernel probe of each fused kernel of this device, one line each."""
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16 | float16 | float32"})
    heads: int = field(default=32, metadata={"help": "query heads"})
    kv_heads: int = field(default=8, metadata={"help": "key/value heads"})
    head_dim: int = field(default=128, metadata={"help": "head dimension"})


def probe_bench(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ra.AUTO_ORDER[device.type]:
        failure = ra.probe_kernel(name, device, getattr(torch, cfg.dtype), cfg.heads, cfg.kv_heads, cfg.head_dim)
        print(f"{name:10s} {failure or 'ok'}")


@dataclass
class SmallModel:
    """The miniature's untrained model (the README's recipe, step 1)."""
    out: str = field(default="runs/mini-0/small", metadata={"help": "folder to write it to"})


@dataclass
class MiniData:
    """The miniature's short data on the built-in corpus, no model run (the README's recipe, step 1)."""
    model: str = field(default="runs/mini-0/small", metadata={"help": "its tokenizer's model"})
    out: str = field(default="data/mini-0/gold", metadata={"help": "output folder (its rank0.jsonl)"})
    docs: int = field(default=16000, metadata={"help": "documents of the demo corpus (copy: of copy_corpus)"})
    paragraphs: str = field(default="2", metadata={"help": "gold: paragraphs a document, N or A-B"})
    chunk_min: int = field(default=8, metadata={"help": "gold: fewest tokens in a chunk"})
    chunk_max: int = field(default=100, metadata={"help": "gold: most tokens in a chunk"})
    min_doc_len: int = field(default=1, metadata={"help": "fewest tokens in a document"})
    max_doc_len: int = field(default=512, metadata={"help": "most tokens in a document"})
    turns: int = field(default=4, metadata={"help": "gold: at most this many chunks per document"})
    seed: int = field(default=0, metadata={"help": "seed of the corpus and of every choice"})


def gold_record(doc, doc_index, tokenizer, cfg):
    """`gold`: data_gen's steps 1-3 with every question of a chunk (its facts) kept; the planted answers
    ("At Barwick 57.") chosen, the place with another number of the document rejected; no reference
    log-probs. The questions in random order: in document order a model learns to answer by elimination
    (turn 2 = the fact turn 1 skipped) instead of matching."""
    n_tokens, starts = data_gen.measure(doc, tokenizer, cfg)
    chunks = data_gen.chunk_document(doc["text"], starts, cfg.chunk_min, cfg.chunk_max)
    chunks = sorted(random.Random(data_gen.stream(cfg, doc, "chunks")).sample(chunks, min(cfg.turns, len(chunks))))
    asked, filtered = [], {}
    for j, (a, b) in enumerate(chunks):
        questions = [f["question"] for f in doc["facts"] if f["sentence"] in doc["text"][a:b]][:4]
        if not questions:
            filtered["questions"] = filtered.get("questions", 0) + 1
        for k, question in enumerate(questions):
            lead_in = random.Random(data_gen.stream(cfg, doc, j, k, "lead-in")).choice(data_gen.LEAD_INS)
            asked.append((question, {"instruction": data_gen.with_lead_in(lead_in, question), "chunk": [a, b]}))
    if not asked:
        raise data_gen.Dropped("questions")
    fact, numbers, turns = {f["question"]: f for f in doc["facts"]}, sorted({f["answer"] for f in doc["facts"]}), []
    for i in random.Random(data_gen.stream(cfg, doc, "gold-order")).sample(range(len(asked)), len(asked)):
        question, turn = asked[i]
        place, right = fact[question]["place"], fact[question]["answer"]
        others = [n for n in numbers if n != right] or [str(int(right) % 90 + 10)]
        wrong = random.Random(data_gen.stream(cfg, doc, i, "gold-wrong")).choice(others)
        turns.append({**turn, "chosen": f"At {place} {right}.", "rejected": f"At {place} {wrong}."})
    return mini_record(doc, doc_index, "gold", n_tokens, filtered, starts, turns, cfg)


def copy_record(doc, doc_index, tokenizer, cfg):
    """`copy`: "Repeat the text above.", the document chosen, its words in reverse order rejected."""
    text, (n_tokens, starts) = doc["text"], data_gen.measure(doc, tokenizer, cfg)
    turn = {"instruction": data_gen.COPY_INSTRUCTION, "chunk": [0, len(text)], "chosen": text,
            "rejected": " ".join(reversed(text.split()))}
    return mini_record(doc, doc_index, "copy", n_tokens, {}, starts, [turn], cfg)


def mini_record(doc, doc_index, generator, n_tokens, filtered, starts, turns, cfg):
    meta = {"doc_index": doc_index, "generator": generator, "questions": "template", "doc_tokens": n_tokens,
            "filtered_turns": filtered, "chunk_tokens": [data_gen.tokens_in(starts, *t["chunk"]) for t in turns],
            "seed": cfg.seed}
    return {"id": doc["id"], "document": doc["text"], "turns": turns, "meta": meta}


def mini_data(kind, cfg):
    """`python test_longpo.py gold|copy --out DIR ...`: DIR/rank0.jsonl, the records of the documents that
    give one, in order (longpo.py reads the folder)."""
    tokenizer = longpo.load_tokenizer(cfg.model)
    docs = (data_gen.copy_corpus(cfg.docs, cfg.seed) if kind == "copy" else
            data_gen.demo_corpus(cfg.docs, cfg.paragraphs, cfg.seed))
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "rank0.jsonl"), "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            with contextlib.suppress(data_gen.Dropped):
                rec = (copy_record if kind == "copy" else gold_record)(doc, i, tokenizer, cfg)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


HARNESS = {"ring": (ring_bench, RingBench), "train": (train_bench, TrainBench), "probe": (probe_bench, ProbeBench),
           "generate": (generate_bench, GenerateBench), "record": (record_bench, RecordBench),
           "small": (lambda cfg: save_small_model(cfg.out), SmallModel),
           "gold": (functools.partial(mini_data, "gold"), MiniData),
           "copy": (functools.partial(mini_data, "copy"), MiniData)}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in HARNESS:
        sys.exit(f"usage: python test_longpo.py {{{','.join(HARNESS)}}} [flags] (--help for each); "
                 "the tests run with: python -m pytest -q -rs test_longpo.py")
    bench_main, bench_config = HARNESS[sys.argv.pop(1)]
    longpo.run_cli(bench_main, bench_config)
