"""LongPO: short-to-long preference optimisation (Chen et al., ICLR 2025), trained sequence-parallel.

A short-context model pi_S (e.g. Mistral-7B-Instruct-v0.2, 32K) answers an instruction I about a long
document twice: seeing only the chunk it was written from (x_S: chosen y_S) and seeing it all (x_L:
rejected y_L; data_gen.py). The policy, initialised from pi_S, learns on the LONG input to prefer y_S,
against pi_S on the SHORT input as reference: no human labels, short-context skill kept.
  * Eq. 12, longpo_loss: -log sigmoid(r(x_L, y_S) - r(x_L, y_L)), r(x_L, y) = beta log pi(y|x_L)/pi_S(y|x_S).
  * Eq. 13, build_example and short_reference_logps: up to 4 turns of a document are one sample, the
    document once, then I_1 y_1 I_2 y_2 ... (format_dialogue and its answer mask); the reference scores
    each turn on its own chunk.
  * Eq. 14, nll_weights and total_loss: L = lam * L_LongPO + L_NLL over the chosen long sequence.
Then how it runs at 128K-512K tokens: sequence-parallel log-probs (ring attention, log-softmax in
chunks), chosen and rejected packed after ONE copy of the document, the step, the loop (FSDP2),
checkpoints, main; then the plumbing data_gen.py and eval.py share.

Deviations: Eq. 13 sums log-probs over turns, as the release code does (the paper: the log of a sum of
probabilities); reference log-probs computed once (data_gen.py, or up front here); ring attention at any
SP size instead of Ulysses; one pair per micro-step. Baselines: --loss sft and --loss dpo.

    python longpo.py                                       # tiny random model, CPU, one process
    torchrun --nproc_per_node 2 longpo.py                  # the same, SP = 2 over 2 CPU processes
    torchrun --nproc_per_node 8 longpo.py --model mistralai/Mistral-7B-Instruct-v0.2 \\
        --data data/longpo_128k --sp-size 8 --max-length 131072 --rope-theta 1e7 \\
        --output-dir runs/mistral-128k      # one 8-GPU node (one GPU: --nproc_per_node 1 --sp-size 1)
    python longpo.py --plan 8 --model mistralai/Mistral-7B-Instruct-v0.2 --max-length 524288
"""
import copy
import dataclasses
import datetime
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
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
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, MistralConfig,
                          PreTrainedTokenizerFast)

import ring_attention  # importing it registers the attention implementation "ring_attention"
from ring_attention import zigzag_shard

# FSDP2 warns that the root module returns a view (its one position's logits); we never modify it
# in place, which is the case the warning is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# Shape glossary: B sequences (1 per micro-step; --micro-batch for sft), L whole-sequence tokens
# (padded: a sequence or a packed pair's prefix to a multiple of 2*sp, its branches to one of sp),
# T = L/sp tokens on this rank, H hidden size, V vocabulary, n tokens that carry a label.
LOGPROB_CHUNK = 4096  # tokens per chunk of the log-softmax: never a whole sequence's logits


def arg(default, help, choices=None):
    """A config field with its --help text (and allowed values): the command line comes from the dataclass."""
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


@dataclass
class TrainConfig:
    """LongPO training (Eq. 12-14): the paper's defaults (RoPE theta: the model's), release code's noted."""
    model: str = arg("tiny", "pi_S: hub id, local dir, or 'tiny' (random 2 x 64 Mistral)")
    data: str = arg("data/longpo_tiny", "preference JSONL files or data_gen.py folders, comma-separated")
    output_dir: str = arg("runs/longpo-tiny", "config, metrics, checkpoints, final model")
    ref_model: str = arg("", "pi_S for missing reference log-probs and DPO ('': --model)")
    sp_size: int = arg(0, "sequence-parallel (ring) group size, divides the world")
    loss: str = arg("longpo", "the objective; the paper's baselines: dpo (long-input "
                    "references, with the NLL), sft (the NLL alone)", ("longpo", "dpo", "sft"))
    beta: float = arg(0.1, "reward scale beta (paper 0.1; release code 0.01)")
    lam: float = arg(0.01, "weight lambda of the preference term (paper and code 0.01)")
    nll_target: str = arg("auto", "NLL tokens: sequence (the chosen long sequence), responses (its answers), "
                          "auto (sft: responses)", ("auto", "sequence", "responses"))
    nll_context_weight: float = arg(1.0, "--nll-target sequence: its non-answer tokens' weight (paper 1)")
    lr: float = arg(0.0, "peak learning rate (0: 5e-7, sft 2e-5 as the paper; tiny 1e-4)")
    warmup_ratio: float = arg(0.1, "linear warm-up share of the steps, then cosine to 0")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0: off)")
    max_steps: int = arg(0, "optimiser steps (0: one epoch)")
    grad_accum: int = arg(0, "samples per step per DP group (0: 8, the paper's batch at dp 1; tiny 1)")
    micro_batch: int = arg(1, "--loss sft: samples in one right-padded forward")
    max_length: int = arg(0, "most tokens of a record's pair (prompt once, both answers; padding to 2 x sp "
                          "aside); longer records are skipped")
    rope_theta: float = arg(0.0, "RoPE theta of the POLICY (paper 1e7; 0: the model's)")
    dtype: str = arg("auto", "auto (CUDA: bf16 compute, fp32 masters; CPU: fp32), bfloat16 (that anywhere)",
                     ("auto", "bfloat16", "float32", "float64"))
    grad_checkpointing: bool = arg(True, "recompute each decoder layer in backward")
    seed: int = arg(42, "seed of the data order")
    save_every: int = arg(0, "checkpoint every N steps (0: only the final model)")
    resume: bool = arg(False, "continue the run in --output-dir from its last checkpoint")
    attn_kernel: str = arg("auto", "the ring's block kernel (auto: the fastest that passes its probe)",
                           ("auto", *ring_attention.KERNELS))
    plan: int = arg(0, "print the per-GPU memory plan on this many GPUs and exit (no weights loaded)")


# ---------------------------------------------------------- the objective (Eq. 12-14)

def longpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Eq. 12 for a batch of pairs, all inputs (B,): (losses, chosen_rewards, rejected_rewards). The ref log-
    probs are pi_S's on the SHORT inputs, the policy's on the LONG one (DPO: both long)."""
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
    """The chosen and rejected LONG dialogues of a record: {side: {'ids': [...], 'is_answer': [...]}};
    is_answer marks each answer's tokens up to its end-of-turn token (the model learns to stop)."""
    example = {}
    for side in sides:
        ids, is_answer = format_dialogue(tokenizer, rec["document"], rec["turns"], side)
        example[side] = {"ids": ids, "is_answer": is_answer}
    return example


@torch.no_grad()
def short_reference_logps(ref_model, tokenizer, record):
    """Eq. 13's reference (ref_chosen_logp, ref_rejected_logp): the sum over turns i of log pi_S(y_i | C_S,i,
    I_i), each turn on its own chunk, a whole short input in this process (a sum of logs, as the release code
    and the policy's side; the paper writes the log of a sum of probabilities)."""
    head = ref_model.get_output_embeddings().weight
    head = head.to(torch.promote_types(head.dtype, torch.float32))  # cast once, not per turn (token_logps)

    def logp(turn, side):  # log pi_S(y_i | C_S,i, I_i): the log-probs of the answer's tokens, summed
        ids, is_answer = short_dialogue(tokenizer, record, turn, side)
        targets, is_target = (t.to(ref_model.device) for t in shifted_targets(ids, is_answer))
        hidden = last_hidden_state(ref_model, input_ids=targets.new_tensor([ids]))
        return token_logps(hidden, head, targets[None], is_target.nonzero()[:, 0], LOGPROB_CHUNK).sum().item()
    return tuple(sum(logp(turn, side) for turn in record["turns"]) for side in ("chosen", "rejected"))


def short_dialogue(tokenizer, record, turn, side):
    """x_S of one turn and its answer, [C_S,i; I_i] y_i: (ids, is_answer)."""
    start, end = turn["chunk"]
    return format_dialogue(tokenizer, record["document"][start:end], [turn], side)


def nll_weights(is_answer, cfg):
    """Eq. 14's L_NLL over the chosen LONG sequence S_L: each token's weight. --nll-target sequence (the
    paper's LongPO and DPO): all of S_L, non-answer tokens at --nll-context-weight (paper 1); responses (its
    SFT baseline): the answers only. sequence_logps takes the weighted token mean of -log p."""
    context = 0.0 if cfg.nll_target == "responses" else cfg.nll_context_weight  # auto: resolve_defaults
    return [1.0 if answer else context for answer in is_answer]


def total_loss(pref_losses, nll, lam):
    """Eq. 14: L = lam * L_LongPO + L_NLL, the NLL with weight 1."""
    return lam * pref_losses.mean() + nll


# ---------------------------------------------------------- Eq. 13's tokens: the dialogue, its answer mask

def format_dialogue(tokenizer, context, turns, answer_key=None):
    """THE chat formatting of a long or short sequence (data generation, reference, training): (input_ids,
    is_answer). context: the document or a chunk; turns: dicts with 'instruction' and turn[answer_key]; the
    first user message is context, a blank line, instruction (the document once); answer_key None: the ids end
    with the one turn's generation prompt. render_turns (next) renders the template turn by turn and marks
    the answers (Mistral, Llama, ChatML, Gemma render so); each piece is then tokenized as it continues the
    text before it. Content is text: a special token's literal in a document is no token (hide_literals)."""
    # e.g. the tiny model's template, two turns; is_answer marks each answer and its end-of-turn token:
    #   <s>[INST] {document}\n\n{I_1} [/INST]{y_1}</s>[INST] {I_2} [/INST]{y_2}</s>
    #                                         ^^^^^^^^^^                  ^^^^^^^^^^
    if answer_key is None and len(turns) != 1:
        raise ValueError("format_dialogue: a generation prompt takes exactly one turn")
    keys, specials = [k for k in ("instruction", answer_key) if k], special_tokens(tokenizer)
    hide, show = hide_literals(specials, [context] + [t[k] for t in turns for k in keys])
    turns = [{**t, **{k: hide(t[k]) for k in keys}} for t in turns]
    ids, is_answer, before = [], [], ""
    for text, answer in render_turns(tokenizer, hide(context), turns, answer_key, specials):
        for part, literal in show(text):  # a literal in the content: as text, on its own (after a word, "x")
            piece = encode_after(tokenizer, "x" if literal else before, part, as_text=literal)
            ids += piece
            is_answer += [answer] * len(piece)
            before = (before + part)[-CONTEXT_CHARS:]
    return ids, is_answer


def render_turns(tokenizer, context, turns, answer_key, specials):
    """The rendered dialogue as [(text, is_answer)] that concatenate to it: prompts and answer spans."""
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


def split_answer(segment, answer, specials):
    """The rendered assistant turn cut into the answer span (leading space, the answer, up to the last special
    after it: the model must learn to stop) and the rest (ChatML's newline, never written by the model)."""
    core = answer.strip()
    head = segment[:len(segment) - len(segment.lstrip())]
    if not segment[len(head):].startswith(core):
        raise UsageError("the chat template alters the assistant text (it renders "
                         f"{segment[:60]!r} for the answer {answer[:40]!r}); cannot locate the answer tokens")
    tail = segment[len(head) + len(core):]
    cut = max((tail.rfind(s) + len(s) for s in specials if s and s in tail), default=len(tail))
    return segment[:len(head) + len(core) + cut], tail[cut:]


def shifted_targets(ids, weights):
    """Next-token targets: position t predicts ids[t+1], with the weight or mark of ids[t+1]."""
    ids_t = torch.tensor(ids)
    return torch.cat([ids_t[1:], ids_t.new_tensor([0])]), torch.tensor(list(weights[1:]) + [False])


# ---------------------------------------------------------- sequence-parallel log-probs

def token_logps(hidden, weight, targets, idx, chunk_size):
    """(B, T): log p(targets_t | prefix) at the flat positions idx (n,), 0 elsewhere; hidden (B, T, H), weight
    (V, H) the output embedding. Head and log-softmax in fp32, chunk_size labelled tokens at a time, each
    recomputed in backward: never a whole sequence's logits."""
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


def sp_sum(x, par):
    """THE sequence-parallel gradient, in one place. Forward: the sum of x over the SP group, the same on
    every rank. Backward: sp x the gradient of this rank's own part (ring attention's backward carries the dk,
    dv of the keys it attended to home to their ranks). Every rank backpropagates the same loss through its
    part of the sequence; FSDP then averages the gradients over all dp x sp ranks, so x sp turns the SP
    group's mean into the sum of its parts: the gradient of the whole sequence."""
    if par.sp_size == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total, group=par.sp_group)
    return total + par.sp_size * (x - x.detach())  # the value: total; the gradient: sp x this rank's part


@dataclass
class Sequence:
    """What one forward runs on, this rank's part, (B, T) on the device: ids, GLOBAL positions, targets; the
    chosen and rejected answer marks (Eq. 12-13) and the NLL weights (Eq. 14) it has; labelled (n,), the flat
    positions where any is set; layout, a packed pair's BranchLayout."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    labelled: torch.Tensor
    chosen: torch.Tensor = None
    rejected: torch.Tensor = None
    nll: torch.Tensor = None
    layout: object = None


def prepare_sequence(ids, masks, par, pad_id, pad_to=0):
    """One sequence as its Sequence on this rank (place): padded to a multiple of 2*sp (at least pad_to
    tokens), targets shifted BEFORE sharding (no label crosses a shard border); masks, {name: each token's
    mark or NLL weight}. Padding is never a target."""
    length = len(ids)
    pad = -(-max(length, pad_to) // (2 * par.sp_size)) * 2 * par.sp_size - length
    host = {"input_ids": torch.tensor(ids + [pad_id] * pad), "position_ids": torch.arange(length + pad),
            "targets": F.pad(shifted_targets(ids, [False] * length)[0], (0, pad))}
    for name, weights in masks.items():
        host[name] = F.pad(shifted_targets(ids, weights)[1], (0, pad))
    return place(host, par)


def place(host, par, layout=None):
    """This rank's part of a whole sequence's host tensors as a Sequence, (1, T) on the device: their zigzag
    shard, or, for a packed pair (layout), the zigzag shard of its prefix and then this rank's contiguous
    slice of the branch region. labelled is found on the host: no device sync, the log-prob chunks known."""
    n = layout.n_prefix * par.sp_size if layout else len(host["input_ids"])
    nb = layout.n_branch if layout else 0

    def shard(t):  # (L,) -> (1, T)
        branch = t[n + par.sp_rank * nb:n + (par.sp_rank + 1) * nb]
        return torch.cat([zigzag_shard(t[:n].unsqueeze(0), par.sp_rank, par.sp_size), branch.unsqueeze(0)], 1)
    seq = {key: shard(t) for key, t in host.items()}
    labelled = torch.zeros(seq["input_ids"].shape, dtype=torch.bool)
    for name in ("chosen", "rejected", "nll"):
        if name in seq:
            labelled |= seq[name] != 0
    seq["labelled"] = labelled.reshape(-1).nonzero().squeeze(-1)
    return Sequence(**{key: t.to(par.device) for key, t in seq.items()}, layout=layout)


def shared_prefix(example, sp_size):
    """Tokens of a packed pair's shared prefix: the longest multiple of 2*sp of the prompt that leaves its
    last token (which predicts the first answer token) to both branches; 0: too short to share."""
    first = example["chosen"]["is_answer"].index(True)
    return (first - 1) // (2 * sp_size) * 2 * sp_size


# pack_pair and place at sp 2: a prompt p0..p9, chosen answer c0 c1, rejected r0 r1 r2; n = 8 shared tokens
# (a multiple of 2 x sp leaving p9, which predicts each answer's first token, to both branches):
#   whole:      p0 p1 p2 p3 p4 p5 p6 p7 | p8 p9 c0 c1 | p8 p9 r0 r1 r2 | pad
#   positions    0  1  2  3  4  5  6  7 |  8  9 10 11 |  8  9 10 11 12 |  8
#   rank 0:     p0 p1 p6 p7 (zigzag chunks 0 and 3)  + branch tokens 0-4: p8 p9 c0 c1 p8
#   rank 1:     p2 p3 p4 p5 (zigzag chunks 1 and 2)  + branch tokens 5-9: p9 r0 r1 r2 pad
# Targets are shifted on the whole sequence first (p9 -> c0 in one branch, p9 -> r0 in the other).
def pack_pair(example, sp_size, pad_id, nll=None):
    """The chosen and rejected sequences packed to run the document ONCE, unsharded: [prefix | chosen branch |
    rejected branch | padding], the branches continuing the prefix's positions; each keeps its own labels."""
    c, r = example["chosen"], example["rejected"]
    n = shared_prefix(example, sp_size)
    if n == 0:
        raise ValueError(f"a prompt of {c['is_answer'].index(True)} tokens is too short to share over "
                         f"{sp_size} ranks (prepare_data skips such records)")
    chosen_len, rejected_len = len(c["ids"]) - n, len(r["ids"]) - n  # the two branches
    n_branch = -(-(chosen_len + rejected_len) // sp_size)  # branch tokens per rank
    pad = sp_size * n_branch - chosen_len - rejected_len
    t_c, a_c = shifted_targets(c["ids"], c["is_answer"])
    t_r, a_r = shifted_targets(r["ids"], r["is_answer"])
    zeros = lambda k: torch.zeros(k, dtype=torch.bool)  # noqa: E731
    positions = [torch.arange(n + chosen_len), torch.arange(n, n + rejected_len), torch.arange(n, n + pad)]
    packed = {"input_ids": torch.tensor(c["ids"] + r["ids"][n:] + [pad_id] * pad),
              "position_ids": torch.cat(positions),
              "targets": torch.cat([t_c, t_r[n:], torch.zeros(pad, dtype=t_c.dtype)]),
              "chosen": torch.cat([a_c, zeros(rejected_len + pad)]),
              "rejected": torch.cat([zeros(n + chosen_len), a_r[n:], zeros(pad)]),  # no answer in the prefix
              "layout": ring_attention.BranchLayout(n // sp_size, (chosen_len, rejected_len, pad), n_branch)}
    if nll is not None:
        packed["nll"] = torch.cat([shifted_targets(c["ids"], nll)[1], torch.zeros(rejected_len + pad)])
    return packed


def prepare_packed(example, par, pad_id, nll=None):
    """This rank's part of the packed pair (pack_pair), the Sequence on the device with its BranchLayout."""
    packed = pack_pair(example, par.sp_size, pad_id, nll)
    return place(packed, par, packed.pop("layout"))


def last_hidden_state(model, **inputs):
    """(B, T, H): the decoder's output after its final norm, caught by a hook. The model runs whole (FSDP2's
    root gathers the embedding), but no other layer's output is kept (output_hidden_states would hold 33 x T
    x H for Mistral-7B) and the head computes one position."""
    caught = []
    hook = model.get_decoder().norm.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[0]


def sequence_logps(model, seq, par, chunk_size=LOGPROB_CHUNK):
    """Log-probs of one (sharded, maybe packed) batch, (B,) summed over the SP group: 'chosen' and 'rejected',
    summed over that mask's positions; 'nll', the weighted token mean of -log p (nll_weights)."""
    ring = {}
    if getattr(model.config, "_attn_implementation", None) == "ring_attention":
        ring = {"ring_group": par.sp_group, "ring_layout": seq.layout, "ring_kernel": par.kernel}
    elif seq.layout is not None or par.sp_size > 1:  # a causal kernel would let one branch see the other
        raise RuntimeError("a packed or sharded sequence needs the model to run ring attention (setup_model)")
    hidden = last_hidden_state(model, input_ids=seq.input_ids, position_ids=seq.position_ids, **ring)
    weight = model.get_output_embeddings().weight  # FSDP2 reshards the root's weights only after backward
    # Every rank must backpropagate through every layer even when no labelled token landed in its
    # shard: other ranks' queries attended to its keys, and ring attention's backward (like FSDP's
    # gradient reduction) is a collective that all ranks of the group enter together.
    anchor = 0.0 * (hidden.sum() + weight.sum())
    logps = token_logps(hidden, weight, seq.targets, seq.labelled, chunk_size) + anchor  # (B, T)
    result = {name: sp_sum((logps * getattr(seq, name)).sum(-1), par)
              for name in ("chosen", "rejected") if getattr(seq, name) is not None}
    if seq.nll is not None:
        # the weights summed in the log-probs' precision (fp64 for an fp64 model, as the tests run it)
        count = sp_sum(seq.nll.to(logps.dtype).sum(-1), par).clamp_min(1e-12)
        result["nll"] = -sp_sum((logps * seq.nll).sum(-1), par) / count
    return result


# ---------------------------------------------------------- the step

def step_inputs(examples, cfg, par, pad_id):
    """One micro-step's Sequence: the packed pair, or sft's --micro-batch chosen sequences."""
    if cfg.loss == "sft":
        return sft_batch(examples, cfg, par, pad_id)
    (example,) = examples
    return prepare_packed(example, par, pad_id, nll_weights(example["chosen"]["is_answer"], cfg))


def micro_step(model, ref_model, seq, refs, cfg, par):
    """Forward and backward of one sample on this SP group: one forward of the packed pair gives log
    pi(y_S|x_L), log pi(y_L|x_L) and the NLL, one backward Eq. 14's exact gradient (sft: its batch's NLL).
    refs: (ref_chosen_logp, ref_rejected_logp) from the data. Returns the metrics as device tensors (no
    sync)."""
    if cfg.loss == "sft":
        logps = sequence_logps(model, seq, par)
        loss = logps["nll"].sum()  # each sequence's own token mean, summed
        metrics = {"loss": loss, "nll": loss, "logps/chosen": logps["chosen"].sum()}
    else:
        if cfg.loss == "dpo":  # DPO's reference: the frozen model on the LONG input, as the policy sees it
            with torch.no_grad():
                ref = sequence_logps(ref_model, dataclasses.replace(seq, nll=None), par)
            ref_c, ref_r = ref["chosen"], ref["rejected"]
        else:  # LongPO's (Eq. 13): pi_S on the SHORT inputs, from the data
            ref_c, ref_r = (torch.tensor([x], dtype=torch.float64, device=par.device) for x in refs)
        logps = sequence_logps(model, seq, par)
        losses, chosen_rewards, rejected_rewards = longpo_loss(
            logps["chosen"], logps["rejected"], ref_c, ref_r, cfg.beta)
        loss = total_loss(losses, logps["nll"], cfg.lam)
        metrics = {"loss": loss, "nll": logps["nll"], "pref_loss": losses.mean(),
                   "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
                   "logps/chosen": logps["chosen"].sum(), "logps/rejected": logps["rejected"].sum()}
    (loss / cfg.grad_accum).backward()  # a step's samples averaged (the SP gradient: sp_sum)
    return {key: value.detach() for key, value in metrics.items()}


def sft_batch(examples, cfg, par, pad_id):
    """sft's chosen sequences right-padded into one batch (B, T): causal, so no token sees the padding, and
    each keeps its own token-mean NLL: the same step as one at a time."""
    longest = max(len(ex["chosen"]["ids"]) for ex in examples)
    rows = [prepare_sequence(ex["chosen"]["ids"], {"chosen": ex["chosen"]["is_answer"],
                                                   "nll": nll_weights(ex["chosen"]["is_answer"], cfg)},
                             par, pad_id, longest) for ex in examples]
    width = rows[0].input_ids.shape[1]  # row b's flat positions follow rows 0..b-1
    cat = lambda key: torch.cat([getattr(row, key) for row in rows])  # noqa: E731
    return Sequence(cat("input_ids"), cat("position_ids"), cat("targets"),
                    torch.cat([row.labelled + b * width for b, row in enumerate(rows)]), chosen=cat("chosen"),
                    nll=cat("nll"))


# ---------------------------------------------------------- the loop

def resolve_dtypes(cfg, device):
    """(master dtype of weights, grads and AdamW states, compute dtype). bf16 is mixed precision: fp32
    masters, since an update of lr 5e-7 is far below bf16's resolution of a weight."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.float32, torch.bfloat16
    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return dtype, dtype


def load_for_training(name, par, dtypes, rope_theta=0.0, grad_checkpointing=True, trainable=True):
    """A model set up on par's world (setup_model), to train or (trainable False) to score. Under FSDP only
    rank 0 reads the weights, in their own dtype; the others build the model on the meta device and the
    sharding hands each its share (Mistral-7B: 14.5 GB of host memory once, not 29 GB on each rank)."""
    master_dtype, compute_dtype = dtypes
    if par.world_size == 1 and master_dtype == compute_dtype:  # nothing to shard or cast: the plain module
        model = load_model(name, master_dtype, rope_theta)
        return setup_model(model, par, compute_dtype, grad_checkpointing, trainable)
    source = load_model(name, "auto", rope_theta) if par.rank == 0 else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(name, rope_theta), dtype=master_dtype,
                                                 attn_implementation="sdpa")
    return setup_model(model, par, compute_dtype, grad_checkpointing, trainable, source)


def setup_model(model, par, compute_dtype, grad_checkpointing, trainable=True, source=None):
    """Ring attention, activation checkpointing and FSDP2 on a model; a meta model takes its weights and
    buffers from source, rank 0's loaded model."""
    meta = next(model.parameters()).is_meta
    model.config.use_cache = False
    # THE swap: every attention layer now runs zigzag ring attention over the SP group (of one at SP 1)
    model.set_attn_implementation("ring_attention")
    if grad_checkpointing and trainable:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if not meta and next(model.parameters()).device != par.device:
        model.to(par.device)
    # FSDP2 shards weights, grads and AdamW states over ALL ranks (dp x sp), AVERAGES the gradients over them
    # (sp_sum's x sp relies on it) and runs mixed precision (bf16 compute of fp32 masters, fp32 reductions),
    # on a group of one too; else the plain module runs.
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)  # as the release code
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    def lr_lambda(step):  # linear warm-up, then cosine to 0 (the release code's schedule)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


@functools.lru_cache(maxsize=2)  # one epoch's order, made once
def epoch_order(n, seed, epoch):
    """The records' order in an epoch: a permutation seeded by (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_samples(step, n, cfg, par):
    """The records this DP group trains at this step: the run's samples are numbered on, step by step,
    grad_accum x dp a step, the DP groups taking every dp-th; sample k is record epoch_order[k % n] of
    epoch k // n."""
    ks = [(step * cfg.grad_accum + m) * par.dp_size + par.dp_rank for m in range(cfg.grad_accum)]
    return [epoch_order(n, cfg.seed, k // n)[k % n] for k in ks]


def train_step(step, model, ref_model, data, cfg, par, optimizer, scheduler, signalled):
    """One optimiser step: grad_accum samples per DP group, clipping, AdamW, the schedule. Its metrics,
    averaged over the world, carry whether any rank got SIGUSR1. A non-finite loss or gradient norm (the same
    on every rank) stops all before the update."""
    records, tokenizer = data
    t0, sums, tokens, mine = time.perf_counter(), {}, 0, []
    samples = step_samples(step, len(records), cfg, par)
    for first in range(0, cfg.grad_accum, cfg.micro_batch):  # micro_batch > 1: sft only (check_config)
        idxs = samples[first:first + cfg.micro_batch]
        examples = [build_example(records[i], tokenizer, trained_sides(cfg)) for i in idxs]
        seq = step_inputs(examples, cfg, par, tokenizer.pad_token_id)
        metrics = micro_step(model, ref_model, seq, records.refs[idxs[0]], cfg, par)  # sft: refs unused
        sums = {key: sums.get(key, 0.0) + value / cfg.grad_accum for key, value in metrics.items()}
        tokens, mine = tokens + sum(map(trained_length, examples)), mine + idxs
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # tokens: the world mean of tokens * dp is the sum over DP groups (their sp ranks hold the same count)
    metrics = world_mean({**sums, "tokens": tokens * par.dp_size, "signalled": float(signalled)}, par)
    if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm.item())):
        names = ", ".join(f"{records[i].get('id', i)!r} of {records.lengths[i]} tokens" for i in mine)
        raise FloatingPointError(
            f"non-finite loss or gradient norm at step {step + 1} (records {names} on rank {par.rank}); "
            f"no update was applied. The last good checkpoint is {last_checkpoint(cfg.output_dir)}: a fused "
            "attention kernel can fail on one record's block shapes, so resume from it with --resume and "
            "another --attn-kernel (sdpa_flash on CUDA, plain on CPU) first; if that fails the same way, "
            "with a lower --lr")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    return {"step": step + 1, **metrics, "grad_norm": grad_norm.item(), "lr": lr,
            "tokens_per_s": metrics["tokens"] / elapsed,
            "tokens_per_s_per_gpu": metrics["tokens"] / elapsed / par.world_size}


def trained_sides(cfg):
    return ("chosen",) if cfg.loss == "sft" else ("chosen", "rejected")


def trained_length(example):
    """Tokens training runs for a record, padding aside: the packed pair (the prompt once, both answer
    branches; data_gen.py --max-length counts this), or sft's chosen sequence."""
    if "rejected" not in example:
        return len(example["chosen"]["ids"])
    first = example["chosen"]["is_answer"].index(True)  # the prompt's last token goes to both branches
    return len(example["chosen"]["ids"]) + len(example["rejected"]["ids"]) - (first - 1)


def prepare_data(records, cfg, par, tokenizer, compute_dtype):
    """The records that fit --max-length and share a prompt over the SP ranks, with their lengths, and
    reference log-probs computed on the SHORT inputs where the file has none (Eq. 13); the same on every
    rank."""
    def measure(i):
        example = build_example(records[i], tokenizer, trained_sides(cfg))
        return trained_length(example), cfg.loss == "sft" or shared_prefix(example, par.sp_size) > 0
    measured = distributed_map(measure, range(len(records)), par, "lengths")
    kept = [i for i, (n, shared) in enumerate(measured) if n <= (cfg.max_length or math.inf) and shared]
    lengths = [n for n, _ in measured]
    short = sum(not shared for _, shared in measured)
    print0(f"--max-length {cfg.max_length or 'none'}: kept {len(kept)} of {len(records)} records; "
           f"{len(records) - len(kept) - short} skipped as longer, {short} with prompts too short to share "
           f"(the trained sequences have {min(lengths)}-{max(lengths)} tokens)")
    if not kept:
        raise UsageError(f"no record of --data {cfg.data} fits --max-length {cfg.max_length}; raise it")
    records = records.select(kept)
    records.lengths = [lengths[i] for i in kept]
    missing = [i for i, ref in enumerate(records.refs) if None in ref]
    if cfg.loss == "longpo" and missing:
        name = cfg.ref_model or cfg.model
        print0(f"{len(missing)} records lack reference log-probs: computing them with {name} (short inputs)")
        ref, ref_tok = load_model(name, compute_dtype), load_tokenizer(name)  # its own RoPE, not --rope-theta
        ref.to(par.device).eval()
        values = distributed_map(lambda i: short_reference_logps(ref, ref_tok, records[i]), missing, par,
                                 "reference log-probs")
        for i, value in zip(missing, values):
            records.refs[i] = value
        del ref
    return records


def open_metrics(cfg, start_step, par):
    """metrics.jsonl for appending; on resume without the lines after the checkpoint (redone)."""
    path, lines = os.path.join(cfg.output_dir, "metrics.jsonl"), []
    if par.rank != 0:
        return None
    if start_step and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= start_step]
    with open(path, "w") as f:
        f.writelines(lines)
    return open(path, "a")


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
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=par.rank != 0,
               desc="train")
    # SIGUSR1 (a scheduler's warning before its time limit, e.g. SLURM's --signal=USR1@1200) asks for a
    # checkpoint at the end of the step in flight; every rank learns of any rank's signal through that
    # step's metrics reduction, so all stop together. SIGTERM keeps its meaning: stop now.
    usr1 = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: usr1.append(signum))
    for step in bar:
        metrics = train_step(step, policy, ref_model, (records, tokenizer), cfg, par, optimizer, scheduler,
                             bool(usr1))
        signalled = metrics.pop("signalled") > 0 and metrics["step"] < total_steps  # on any rank
        if metrics_file:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in metrics.items()))
        if signalled or (cfg.save_every and metrics["step"] % cfg.save_every == 0):
            save_checkpoint(policy, optimizer, scheduler, metrics["step"], cfg, par)
        if signalled:
            print0(f"SIGUSR1: stopped at step {metrics['step']} with a checkpoint; continue with --resume")
            return
    save_final(policy, tokenizer, cfg, par, cfg.max_length or max(records.lengths))
    print0(f"final model: {os.path.join(cfg.output_dir, 'final')}")


# ---------------------------------------------------------- checkpoints and resume

def checkpoint_steps(output_dir):
    """The steps of output_dir's complete checkpoints (trainer_state.json written), ascending."""
    done = glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*", "trainer_state.json"))
    steps = [path.split(os.sep)[-2].removeprefix("checkpoint-") for path in done]
    return sorted(int(step) for step in steps if step.isdigit())  # not a .tmp one


def last_checkpoint(output_dir):
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def save_checkpoint(model, optimizer, scheduler, step, cfg, par):
    """Sharded model and AdamW states (torch.distributed.checkpoint) and the scheduler, written to a .tmp
    folder renamed checkpoint-<step> once complete. No random state: a step draws no random numbers (the data
    order is a function of --seed and the step), so a resumed run repeats the uninterrupted one."""
    path = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = path + ".tmp"
    if par.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(par)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    barrier(par)
    if par.rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "scheduler": scheduler.state_dict()}, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier(par)


def load_checkpoint(path, model, optimizer, scheduler, par):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    scheduler.load_state_dict(trainer_state["scheduler"])
    return trainer_state["step"]


def save_final(model, tokenizer, cfg, par, trained_tokens):
    """The full weights, gathered a tensor at a time in the base model's dtype (Mistral: bf16, 14.5 GB), as a
    model from_pretrained loads; its config carries the trained context and RoPE theta."""
    dtype = load_config(cfg.model).dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # collective: all ranks
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


# What --resume may change: none of them changes what a step computes
NOT_RUN_DEFINING = ("output_dir", "micro_batch", "grad_checkpointing", "save_every", "resume", "attn_kernel",
                    "plan")


def run_identity(cfg, world_size, sp_size, records):
    """The run-defining arguments, the world and sp sizes, and a hash of the data (resuming on other data
    would silently train on it)."""
    defining = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RUN_DEFINING}
    return {**defining, "world_size": world_size, "sp_size": sp_size, "data_sha256": records.sha256}


def check_output_dir(cfg, identity):
    """'fresh', 'resume' or 'finished' (final/ written). A folder holding a run is continued only by --resume
    with the same run-defining arguments (each change named), never overwritten."""
    out, path = cfg.output_dir, os.path.join(cfg.output_dir, "config.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output-dir {out} is a file; give a folder")
    if not os.path.exists(path):
        return "fresh"
    if not cfg.resume:
        raise UsageError(f"--output-dir {out} holds an earlier run; pass --resume to continue it, or choose "
                         "another --output-dir (or delete that one)")
    with open(path) as f:
        before = json.load(f).get("identity", {})
    changed = changed_arguments(before, identity)
    if changed:
        raise UsageError(f"--resume: {out} holds a run with other arguments ({changed}); resume it with "
                         "the same ones, or start a new run in another --output-dir")
    return "finished" if os.path.isdir(os.path.join(out, "final")) else "resume"


def changed_arguments(before, now):
    """'name: X there, Y now' for each argument of now that before (a dict) holds otherwise."""
    return "; ".join(f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in now.items() if before.get(k) != v)


# ---------------------------------------------------------- main

def check_config(cfg):
    """The checks the command line cannot make."""
    weight = cfg.nll_context_weight
    if not 0 <= weight <= 1 or (cfg.nll_target == "responses" and weight != 1):
        raise UsageError(f"--nll-context-weight {weight}: a weight in [0, 1] of the non-answer tokens of "
                         "--nll-target sequence (responses trains the answers only)")
    check_at_least(cfg, ("grad_accum",), 1)
    check_at_least(cfg, ("sp_size", "plan", "lr", "lam", "max_grad_norm", "max_steps", "max_length",
                         "rope_theta", "save_every"), 0, " (0: the default)")
    check_kernel(cfg.attn_kernel)
    if not cfg.beta > 0:
        raise UsageError(f"--beta {cfg.beta} must be > 0 (paper 0.1, release code 0.01)")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise UsageError(f"--warmup-ratio {cfg.warmup_ratio} must be within [0, 1]")
    if cfg.micro_batch < 1 or cfg.grad_accum % cfg.micro_batch:
        raise UsageError(f"--micro-batch {cfg.micro_batch} must be >= 1 and divide --grad-accum "
                         f"{cfg.grad_accum}")
    if cfg.micro_batch > 1 and cfg.loss != "sft":
        raise UsageError(f"--micro-batch {cfg.micro_batch} is for --loss sft; preference pairs run one at a "
                         "time (the packing is per pair): use --micro-batch 1")
    if cfg.plan and cfg.max_length < 1:
        raise UsageError("--plan needs --max-length (tokens of one sequence), e.g. --max-length 524288")
    if not cfg.plan:
        check_sp_size(cfg.sp_size)


def resolve_defaults(cfg):
    """Flags left at 0 take the paper's value (SFT 2e-5, LongPO and DPO 5e-7), or the tiny demo's, so that its
    short run visibly trains; --nll-target auto: sft trains its responses, LongPO and DPO the sequence."""
    tiny, sft = cfg.model == "tiny", cfg.loss == "sft"
    return dataclasses.replace(cfg, lr=cfg.lr or (1e-4 if tiny else 2e-5 if sft else 5e-7),
                               grad_accum=cfg.grad_accum or (1 if tiny else 8),
                               nll_target=cfg.nll_target if cfg.nll_target != "auto" else
                               "responses" if sft else "sequence")


def main(cfg):
    cfg = resolve_defaults(cfg)
    check_config(cfg)
    for flag, name in (("--model", cfg.model), ("--ref-model", cfg.ref_model)):
        if name:
            check_model(name, flag)
            load_config(name)  # a model whose logits this code cannot compute is refused before any work
    if cfg.plan:
        return print(memory_plan(cfg))
    records = Records(cfg.data)  # every rank, before any process group or model: all or none stop here
    world = int(os.environ.get("WORLD_SIZE", 1))
    identity = run_identity(cfg, world, cfg.sp_size or world, records)
    state = check_output_dir(cfg, identity)
    if state == "finished":
        return print0(f"{cfg.output_dir} holds this run, finished (final/ exists): nothing to do")
    rank, world_size, device = init_distributed(group_of_one=True)
    par = setup_parallel(cfg.sp_size, rank, world_size, device, cfg.attn_kernel)
    if rank == 0 and state == "fresh":
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "identity": identity}, f, indent=2)
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    train(cfg, par, records)


# ========================================================== plumbing
# Below: what the method runs on, much of it shared with data_gen.py and eval.py: processes, errors and
# the command line, chat templates, records, model loading and the tiny preset, the memory plan.

# ---------------------------------------------------------- errors; processes and their groups

class UsageError(ValueError):
    """A user's mistake: printed as one line 'error: ...', exit status 2, no traceback."""


def check_at_least(cfg, names, least, hint=""):
    """One line for the first of these fields (flag names) below least, NaN included."""
    for name in names:
        if not getattr(cfg, name) >= least:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= {least}{hint}")


TIMEOUT = datetime.timedelta(minutes=30)  # of every process group: a collective waiting longer fails


def init_distributed(group_of_one=False):
    """(rank, world_size, device) from torchrun's variables (one process without them); nccl on CUDA, gloo on
    CPU; group_of_one: a process group even for one process (FSDP2 needs one). CUDA memory: expandable
    segments unless an allocator config is set."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # before CUDA: less fragmentation
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group(backend, timeout=TIMEOUT)
        elif group_of_one:  # an in-process store: no address or port to agree on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT)
    return rank, world_size, device


def print0(*args, **kwargs):
    if (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0:
        print(*args, **kwargs, flush=True)


@dataclass
class Parallel:
    """world = dp x sp: consecutive ranks form an SP group (one ring) reading one sample; the DP groups read
    different samples. sp_group is LOCAL at sp_size 1; kernel: the ring's block kernel (--attn-kernel)."""
    rank: int
    world_size: int
    sp_size: int
    sp_group: object
    device: torch.device
    kernel: str = "auto"

    def __post_init__(self):
        self.sp_rank = self.rank % self.sp_size  # the place in the ring
        self.dp_rank = self.rank // self.sp_size  # the group, i.e. which samples it reads
        self.dp_size = self.world_size // self.sp_size

    @functools.cached_property
    def mesh(self):  # the world's, which FSDP shards over; made at its first use
        return dist.device_mesh.init_device_mesh(self.device.type, (self.world_size,))


def check_sp_size(sp_size, world=None):
    """--sp-size (0: all) must divide the number of processes: torchrun's, or --plan's GPUs."""
    world = world or int(os.environ.get("WORLD_SIZE", 1))
    if sp_size < 0 or world % (sp_size or world):
        raise UsageError(f"--sp-size {sp_size} must divide the number of processes {world} (torchrun "
                         f"--nproc_per_node x nodes, or --plan's); e.g. --sp-size {world}")


def setup_parallel(sp_size, rank, world_size, device, kernel="auto"):
    """The SP groups of an initialised world (sp_size 0: one ring over all ranks)."""
    sp_size = sp_size or world_size
    # every rank creates every group, in the same order: ranks [g * sp, (g + 1) * sp) form group g
    groups = [dist.new_group(list(range(f, f + sp_size)), timeout=TIMEOUT)
              for f in range(0, world_size, sp_size)] if sp_size > 1 else []
    sp_group = groups[rank // sp_size] if groups else ring_attention.LOCAL
    return Parallel(rank, world_size, sp_size, sp_group, device, kernel)


def barrier(par):
    if par.world_size > 1:
        dist.barrier()


def distributed_map(fn, items, par, desc):
    """[fn(x) for x in items], the items split over all ranks, the results gathered in order."""
    mine = [(i, fn(items[i])) for i in tqdm(range(par.rank, len(items), par.world_size), desc=desc,
                                            disable=par.rank != 0)]
    if par.world_size > 1:
        gathered = [None] * par.world_size
        dist.all_gather_object(gathered, mine)
        mine = [pair for part in gathered for pair in part]
    return [value for _, value in sorted(mine, key=lambda pair: pair[0])]


def world_mean(values, par):
    """The mean of a dict of floats over all ranks (SP replicas agree: the mean over DP)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=par.device)
    if par.world_size > 1:
        dist.all_reduce(t)
        t /= par.world_size
    return dict(zip(values, t.tolist()))


def check_kernel(name):
    """--attn-kernel, checked before any work; a kernel other than auto or cudnn also keeps cuDNN out of
    transformers' sdpa attention (the short reference inputs)."""
    on_cuda = torch.cuda.is_available()
    if (name in ("cudnn", "sdpa_flash", "flash_attn") and not on_cuda) or (name == "cpu" and on_cuda):
        raise UsageError(f"--attn-kernel {name} does not run on this machine ({'no ' * (not on_cuda)}CUDA); "
                         "use auto or plain")
    if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn-kernel flash_attn: flash-attn is not installed "
                         "(pip install 'flash-attn>=2.7' --no-build-isolation)")
    if on_cuda and name not in ("auto", "cudnn"):
        torch.backends.cuda.enable_cudnn_sdp(False)


# ---------------------------------------------------------- the command line; failures

def run_cli(main, cls):
    """main(config from the command line). A UsageError or KernelError is one line on stderr and exit 2; every
    rank checks the same, so rank 0 speaks (the others wait: torchrun stops them). Other errors keep their
    tracebacks; a collective waiting on a lost rank fails after TIMEOUT."""
    try:
        main(config_from_cli(cls))
    except (UsageError, ring_attention.KernelError) as e:
        if int(os.environ.get("RANK", 0)) != 0:
            time.sleep(5)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Flags of TRL's and transformers' trainers that users bring along (and one of ours that went), and
# this project's names for them
FOREIGN_FLAGS = {"--learning-rate": "--lr", "--gradient-accumulation-steps": "--grad-accum",
                 "--per-device-train-batch-size": "--micro-batch", "--model-name-or-path": "--model",
                 "--max-seq-length": "--max-length", "--gradient-checkpointing": "--grad-checkpointing",
                 "--dataset-name": "--data", "--save-steps": "--save-every",
                 "--resume-from-checkpoint": "--resume", "--world-size": "--plan"}


def config_from_cli(cls, argv=None):
    """A config dataclass from the command line (HfArgumentParser); an unknown flag or a bad value is a
    UsageError naming it, and the flag meant where one is close."""
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
        foreign = FOREIGN_FLAGS.get(flag.replace("_", "-"))
        meant = foreign if foreign in known else close[0] if close else None
        raise UsageError(f"unknown flag {flag}" + (f"; did you mean {meant}?" if meant else "; see --help")
                         if flag.startswith("-") else f"unexpected argument {flag!r}; see --help")
    return cfg


# ---------------------------------------------------------- chat templates: content stays text

def hide_literals(specials, contents):
    """(hide, show) for a dialogue's content: hide turns each special token's literal in the content (a paper
    quoting '<|im_end|>') into a private-use character, so that the template renders only its own specials
    as such; show cuts a rendered text into [(text, is_literal)], each literal restored as its own piece."""
    literals = [lit for lit in sorted(filter(None, specials), key=len, reverse=True)
                if any(lit in text for text in contents)]  # those the content holds (usually none)
    free = (c for c in map(chr, range(0xE000, 0xF900)) if all(c not in text for text in contents))
    hidden = {lit: next(free) for lit in literals}
    shown = {c: lit for lit, c in hidden.items()}

    def hide(text):
        for lit, c in hidden.items():
            text = text.replace(lit, c)
        return text

    def show(text):
        parts = re.split(f"([{''.join(shown)}])", text) if shown else [text]
        return [(shown.get(part, part), part in shown) for part in parts if part]
    return hide, show


def special_tokens(tokenizer):
    """{text: id} of the special tokens: bos/eos/pad and added specials such as <|im_end|>."""
    added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
             if getattr(t, "special", False)}
    return {**dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)), **added}


CONTEXT_CHARS = 256  # of the text before a piece, to tokenize it as it continues


def encode_after(tokenizer, before, text, as_text=False):
    """Token ids of text as the tokenizer cuts it when it FOLLOWS before (a SentencePiece tokenizer starts
    every string with '▁': 'The' alone would become '▁The'). as_text: specials' literals are text."""
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


# ---------------------------------------------------------- records

def parse_record(line, where, need_ref):
    """One JSONL line as a record, or a UsageError naming the line and the field at fault."""
    try:
        rec = json.loads(line)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise UsageError(f"{where}: not valid JSON ({e})") from None

    def check(ok, field_, problem):
        if not ok:
            raise UsageError(f"{where}: field '{field_}' {problem}")
    check(isinstance(rec, dict), "<record>", "must be a JSON object")
    doc = rec.get("document")
    check(isinstance(doc, str) and doc, "document", "is missing or not a non-empty string")
    turns = rec.get("turns")
    check(isinstance(turns, list) and turns, "turns", "is missing or empty: a record needs at least one turn")
    for i, turn in enumerate(turns):
        check(isinstance(turn, dict), f"turns[{i}]",
              f"= {turn!r} must be an object with instruction, chunk, chosen, rejected")
        for name in ("instruction", "chosen", "rejected"):
            check(isinstance(turn.get(name), str) and turn[name].strip(), f"turns[{i}].{name}",
                  "is missing or not a non-empty string")
        span = turn.get("chunk")
        check(isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
              and 0 <= span[0] < span[1] <= len(doc), f"turns[{i}].chunk",
              f"= {span} is not a character span [start, end) inside the document of {len(doc)} characters")
    for name in ("ref_chosen_logp", "ref_rejected_logp"):
        value = rec.get(name)
        check(name not in rec or (type(value) in (int, float) and math.isfinite(value)), name,  # not bool
              f"= {value!r} is not a finite number")
        check(name in rec or not need_ref, name,
              "is missing: data_gen.py writes it (longpo.py computes missing ones up front)")
    return rec


class Records:
    """Preference records, validated once, then read one at a time (45K records of 128K tokens are ~20 GB of
    text). --data: JSONL files or data_gen.py folders, comma-separated, one set; a folder's records in
    document order (meta.doc_index), whichever rank wrote them. refs[i]: (ref_chosen_logp, ref_rejected_logp)
    or Nones; lengths[i]: the tokens training runs (prepare_data)."""
    lengths = None

    def __init__(self, path, need_ref=False):
        entries, digest = [], hashlib.sha256()  # (sort key, (file, byte offset), refs) of each record
        for name, folder in data_files(path):
            before, offset = len(entries), 0
            with open(name, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        rec = parse_record(line, f"{name}:{lineno}", need_ref)
                        order = rec.get("meta", {}).get("doc_index", 0) if folder else 0
                        refs = (rec.get("ref_chosen_logp"), rec.get("ref_rejected_logp"))
                        entries.append(((folder or name, order), (name, offset), refs))
                        digest.update(line)
                    offset += len(line)
            if len(entries) == before:
                raise UsageError(f"--data {name} holds no records")
        entries.sort(key=lambda entry: entry[0])  # stable: equal keys keep the files' and lines' order
        self.offsets, self.refs = [e[1] for e in entries], [e[2] for e in entries]
        self.sha256 = digest.hexdigest()  # of the lines as read: --resume refuses other data

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        name, offset = self.offsets[i]
        with open(name, "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def select(self, indices):
        """The records at these indices, in this order."""
        subset = copy.copy(self)
        subset.offsets, subset.refs = [self.offsets[i] for i in indices], [self.refs[i] for i in indices]
        return subset


def data_files(path):
    """[(file, its folder or None)] of --data: JSONL files or folders of them, comma-separated."""
    names = []
    for name in path.split(","):
        if os.path.isdir(name):
            found = sorted(glob.glob(os.path.join(name, "*.jsonl")))
            if not found:
                raise UsageError(f"--data {name}: the folder holds no .jsonl files")
            names += [(file, name) for file in found]
        elif os.path.isfile(name):
            names.append((name, None))
        else:
            raise UsageError(f"--data {name} does not exist; create it first with: python data_gen.py "
                             f"--out {name or 'FOLDER'}")
    return names


# ---------------------------------------------------------- loading models; the tiny preset

def set_rope_theta(config, theta):
    config.rope_parameters["rope_theta"] = float(theta)  # transformers 5 keeps RoPE's settings there


PRESET_SPECIALS = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]"]


def tiny_tokenizer(core=None):
    """The built-in byte-level tokenizer: pad 0, bos 1, eos 2, [INST], [/INST], a Mistral-style chat template;
    core: a trained BPE (test_longpo.py's miniature) or the 256 bytes (tiny)."""
    if core is None:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {tok: i for i, tok in enumerate(PRESET_SPECIALS + alphabet)}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["[INST]", "[/INST]"])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
        "{% endfor %}")
    return tok


def tiny_config(vocab_size, hidden=64, intermediate=128, layers=2, kv_heads=2):
    """A built-in Mistral: full attention, 4 query heads, RoPE theta 1e4, the tokenizer's special ids."""
    return MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=1 << 20, sliding_window=None, rope_theta=1e4,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def check_model(name, flag="--model"):
    """One line, at once, for a model that cannot load: a folder without config.json (a training checkpoint is
    one), or a name that is neither a folder nor a hub id org/name."""
    if name == "tiny" or os.path.exists(os.path.join(name, "config.json")):
        return
    if os.path.isdir(name):
        raise UsageError(f"{flag} {name} holds no config.json: not a model folder (nor is a training "
                         "checkpoint): give a run's final/ folder, or continue the run with --resume")
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", name) or os.path.isdir(name.split("/")[0]):
        raise UsageError(f"{flag} {name}: no such folder (nor a hub id of the form org/name); a training run "
                         "writes its model to <--output-dir>/final when it finishes")


def load_tokenizer(name):
    if name == "tiny":
        return tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:  # Mistral's and Llama's have none; pads are never a target: eos serves
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(name, dtype=torch.float32, rope_theta=0.0):
    """'tiny', a hub id or a local folder, in dtype ('auto': the checkpoint's own); rope_theta > 0 replaces
    RoPE's theta. 'tiny' has random weights from a FIXED seed (the global RNG untouched)."""
    config = load_config(name, rope_theta)
    if name != "tiny":
        return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype,
                                                    attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model if dtype == "auto" else model.to(dtype)


SCALED_LOGITS = ("attn_logit_softcapping", "final_logit_softcapping", "logit_scale")


def load_config(name, rope_theta=0.0):
    """The config a model runs with here, no weights: full attention, RoPE theta rope_theta if > 0."""
    config = tiny_config(len(tiny_tokenizer())) if name == "tiny" else AutoConfig.from_pretrained(name)
    scaled = [k for k in SCALED_LOGITS if getattr(config, k, None)]  # Gemma-2 softcaps, Cohere scales
    if scaled:  # neither ring attention nor token_logps applies them: every log-prob would be silently wrong
        raise UsageError(f"{name}: {scaled[0]} = {getattr(config, scaled[0])}, which this code does not "
                         "apply; use a Llama, Mistral or Qwen model")
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    if rope_theta:
        set_rope_theta(config, rope_theta)
    return config


# ---------------------------------------------------------- memory plan

def memory_plan(cfg):
    """--plan: the per-GPU memory of train()'s strategy for --model at --max-length on --plan GPUs
    (the test suite checks it against this file's step traced on fake tensors)."""
    check_sp_size(cfg.sp_size, cfg.plan)
    return plan_report(*plan_rows(load_config(cfg.model), cfg))


def plan_rows(c, cfg):
    """(header lines, rows (category, what, bytes)) at the step's peak: FSDP full sharding, bf16 compute
    (2 bytes) over fp32 masters, every decoder layer checkpointed, the packed pair over sp GPUs, log-probs
    in chunks. The peak is in the backward of the top decoder layer (long sequences) or of the log-prob
    head (a large vocabulary over short ones)."""
    H, n_layers, inter, V = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or H // hq
    layer = H * (hq + 2 * hkv) * d + hq * d * H + 3 * H * inter + 2 * H  # q k v o, the MLP, 2 norms
    root = V * H * (1 if c.tie_word_embeddings else 2) + H  # embedding, head, final norm
    params, W = n_layers * layer + root, cfg.plan
    sp = cfg.sp_size or W
    T = -(-cfg.max_length // sp)  # tokens per GPU
    rows = [("params", "fp32 master weights, sharded over all GPUs", 4 * params / W),
            ("grads", "fp32 gradients, sharded (accumulated over the micro-steps)", 4 * params / W),
            ("optimizer", "AdamW m and v (fp32), sharded", 8 * params / W),
            ("card", "FSDP: the previous layer's reduce-scatter in flight [estimate, not traced]", 4 * layer)]
    phases = {"the top layer": [
        ("params", "bf16 weights gathered: the root and 2 decoder layers (current + prefetch)",
         2 * (root + 2 * layer)),
        ("grads", "FSDP reduce-scatter: one layer's unsharded gradients in fp32", 4 * layer),
        ("activations", f"checkpoints: the {n_layers - 1} layer inputs below, {T} tokens x {H}",
         2 * (n_layers - 1) * T * H),
        ("temporaries", "the layer recomputed: its MLP's backward, its attention's saved tensors (2 norms "
         "in fp32 and bf16, q, k, v, out), 3 gradients of the hidden state",
         T * (12 * inter + 18 * H + 6 * hq * d + 4 * hkv * d))],
        "the log-prob head": [
        ("params", "bf16 weights gathered: the root (embedding, head)", 2 * root),
        ("activations", f"checkpoints: {n_layers} layer inputs x {T} tokens x {H}; the final norm's "
         "input, fp32 upcast and output; the head in fp32", 2 * n_layers * T * H + 10 * T * H + 4 * V * H),
        ("temporaries", f"log-probs: {LOGPROB_CHUNK} x {V} fp32 logits, log-softmax, their grad; the head's "
         "grad; the final hidden state's grad", 12 * LOGPROB_CHUNK * V + 4 * V * H + 4 * T * H)]}
    size = {where: sum(b for _, _, b in phase) / 2**30 for where, phase in phases.items()}
    peak, other = sorted(phases, key=size.get, reverse=True)
    lines = [f"memory plan: {cfg.model} ({params / 1e9:.2f}B parameters, {n_layers} layers, hidden {H}, "
             f"MLP {inter}, {hq}/{hkv} heads of {d}, vocab {V})",
             f"sequence {cfg.max_length} tokens on {W} GPUs: dp {W // sp} x sp {sp}, {T} tokens per GPU",
             f"peak in the backward of {peak} (that of {other} needs {size[other]:.2f} GiB to its "
             f"{size[peak]:.2f} GiB beside the weights, grads and AdamW):"]
    return lines, rows + phases[peak]


def plan_report(lines, rows):
    """A memory plan's lines: its rows in GiB, what the card itself needs, and the verdict against this
    machine's card (else an 80 GB card's 79.1 GiB)."""
    usable = torch.cuda.mem_get_info()[1] / 2**30 if torch.cuda.is_available() else 79.1
    rows = [row for row in rows if row[2]] + [
        ("card", "CUDA context, cuBLAS and cuDNN workspaces, NCCL buffers [estimate]", 2.5 * 2**30),
        ("card", "headroom for fragmentation: 5% of the card", 0.05 * usable * 2**30)]
    peak = sum(b for _, _, b in rows) / 2**30
    verdict = ("fits" if peak <= usable else "NEAR THE LIMIT: fits only without the headroom" if
               peak - rows[-1][2] / 2**30 <= usable else "DOES NOT FIT")
    out = lines + [f"  {b / 2**30:8.2f} GiB  {name}" for _, name, b in rows]
    return "\n".join(out + [f"peak per GPU: {peak:.2f} GiB of {usable:.1f} GiB usable: {verdict}"])


if __name__ == "__main__":
    run_cli(main, TrainConfig)
