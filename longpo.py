"""LongPO: short-to-long preference optimisation (Chen et al., ICLR 2025), trained sequence-parallel.

A model pi_S aligned on short inputs (e.g. Mistral-7B-Instruct-v0.2, 32K tokens) answers an
instruction I about a long document C_L twice: seeing only the chunk C_S the instruction was written
from (x_S = [C_S; I]: chosen y_S) and seeing it all (x_L = [C_L; I]: rejected y_L). The policy
pi_theta, initialised from pi_S, learns on the LONG input to prefer y_S, against pi_S on the SHORT
input as reference: no human labels, short-context skill kept (data_gen.py makes the data).
The objective comes first:
  * Eq. 12, longpo_loss: L_LongPO = -log sigmoid(r(x_L, y_S) - r(x_L, y_L)), with the short-to-long
    reward r(x_L, y) = beta * log(pi_theta(y|x_L) / pi_S(y|x_S)).
  * Eq. 13, build_example and short_reference_logps: up to 4 turns of a document are one sample; the
    policy reads the document once, then I_1 y_1 I_2 y_2 ... (format_dialogue, the one chat formatting,
    under the plumbing), and its log-prob sums over the answer tokens (sequence_logps); the reference
    scores each turn on its own short chunk.
  * Eq. 14, nll_weights and total_loss: L = lam * L_LongPO + L_NLL over the chosen long sequence, whose
    weighted token mean sequence_logps computes.
Then how it runs at 128K-512K tokens: sequence-parallel log-probs (ring attention, log-softmax in
chunks), ONE pass over the document per pair (chosen and rejected packed after one copy of it), the
step, the loop (FSDP2), checkpoints, main; then, under a heading, the plumbing data_gen.py and
eval.py share: chat formatting and records, model loading, the memory plan.

Deliberate deviations: Eq. 13 sums log-probabilities over turns, as the release code does (the paper
writes the log of a sum of probabilities); reference log-probs computed once on the short inputs (by
data_gen.py, or up front by --ref-model or --model); ring attention (any SP size) instead of Ulysses;
one sample per micro-step (the batch of 8 is accumulation). Baselines: --loss sft and --loss dpo.

    python longpo.py                                       # tiny random model, CPU, one process
    torchrun --nproc_per_node 2 longpo.py                  # the same, SP = 2 over 2 CPU processes
    torchrun --nproc_per_node 8 longpo.py --model mistralai/Mistral-7B-Instruct-v0.2 \\
        --data data/longpo_128k.jsonl --sp-size 8 --max-length 131072 --rope-theta 1e7 \\
        --output-dir runs/mistral-128k                     # one 8-GPU node (one GPU: --nproc_per_node 1)
    python longpo.py --plan --model mistralai/Mistral-7B-Instruct-v0.2 --max-length 524288 --world-size 8
"""
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MistralConfig, PreTrainedTokenizerFast

import ring_attention  # importing it registers the attention implementation "ring_attention"
from ring_attention import zigzag_shard

# FSDP2 warns that the root module returns a view (its one position's logits); we never modify it
# in place, which is the case the warning is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# Shape glossary: B sequences (1 per micro-step; --micro-batch for sft), L whole-sequence tokens
# (padded to a multiple of 2*sp), T = L/sp tokens on this rank, H hidden size, V vocabulary,
# n tokens that carry a label.


@dataclass
class TrainConfig:
    """LongPO training (paper Eq. 12-14); defaults follow the paper, the release code's values noted."""
    model: str = field(default="tiny", metadata={"help": "pi_S: hub id, local dir, or 'tiny' (random 2 x 64 Mistral)"})
    data: str = field(default="data/longpo_tiny.jsonl", metadata={"help": "preference JSONL; several, comma-separated"})
    output_dir: str = field(default="runs/longpo-tiny", metadata={"help": "config, metrics, checkpoints, final model"})
    ref_model: str = field(default="", metadata={"help": "pi_S for missing reference log-probs and DPO ('': --model)"})
    sp_size: int = field(default=0, metadata={"help": "sequence-parallel (ring) group size, divides the world"})
    loss: str = field(default="longpo", metadata={"help": "longpo | dpo | sft"})
    beta: float = field(default=0.1, metadata={"help": "reward scale beta (paper 0.1; release code 0.01)"})
    lam: float = field(default=0.01, metadata={"help": "weight lambda of the preference term (paper and code 0.01)"})
    nll_target: str = field(default="auto", metadata={
        "help": "NLL tokens: sequence (the chosen long sequence) | responses (its answers) | auto (sft: responses)"})
    nll_context_weight: float = field(default=1.0, metadata={
        "help": "with --nll-target sequence: the NLL weight of its non-answer tokens (answers 1; paper 1)"})
    pack: str = field(default="shared-prefix", metadata={
        "help": "shared-prefix: chosen and rejected after ONE copy of the document | pairs: one after the other"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (0: 5e-7, sft 2e-5 as the paper; tiny 1e-4)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up share of the steps, then cosine to 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper 0)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    max_steps: int = field(default=0, metadata={"help": "optimiser steps (0: one epoch)"})
    grad_accum: int = field(default=0, metadata={"help": "samples per step per DP group (0: 8 as the paper; tiny 1)"})
    micro_batch: int = field(default=1, metadata={"help": "--loss sft: samples in one right-padded forward"})
    max_length: int = field(default=0, metadata={"help": "most tokens a trained sequence has; longer ones are skipped"})
    rope_theta: float = field(default=0.0, metadata={"help": "RoPE theta of the POLICY (paper 1e7; 0: the model's)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (CUDA: bf16 compute, fp32 masters; CPU: fp32) | bfloat16 (that anywhere) | float32 | float64"})
    save_dtype: str = field(default="auto", metadata={"help": "final/'s weights: auto (the base model's) | float32"})
    grad_checkpointing: bool = field(default=True, metadata={"help": "recompute each decoder layer in backward"})
    logprob_chunk: int = field(default=4096, metadata={"help": "tokens per chunk of the log-softmax"})
    seed: int = field(default=42, metadata={"help": "data order and initialisation seed"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only the final model)"})
    save_every_minutes: float = field(default=0.0, metadata={"help": "checkpoint when N minutes passed since the last"})
    save_total_limit: int = field(default=0, metadata={"help": "keep the newest N checkpoints (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run held in --output-dir"})
    stop_after: int = field(default=0, metadata={"help": "checkpoint and stop after N steps (then --resume)"})
    attn_kernel: str = field(default="auto", metadata={"help": "auto | cudnn | sdpa_flash | flash_attn | cpu | plain"})
    timeout_minutes: float = field(default=30.0, metadata={"help": "a collective waiting longer fails the job"})
    plan: bool = field(default=False, metadata={"help": "print the per-GPU memory plan and exit (no weights loaded)"})
    world_size: int = field(default=8, metadata={"help": "GPUs assumed by --plan"})
    gpu_gib: float = field(default=0.0, metadata={"help": "--plan: usable GiB per GPU (0: this card's, else 79.1)"})
    plan_branch_tokens: int = field(default=4608, metadata={"help": "--plan: tokens of the rejected branch (4 x 1152)"})


# ----------------------------------------------------------------------------- the objective (Eq. 12-14)

def longpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Eq. 12 for a batch of pairs, all inputs (B,): returns (losses, chosen_rewards, rejected_rewards).
    LongPO: the ref log-probs are pi_S's on the SHORT input, the policy's on the LONG one (DPO: both long)."""
    # short-to-long reward r(x_L, y) = beta * log(pi_theta(y|x_L) / pi_S(y|x_S))
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    # Eq. 12: the partition function cancels in the Bradley-Terry difference
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards, rejected_rewards


# Eq. 13, multi-turn samples. One document yields up to 4 turns (I_i, y_S,i, y_L,i), packed as ONE
# sample: the policy's long sequence holds the document once, then I_1 y_1 I_2 y_2 ... with the chosen
# (or the rejected) answers of every turn (format_dialogue), and log pi_theta(y|x_L) sums over all its
# answer tokens (sequence_logps). The reference scores each turn on its OWN short chunk.
def build_example(rec, tokenizer, sides=("chosen", "rejected")):
    """The chosen and rejected LONG dialogues of one record: {side: {"ids": [...], "is_answer": [...]}}."""
    return {side: dict(zip(("ids", "is_answer"), format_dialogue(tokenizer, rec["document"], rec["turns"], side)))
            for side in sides}


@torch.no_grad()
def short_reference_logps(ref_model, tokenizer, record, chunk_size=4096):
    """Eq. 13's reference, (ref_chosen_logp, ref_rejected_logp): log pi_S(y|x_S) = sum over turns i of
    log pi_S(y_i | C_S,i, I_i), each turn scored as training scores a sequence. A sum of log-probs, as
    the release code (the paper writes the log of a sum of probabilities)."""
    one_device = one_process(ref_model.device)  # short inputs

    def logp(turn, side):  # log pi_S(y_i | C_S,i, I_i)
        ids, is_answer = short_dialogue(tokenizer, record, turn, side)
        seq = prepare_sequence(ids, {side: is_answer}, one_device, tokenizer.pad_token_id)
        return sequence_logps(ref_model, seq, one_device, chunk_size)[side].item()
    return tuple(sum(logp(turn, side) for turn in record["turns"]) for side in ("chosen", "rejected"))


def short_dialogue(tokenizer, record, turn, side):
    """x_S of one turn and its answer, [C_S,i; I_i] y_i: (ids, is_answer) of its dialogue on its own chunk."""
    start, end = turn["chunk"]
    return format_dialogue(tokenizer, record["document"][start:end], [turn], side)


def nll_weights(is_answer, cfg):
    """Eq. 14's L_NLL(pi_theta; S_L): which tokens of the chosen LONG sequence S_L the NLL trains, with what
    weight. --nll-target sequence (the paper's LongPO and DPO; auto): all of S_L, the non-answer tokens
    weighing --nll-context-weight (1 in the paper); responses (its SFT baseline; auto for sft): the answers.
    sequence_logps makes them the weighted token mean sum_t w_t * -log p(x_t+1 | x_<=t) / sum_t w_t."""
    context = 0.0 if nll_target(cfg) == "responses" else cfg.nll_context_weight
    return [1.0 if answer else context for answer in is_answer]


def nll_target(cfg):
    return cfg.nll_target if cfg.nll_target != "auto" else "responses" if cfg.loss == "sft" else "sequence"


def total_loss(pref_losses, nll, lam):
    """Eq. 14: L = lam * L_LongPO + L_NLL, the NLL with weight 1 (the SFT baseline: lam = 0)."""
    return lam * pref_losses.mean() + nll


# ----------------------------------------------------------------------------- sequence-parallel log-probs

def token_logps(hidden, weight, targets, idx, chunk_size):
    """log p(target_t | prefix) at the flat positions idx (n,) (B, T) with 0 elsewhere; hidden (B, T, H) the
    final hidden states, weight (V, H) the output embedding. Head and log-softmax in fp32 over chunks of
    chunk_size labelled tokens, each recomputed in backward: never the whole sequence's logits."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    # The head runs in fp32 too: bf16 logits of size ~20 would be off by ~0.1 each, and a sequence's
    # log-prob sums hundreds of them.
    weight = weight.to(acc)

    def chunk_logps(h, w, t):
        logits = F.linear(h.to(acc), w)  # (chunk, V) in fp32 (fp64 for fp64 models)
        return logits.log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)

    pieces = []
    for start in range(0, idx.numel(), chunk_size):
        sel = idx[start:start + chunk_size]
        pieces.append(torch.utils.checkpoint.checkpoint(
            chunk_logps, flat_h[sel], weight, flat_t[sel], use_reentrant=False))
    values = torch.cat(pieces) if pieces else flat_h.new_zeros(0, dtype=acc)
    out = torch.zeros(flat_t.shape, dtype=acc, device=hidden.device)
    return out.index_put((idx,), values).view(targets.shape)


class SPSum(torch.autograd.Function):
    """Sum over the SP group as a value; the gradient flows through each rank's own part only, so the
    parameter gradients SUMMED over the group equal those of the unsharded sequence. FSDP averages over
    all ranks instead: micro_step's grad_scale (x sp) turns that mean over the group into this sum."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        if ring_attention._group_size_rank(group)[0] > 1:
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@dataclass
class Sequence:
    """What one forward runs on, this rank's part, (B, T) tensors on the device: input ids, their GLOBAL
    positions, next-token targets; the marks of the chosen and of the rejected answers (Eq. 12-13's log-probs)
    and the NLL's token weights (Eq. 14), those this sequence has; labelled (n,), the flat positions where
    any is set (found on the host); layout, a packed pair's BranchLayout (ring_attention)."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    labelled: torch.Tensor
    chosen: torch.Tensor = None
    rejected: torch.Tensor = None
    nll: torch.Tensor = None
    layout: object = None


def prepare_sequence(ids, masks, par, pad_id, pad_to=0):
    """Pad to a multiple of 2*sp (at least pad_to tokens), shift targets BEFORE sharding (no label
    crosses a shard border), zigzag-shard input_ids, position_ids (global positions), targets and each
    named mask the same way; padding is never a target. Returns the Sequence, (1, T) on the device."""
    length = len(ids)
    padded = -(-max(length, pad_to) // (2 * par.sp_size)) * 2 * par.sp_size
    out = {"input_ids": torch.tensor(ids + [pad_id] * (padded - length)), "position_ids": torch.arange(padded),
           "targets": F.pad(shifted_targets(ids, [False] * length)[0], (0, padded - length))}
    for name, weights in masks.items():  # bool marks, or the NLL's float weights
        out[name] = F.pad(shifted_targets(ids, weights)[1], (0, padded - length))
    out = {key: zigzag_shard(t.unsqueeze(0), par.sp_rank, par.sp_size) for key, t in out.items()}  # (1, T)
    return to_device(out, masks, par.device)


def to_device(seq, names, device, layout=None):
    """The Sequence of a prepared dict of host tensors, on the device, labelled: the flat positions where
    any of the named masks is set, found on the host (no device sync; the log-prob chunks' shapes known)."""
    none = torch.zeros(seq["input_ids"].shape, dtype=torch.bool)
    mask = functools.reduce(torch.logical_or, [seq[name] != 0 for name in names], none)
    seq["labelled"] = mask.reshape(-1).nonzero().squeeze(-1)
    return Sequence(**{key: t.to(device) for key, t in seq.items()}, layout=layout)


def pack_pair(example, sp_size, pad_id, nll):
    """The chosen and rejected long sequences packed to run the document ONCE: [prefix | chosen branch
    | rejected branch | padding] (unsharded), or None when their shared prompt (document and first
    instruction) has under 2*sp + 1 tokens (the pair then runs the 'pairs' way). The prefix is the
    longest multiple of 2*sp tokens of the prompt leaving its last token to the branches, which continue
    its positions. Labels are each sequence's own: answers, and the chosen sequence's NLL weights."""
    c, r = example["chosen"], example["rejected"]
    first = c["is_answer"].index(True)  # the first answer token: the shared prompt ends before it
    # the prompt's last token predicts the first answer token, which differs: it goes to both branches
    n = (first - 1) // (2 * sp_size) * 2 * sp_size
    if n == 0 or c["ids"][:first] != r["ids"][:first]:
        return None
    chosen_len, rejected_len = len(c["ids"]) - n, len(r["ids"]) - n  # the two branches
    n_branch = -(-(chosen_len + rejected_len) // sp_size)  # branch tokens per rank
    pad = sp_size * n_branch - chosen_len - rejected_len
    t_c, a_c = shifted_targets(c["ids"], c["is_answer"])
    t_r, a_r = shifted_targets(r["ids"], r["is_answer"])
    nll_c = shifted_targets(c["ids"], nll)[1]
    zeros = lambda k: torch.zeros(k, dtype=torch.bool)  # noqa: E731
    positions = [torch.arange(n + chosen_len), torch.arange(n, n + rejected_len), torch.arange(n, n + pad)]
    return {"input_ids": torch.tensor(c["ids"] + r["ids"][n:] + [pad_id] * pad),
            "position_ids": torch.cat(positions),
            "targets": torch.cat([t_c, t_r[n:], torch.zeros(pad, dtype=t_c.dtype)]),
            "chosen": torch.cat([a_c, zeros(rejected_len + pad)]),
            "rejected": torch.cat([zeros(n + chosen_len), a_r[n:], zeros(pad)]),  # no answer in the prefix
            "nll": torch.cat([nll_c, torch.zeros(rejected_len + pad)]),
            "layout": ring_attention.BranchLayout(n // sp_size, (chosen_len, rejected_len, pad), n_branch)}


def prepare_packed(example, par, pad_id, nll):
    """This rank's part of the packed pair: its zigzag shard of the prefix, then its contiguous slice
    of the branch region; (1, T) tensors on the device and the BranchLayout, or None (pack_pair)."""
    packed = pack_pair(example, par.sp_size, pad_id, nll)
    if packed is None:
        return None
    layout = packed.pop("layout")
    n, nb = layout.n_prefix * par.sp_size, layout.n_branch
    for key, t in packed.items():
        prefix = zigzag_shard(t[:n].unsqueeze(0), par.sp_rank, par.sp_size)
        branch = t[n + par.sp_rank * nb:n + (par.sp_rank + 1) * nb].unsqueeze(0)
        packed[key] = torch.cat([prefix, branch], 1)  # (1, T)
    return to_device(packed, ("chosen", "rejected", "nll"), par.device, layout)


def last_hidden_state(model, **inputs):
    """(B, T, H): the decoder's output after its final norm, caught as it leaves the norm. The model's
    own head computes one position's logits (unused); no other layer's output is kept (a no-grad pass
    asking output_hidden_states would hold all of them: 33 x T x H for Mistral-7B)."""
    caught = []
    hook = model.get_decoder().norm.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[0]


def sequence_logps(model, seq, par, chunk_size):
    """Log-probs of one (sharded, possibly packed) batch, named values of shape (B,) summed over the SP
    group: "chosen" and "rejected" (those seq holds), the log-probs summed over that mask's positions;
    "nll", when seq holds NLL weights (nll_weights), the weighted token mean of -log p."""
    ring_kwargs = {}
    if getattr(model.config, "_attn_implementation", None) == "ring_attention":
        ring_kwargs = {"ring_group": par.sp_group, "ring_layout": seq.layout}
    elif seq.layout is not None or par.sp_size > 1:  # a causal kernel would let the rejected branch see the chosen one
        raise RuntimeError("a packed or sharded sequence needs the model to run ring attention (setup_model)")
    hidden = last_hidden_state(model, input_ids=seq.input_ids, position_ids=seq.position_ids, **ring_kwargs)
    weight = model.get_output_embeddings().weight
    # Every rank must backpropagate through every layer even when no labelled token landed in its
    # shard: other ranks' queries attended to its keys, and ring attention's backward (like FSDP's
    # gradient reduction) is a collective that all ranks of the group enter together.
    anchor = 0.0 * (hidden.sum() + weight.sum())
    logps = token_logps(hidden, weight, seq.targets, seq.labelled, chunk_size) + anchor  # (B, T)
    result = {name: SPSum.apply((logps * getattr(seq, name)).sum(-1), par.sp_group)
              for name in ("chosen", "rejected") if getattr(seq, name) is not None}
    if seq.nll is not None:
        # the weights summed in the log-probs' precision: in fp32 a sum of 0.3s rounds differently per shard
        count = SPSum.apply(seq.nll.to(logps.dtype).sum(-1).detach(), par.sp_group).clamp_min(1e-12)
        result["nll"] = -SPSum.apply((logps * seq.nll).sum(-1), par.sp_group) / count
    return result


# ----------------------------------------------------------------------------- the step

def step_inputs(examples, cfg, par, pad_id):
    """One micro-step's tokens, made on the host and moved to the device: [the packed pair], or [chosen,
    rejected] (--pack pairs, or a prompt too short to share), or [sft's batch of --micro-batch sequences]."""
    if cfg.loss == "sft":
        return [sft_batch(examples, cfg, par, pad_id)]
    (example,) = examples
    c, r = example["chosen"], example["rejected"]
    nll = nll_weights(c["is_answer"], cfg)
    packed = prepare_packed(example, par, pad_id, nll) if cfg.pack == "shared-prefix" else None
    if packed is not None:
        return [packed]
    return [prepare_sequence(c["ids"], {"chosen": c["is_answer"], "nll": nll}, par, pad_id),
            prepare_sequence(r["ids"], {"rejected": r["is_answer"]}, par, pad_id)]


def micro_step(model, ref_model, sequences, refs, cfg, par):
    """Forward and backward of one pair on this SP group (sft: --micro-batch chosen sequences), its
    sequences from step_inputs, refs its (ref_chosen_logp, ref_rejected_logp) from the data (Eq. 13).
    Returns its metrics, tensors on the device."""
    # The gradient reduction (FSDP) AVERAGES over all dp x sp ranks, but the sp ranks of a sample
    # hold parts of ONE gradient (SPSum), to be SUMMED: scale by sp. Accumulation averages: / grad_accum.
    grad_scale = par.sp_size / cfg.grad_accum
    if cfg.loss == "sft":
        return sft_step(model, *sequences, cfg, par, grad_scale)
    if len(sequences) == 1:
        return packed_step(model, ref_model, *sequences, refs, cfg, par, grad_scale)
    return pairs_step(model, ref_model, *sequences, refs, cfg, par, grad_scale)


def packed_step(model, ref_model, packed, refs, cfg, par, grad_scale):
    """The shared-prefix step: one forward of the packed pair gives log pi(y_S|x_L), log pi(y_L|x_L)
    and the Eq. 14 NLL, one backward the exact gradient of Eq. 14; the document runs once."""
    ref_c, ref_r = pair_reference_logps(ref_model, [packed], refs, cfg, par)
    logps = sequence_logps(model, packed, par, cfg.logprob_chunk)
    logp_c, logp_r, nll = logps["chosen"], logps["rejected"], logps["nll"]
    losses, chosen_rewards, rejected_rewards = longpo_loss(logp_c, logp_r, ref_c, ref_r, cfg.beta)
    loss = total_loss(losses, nll, cfg.lam)
    (loss * grad_scale).backward()
    return pair_metrics(loss, nll, losses, chosen_rewards, rejected_rewards, logp_c, logp_r)


def pairs_step(model, ref_model, chosen, rejected, refs, cfg, par, grad_scale):
    """The reference path (--pack pairs): chosen and rejected one after the other, never in memory
    together. The pair loss gradient is a scalar weight times (grad log p_chosen - grad log p_rejected):
    rejected without grad, chosen with grad, rejected with grad, the other side's value a constant."""
    ref_c, ref_r = pair_reference_logps(ref_model, [chosen, rejected], refs, cfg, par)
    with torch.no_grad():
        logp_r = sequence_logps(model, rejected, par, cfg.logprob_chunk)["rejected"]
    # chosen pass: d/dtheta of lam * L_pref(logp_c, logp_r = const) + NLL
    logps = sequence_logps(model, chosen, par, cfg.logprob_chunk)
    logp_c, nll = logps["chosen"], logps["nll"]
    losses, chosen_rewards, rejected_rewards = longpo_loss(logp_c, logp_r, ref_c, ref_r, cfg.beta)
    loss = total_loss(losses, nll, cfg.lam)
    (loss * grad_scale).backward()
    # rejected pass: d/dtheta of lam * L_pref(logp_c = const, logp_r)
    logp_r = sequence_logps(model, rejected, par, cfg.logprob_chunk)["rejected"]
    losses_r = longpo_loss(logp_c.detach(), logp_r, ref_c, ref_r, cfg.beta)[0]
    (cfg.lam * losses_r.mean() * grad_scale).backward()
    return pair_metrics(loss, nll, losses, chosen_rewards, rejected_rewards, logp_c, logp_r)


def sft_batch(examples, cfg, par, pad_id):
    """The chosen sequences of sft's micro-batch as one right-padded batch (B, T)."""
    longest = max(len(ex["chosen"]["ids"]) for ex in examples)
    rows = [prepare_sequence(ex["chosen"]["ids"], {"chosen": ex["chosen"]["is_answer"],
                                                   "nll": nll_weights(ex["chosen"]["is_answer"], cfg)},
                             par, pad_id, longest) for ex in examples]
    width = rows[0].input_ids.shape[1]  # row b's flat positions follow rows 0..b-1
    cat = lambda key: torch.cat([getattr(row, key) for row in rows])  # noqa: E731
    return Sequence(cat("input_ids"), cat("position_ids"), cat("targets"),
                    torch.cat([row.labelled + b * width for b, row in enumerate(rows)]), chosen=cat("chosen"),
                    nll=cat("nll"))


def sft_step(model, batch, cfg, par, grad_scale):
    """The SFT baseline: the NLL of sft_batch's sequences, the same gradient as one at a time (causal: no
    token sees the padding; each its own token mean); summed metrics."""
    logps = sequence_logps(model, batch, par, cfg.logprob_chunk)
    loss = logps["nll"].sum()  # Eq. 14 without its preference term, per sequence
    (loss * grad_scale).backward()
    return {"loss": loss.detach(), "nll": loss.detach(), "logps/chosen": logps["chosen"].sum().detach()}


def pair_reference_logps(ref_model, sequences, refs, cfg, par):
    """(ref_chosen, ref_rejected) as (1,) tensors. LongPO: pi_S on the SHORT inputs, from the data
    (Eq. 13). DPO: the frozen model on the LONG input, the sequences exactly as the policy sees them."""
    if cfg.loss != "dpo":
        return tuple(torch.tensor([x], dtype=torch.float64, device=par.device) for x in refs)
    with torch.no_grad():
        return answer_logps(ref_model, sequences, par, cfg.logprob_chunk)


def answer_logps(model, sequences, par, chunk_size):
    """(log p(chosen answers), log p(rejected answers)), (B,) each, from a packed pair or its two sequences."""
    logps = [sequence_logps(model, dataclasses.replace(seq, nll=None), par, chunk_size) for seq in sequences]
    by_side = {name: value for part in logps for name, value in part.items()}  # packed: one part; pairs: two
    return by_side["chosen"], by_side["rejected"]


def pair_metrics(loss, nll, losses, chosen_rewards, rejected_rewards, logp_c, logp_r):
    """The pair's metrics as tensors on the device (read by train_step: no sync inside the step)."""
    metrics = {"loss": loss, "nll": nll, "pref_loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(),
               "rewards/rejected": rejected_rewards.mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
               "logps/chosen": logp_c.sum(), "logps/rejected": logp_r.sum()}
    return {key: value.detach() for key, value in metrics.items()}


# ----------------------------------------------------------------------------- the loop

def resolve_dtypes(cfg, device):
    """(master dtype of the weights, gradients and AdamW states, compute dtype). bf16 is always mixed
    precision: fp32 masters, because an update of lr 5e-7 is far below bf16's resolution of a weight."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.float32, torch.bfloat16
    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return dtype, dtype


def load_for_training(name, par, dtypes, rope_theta=0.0, grad_checkpointing=True, trainable=True):
    """A model set up on par's world (setup_model), to train or, trainable False, to score. Under FSDP its
    weights are read ONCE, by rank 0 and in the checkpoint's own dtype: the other ranks build the model's
    shapes on the meta device, and the sharding hands each rank its share of rank 0's weights (Mistral-7B:
    14.5 GB of host memory on one rank, not 29 GB on each; 70B loads at all)."""
    master_dtype, compute_dtype = dtypes
    if par.world_size == 1 and master_dtype == compute_dtype:  # nothing to shard or cast: the plain module
        model = load_model(name, master_dtype, rope_theta)
        return setup_model(model, par, compute_dtype, grad_checkpointing, trainable)
    source = load_model(name, "auto", rope_theta) if par.rank == 0 else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name, rope_theta), dtype=master_dtype,
                                                 attn_implementation="sdpa")
    return setup_model(model, par, compute_dtype, grad_checkpointing, trainable, source)


def setup_model(model, par, compute_dtype, grad_checkpointing, trainable=True, source=None):
    """Ring attention, activation checkpointing and FSDP2 full sharding on a model. A model on the meta
    device takes its weights and buffers from `source`, rank 0's loaded model (the others': None)."""
    meta = next(model.parameters()).is_meta
    model.config.use_cache = False
    # THE swap: every attention layer now runs zigzag ring attention over the SP group (a group of
    # one at SP size 1: the same block kernels, and the branch mask of a packed pair)
    model.set_attn_implementation("ring_attention")
    if grad_checkpointing and trainable:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if not meta and next(model.parameters()).device != par.device:
        model.to(par.device)
    # FSDP2 does both jobs, with one code path for every world size: weights, grads and AdamW states
    # sharded over ALL ranks (dp x sp), and mixed precision (bf16 compute of fp32 master weights,
    # gradients reduced in fp32), which it applies on a process group of one as well. A single
    # process in its master dtype has nothing to shard or cast and runs the plain module.
    if par.world_size > 1 or compute_dtype != next(model.parameters()).dtype:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                  reduce_dtype=torch.promote_types(compute_dtype, torch.float32))
        for layer in model.model.layers:
            fully_shard(layer, mesh=par.mesh, mp_policy=mp)
        fully_shard(model, mesh=par.mesh, mp_policy=mp)
    if meta:  # each rank's shard of rank 0's weights, cast to the master dtype
        model.to_empty(device=par.device)
        set_model_state_dict(model, source.state_dict() if source else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, buffer in model.named_buffers():  # not weights (the rotary frequencies): rank 0's too
            if source is not None:
                buffer.copy_(source.get_buffer(name))
            if par.world_size > 1:
                dist.broadcast(buffer, 0)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def make_optimizer(model, cfg, total_steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    def lr_lambda(step):  # linear warm-up, then cosine to 0 (the release code's schedule)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def record_index(k, n, seed):
    """The k-th sample of the run: epoch k // n in a permutation seeded by (seed, epoch)."""
    epoch, position = divmod(k, n)
    return epoch_order(n, seed * 1_000_003 + epoch)[position]


@functools.lru_cache(maxsize=2)  # one epoch's order, made once (16000 records take ~9 ms to shuffle)
def epoch_order(n, seed):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return tuple(order)


class NonFinite(FloatingPointError):
    """A non-finite loss or gradient norm, seen by every rank at once (the same reduced values)."""


def which_records(records, idxs):
    return "record " + ", ".join(f"{records[i].get('id', i)!r} of {records.lengths[i]} tokens" for i in idxs)


def train_step(step, model, ref_model, data, cfg, par, optimizer, scheduler, last_save):
    """One optimiser step: grad_accum samples per DP group, clipping, AdamW, schedule. Its metrics say too
    whether any rank got SIGUSR1 ("signalled") and whether --save-every-minutes have passed since last_save
    on any rank's clock ("due"): they ride on the metrics' reduction, no collective of their own."""
    records, tokenizer = data
    t0, sums, tokens, mine = time.perf_counter(), {}, 0, []
    sides = trained_sides(cfg)
    for first in range(0, cfg.grad_accum, cfg.micro_batch):  # micro_batch > 1: sft only (check_config)
        ks = [(step * cfg.grad_accum + m) * par.dp_size + par.dp_rank for m in range(first, first + cfg.micro_batch)]
        idxs = [record_index(k, len(records), cfg.seed) for k in ks]  # k: the sample's number
        examples = [build_example(records[i], tokenizer, sides) for i in idxs]
        refs_of_pair = records.refs[idxs[0]]  # a micro-batch of several is sft's, which has no reference
        sequences = step_inputs(examples, cfg, par, tokenizer.pad_token_id)
        metrics = micro_step(model, ref_model, sequences, refs_of_pair, cfg, par)
        metrics = {key: value.item() for key, value in metrics.items()}
        bad = torch.tensor(float(not math.isfinite(metrics["loss"])), device=par.device)
        if par.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        if bad.item():
            raise NonFinite(f"non-finite loss at step {step + 1} ({which_records(records, idxs)} on rank {par.rank}); "
                            "no update was applied.")
        mine += idxs
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
        tokens += sum(map(trained_length, examples))  # the tokens trained, each once: the packed pair
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not math.isfinite(grad_norm.item()):  # the same global norm on every rank: each says its records
        raise NonFinite(f"non-finite gradient norm at step {step + 1} ({which_records(records, mine)} on rank "
                        f"{par.rank}); no update was applied.")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # tokens: the world mean of tokens * dp is the sum over DP groups (their sp ranks hold the same count)
    due = cfg.save_every_minutes and time.monotonic() - last_save >= 60 * cfg.save_every_minutes
    metrics = world_mean({**sums, "tokens": tokens * par.dp_size, "signalled": float(bool(SIGNALLED)),
                          "due": float(bool(due))}, par)
    elapsed = time.perf_counter() - t0
    return {"step": step + 1, **metrics, "grad_norm": grad_norm.item(), "lr": lr,
            "tokens_per_s": metrics["tokens"] / elapsed,
            "tokens_per_s_per_gpu": metrics["tokens"] / elapsed / par.world_size}


def trained_sides(cfg):
    return ("chosen",) if cfg.loss == "sft" else ("chosen", "rejected")


def trained_length(example, packed=True):
    """Tokens of the sequence training runs for a record, padding aside: the shared-prefix packed pair (the
    prompt once, then both answer branches; data_gen.py --max-length counts this), else the longer one."""
    lengths = [len(side["ids"]) for side in example.values()]
    if packed and len(lengths) == 2:
        c, r = example["chosen"], example["rejected"]
        first = c["is_answer"].index(True)  # the shared prompt ends here; its last token goes to both branches
        if c["ids"][:first] == r["ids"][:first]:
            return sum(lengths) - (first - 1)
    return max(lengths)


def prepare_data(records, cfg, par, tokenizer, compute_dtype):
    """Records with their lengths and reference log-probs (computed on the SHORT inputs where the file
    has none, Eq. 13); every rank ends with the same. Those longer than --max-length are skipped."""
    packed = cfg.pack == "shared-prefix" and cfg.loss != "sft"
    lengths = distributed_map(lambda i: trained_length(build_example(records[i], tokenizer, trained_sides(cfg)),
                                                       packed), range(len(records)), par, "lengths")
    kept = [i for i, n in enumerate(lengths) if n <= (cfg.max_length or math.inf)]
    print0(f"--max-length {cfg.max_length or 'none'}: kept {len(kept)} of {len(records)} records; "
           f"{len(records) - len(kept)} skipped as longer (the trained sequences have "
           f"{min(lengths)}-{max(lengths)} tokens)")
    if not kept:
        raise UsageError(f"no record of --data {cfg.data} fits --max-length {cfg.max_length}; raise it")
    records = records.select(kept)
    records.lengths = [lengths[i] for i in kept]
    missing = [i for i, ref in enumerate(records.refs) if None in ref]
    if cfg.loss == "longpo" and missing:
        name = cfg.ref_model or cfg.model
        print0(f"{len(missing)} records lack reference log-probs: computing them with {name} on the short inputs")
        ref, ref_tok = load_model_and_tokenizer(name, compute_dtype)  # its own RoPE, not --rope-theta
        ref.to(par.device).eval()
        values = distributed_map(lambda i: short_reference_logps(ref, ref_tok, records[i], cfg.logprob_chunk),
                                 missing, par, "reference log-probs")
        for i, value in zip(missing, values):
            records.refs[i] = value
        del ref
    return records


def open_metrics(cfg, start_step, par):
    """metrics.jsonl; on resume, drop lines of steps after the checkpoint (they will be redone)."""
    path, lines = os.path.join(cfg.output_dir, "metrics.jsonl"), []
    if par.rank != 0:
        return None
    if start_step and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= start_step]
    with open(path, "w") as f:
        f.writelines(lines)
    return open(path, "a")


SIGNALLED = []  # SIGUSR1 received: training checkpoints at the next step boundary and exits


def checkpoint_on_signal():
    """SIGUSR1 (a scheduler's warning before its time limit, e.g. SLURM's --signal=USR1@600) asks for a
    checkpoint at the end of the step in flight; every rank learns of any rank's signal through that step's
    metrics reduction, so all stop together. SIGTERM keeps its meaning, stop now: torchrun sends it to
    every rank when one has failed, and a rank waiting on a dead one would never finish its step."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: SIGNALLED.append("SIGUSR1"))


def train(cfg, par, records):
    dtypes, tokenizer = resolve_dtypes(cfg, par.device), load_tokenizer(cfg.model)
    records = prepare_data(records, cfg, par, tokenizer, dtypes[1])
    ref_model = None
    if cfg.loss == "dpo":
        ref_model = load_for_training(cfg.ref_model or cfg.model, par, dtypes, trainable=False)
    policy = load_for_training(cfg.model, par, dtypes, cfg.rope_theta, cfg.grad_checkpointing)
    total_steps = cfg.max_steps or math.ceil(len(records) / (par.dp_size * cfg.grad_accum))
    optimizer, scheduler = make_optimizer(policy, cfg, total_steps)
    ckpt = last_checkpoint(cfg.output_dir) if cfg.resume else None
    start = load_checkpoint(ckpt, policy, optimizer, scheduler, par) if ckpt else 0
    print0(f"resumed from {ckpt} at step {start}" if ckpt else "starting from step 0")
    metrics_file = open_metrics(cfg, start, par)
    print0(f"training: {len(records)} records, {total_steps} steps of {cfg.grad_accum} x {par.dp_size} "
           f"samples, world {par.world_size} = dp {par.dp_size} x sp {par.sp_size}, device {par.device}")
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=par.rank != 0, desc="train")
    checkpoint_on_signal()  # from here on a stop signal costs at most the step in flight
    checkpoints, last_save = Checkpoints(cfg, par), time.monotonic()
    for step in bar:
        try:
            metrics = train_step(step, policy, ref_model, (records, tokenizer), cfg, par, optimizer, scheduler,
                                 last_save)
        except NonFinite as e:  # on every rank together: the checkpoint being written is the last good one
            checkpoints.finish()
            raise NonFinite(f"{e} The last good checkpoint is {last_checkpoint(cfg.output_dir)}: a fused attention "
                            "kernel can fail on one record's block shapes, so resume from it with --resume and another "
                            "--attn-kernel (sdpa_flash on CUDA, plain on CPU) first; if that fails the same way, "
                            "with a lower --lr") from None
        signalled, due = metrics.pop("signalled") > 0, metrics.pop("due") > 0  # on any rank
        checkpoints.name_if_written()
        if metrics_file:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in metrics.items()))
        stop = cfg.stop_after and metrics["step"] - start >= cfg.stop_after and metrics["step"] < total_steps
        signalled = signalled and metrics["step"] < total_steps  # at the last step: the final model follows
        if stop or signalled or due or (cfg.save_every and metrics["step"] % cfg.save_every == 0):
            checkpoints.save(policy, optimizer, scheduler, metrics["step"])
            last_save = time.monotonic()
        if stop or signalled:
            checkpoints.finish()
            why = f"--stop-after {cfg.stop_after}" if stop else f"signal {', '.join(SIGNALLED) or 'on another rank'}"
            print0(f"{why}: stopped at step {metrics['step']} with a checkpoint; continue with --resume")
            return
    checkpoints.finish()
    save_final(policy, tokenizer, cfg, par, cfg.max_length or max(records.lengths))
    print0(f"final model: {os.path.join(cfg.output_dir, 'final')}")


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_steps(output_dir):
    """The steps of the complete checkpoints in output_dir, ascending."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(int(d.split("-")[1]) for d in names if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
                  and os.path.exists(os.path.join(output_dir, d, "trainer_state.json")))


def last_checkpoint(output_dir):
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


# What defines a run: --resume must continue with the same (save_every, stop_after, logprob_chunk,
# grad_checkpointing and the like may change; they do not change what is computed).
RUN_DEFINING = ("model", "ref_model", "data", "loss", "beta", "lam", "nll_target", "nll_context_weight", "pack", "lr",
                "warmup_ratio", "weight_decay", "max_grad_norm", "max_steps", "grad_accum", "max_length", "rope_theta",
                "dtype", "seed")


def run_identity(cfg, world_size, sp_size):
    """The run-defining arguments, the world and sp sizes, and the data's size and a hash of its first
    records (resuming on another file would silently train on other data)."""
    digest, names = hashlib.sha256(), data_files(cfg.data)
    for name in names:
        with open(name, "rb") as f:
            for _, line in zip(range(8), f):
                digest.update(line)
    return {**{k: getattr(cfg, k) for k in RUN_DEFINING}, "world_size": world_size, "sp_size": sp_size,
            "data_bytes": sum(os.path.getsize(name) for name in names),
            "data_sha256_first_records": digest.hexdigest()}


def check_output_dir(cfg, identity):
    """'fresh', 'resume' (the run held there) or 'finished' (it wrote final/). Refuses to overwrite a
    run without --overwrite, and to resume one with other run-defining arguments (naming each)."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output-dir {out} is a file; give a folder")
    held = [n for n in ("final/", "metrics.jsonl") if os.path.exists(os.path.join(out, n))]
    held += ["checkpoints"] if last_checkpoint(out) else []
    if cfg.overwrite or not (held or cfg.resume):
        return "fresh"
    if not cfg.resume:
        raise UsageError(f"--output-dir {out} holds an earlier run ({', '.join(held)}); pass --resume to continue "
                         "it, --overwrite to replace it, or choose another --output-dir")
    path = os.path.join(out, "config.json")
    before = None
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f).get("identity")
    if before is None:
        if not held:
            return "fresh"  # nothing of a run there yet
        raise UsageError(f"--resume: {path} does not record the run's arguments, so it cannot be checked; "
                         "start a new run (--overwrite or another --output-dir)")
    changed = changed_arguments(before, identity)
    if changed:
        raise UsageError(f"--resume: {out} holds a run with other arguments ({changed}); resume it with "
                         "the same ones, or start a new run (--overwrite or another --output-dir)")
    return "finished" if os.path.isdir(os.path.join(out, "final")) else "resume"


def changed_arguments(before, now):
    """'name: X there, Y now' for each argument of `now` that `before` (a dict) holds otherwise, joined by '; '."""
    return "; ".join(f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in now.items() if before.get(k) != v)


def clear_output_dir(out):
    """--overwrite: remove a previous run's config, metrics, checkpoints and final model."""
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if name in ("config.json", "metrics.jsonl", "final") or name.startswith("checkpoint-"):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


class Checkpoints:
    """Sharded model + optimizer (torch.distributed.checkpoint), scheduler, data position and every rank's
    RNG, written in the background: the state is copied to host memory, training goes on while a thread
    writes it to a temporary folder, which rank 0 renames as soon as it is complete (a crash never leaves
    half a checkpoint); then --save-total-limit removes the oldest beyond the newest N."""

    def __init__(self, cfg, par):
        self.cfg, self.par, self.writing = cfg, par, None
        self.group = dist.new_group(backend="gloo", timeout=TIMEOUT[0])  # the writer thread's own

    def save(self, model, optimizer, scheduler, step):
        self.finish()  # one at a time
        final = os.path.join(self.cfg.output_dir, f"checkpoint-{step}")
        tmp = final + ".tmp"
        if self.par.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "samples_seen": step * self.cfg.grad_accum * self.par.dp_size,
                           "scheduler": scheduler.state_dict()}, f)
        barrier(self.par)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
                   os.path.join(tmp, f"rng_rank{self.par.rank}.pt"))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, process_group=self.group)
        self.writing = [future, tmp, final]

    def name_if_written(self):
        """Rank 0, at every step: the checkpoint named once written (rank 0's write completes after every
        rank's), so a crash before the next one loses nothing it holds."""
        if self.par.rank == 0 and self.writing and self.writing[1] and self.writing[0].done():
            future, tmp, final = self.writing
            future.result()
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.writing[1] = None  # named
            limit = self.cfg.save_total_limit
            for old in checkpoint_steps(self.cfg.output_dir)[:-limit] if limit else []:
                shutil.rmtree(os.path.join(self.cfg.output_dir, f"checkpoint-{old}"))

    def finish(self):
        """Every rank: wait for the checkpoint being written, and name it."""
        if self.writing:
            self.writing[0].result()
            self.name_if_written()
            self.writing = None
            barrier(self.par)


def load_checkpoint(path, model, optimizer, scheduler, par):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    scheduler.load_state_dict(trainer_state["scheduler"])
    try:  # tensors, ints and tuples only: a pickle of anything else could run code
        rng = torch.load(os.path.join(path, f"rng_rank{par.rank}.pt"), weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path}/rng_rank{par.rank}.pt holds more than random states; not loading it "
                         "(a checkpoint from elsewhere?)") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return trainer_state["step"]


def save_final(model, tokenizer, cfg, par, trained_tokens):
    """The full weights, gathered one tensor at a time in --save-dtype (auto: the base model's; Mistral:
    bf16, 14.5 GB, not an fp32 copy of 29 GB), as an HF model that AutoModelForCausalLM.from_pretrained
    loads; its config carries the trained context (max_position_embeddings, which serving stacks take as
    the limit) and the RoPE theta it was trained with."""
    dtype = getattr(torch, cfg.save_dtype) if cfg.save_dtype != "auto" else load_config(cfg.model).dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a collective: every rank
        if par.rank == 0:
            state[name] = tensor.to("cpu", dtype)
    if par.rank == 0:
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.use_cache, config.dtype = True, dtype  # for generation after training
        config.max_position_embeddings = max(config.max_position_embeddings, trained_tokens)
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
        clean.load_state_dict(state, assign=True)
        clean.save_pretrained(os.path.join(cfg.output_dir, "final"))
        tokenizer.save_pretrained(os.path.join(cfg.output_dir, "final"))
    barrier(par)


# ----------------------------------------------------------------------------- main

def check_config(cfg):
    choices = {"loss": ("longpo", "dpo", "sft"), "nll_target": ("auto", "sequence", "responses"),
               "dtype": ("auto", "float32", "float64", "bfloat16"), "pack": ("shared-prefix", "pairs"),
               "save_dtype": ("auto", "float32", "bfloat16", "float16")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if not 0 <= cfg.nll_context_weight <= 1 or (cfg.nll_target == "responses" and cfg.nll_context_weight != 1):
        raise UsageError(f"--nll-context-weight {cfg.nll_context_weight}: a weight in [0, 1] of the non-answer "
                         "tokens of --nll-target sequence (responses trains the answers only)")
    check_at_least(cfg, ("grad_accum", "logprob_chunk", "world_size", "plan_branch_tokens"), 1)
    check_at_least(cfg, ("sp_size", "lr", "lam", "weight_decay", "max_grad_norm", "max_steps", "max_length",
                         "rope_theta", "save_every", "save_every_minutes", "save_total_limit", "stop_after",
                         "gpu_gib"), 0, " (0: the default)")
    check_runtime(cfg)
    if not cfg.beta > 0:
        raise UsageError(f"--beta {cfg.beta} must be > 0 (paper 0.1, release code 0.01)")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise UsageError(f"--warmup-ratio {cfg.warmup_ratio} must be within [0, 1]")
    if cfg.micro_batch < 1 or cfg.grad_accum % cfg.micro_batch:
        raise UsageError(f"--micro-batch {cfg.micro_batch} must be >= 1 and divide --grad-accum {cfg.grad_accum}")
    if cfg.micro_batch > 1 and cfg.loss != "sft":
        raise UsageError(f"--micro-batch {cfg.micro_batch} is for --loss sft; preference pairs run one at a time "
                         "(the shared-prefix packing is per pair): use --micro-batch 1")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run, or replace it")
    if cfg.plan and cfg.max_length < 1:
        raise UsageError("--plan needs --max-length (tokens of one sequence), e.g. --max-length 524288")
    if not cfg.plan:
        check_sp_size(cfg.sp_size)


def resolve_defaults(cfg):
    """Flags left at 0 take the paper's value (SFT baseline 2e-5, LongPO and DPO 5e-7), or a demo value for
    the random tiny model, so that its short default run visibly trains; --nll-target auto its loss's."""
    tiny = cfg.model == "tiny"
    return dataclasses.replace(cfg, lr=cfg.lr or (1e-4 if tiny else 2e-5 if cfg.loss == "sft" else 5e-7),
                               grad_accum=cfg.grad_accum or (1 if tiny else 8), nll_target=nll_target(cfg))


def main(cfg):
    cfg = resolve_defaults(cfg)
    check_config(cfg)
    for flag, name in (("--model", cfg.model), ("--ref-model", cfg.ref_model)):
        if name:
            check_model(name, flag)
    if cfg.plan:
        print(memory_plan(cfg))
        return
    records = Records(cfg.data)  # every rank, before any process group or model: all or none stop here
    world = int(os.environ.get("WORLD_SIZE", 1))
    identity = run_identity(cfg, world, cfg.sp_size or world)
    state = check_output_dir(cfg, identity)
    if state == "finished":
        print0(f"{cfg.output_dir} holds this run, finished (final/ exists): nothing to do")
        return
    rank, world_size, device = init_distributed(cfg.timeout_minutes, group_of_one=True)
    par = setup_parallel(cfg.sp_size, rank, world_size, device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: ranks of an SP group must agree
    if rank == 0 and state == "fresh":
        clear_output_dir(cfg.output_dir)  # --overwrite, or leftovers of a run that never started
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "identity": identity}, f, indent=2)
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    train(cfg, par, records)


# ============================================================================= plumbing shared by the scripts
# Below: what data_gen.py and eval.py use too. The command line and failures across ranks, chat
# formatting and records (the one place where a dialogue becomes tokens), model loading and the tiny
# preset, the memory plan.

# ----------------------------------------------------------------------------- errors; processes and their groups

class UsageError(ValueError):
    """A user's mistake (a flag, an input file, a record, an output folder): the scripts print it as
    one line `error: ...` and exit with status 2, no traceback. Bugs keep their tracebacks."""


def check_at_least(cfg, names, least, hint=""):
    """One line for the first of these config fields (flag names) below `least`, NaN included."""
    for name in names:
        if not getattr(cfg, name) >= least:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= {least}{hint}")


def check_output_file(flag, path, example):  # before any work: a folder where a file goes
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UsageError(f"{flag} {path} is a folder; give the output file, e.g. {os.path.join(path, example)}")


TIMEOUT = [datetime.timedelta(minutes=30)]  # of every process group: init_distributed's timeout_minutes


def init_distributed(timeout_minutes=30.0, group_of_one=False):
    """(rank, world_size, device) from torchrun's RANK/LOCAL_RANK/WORLD_SIZE (one process without them);
    nccl on CUDA, gloo on CPU; a collective waiting longer than timeout_minutes fails (--timeout-minutes).
    group_of_one: a process group even for one process without torchrun (FSDP2, which training uses
    for mixed precision, needs one). CUDA memory: expandable segments, unless an allocator config is set."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # before CUDA: little fragmentation
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend, timeout = ("nccl" if device.type == "cuda" else "gloo"), datetime.timedelta(minutes=timeout_minutes)
    TIMEOUT[0] = timeout  # the SP groups' too (setup_parallel)
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group(backend, timeout=timeout)
        elif group_of_one:  # an in-process store: no address or port to agree on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return rank, world_size, device


def print0(*args, **kwargs):
    if (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0:
        print(*args, **kwargs, flush=True)


@dataclass
class Parallel:
    """world = dp x sp: consecutive ranks form an SP group (one ring) that reads one sample, the DP
    groups read different samples. sp_group is LOCAL when sp_size is 1."""
    rank: int
    world_size: int
    sp_size: int
    sp_group: object
    device: torch.device

    def __post_init__(self):
        self.sp_rank = self.rank % self.sp_size  # the place in the ring
        self.dp_rank = self.rank // self.sp_size  # the group, i.e. which samples it reads
        self.dp_size = self.world_size // self.sp_size

    @functools.cached_property
    def mesh(self):  # the world's, which FSDP shards over; made at its first use
        return dist.device_mesh.init_device_mesh(self.device.type, (self.world_size,))


def one_process(device):
    """The Parallel of work done whole in this process (e.g. short inputs), whatever the world."""
    return Parallel(0, 1, 1, ring_attention.LOCAL, device)


def check_sp_size(sp_size):
    """Before any process group: --sp-size (0: all processes) must divide torchrun's world size."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if sp_size < 0 or world % (sp_size or world):
        raise UsageError(f"--sp-size {sp_size} must divide the number of processes {world} "
                         f"(torchrun --nproc_per_node x nodes); e.g. --sp-size {world}")


def setup_parallel(sp_size, rank, world_size, device):
    """The SP groups of an initialised world (sp_size 0: one ring over all ranks; check_sp_size first)."""
    sp_size = sp_size or world_size
    assert world_size % sp_size == 0, (sp_size, world_size)
    # every rank creates every group, in the same order: ranks [g * sp, (g + 1) * sp) form group g
    groups = [dist.new_group(list(range(f, f + sp_size)), timeout=TIMEOUT[0])
              for f in range(0, world_size, sp_size)] if sp_size > 1 else []
    sp_group = groups[rank // sp_size] if groups else ring_attention.LOCAL
    return Parallel(rank, world_size, sp_size, sp_group, device)


def barrier(par):
    if par.world_size > 1:
        dist.barrier()


def distributed_map(fn, items, par, desc):
    """[fn(x) for x in items], the items split over all ranks, results gathered in order."""
    from tqdm import tqdm
    mine = [(i, fn(items[i])) for i in tqdm(range(par.rank, len(items), par.world_size), desc=desc,
                                            disable=par.rank != 0)]
    if par.world_size > 1:
        gathered = [None] * par.world_size
        dist.all_gather_object(gathered, mine)
        mine = [pair for part in gathered for pair in part]
    return [value for _, value in sorted(mine, key=lambda pair: pair[0])]


def world_mean(values, par):
    """Mean of a dict of floats over all ranks (SP replicas agree, so this is the mean over DP)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=par.device)
    if par.world_size > 1:
        dist.all_reduce(t)
        t /= par.world_size
    return dict(zip(values, t.tolist()))


def use_kernel(name):
    """--attn-kernel: the block kernel of the models' ring attention; any other than auto or cudnn also
    takes cuDNN from transformers' "sdpa" attention (one-process generation; its other backends stay, as
    masked batches need them). Checked before any work: a CUDA kernel without CUDA is refused."""
    if name not in ("auto", *ring_attention.KERNELS):
        raise UsageError(f"--attn-kernel {name!r}: choose one of auto, {', '.join(ring_attention.KERNELS)}")
    on_cuda = torch.cuda.is_available()
    if (name in ("cudnn", "sdpa_flash", "flash_attn") and not on_cuda) or (name == "cpu" and on_cuda):
        raise UsageError(f"--attn-kernel {name} does not run on this machine ({'no ' * (not on_cuda)}CUDA); "
                         "use auto or plain")
    if name == "flash_attn" and not ring_attention.flash_attn_available():
        raise UsageError("--attn-kernel flash_attn: flash-attn >= 2.7 is not installed "
                         "(pip install flash-attn --no-build-isolation)")
    ring_attention.KERNEL[0] = name
    if on_cuda and name not in ("auto", "cudnn"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def check_runtime(cfg):
    """Every script's --timeout-minutes and --attn-kernel, checked (and the kernel set) before any work."""
    if not cfg.timeout_minutes > 0:
        raise UsageError(f"--timeout-minutes {cfg.timeout_minutes} must be > 0")
    use_kernel(cfg.attn_kernel)


# ----------------------------------------------------------------------------- the command line; failures

def run_cli(main, cls, watch=lambda cfg: True):
    """main(config from the command line). A UsageError becomes one line on stderr and exit 2: every rank
    checks the same flags and files, so rank 0 speaks for all (the others wait a moment; torchrun stops
    them once one rank has stopped). Under torchrun (and watch(cfg)), a thread watches the other ranks
    (watch_peers); any other error prints its traceback, then is reported to them (report_failure)."""
    try:
        cfg = config_from_cli(cls)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    watching = world > 1 and watch(cfg)
    watcher = watch_peers(rank, world, cfg.timeout_minutes) if watching else None
    try:
        main(cfg)
    except (UsageError, ring_attention.KernelError) as e:
        if watching:  # a mistake only some ranks saw stops the others too
            REPORTING.set()
            quietly(lambda: first_failure(open_store(), f"rank {rank}: error: {e}"))
        if rank != 0:
            time.sleep(5)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (Exception, KeyboardInterrupt) as e:
        if not watching:
            raise
        traceback.print_exc()
        report_failure(e, rank, world)
        sys.exit(1)
    finally:
        if watching:
            quietly(lambda: open_store().set(store_key(f"done{rank}"), "1"))  # finished: not silent
            STOPPED.set()  # and the watcher out of the store before the process ends
            watcher.join(timeout=2 * BEAT)
        if dist.is_initialized():
            dist.destroy_process_group()


# A rank that fails must not leave the others waiting for it (a collective waits --timeout-minutes, and
# on several nodes no launcher stops them), and every rank's log must say which rank failed first. The
# ranks share the launcher's key-value store (torchrun's, which outlives them): each beats a counter
# there every BEAT seconds and watches the next rank still running; the first failure is written once,
# and each rank's watcher, seeing it, says it and ends its process after the failed rank has ended
# (so that torchrun's own summary names that rank first).
BEAT, REPORTING, STOPPED = 2.0, threading.Event(), threading.Event()  # STOPPED: this rank is done


def store_key(name):  # keys of this run of the ranks (torchrun's store outlives a restart of them)
    return f"longpo/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def open_store():
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=30))


def quietly(fn):
    """fn(), any error ignored: a store gone with its launcher leaves the process groups' own timeouts."""
    try:
        fn()
    except Exception:
        pass


def first_failure(store, text=None):
    """The run's first failure; text becomes it unless one is recorded."""
    return store.compare_set(store_key("failure"), "", text).decode() if text else \
        store.get(store_key("failure")).decode()


def watch_peers(rank, world_size, timeout_minutes):
    """A thread that ends this process once another rank failed, saying which failed first. It beats
    this rank's counter and watches the next rank still running: a counter still for half the timeout
    (at most a minute) is that rank's death, recorded as the first failure. A store error is retried."""
    silent_after, state = min(60.0, 30 * timeout_minutes), {"store": None, "last": None, "since": time.monotonic()}

    def beat():
        store = state["store"] = state["store"] or open_store()
        store.add(store_key(f"beat{rank}"), 1)
        neighbour = (rank + 1) % world_size
        while neighbour != rank and store.check([store_key(f"done{neighbour}")]):
            neighbour = (neighbour + 1) % world_size  # finished: the one after it
        beats = (neighbour, store.add(store_key(f"beat{neighbour}"), 0))
        if beats != state["last"]:
            state["last"], state["since"] = beats, time.monotonic()
        elif neighbour != rank and time.monotonic() - state["since"] > silent_after:
            first_failure(store, f"rank {neighbour} stopped first: silent for {silent_after:.0f} s (killed, "
                                 "or crashed outside Python)")
        if store.check([store_key("failure")]) and not REPORTING.is_set():  # else this rank's main thread says it
            print(f"error: rank {rank} stops: {first_failure(store)}", file=sys.stderr, flush=True)
            time.sleep(2.5 * BEAT)  # the failed rank ends first
            os._exit(1)

    def watch():
        while not STOPPED.wait(BEAT):
            try:
                beat()
            except Exception:
                state["store"] = None  # connect again at the next beat
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def report_failure(error, rank, world_size):
    """This rank failed: record the first failure (this error, or the ranks that went silent just before
    it: a collective fails when a peer dies), say it, and give the other ranks' watchers time to see it."""
    REPORTING.set()

    def report():
        store = open_store()
        text = f"rank {rank} failed first: {type(error).__name__} {(str(error).splitlines() or [''])[0][:300]}"
        if not store.check([store_key("failure")]):
            beats = [store.add(store_key(f"beat{r}"), 0) for r in range(world_size)]
            time.sleep(2.5 * BEAT)  # a live rank beats meanwhile; one that died does not
            silent = [r for r in range(world_size) if r != rank and store.add(store_key(f"beat{r}"), 0) == beats[r]
                      and not store.check([store_key(f"done{r}")])]
            if silent:
                text = f"rank {', '.join(map(str, silent))} stopped first: silent (killed, or crashed outside Python)"
        print(f"error: rank {rank} stops: {first_failure(store, text)}", file=sys.stderr, flush=True)
        time.sleep(1.5 * BEAT)
    quietly(report)


# Flags of TRL's and transformers' trainers that users bring along, and this project's names for them
FOREIGN_FLAGS = {"--learning-rate": "--lr", "--gradient-accumulation-steps": "--grad-accum",
                 "--per-device-train-batch-size": "--micro-batch", "--model-name-or-path": "--model",
                 "--max-seq-length": "--max-length", "--gradient-checkpointing": "--grad-checkpointing",
                 "--dataset-name": "--data", "--save-steps": "--save-every", "--resume-from-checkpoint": "--resume"}


def config_from_cli(cls, argv=None):
    """A config dataclass from the command line; --help from its fields' help (HfArgumentParser). An unknown
    flag or a bad value is a UsageError naming it (and the flag meant, where one is close)."""
    import difflib
    from transformers import HfArgumentParser
    parser = HfArgumentParser(cls, description=cls.__doc__)

    def error(message):
        raise UsageError(message)
    parser.error = error
    cfg, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        flag = next((a for a in rest if a.startswith("-")), rest[0]).split("=")[0]
        known = [name for action in parser._actions for name in action.option_strings if "_" not in name]
        close = difflib.get_close_matches(flag.replace("_", "-"), known, 1, 0.75)
        meant = FOREIGN_FLAGS.get(flag.replace("_", "-")) or (close[0] if close else None)
        raise UsageError(f"unknown flag {flag}" + (f"; did you mean {meant}?" if meant else "; see --help")
                         if flag.startswith("-") else f"unexpected argument {flag!r}; see --help")
    return cfg


# ----------------------------------------------------------------------------- chat formatting

CONTEXT_CHARS = 256


def encode_after(tokenizer, before, text, as_text=False):
    """Token ids of `text` as the tokenizer cuts it when it FOLLOWS `before` in one string (a SentencePiece
    tokenizer starts every string with a dummy '▁': 'The' after '<|assistant|>\\n' would become '▁The',
    the model wrote 'The'). as_text: special tokens' literals in it are text, not their ids."""
    def encode(s, **kwargs):
        return tokenizer(s, add_special_tokens=False, split_special_tokens=as_text, **kwargs)
    if not before:
        return encode(text)["input_ids"]
    anchor = before[-CONTEXT_CHARS:]
    head, both = encode(anchor)["input_ids"], encode(anchor + text)["input_ids"]
    if both[:len(head)] == head:
        return both[len(head):]
    # The context's last token changes when text follows (GPT-2's pre-tokenizer cuts '\n\n' before a
    # word as '\n' + '\n'). The prompt's tokens are what the model saw, so keep them and take the
    # tokens that start inside text; one that straddles the border cannot be split.
    enc = encode(anchor + text, return_offsets_mapping=True)
    starts = [a for a, _ in enc["offset_mapping"]]
    ends = [b for _, b in enc["offset_mapping"]]
    if any(a < len(anchor) < b for a, b in zip(starts, ends)):
        raise UsageError(f"the tokenizer merges the text before {text[:20]!r} with it into one token; "
                         "format_dialogue cannot split such a template turn by turn")
    return [t for t, a in zip(enc["input_ids"], starts) if a >= len(anchor)]


def special_tokens(tokenizer):
    """{text: id} of the tokenizer's special tokens: bos/eos/pad and the added ones marked special,
    which include end-of-turn markers such as <|im_end|> or <|eot_id|>."""
    added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
             if getattr(t, "special", False)}
    return {**dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)), **added}


def split_answer(segment, answer, specials):
    """Cut the rendered assistant turn (' The answer</s>' in Mistral's template, 'The answer<|im_end|>\\n' in
    ChatML) into the answer span (leading whitespace, the answer, up to the last special token after it:
    the model must learn to stop) and the rest (ChatML's newline: context the model never writes)."""
    core = answer.strip()
    head = segment[:len(segment) - len(segment.lstrip())]
    if not segment[len(head):].startswith(core):
        raise UsageError("the chat template alters the assistant text (it renders "
                         f"{segment[:60]!r} for the answer {answer[:40]!r}); cannot locate the answer tokens")
    tail = segment[len(head) + len(core):]
    cut = max((tail.rfind(s) + len(s) for s in specials if s and s in tail), default=len(tail))
    return segment[:len(head) + len(core) + cut], tail[cut:]


def format_dialogue(tokenizer, context, turns, answer_key=None):
    """THE chat formatting of a long or short sequence: data generation, reference and training.
    context: the document (long) or one chunk (short); turns: dicts with "instruction" and the answer
    turns[i][answer_key]; the first user message is context, a blank line, instruction (Eq. 13: the
    document once). Returns (input_ids, is_answer); with answer_key=None the ids end with the generation
    prompt of the one turn. Any template that renders turn by turn works (Mistral, Llama-2/3, ChatML,
    Zephyr, Gemma): each generation prompt is a prefix of the dialogue, the answer span follows it
    (split_answer); every piece is tokenized as the continuation of the text before it (encode_after).
    Content is text: a special token's literal text in it (a paper quoting "<|im_end|>") stays text."""
    if answer_key is None and len(turns) != 1:
        raise ValueError("format_dialogue: a generation prompt takes exactly one turn")
    specials = special_tokens(tokenizer)
    literals = sorted((s for s in specials if s), key=len, reverse=True)
    contents = [context] + [t[key] for t in turns for key in ("instruction", answer_key) if key]
    mark = next(c for c in map(chr, range(0xE000, 0xF900)) if all(c not in text for text in contents))

    def hide(text):  # each special's literal in the content, its first character marked: no special
        for lit in literals:
            text = text.replace(lit, mark + lit[1:])
        return text
    turns = [{**t, **{key: hide(t[key]) for key in ("instruction", answer_key) if key}} for t in turns]
    ids, is_answer, before = [], [], ""
    for text, answer in render_pieces(tokenizer, hide(context), turns, answer_key, specials):
        for start, end, literal in text_runs(text, mark, literals):  # a hidden literal: text, as after a word
            piece = encode_after(tokenizer, "x", literal, True) if literal else \
                encode_after(tokenizer, before, text[start:end])
            ids += piece
            is_answer += [answer] * len(piece)
            before = (before + text[start:end])[-CONTEXT_CHARS:]
    return ids, is_answer


def render_pieces(tokenizer, context, turns, answer_key, specials):
    """The rendered dialogue as [(text, is_answer)], concatenating to the whole: the prompts (template
    markers, the user messages) and the answer spans."""
    messages, pieces, done, rest = [], [], "", ""
    for i, turn in enumerate(turns):
        text = f"{context}\n\n{turn['instruction']}" if i == 0 else turn["instruction"]
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise UsageError("the chat template does not render turn by turn as a prefix of the "
                             "whole dialogue; format_dialogue needs such a template")
        pieces.append((rest + prompt[len(done):], False))  # rest: the end of the previous turn
        done = prompt
        if answer_key is None:
            break
        messages.append({"role": "assistant", "content": turn[answer_key]})
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise UsageError("the chat template renders the dialogue differently from its generation "
                             "prompt; cannot locate the answer tokens")
        span, rest = split_answer(full[len(prompt):], turn[answer_key], specials)
        pieces.append((span, True))
        done = full
    return pieces + [(rest, False)]


def text_runs(text, mark, literals):
    """[(start, end, literal)] covering text: each special's literal hidden in the content (its first
    character replaced by mark), and the text between them (literal None)."""
    runs, start, p = [], 0, text.find(mark)
    while p != -1:
        literal = next(lit for lit in literals if text.startswith(lit[1:], p + 1))
        runs += [(start, p, None), (p, p + len(literal), literal)]
        start = p + len(literal)
        p = text.find(mark, start)
    return [run for run in runs + [(start, len(text), None)] if run[1] > run[0]]  # no empty run


def shifted_targets(ids, weights):
    """Next-token targets: position t predicts ids[t+1], with the weight (or bool mark) of ids[t+1]."""
    ids_t = torch.tensor(ids)
    return torch.cat([ids_t[1:], ids_t.new_tensor([0])]), torch.tensor(list(weights[1:]) + [False])


# ----------------------------------------------------------------------------- records

REQUIRED_TURN_FIELDS = ("instruction", "chunk", "chosen", "rejected")


def validate_record(rec, where, need_ref):
    """Raise UsageError naming the line and field when a record breaks the format (README)."""
    def bad(field_, problem):
        raise UsageError(f"{where}: field '{field_}' {problem}")
    if not isinstance(rec, dict):
        bad("<record>", "must be a JSON object")
    if not isinstance(rec.get("document"), str) or not rec["document"]:
        bad("document", "is missing or not a non-empty string")
    if not isinstance(rec.get("turns"), list) or not rec["turns"]:
        bad("turns", "is missing or empty: a record needs at least one turn")
    for i, turn in enumerate(rec["turns"]):
        if not isinstance(turn, dict):
            bad(f"turns[{i}]", f"= {turn!r} must be an object with {', '.join(REQUIRED_TURN_FIELDS)}")
        for name in REQUIRED_TURN_FIELDS:
            if name not in turn:
                bad(f"turns[{i}].{name}", "is missing")
        span = turn["chunk"]
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                and 0 <= span[0] < span[1] <= len(rec["document"])):
            bad(f"turns[{i}].chunk", f"= {span} is not a character span [start, end) inside the "
                f"document of {len(rec['document'])} characters")
        for name in ("instruction", "chosen", "rejected"):
            if not isinstance(turn[name], str) or not turn[name].strip():
                bad(f"turns[{i}].{name}", "must be a non-empty string")
    for name in ("ref_chosen_logp", "ref_rejected_logp"):
        if name in rec and not (type(rec[name]) in (int, float) and math.isfinite(rec[name])):  # bool is no number
            bad(name, f"= {rec[name]!r} is not a finite number")
        if need_ref and name not in rec:
            bad(name, "is missing: data_gen.py writes it (longpo.py computes missing ones up front)")


class Records:
    """A preference JSONL validated once, then read one record at a time (45K records of 128K tokens
    are ~20 GB of text); several files, comma-separated, are one set. refs[i]: (ref_chosen_logp,
    ref_rejected_logp), None where the file has none."""

    def __init__(self, path, need_ref=False):
        self.paths, self.offsets, self.refs = data_files(path), [], []  # offsets: (file index, byte offset)
        for index, name in enumerate(self.paths):
            if not self.index_file(index, name, need_ref):
                raise UsageError(f"--data {name} holds no records")

    def index_file(self, index, name, need_ref):
        """Validate one file's records and note where each starts; returns how many it holds."""
        before, offset = len(self.offsets), 0
        with open(name, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError as e:  # bad JSON or bad UTF-8
                        raise UsageError(f"{name}:{lineno}: not valid JSON ({e})") from None
                    validate_record(rec, f"{name}:{lineno}", need_ref)
                    self.offsets.append((index, offset))
                    self.refs.append((rec.get("ref_chosen_logp"), rec.get("ref_rejected_logp")))
                offset += len(line)
        return len(self.offsets) - before

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        index, offset = self.offsets[i]
        with open(self.paths[index], "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def select(self, indices):
        """The records at these indices, in this order."""
        subset = copy.copy(self)
        subset.offsets, subset.refs = [self.offsets[i] for i in indices], [self.refs[i] for i in indices]
        return subset


def data_files(path):
    """The files of --data: one path, or several comma-separated; each must be a file."""
    names = path.split(",")
    for name in names:
        if not name:
            raise UsageError(f"--data {path}: an empty name in the comma-separated list")
        if not os.path.isfile(name):
            why = "is a folder; give the preference JSONL file" if os.path.isdir(name) else \
                f"does not exist; create it first with: python data_gen.py --out {name or 'FILE'}"
            raise UsageError(f"--data {name} {why}")
    return names


# ----------------------------------------------------------------------------- loading models; the tiny preset

def set_rope_theta(config, theta):
    """RoPE theta lives in config.rope_parameters (transformers 5.x) or config.rope_theta (4.x)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = float(theta)
    else:
        config.rope_theta = float(theta)


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}")


PRESET_SPECIALS = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]"]


def tiny_tokenizer(core=None):
    """The built-in models' byte-level tokenizer: specials pad 0, bos 1, eos 2, [INST], [/INST] and a
    Mistral-style chat template; core: a trained BPE (data_gen's miniature) or the 256 bytes (tiny)."""
    if core is None:
        vocab = {tok: i for i, tok in enumerate(PRESET_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["[INST]", "[/INST]"])
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size, hidden=64, intermediate=128, layers=2, kv_heads=2):
    """A built-in Mistral: full attention, 4 query heads, RoPE theta 1e4, the presets' special ids."""
    return MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=1 << 20, sliding_window=None, rope_theta=1e4,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


# name: (tokenizer, config of a vocabulary size); random weights from a FIXED seed: data_gen, longpo
# and eval all see the same model, offline
PRESETS = {"tiny": (tiny_tokenizer, tiny_config)}


def check_model(name, flag="--model"):
    """Fail at once, in one line, on a model that cannot load: a missing folder, a training checkpoint,
    a folder without config.json, or a hub id neither cached nor on the hub (asked with a timeout)."""
    if name in PRESETS:
        return
    if os.path.isdir(name):
        if any(os.path.exists(os.path.join(name, f)) for f in ("trainer_state.json", ".metadata")):
            raise UsageError(f"{flag} {name} is a training checkpoint (sharded weights and optimiser state), not a "
                             "model: give the run's final/ folder, or continue training it with --resume")
        if not os.path.exists(os.path.join(name, "config.json")):
            raise UsageError(f"{flag} {name} holds no config.json: not a model folder (save_pretrained writes one, "
                             "e.g. a run's final/)")
        return
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", name) or os.path.isdir(name.split("/")[0]):
        raise UsageError(f"{flag} {name}: no such folder (nor a hub id of the form org/name); a training run "
                         "writes its model to <--output-dir>/final when it finishes")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    try:
        HfApi().model_info(name, timeout=8)
    except GatedRepoError:
        return  # exists; loading says how to get access
    except RepositoryNotFoundError:
        raise UsageError(f"{flag} {name}: no such local folder, nor a model on the hub (check the spelling)") from None
    except Exception as e:  # no network, proxy, timeout
        raise UsageError(f"{flag} {name}: no such local folder, not in the local hub cache, and the hub cannot be "
                         f"reached ({type(e).__name__}); download it first or give a local folder") from None


def load_tokenizer(name):
    if name in PRESETS:
        return PRESETS[name][0]()
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:  # Mistral's and Llama's have none; pads are never a target: eos serves
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model_and_tokenizer(name, dtype=torch.float32, rope_theta=0.0):
    return load_model(name, dtype, rope_theta), load_tokenizer(name)


def load_model(name, dtype=torch.float32, rope_theta=0.0):
    """A preset (PRESETS), a hub id or a local directory, in dtype ("auto": the checkpoint's own);
    rope_theta > 0 replaces the model's RoPE theta (the policy's only)."""
    config = model_config(name, rope_theta)
    if name not in PRESETS:
        return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, attn_implementation="sdpa")
    model = seeded_model(config)
    return model if dtype == "auto" else model.to(dtype)


def model_config(name, rope_theta=0.0):
    """The config LongPO runs a model with: full attention (Mistral v0.2 has no sliding window either),
    and RoPE theta rope_theta if > 0."""
    config = load_config(name)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    if rope_theta:
        set_rope_theta(config, rope_theta)
    return config


def seeded_model(config):
    """A preset's random weights: from a fixed seed, the same in every script; the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def load_config(name):
    """A model's config, no weights loaded: a preset's, or a hub id's or local directory's."""
    return PRESETS[name][1](len(load_tokenizer(name))) if name in PRESETS else AutoConfig.from_pretrained(name)


# ----------------------------------------------------------------------------- memory plan

def memory_plan(cfg):
    """The per-GPU memory of train()'s strategy for --model at --max-length on --world-size GPUs: the plan's
    rows, and beside them the same step traced on fake tensors (trace_step) where PyTorch's tools import."""
    c = load_config(cfg.model)
    if cfg.world_size % (cfg.sp_size or cfg.world_size):
        raise UsageError(f"--sp-size {cfg.sp_size} must divide --world-size {cfg.world_size}")
    lines, rows = plan_rows(c, cfg)
    return plan_report(lines, rows, cfg.gpu_gib, traced_peak(c, cfg))


def plan_rows(c, cfg):
    """(header lines, rows (category, what, bytes)): FSDP full sharding, bf16 compute, fp32 masters, grads
    and AdamW, every decoder layer checkpointed, ring attention over sp GPUs, chunked log-softmax; chosen and
    rejected packed after one copy of the document (one graph of max_length tokens) or in turn."""
    H, n_layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or H // hq
    layer = H * (hq + 2 * hkv) * d + hq * d * H + 3 * H * inter + 2 * H  # q, k, v, o, MLP, 2 norms
    root = vocab * H * (1 if c.tie_word_embeddings else 2) + H
    params = n_layers * layer + root
    W, sp = cfg.world_size, cfg.sp_size or cfg.world_size
    packed = cfg.pack == "shared-prefix"
    T = -(-cfg.max_length // sp)  # one graph's tokens per GPU: the packed pair, or one sequence
    bf16, fp32, chunk = 2, 4, cfg.logprob_chunk
    rows = [("params", "fp32 master weights, sharded over all GPUs", fp32 * params / W),
            ("grads", "fp32 gradients, sharded (accumulated over the micro-steps)", fp32 * params / W),
            ("optimizer", "AdamW m and v (fp32), sharded", 2 * fp32 * params / W),
            ("card", "FSDP: the previous layer's reduce-scatter in flight on its own stream [estimate, not traced]",
             layer * fp32)]
    # The rest peaks at one of two moments: the backward of the top decoder layer (recomputed: long
    # sequences) or of the log-prob head (a large vocabulary over short ones). The ring's buffers come
    # and go under the first.
    in_layer = [
        ("params", "bf16 weights gathered: the root (embedding, head) and 2 decoder layers (current + prefetch)",
         (root + 2 * layer) * bf16),
        ("grads", "FSDP reduce-scatter: one layer's unsharded gradients in fp32", layer * fp32),
        ("activations", f"activation checkpoints: the {n_layers - 1} layer inputs below, {T} tokens x {H}",
         (n_layers - 1) * T * H * bf16),
        ("temporaries", "the layer recomputed, in its MLP's backward: gate, up, silu, product, 2 grads (6 x I)",
         T * 6 * inter * bf16),
        ("temporaries", "  + its attention half saved: 2 norms' fp32 input and bf16 output, q, out, o_proj input",
         T * (2 * H * (fp32 + bf16) + 3 * hq * d * bf16)),
        ("temporaries", "  + k, v saved, and 3 gradients of the hidden state in flight",
         T * (2 * hkv * d + 3 * H) * bf16)]
    in_head = [
        ("params", "bf16 weights gathered: the root (embedding, head)", root * bf16),
        ("activations", f"activation checkpoints: {n_layers} layer inputs x {T} tokens x {H}", n_layers * T * H * bf16),
        ("activations", "final norm's input, fp32 upcast and output; its labelled rows gathered",
         T * H * (3 * bf16 + fp32)),
        ("activations", "the output head in fp32", vocab * H * fp32),
        ("temporaries", f"log-probs: {chunk} x {vocab} fp32 logits, log-softmax and their grad; the fp32 head's "
         "grad; grad of the final hidden state", 3 * chunk * vocab * fp32 + vocab * H * fp32 + T * H * fp32)]
    size = lambda phase: sum(b for _, _, b in phase)  # noqa: E731
    peak, other = (in_layer, in_head) if size(in_layer) >= size(in_head) else (in_head, in_layer)
    rows += peak
    branch = f" ({cfg.plan_branch_tokens} of them the rejected branch)" if packed else ""
    lines = [f"memory plan: {cfg.model} ({params / 1e9:.2f}B parameters, {n_layers} layers, hidden {H}, "
             f"MLP {inter}, {hq}/{hkv} heads of {d}, vocab {vocab})",
             f"sequence {cfg.max_length} tokens{branch} on {W} GPUs: dp {W // sp} x sp {sp}, {T} tokens per GPU",
             "strategy: FSDP full sharding, bf16 compute, checkpoint every layer, chosen and rejected "
             + ("packed after one copy of the document (--pack shared-prefix)" if packed else "in turn (--pack pairs)")]
    if not packed:
        lines.append(f"(chosen and rejected graphs at once would add {n_layers * T * H * bf16 / 2**30:.2f} GiB)")
    lines.append(f"peak in the backward of the {'top layer' if peak is in_layer else 'log-prob head'} (that of the "
                 f"{'head' if peak is in_layer else 'top layer'} needs {size(other) / 2**30:.2f} GiB to this "
                 f"{size(peak) / 2**30:.2f} GiB beside the weights, grads and AdamW states):")
    return lines, rows


# What the plans do not model, as rows of their own: estimates for an H100 or H200 (CUDA 12-13, NCCL 2.2x),
# and headroom for the allocator (expandable segments, set by init_distributed, keep fragmentation low).
CARD_ROWS = [("card", "CUDA context and kernel workspaces (cuBLAS, cuDNN) [estimate, not traced]", 1.0 * 2**30),
             ("card", "NCCL buffers of the process groups [estimate, not traced]", 1.5 * 2**30)]
HEADROOM = 0.05


def plan_report(lines, rows, gpu_gib=0.0, traced=None):
    """A memory plan's lines: its rows in GiB, then the card's own rows, and the verdict against the card's
    usable memory (gpu_gib; 0: this machine's card, else 79.1 GiB, an 80 GB card's); traced: the traced
    step's peak by category (bytes), printed beside the plan's."""
    usable = gpu_gib or (torch.cuda.mem_get_info()[1] / 2**30 if torch.cuda.is_available() else 79.1)
    rows = [row for row in rows if row[2]] + CARD_ROWS
    rows.append(("card", f"headroom for fragmentation: {HEADROOM:.0%} of the card", HEADROOM * usable * 2**30))
    peak = sum(b for _, _, b in rows) / 2**30
    verdict = ("fits" if peak <= usable else "NEAR THE LIMIT: fits only without the headroom" if
               peak - rows[-1][2] / 2**30 <= usable else "DOES NOT FIT")
    out = lines + [f"  {b / 2**30:8.2f} GiB  {name}" for _, name, b in rows]
    if traced:
        planned = plan_categories(rows)
        out.append("traced on fake tensors by PyTorch's memory tracker, GiB (the plan's in brackets): " + ", ".join(
            f"{name} {traced[name] / 2**30:.2f} ({planned.get(name, 0) / 2**30:.2f})" for name in traced)
            + f"; with the card's rows: {(sum(traced.values()) + planned['card']) / 2**30:.2f} GiB")
    return "\n".join(out + [f"peak per GPU: {peak:.2f} GiB of {usable:.1f} GiB usable: {verdict}"])


def plan_categories(rows):
    totals = {}
    for category, _, b in rows:
        totals[category] = totals.get(category, 0) + b
    return totals


# The tracker's kinds of memory, in the plan's categories
TRACED = {"params": ("Sharded Param", "Unsharded Param", "All Gather", "Buffer"),
          "grads": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter"), "optimizer": ("OptState",),
          "activations": ("Activation",), "temporaries": ("Temp", "Inputs")}


def traced_peak(c, cfg, layers=(3, 4)):
    """The peak of trace_step by category (bytes) for c's depth, from traces of `layers` decoder layers
    (from 3 on, memory grows linearly with the depth: 32 layers take half a minute to trace, 3 and 4 seconds);
    None where PyTorch's private tracing tools do not import, a process group already exists, or for --pack
    pairs (three forwards a micro-step; PyTorch's tracker follows one)."""
    if not can_trace() or cfg.pack == "pairs":  # the tracker follows one forward per micro-step
        return None
    few, more = (trace_step(with_layers(c, n), cfg) for n in layers)
    per_layer = {name: (more[name] - few[name]) / (layers[1] - layers[0]) for name in few}
    return {name: few[name] + per_layer[name] * (c.num_hidden_layers - layers[0]) for name in few}


def can_trace():
    """Whether PyTorch's private tracing tools import, and no process group exists yet (a fake one will)."""
    try:
        import torch.distributed._tools.fsdp2_mem_tracker  # noqa: F401 (its MemTracker too)
        import torch.testing._internal.distributed.fake_pg  # noqa: F401
    except ImportError:
        return False
    return not dist.is_initialized()


@contextlib.contextmanager
def fake_world(c, world_size, sp_size):
    """(par, fake mode) of rank 0 in a fake process group of world_size ranks, to trace model config c's
    step on fake tensors (shapes, no data). The CPU's fused attention stands in for the card's (the same
    out and lse); its probe needs real values, so it runs here, before the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        par = setup_parallel(sp_size, 0, world_size, torch.device("cpu"))
        d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        ring_attention.probe_kernel("cpu", par.device, torch.bfloat16, c.num_attention_heads, c.num_key_value_heads, d)
        yield par, FakeTensorMode(allow_non_fake_inputs=True)
    finally:
        dist.destroy_process_group()


def with_layers(c, n):
    fields = {key: value for key, value in c.to_dict().items() if key != "layer_types"}  # one per layer
    return type(c).from_dict({**fields, "num_hidden_layers": n})


def plan_example(cfg):
    """A pair of the plan's shape: chosen and rejected answers of --plan-branch-tokens after one prompt,
    the packed pair --max-length tokens (--pack pairs: each sequence)."""
    branch = cfg.plan_branch_tokens
    prompt = cfg.max_length - branch if cfg.pack == "pairs" else cfg.max_length - 2 * branch + 1
    is_answer = [False] * prompt + [True] * branch
    return {"chosen": {"ids": [1] * prompt + [2] * branch, "is_answer": is_answer},
            "rejected": {"ids": [1] * prompt + [3] * branch, "is_answer": is_answer}}


def trace_step(c, cfg):
    """Rank 0's peak memory by category (bytes) in a LongPO step of model config c at cfg's length, world and
    SP size: this file's micro_step and AdamW, run on fake tensors (shapes, no data) in a fake process group
    of --world-size ranks, FSDP's and autograd's memory recorded by PyTorch's FSDPMemTracker. A micro-step
    after the first of an accumulation (the gradients exist), AdamW's states made: the steady state's peak.
    Kernels' workspaces are not seen (the plan's card rows)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    cfg = dataclasses.replace(cfg, loss="longpo", grad_accum=2)
    with fake_world(c, cfg.world_size, cfg.sp_size) as (par, fake):
        _ = par.mesh  # FSDP's mesh, made on real tensors
        sequences = step_inputs([plan_example(cfg)], cfg, par, pad_id=0)  # on the host, as training makes them
        with fake:
            model = AutoModelForCausalLM.from_config(c, dtype=torch.float32, attn_implementation="sdpa")
            model = setup_model(model, par, torch.bfloat16, cfg.grad_checkpointing)
            optimizer = torch.optim.AdamW(model.parameters())
            for p in model.parameters():  # gradients accumulated by an earlier micro-step
                p.grad = torch.zeros_like(p)
            tracker = FSDPMemTracker(model, optimizer)
            with tracker:
                optimizer.step()  # AdamW's states, as from the first step on
                micro_step(model, None, sequences, (0.0, 0.0), cfg, par)
            peak = tracker.get_tracker_snapshot("peak")[par.device]
    return {name: sum(peak.get(kind, 0) for kind in kinds) for name, kinds in TRACED.items()}


if __name__ == "__main__":
    run_cli(main, TrainConfig)
