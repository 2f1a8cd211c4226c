"""LongPO: short-to-long preference optimisation (Chen et al., ICLR 2025), trained sequence-parallel.

What this file implements (method.md):
  * Eq. 12: longpo_loss, the DPO-form loss whose reference scores BOTH answers on the SHORT input:
      L_LongPO = -log sigmoid(beta * [(log pi_theta(y_S|x_L) - log pi_S(y_S|x_S))
                                      - (log pi_theta(y_L|x_L) - log pi_S(y_L|x_S))])
  * Eq. 13: multi-turn samples. The long document appears once, then I_1 y_1 I_2 y_2 ...; the policy
    log-prob is the sum over all answer tokens of that sequence, the reference log-prob the sum over
    turns of log pi_S(y_i | C_S,i, I_i) (a sum of log-probs, as the release code does, not the log of
    a sum of probabilities written in the paper: the standard, numerically sane form).
  * Eq. 14: L = lam * L_LongPO + NLL, NLL the token-mean cross entropy over the whole chosen long
    sequence (--nll-target sequence, the paper) or over its answer tokens (responses).
  * Baselines: --loss sft (NLL on chosen answers, long inputs) and --loss dpo (same pairs, reference
    = a frozen --ref-model on the LONG input, also sequence-parallel).
  * format_dialogue: THE chat formatting of long and short sequences, shared with data_gen.py.
  * Sequence parallelism: world = dp x sp; an SP group (consecutive ranks) reads one sample, zigzag-
    shards it and runs the model with ring attention (see `setup_model`); log-probs are computed in
    chunks of tokens, never as full-vocabulary logits of the long sequence.
  * One pass over the document per pair (--pack shared-prefix, the default): chosen and rejected
    share the document and first instruction, so they are packed as [prefix | chosen branch |
    rejected branch]; ring attention lets each branch see the whole prefix and only its own past
    (ring_attention.BranchLayout). One forward gives log pi(y_S|x_L), log pi(y_L|x_L) and the NLL,
    one backward the exact gradient of Eq. 14: about 4 forward-equivalents of the sequence instead
    of 9. --pack pairs keeps the reference path: chosen and rejected never held at once, rejected
    without grad, chosen with grad, rejected with grad (the pair loss gradient is a scalar weight
    times (grad log p_chosen - grad log p_rejected)). --plan prints the memory of either.

Deliberate simplifications: one sample per micro-batch per DP group (the paper's batch of 8 is
grad-accumulation); the reference log-probs are precomputed in the data (data_gen.py) or computed
once up front with --ref-model on the short inputs, not run live; flags left at 0 (lr, grad_accum,
sp_size) take the paper's values, a demo value for the random tiny model, and all ranks for sp.

Commands (after `python data_gen.py`, whose output is the default --data):
    python longpo.py                                             # tiny model, CPU, one process
    torchrun --nproc_per_node 2 longpo.py                        # tiny model, CPU, SP = 2 (all ranks)
    python longpo.py --bench-tokens 16384                        # step time and memory benchmark
    torchrun --nproc_per_node 8 longpo.py --model mistralai/Mistral-7B-Instruct-v0.2 \\
        --data data/longpo_128k.jsonl --sp-size 8 --max-length 131072 --rope-theta 1e7 \\
        --output-dir runs/mistral-128k                            # one 8-GPU node
    python longpo.py --plan --model DIR --max-length 524288 --world-size 8 --sp-size 8
"""
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_attention  # noqa: F401  (registers attn_implementation "ring_attention")
from ring_attention import UsageError, init_distributed, print0, run_cli, zigzag_shard

# FSDP2 warns that the root module returns a view (we read hidden_states[-1]); we never modify it
# in place, which is the case the warning is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# Shape glossary: B sequences (1 per micro-step; --micro-batch for sft), L whole-sequence tokens (padded to a multiple of
# 2*sp), T = L/sp tokens on this rank, H hidden size, V vocabulary, n tokens that carry a label.


@dataclass
class TrainConfig:
    """LongPO training (paper Eq. 12-14). Defaults follow the paper; the release code's values are
    noted in the help."""
    model: str = field(default="tiny", metadata={"help": "hub id, local dir, or a built-in random model: 'tiny' (2 x 64) or 'small' (4 x 128, the miniature's, README)"})
    data: str = field(default="data/longpo_tiny.jsonl", metadata={"help": "preference JSONL (design.md format; data_gen.py writes it); several, comma-separated, are trained on as one shuffled set"})
    output_dir: str = field(default="runs/longpo-tiny", metadata={"help": "config, metrics, checkpoints, final model"})
    ref_model: str = field(default="", metadata={"help": "reference pi_S: computes ref log-probs missing from the data (short inputs) and DPO's long-input reference; default: --model"})
    sp_size: int = field(default=0, metadata={"help": "sequence-parallel group size (ring attention); must divide the world size (0: all ranks)"})
    loss: str = field(default="longpo", metadata={"help": "longpo | dpo | sft"})
    beta: float = field(default=0.1, metadata={"help": "reward scale beta (paper 0.1; release code 0.01)"})
    lam: float = field(default=0.01, metadata={"help": "weight lambda of the preference term (paper and code 0.01)"})
    nll_target: str = field(default="auto", metadata={"help": "what the NLL term trains on: sequence (the whole chosen long sequence: the paper's longpo/dpo) | responses (the chosen answers: the paper's sft baseline) | auto: those defaults | a weight w in [0, 1]: answers weigh 1, every other token of the chosen sequence w (0: responses, 1: sequence; the miniature's base model learns with 0.1)"})
    pack: str = field(default="shared-prefix", metadata={"help": "shared-prefix: chosen and rejected packed after ONE copy of the document, one forward and one backward (about half the compute) | pairs: one sequence after the other (the reference path); longpo and dpo"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (0: the paper's, 5e-7 for longpo/dpo and 2e-5 for its sft baseline; 1e-4 for --model tiny)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up share of the steps, then cosine to 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper 0; the release launch script uses rmsprop)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    max_steps: int = field(default=0, metadata={"help": "optimiser steps (0: one epoch)"})
    grad_accum: int = field(default=0, metadata={"help": "samples per optimiser step per DP group (0: 8 as the paper, 1 for --model tiny)"})
    micro_batch: int = field(default=1, metadata={"help": "--loss sft: run this many of a step's samples in one forward, right-padded (the same result as one at a time, faster on short sequences; must divide --grad-accum)"})
    max_length: int = field(default=0, metadata={"help": "longest long sequence in tokens; longer records are skipped and counted (0: no limit)"})
    rope_theta: float = field(default=0.0, metadata={"help": "RoPE theta of the POLICY (paper 1e7 for Mistral; 0: keep the model's)"})
    dtype: str = field(default="auto", metadata={"help": "auto: on CUDA bf16 compute with fp32 master weights, gradients and AdamW states (FSDP2 mixed precision, one process or many), on CPU fp32 | bfloat16: that mixed precision on any device | float32 | float64 (tests)"})
    grad_checkpointing: bool = field(default=True, metadata={"help": "recompute each decoder layer in backward"})
    logprob_chunk: int = field(default=4096, metadata={"help": "tokens per chunk of the log-softmax"})
    seed: int = field(default=42, metadata={"help": "data order and initialisation seed"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only the final model)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir from its last checkpoint (its run-defining arguments and data must be the same)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run held in --output-dir (its final model, metrics and checkpoints are deleted)"})
    stop_after: int = field(default=0, metadata={"help": "save a checkpoint and stop after N steps of this invocation (time-limited jobs; continue with --resume)"})
    bench_tokens: int = field(default=0, metadata={"help": "benchmark: train on one synthetic pair of about this many tokens; print per-rank step time and peak tracked memory; writes nothing"})
    plan: bool = field(default=False, metadata={"help": "print the per-GPU memory plan and exit (no weights loaded)"})
    world_size: int = field(default=8, metadata={"help": "GPUs assumed by --plan"})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "memory per GPU assumed by --plan"})
    plan_branch_tokens: int = field(default=4608, metadata={"help": "--plan with --pack shared-prefix: tokens the rejected branch adds to the packed sequence (paper: up to 4 answers of 1024 tokens with their instructions)"})


# ----------------------------------------------------------------------------- the objective

def longpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Eq. 12 for a batch of pairs, all inputs (B,): returns (losses, chosen_rewards, rejected_rewards).

    For LongPO the ref log-probs are pi_S on the SHORT input x_S and the policy's on the LONG input
    x_L; the same function with long-input ref log-probs is plain DPO."""
    # short-to-long reward r(x_L, y) = beta * log(pi_theta(y|x_L) / pi_S(y|x_S))
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    # Eq. 12: the partition function cancels in the Bradley-Terry difference
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards, rejected_rewards


def total_loss(pref_losses, nll, lam, loss_type):
    """Eq. 14: L = lam * L_LongPO + L_NLL (SFT: the NLL alone)."""
    if loss_type == "sft":
        return nll
    return lam * pref_losses.mean() + nll


def token_logps(hidden, weight, targets, mask, chunk_size):
    """log p(target_t | prefix) at every position where mask is set, (B, T) with 0 elsewhere.

    hidden (B, T, H) final hidden states, weight (V, H) the output embedding. Head and log-softmax run
    in fp32 over chunks of chunk_size labelled tokens, each recomputed in backward (checkpoint), so at
    most one chunk's (chunk_size, V) logits exist at a time: never the whole sequence's."""
    flat_h, flat_t, flat_m = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), mask.reshape(-1)
    idx = flat_m.nonzero().squeeze(-1)  # (n,) positions that carry a label
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


class _SPSum(torch.autograd.Function):
    """Sum over the SP group as a value; the gradient flows through each rank's own part only, so the
    parameter gradients summed over the group equal those of the unsharded sequence."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sp_sum(x, group):
    return _SPSum.apply(x, group) if group is not None else x


# ----------------------------------------------------------------------------- formatting

# Characters of already-rendered text given to the tokenizer as left context of the next piece.
# Tokenizers cut text locally (pre-tokenizer words, BPE within them), so a short window decides
# how the piece starts; it keeps formatting linear in the document length.
CONTEXT_CHARS = 256


def encode_after(tokenizer, before, text):
    """Token ids of `text` as the tokenizer cuts it when it FOLLOWS `before` in one string.

    Pieces of a dialogue cannot be tokenized on their own: a SentencePiece tokenizer (Llama,
    Mistral) puts a dummy '▁' before every string it starts, so the answer 'The' after
    '<|assistant|>\\n' would become '▁The', and a lone ' ' before it a token of its own; the model
    wrote 'The' and '▁The' resp. Encoding `before + text` and keeping what follows `before`'s
    tokens gives the tokens the model itself produces after the prompt."""
    def encode(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]
    if not before:
        return encode(text)
    anchor = before[-CONTEXT_CHARS:]
    head, both = encode(anchor), encode(anchor + text)
    if both[:len(head)] == head:
        return both[len(head):]
    # The context's last token changes when text follows (GPT-2's pre-tokenizer cuts '\n\n' before a
    # word as '\n' + '\n'). The prompt's tokens are what the model saw, so keep them and take the
    # tokens that start inside text; one that straddles the border cannot be split.
    enc = tokenizer(anchor + text, add_special_tokens=False, return_offsets_mapping=True)
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
    """Cut what the template renders after the generation prompt into (answer span, rest).

    segment: the rendered assistant turn, e.g. ' The answer</s>' (Mistral), 'The answer<|eot_id|>'
    (Llama-3, content trimmed), 'The answer<|im_end|>\\n' (ChatML). The answer span is the leading
    whitespace the template adds, the answer as rendered (templates may trim it) and everything up
    to the last special token after it (the end-of-turn marker: the model must learn to stop); the
    rest (ChatML's newline after <|im_end|>) is context the model never writes."""
    core = answer.strip()
    head = segment[:len(segment) - len(segment.lstrip())]
    if not segment[len(head):].startswith(core):
        raise UsageError("the chat template alters the assistant text (it renders "
                         f"{segment[:60]!r} for the answer {answer[:40]!r}); cannot locate the answer tokens")
    tail = segment[len(head) + len(core):]
    cut = max((tail.rfind(s) + len(s) for s in specials if s and s in tail), default=len(tail))
    return segment[:len(head) + len(core) + cut], tail[cut:]


def format_dialogue(tokenizer, context, turns, answer_key=None):
    """THE chat formatting of a (long or short) sequence, shared by data_gen.py and training.

    context: the document (long) or one chunk (short); turns: dicts with "instruction" and, when
    answer_key is given, turns[i][answer_key] the answer. The first user message is context + a
    blank line + instruction (Eq. 13: the document appears once). Returns (input_ids, is_answer):
    token ids and a same-length bool list marking the answer tokens. With answer_key=None the
    sequence ends with the generation prompt of the last instruction (for generation).

    Works with any template that renders turn by turn (Mistral [INST], Llama-2/3, ChatML, Zephyr,
    Gemma, ...): each generation prompt, as apply_chat_template(add_generation_prompt=True) renders
    it, is a prefix of the dialogue, and what follows it up to the end-of-turn marker is the answer
    span (split_answer). The first prompt is tokenized on its own, exactly as for generation; every
    later piece as the continuation of the text before it (encode_after), as the model writes it."""
    if answer_key is None and len(turns) != 1:
        raise ValueError("format_dialogue: a generation prompt takes exactly one turn")
    messages, pieces, done, rest = [], [], "", ""  # pieces: (text, is_answer), concatenating to the dialogue
    specials = special_tokens(tokenizer)
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
    pieces.append((rest, False))
    ids, is_answer, before = [], [], ""
    for text, answer in pieces:
        if text:
            piece = encode_after(tokenizer, before, text)
            ids += piece
            is_answer += [answer] * len(piece)
            before = (before + text)[-CONTEXT_CHARS:]
    return ids, is_answer


def shifted_targets(ids, is_target):
    """Next-token targets: position t predicts ids[t+1]; mask says which positions count."""
    ids_t = torch.tensor(ids)
    targets = torch.cat([ids_t[1:], ids_t.new_tensor([0])])
    mask = torch.tensor(list(is_target[1:]) + [False])
    return targets, mask


# ----------------------------------------------------------------------------- data

REQUIRED_TURN_FIELDS = ("instruction", "chunk", "chosen", "rejected")


def validate_record(rec, where, need_ref):
    """Raise UsageError naming the line and field when a record breaks the design.md format."""
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
            bad(name, "is missing; give --ref-model to compute it on the short inputs, or "
                "produce the data with data_gen.py")


class Records:
    """A preference JSONL validated once, then read one record at a time: 45K records of 128K tokens
    are ~20 GB of text, which no process should hold. Several files, comma-separated, are one data
    set (the miniature trains on copy and gold records together). refs[i] = (ref_chosen_logp,
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
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        index, offset = self.offsets[i]
        with open(self.paths[index], "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, indices):
        """The records at these indices, in this order."""
        subset = copy.copy(self)
        subset.offsets, subset.refs = [self.offsets[i] for i in indices], [self.refs[i] for i in indices]
        return subset


def data_files(path):
    """The files of --data: one path, or several comma-separated; each must be a file."""
    names = path.split(",")
    for name in names:
        if not os.path.isfile(name):
            raise UsageError(f"--data {name} " + ("is a folder; give the preference JSONL file" if os.path.isdir(name) else
                             f"does not exist; create it first with: python data_gen.py --out {name or 'FILE'}"))
    return names


def load_records(path, need_ref=False):
    return Records(path, need_ref)


def build_example(rec, tokenizer, sides=("chosen", "rejected"), short=True):
    """Token sequences of one record: the chosen and rejected LONG dialogues, and per turn the SHORT
    (chunk-only) single-turn sequences that the reference scores (short=False: training, whose
    reference log-probs are ready, skips them; sft reads the chosen side only)."""
    doc, turns = rec["document"], rec["turns"]
    ex = {}
    for side in sides:
        ids, is_answer = format_dialogue(tokenizer, doc, turns, side)
        ex[side] = {"ids": ids, "is_answer": is_answer}
        if short:
            ex[f"short_{side}"] = [dict(zip(("ids", "is_answer"), format_dialogue(
                tokenizer, doc[t["chunk"][0]:t["chunk"][1]], [t], side))) for t in turns]
    return ex


# ----------------------------------------------------------------------------- model

def set_rope_theta(config, theta):
    """RoPE theta lives in config.rope_parameters (transformers 5.x) or config.rope_theta (4.x)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = float(theta)
    else:
        config.rope_theta = float(theta)


def get_rope_theta(config):
    params = getattr(config, "rope_parameters", None)
    return params["rope_theta"] if isinstance(params, dict) else getattr(config, "rope_theta", None)


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}")


def build_tiny_tokenizer():
    """Byte-level tokenizer (256 byte tokens + specials) with a Mistral-style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(PRESET_SPECIALS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    return preset_tokenizer(core, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))


PRESET_SPECIALS = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]"]


def preset_tokenizer(core, pre_tokenizer):
    """A built-in model's tokenizer around a byte-level `tokenizers` core: specials (pad 0, bos 1,
    eos 2) and the Mistral-style chat template."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast
    core.pre_tokenizer = pre_tokenizer
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["[INST]", "[/INST]"])
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def preset_config(vocab_size, hidden, intermediate, layers, kv_heads):
    """A built-in Mistral: full attention, 4 query heads, RoPE theta 1e4, the presets' special ids."""
    from transformers import MistralConfig
    return MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=1 << 20, sliding_window=None, rope_theta=1e4,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_config(vocab_size):
    return preset_config(vocab_size, hidden=64, intermediate=128, layers=2, kv_heads=2)


def build_small_tokenizer():
    """Byte-level BPE (817 tokens) trained here, deterministically, on the demo corpus of
    data_gen.py (its names and two-digit numbers become single tokens), with tiny's specials and
    chat template: the miniature reproduction's model reads its documents in ~4x fewer tokens
    than bytes, and any other text still tokenizes (bytes)."""
    import data_gen  # the corpus the vocabulary is made for (data_gen imports longpo: import here)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    docs = data_gen.demo_corpus(n_docs=8, paragraphs=24, seed=12345)
    names = " ".join(f"{p} {n}" for p in data_gen.PLACES for n in range(10, 100))  # every name and number
    texts = [names] * 3 + [d["text"] + "\n\n" + " ".join(data_gen.with_lead_in(lead, f["question"]) for lead in
                                                          data_gen.LEAD_INS for f in d["facts"][:4]) for d in docs]
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=PRESET_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return preset_tokenizer(core, core.pre_tokenizer)


def small_config(vocab_size):
    """The miniature's short-context model: 4 layers of 128, trained from scratch (README)."""
    return preset_config(vocab_size, hidden=128, intermediate=384, layers=4, kv_heads=4)


PRESETS = {"tiny": (build_tiny_tokenizer, tiny_config), "small": (build_small_tokenizer, small_config)}


def stop_token_ids(tokenizer, model=None):
    """Tokens that end an answer: the end-of-turn special tokens the chat template closes an
    assistant turn with (Llama-3's <|eot_id|>, Gemma's <end_of_turn>, ChatML's <|im_end|>, which are
    not always the tokenizer's eos), the eos, and those of the model's generation config."""
    ids, is_answer = format_dialogue(tokenizer, "", [{"instruction": "?", "answer": "ok"}], "answer")
    special = set(special_tokens(tokenizer).values())
    stops = [t for t, a in zip(ids, is_answer) if a and t in special] + [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops += configured if isinstance(configured, list) else [configured]
    return sorted({t for t in stops if t is not None})


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, par=None, seed=0):
    """Decode token-id prompts, greedy at temperature 0, until an end-of-turn token (stop_token_ids);
    returns (texts, number of new tokens). Used by data_gen.py and eval.py. One process: together,
    left-padded, with transformers' generate. With par of SP size > 1: one prompt at a time,
    sequence-parallel over par's SP group (generate_sp), every rank returning the same texts."""
    if par is not None and par.sp_size > 1:
        results = [generate_sp(model, tokenizer, p, max_new_tokens, par, temperature, top_p, seed + i)
                   for i, p in enumerate(prompts)]
        return [text for text, _ in results], sum(n for _, n in results)
    from transformers import GenerationConfig
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=stop_token_ids(tokenizer, model), **sampling)
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    new = out[:, width:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new], int((new != tokenizer.pad_token_id).sum())


class PromptShardCache:
    """The K/V cache of sequence-parallel generation, per layer: this rank's part of the prompt (the
    prefill's zigzag shard without its padding), then the generated tokens (the same on every rank)
    in room reserved up front, so that a decoding step copies nothing. The prefill's attention sees
    the whole shard, padding included: padding sits at the end of the sequence, in every real
    token's future, so it changes nothing there; decoding never sees it."""

    def __init__(self, keep, room):
        self.keep, self.room = keep, room  # keep: (T,) bool, the real prompt tokens of the shard
        self.n_prompt = int(keep.sum())
        self.keys, self.values, self.length = {}, {}, {}

    def get_seq_length(self, layer_idx=0):
        return self.length.get(layer_idx, 0)

    def update(self, key, value, layer_idx, *args, **kwargs):  # key, value (B, Hkv, T, D)
        if layer_idx not in self.keys:  # the prefill
            shape = (*key.shape[:2], self.n_prompt + self.room, key.shape[3])
            self.keys[layer_idx], self.values[layer_idx] = key.new_empty(shape), value.new_empty(shape)
            self.keys[layer_idx][:, :, :self.n_prompt] = key[:, :, self.keep]
            self.values[layer_idx][:, :, :self.n_prompt] = value[:, :, self.keep]
            self.length[layer_idx] = self.n_prompt
            return key, value
        n, t = self.length[layer_idx], key.shape[2]
        self.keys[layer_idx][:, :, n:n + t], self.values[layer_idx][:, :, n:n + t] = key, value
        self.length[layer_idx] = n + t
        return self.keys[layer_idx][:, :, :n + t], self.values[layer_idx][:, :, :n + t]


def next_token(logits, temperature, top_p, generator):
    """Greedy at temperature 0, else a sample of softmax(logits / T) cut to the top-p mass."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_sp(model, tokenizer, prompt, max_new_tokens, par, temperature=0.0, top_p=1.0, seed=0, stats=None):
    """One prompt decoded sequence-parallel over par's SP group; (text, new tokens), the same on every
    rank. Prefill: the prompt, padded to a multiple of 2*sp and zigzag-sharded, runs through ring
    attention and leaves each rank holding only ITS part of every layer's K/V (PromptShardCache).
    Decoding: the new token's query attends to each rank's part and to the tokens generated so far
    (counted once), merged across the group by the exact lse rule (ring_attention.decode_attention);
    every rank then computes the same hidden state, logits and token (sampling draws from the same
    seeded stream on every rank). stats (a dict), when given, receives the prefill
    and decoding seconds and this rank's cache bytes (the benchmark in data_gen.py)."""
    sp, rank, group = par.sp_size, par.sp_rank, par.sp_group if par.sp_size > 1 else ring_attention.LOCAL
    length = len(prompt)
    padded = -(-length // (2 * sp)) * 2 * sp
    ids = zigzag_shard(torch.tensor([prompt + [tokenizer.pad_token_id] * (padded - length)]), rank, sp)
    positions = zigzag_shard(torch.arange(padded).unsqueeze(0), rank, sp)
    cache = PromptShardCache(positions[0] < length, max_new_tokens)
    attn = model.config._attn_implementation
    model.set_attn_implementation("ring_attention")
    decoder, head = model.get_decoder(), model.get_output_embeddings().weight
    head = head.to(torch.promote_types(head.dtype, torch.float32))  # fp32 logits, as in training
    kwargs = dict(cache=cache, use_cache=True, ring_group=group)
    clock = time.perf_counter()
    try:
        hidden = decoder(input_ids=ids.to(par.device), position_ids=positions.to(par.device), **kwargs).last_hidden_state
        last = (positions[0] == length - 1).nonzero()  # the rank holding the last prompt token
        logits = torch.zeros(head.shape[0], dtype=head.dtype, device=par.device)
        if len(last):
            logits = F.linear(hidden[0, int(last[0])].to(head.dtype), head)
        if sp > 1:  # from the owner of the last prompt token (chunk 2sp-1 or an earlier one) to all
            owner = torch.tensor([rank if len(last) else -1], device=par.device)
            dist.all_reduce(owner, op=dist.ReduceOp.MAX, group=group)
            dist.broadcast(logits, dist.get_global_rank(group, int(owner)), group=group)
        generator = torch.Generator(device=par.device).manual_seed(seed)
        stops, new = set(stop_token_ids(tokenizer, model)), []
        prefill, clock = time.perf_counter() - clock, time.perf_counter()
        while len(new) < max_new_tokens:
            new.append(next_token(logits, temperature, top_p, generator))
            if new[-1] in stops or len(new) == max_new_tokens:
                break
            hidden = decoder(input_ids=torch.tensor([[new[-1]]], device=par.device),
                             position_ids=torch.tensor([[length + len(new) - 1]], device=par.device),
                             ring_decode=cache.n_prompt, **kwargs).last_hidden_state
            logits = F.linear(hidden[0, -1].to(head.dtype), head)
    finally:
        model.set_attn_implementation(attn)
    if stats is not None:
        stats.update(prefill_s=prefill, decode_s=time.perf_counter() - clock, new_tokens=len(new),
                     cache_bytes=sum(t.numel() * t.element_size() for t in [*cache.keys.values(), *cache.values.values()]))
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def ensure_pad_token(tokenizer):
    """Mistral and Llama tokenizers ship without a pad token; padding is always masked out here
    (labels -100, attention masks), so the end-of-sequence token can serve."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(name, flag="--model"):
    """Fail at once, in one line, on a model that cannot load: a missing local folder, a training
    checkpoint (sharded weights, not a model), a folder without config.json, or a hub id that is
    neither cached nor on the hub (asked with a short timeout)."""
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
    if not HUB_ID.match(name) or os.path.isdir(name.split("/")[0]):
        raise UsageError(f"{flag} {name}: no such folder (nor a hub id of the form org/name)")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    try:
        HfApi().model_info(name, timeout=8)
    except GatedRepoError:
        return  # exists; loading says how to get access
    except RepositoryNotFoundError:
        raise UsageError(f"{flag} {name}: no such local folder, and no such model on the hub (check the spelling)") from None
    except Exception as e:  # no network, proxy, timeout
        raise UsageError(f"{flag} {name}: no such local folder, not in the local hub cache, and the hub cannot be "
                         f"reached ({type(e).__name__}); download it first or give a local folder") from None


def load_for_inference(name, device, rope_theta=0.0):
    """(model, tokenizer) for generation and scoring (data_gen.py, eval.py): bf16 on CUDA, fp32 on
    CPU, on the device, in eval mode."""
    model, tokenizer = load_model_and_tokenizer(name, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                                rope_theta)
    return model.to(device).eval(), tokenizer


def check_sp_size(sp_size):
    """Before any process group: --sp-size (0: all processes) must divide torchrun's world size."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if sp_size < 0 or world % (sp_size or world):
        raise UsageError(f"--sp-size {sp_size} must divide the number of processes {world} "
                         f"(torchrun --nproc_per_node x nodes); e.g. --sp-size {world}")


def load_tokenizer(name):
    from transformers import AutoTokenizer
    return PRESETS[name][0]() if name in PRESETS else ensure_pad_token(AutoTokenizer.from_pretrained(name))


def load_model_and_tokenizer(name, dtype=torch.float32, rope_theta=0.0):
    """A preset, `tiny` or `small` (random weights from a FIXED seed: data_gen, longpo and eval see the
    same model), a hub id or a local directory. rope_theta > 0 replaces the model's RoPE theta
    (policy only)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tokenizer = load_tokenizer(name)
    if name in PRESETS:
        config = PRESETS[name][1](len(tokenizer))
        if rope_theta:
            set_rope_theta(config, rope_theta)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        return model.to(dtype), tokenizer
    config = AutoConfig.from_pretrained(name)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None  # LongPO trains full attention (Mistral v0.2 has none)
    if rope_theta:
        set_rope_theta(config, rope_theta)
    model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, attn_implementation="sdpa")
    return model, tokenizer


# ----------------------------------------------------------------------------- sequence parallelism

@dataclass
class Parallel:
    """world = dp x sp; consecutive ranks form an SP group (a ring) that reads one sample."""
    rank: int
    world_size: int
    sp_size: int
    sp_group: object  # None when sp_size == 1
    device: torch.device

    @property
    def dp_rank(self):
        return self.rank // self.sp_size

    @property
    def dp_size(self):
        return self.world_size // self.sp_size

    @property
    def sp_rank(self):
        return self.rank % self.sp_size


def setup_parallel(sp_size, rank, world_size, device):
    sp_size = sp_size or world_size  # 0: one ring over all ranks
    if sp_size < 1 or world_size % sp_size:
        raise UsageError(f"--sp-size {sp_size} must divide the world size {world_size} "
                         f"(torchrun --nproc_per_node x nodes); e.g. --sp-size {world_size}")
    sp_group = None
    for first in range(0, world_size if sp_size > 1 else 0, sp_size):
        ranks = list(range(first, first + sp_size))
        group = dist.new_group(ranks)  # every rank creates every group, in the same order
        if rank in ranks:
            sp_group = group
    return Parallel(rank, world_size, sp_size, sp_group, device)


def prepare_sequence(ids, masks, par, pad_id, pad_to=0):
    """Pad to a multiple of 2*sp (at least pad_to tokens), shift targets BEFORE sharding (no label
    crosses a shard border), zigzag-shard input_ids, position_ids (global positions), targets and
    each named target mask the same way. Padding is never a target. Returns tensors of shape (1, T)
    on the device."""
    length = len(ids)
    padded = -(-max(length, pad_to) // (2 * par.sp_size)) * 2 * par.sp_size
    out = {"input_ids": torch.tensor(ids + [pad_id] * (padded - length)),
           "position_ids": torch.arange(padded)}
    for name, is_target in masks.items():
        targets, mask = shifted_targets(ids, is_target)
        out["targets"] = F.pad(targets, (0, padded - length))
        out[name] = F.pad(mask, (0, padded - length), value=False)
    for key, t in out.items():
        t = t.unsqueeze(0)  # (1, L)
        if par.sp_size > 1:
            t = zigzag_shard(t, par.sp_rank, par.sp_size)  # (1, T)
        out[key] = t.to(par.device)
    return out


def pack_pair(example, sp_size, pad_id, context_weight=1.0):
    """The chosen and rejected long sequences packed to run the document ONCE: [prefix | chosen
    branch | rejected branch | padding], as global (unsharded) lists, or None when the shared prompt
    has fewer than 2*sp + 1 tokens (that pair then runs the 'pairs' way, with the same result).

    The two sequences share their first prompt (document + first instruction). The prefix is the
    longest multiple of 2*sp tokens of it (zigzag shards) that leaves at least its last token to the
    branches, so the prefix's last token predicts the same next token in both; each branch repeats
    the rest of the prompt (< 2*sp + 1 tokens) and continues the positions after the prefix. Labels
    are each sequence's own next tokens: chosen and rejected answers, and the whole chosen sequence
    for the NLL (answers weigh 1, the rest context_weight), exactly as in the two separate sequences."""
    c, r = example["chosen"], example["rejected"]
    first = c["is_answer"].index(True)  # the first answer token: the shared prompt ends before it
    n = (first - 1) // (2 * sp_size) * 2 * sp_size
    if n == 0 or c["ids"][:first] != r["ids"][:first]:
        return None
    lc, lr = len(c["ids"]) - n, len(r["ids"]) - n
    n_branch = -(-(lc + lr) // sp_size)  # branch tokens per rank
    pad = sp_size * n_branch - lc - lr
    t_c, a_c = shifted_targets(c["ids"], c["is_answer"])
    t_r, a_r = shifted_targets(r["ids"], r["is_answer"])
    nll_c = shifted_targets(c["ids"], nll_weights(c["is_answer"], context_weight))[1]
    zeros = lambda k: torch.zeros(k, dtype=torch.bool)  # noqa: E731
    return {"input_ids": torch.tensor(c["ids"] + r["ids"][n:] + [pad_id] * pad),
            "position_ids": torch.cat([torch.arange(n + lc), torch.arange(n, n + lr), torch.arange(n, n + pad)]),
            "targets": torch.cat([t_c, t_r[n:], torch.zeros(pad, dtype=t_c.dtype)]),
            "chosen": torch.cat([a_c, zeros(lr + pad)]),
            "rejected": torch.cat([zeros(n + lc), a_r[n:], zeros(pad)]),  # no answer in the prefix
            "nll": torch.cat([nll_c, torch.zeros(lr + pad)]),
            "layout": ring_attention.BranchLayout(n // sp_size, (lc, lr, pad), n_branch)}


def prepare_packed(example, par, pad_id, context_weight=1.0):
    """This rank's part of the packed pair: its zigzag shard of the prefix, then its contiguous slice
    of the branch region; (1, T) tensors on the device and the BranchLayout, or None (pack_pair)."""
    packed = pack_pair(example, par.sp_size, pad_id, context_weight)
    if packed is None:
        return None
    layout = packed.pop("layout")
    n, nb = layout.n_prefix * par.sp_size, layout.n_branch
    for key, t in packed.items():
        prefix = zigzag_shard(t[:n].unsqueeze(0), par.sp_rank, par.sp_size)
        branch = t[n + par.sp_rank * nb:n + (par.sp_rank + 1) * nb].unsqueeze(0)
        packed[key] = torch.cat([prefix, branch], 1).to(par.device)  # (1, T)
    return {**packed, "layout": layout}


def policy_logps(model, seq, par, chunk_size, nll=None, sums=("answer",)):
    """Sums of the log-probs at the positions of each mask named in sums (seq[name]: targets that
    count) of each (sharded, possibly packed) sequence of the batch, summed over the SP group: (B,)
    each; and each sequence's token-mean NLL over the positions of the mask named nll, weighted by
    its values, (B,) (None without). Returns (*sums, nll)."""
    ring_kwargs = {}
    if getattr(model.config, "_attn_implementation", None) == "ring_attention":
        ring_kwargs = {"ring_group": par.sp_group if par.sp_size > 1 else ring_attention.LOCAL,
                       "ring_layout": seq.get("layout")}
    elif "layout" in seq or par.sp_size > 1:  # a causal kernel would let the rejected branch see the chosen one
        raise RuntimeError("a packed or sharded sequence needs the model to run ring attention (setup_model)")
    out = model(input_ids=seq["input_ids"], position_ids=seq["position_ids"], use_cache=False,
                output_hidden_states=True, logits_to_keep=1, **ring_kwargs)
    hidden = out.hidden_states[-1]  # (1, T, H) after the final norm
    weight = model.get_output_embeddings().weight
    mask = functools.reduce(torch.logical_or, [seq[name] for name in sums + ((nll,) if nll else ())])
    # Every rank must backpropagate through every layer even when no labelled token landed in its
    # shard: other ranks' queries attended to its keys, and ring attention's backward (like FSDP's
    # gradient reduction) is a collective that all ranks of the group enter together.
    anchor = 0.0 * (hidden.sum() + weight.sum())
    logps = token_logps(hidden, weight, seq["targets"], mask, chunk_size) + anchor  # (1, T)
    totals = [sp_sum((logps * seq[name]).sum(-1), par.sp_group) for name in sums]
    if nll is None:
        return (*totals, None)
    # the weights summed in the log-probs' precision: in fp32 a sum of 0.3s rounds differently per shard
    count = sp_sum(seq[nll].to(logps.dtype).sum(-1).detach(), par.sp_group).clamp_min(1e-12)
    return (*totals, -sp_sum((logps * seq[nll]).sum(-1), par.sp_group) / count)


def pair_metrics(loss, nll, losses, chosen_rewards, rejected_rewards, logp_c, logp_r):
    return {"loss": loss.item(), "nll": nll.item(), "pref_loss": losses.mean().item(),
            "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "logps/chosen": logp_c.item(), "logps/rejected": logp_r.item()}


def nll_target_of(cfg):
    """--nll-target with auto resolved: the paper's sft baseline trains the answers, longpo/dpo the sequence."""
    return cfg.nll_target if cfg.nll_target != "auto" else "responses" if cfg.loss == "sft" else "sequence"


def nll_weight(cfg):
    """--nll-target as the weight of the non-answer tokens in the NLL (answers weigh 1)."""
    named = {"sequence": 1.0, "responses": 0.0}
    target = nll_target_of(cfg)
    return named[target] if target in named else float(target)


def micro_step(model, ref_model, example, ref_logps, cfg, par, pad_id):
    """Forward and backward of one sample on this SP group; returns (detached metrics, tokens)."""
    if cfg.loss == "sft":
        return sft_step(model, [example], cfg, par, pad_id)
    # The gradient reduction (FSDP) AVERAGES over all dp x sp ranks, but the sp ranks of a sample
    # hold parts of ONE gradient, to be SUMMED: scale by sp. Accumulation averages: / grad_accum.
    grad_scale = par.sp_size / cfg.grad_accum
    n_tokens = len(example["chosen"]["ids"]) + len(example["rejected"]["ids"])
    if cfg.pack == "shared-prefix":
        packed = prepare_packed(example, par, pad_id, nll_weight(cfg))
        if packed is not None:
            return packed_step(model, ref_model, packed, ref_logps, cfg, par, grad_scale), n_tokens
    chosen = prepare_sequence(example["chosen"]["ids"], nll_masks(example, cfg), par, pad_id)
    return pairs_step(model, ref_model, example, chosen, "nll", ref_logps, cfg, par, pad_id, grad_scale), n_tokens


def nll_weights(is_answer, context_weight):
    """Per-token NLL weights of a chosen sequence: answers 1, every other token context_weight."""
    return [1.0 if a else context_weight for a in is_answer]


def nll_masks(example, cfg):
    """The chosen sequence's answer mask and NLL weights."""
    is_answer = example["chosen"]["is_answer"]
    return {"answer": is_answer, "nll": nll_weights(is_answer, nll_weight(cfg))}


def sft_step(model, examples, cfg, par, pad_id):
    """Forward and backward of sft samples as one batch (--micro-batch), right-padded to one length.
    The same gradient as one sample at a time: attention is causal, so no token sees the padding after
    it, and each sample's NLL is its own token mean. Returns (metrics summed over the samples, tokens)."""
    longest = max(len(ex["chosen"]["ids"]) for ex in examples)
    rows = [prepare_sequence(ex["chosen"]["ids"], nll_masks(ex, cfg), par, pad_id, longest) for ex in examples]
    batch = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}  # (B, T)
    logp_c, nll = policy_logps(model, batch, par, cfg.logprob_chunk, "nll")
    (nll.sum() * par.sp_size / cfg.grad_accum).backward()  # grad_scale of micro_step, per sample
    return ({"loss": nll.sum().item(), "nll": nll.sum().item(), "logps/chosen": logp_c.sum().item()},
            sum(len(ex["chosen"]["ids"]) for ex in examples))


def reference_logps(ref_model, seqs, ref_logps, cfg, par):
    """(ref_chosen, ref_rejected) as (1,) tensors. LongPO: pi_S on the SHORT inputs, precomputed
    (Eq. 13: summed over turns). DPO: the frozen model on the LONG input (seqs, as the policy sees them)."""
    if cfg.loss != "dpo":
        return tuple(torch.tensor([x], dtype=torch.float64, device=par.device) for x in ref_logps)
    with torch.no_grad():
        if "layout" in seqs[0]:  # the packed pair
            return policy_logps(ref_model, seqs[0], par, cfg.logprob_chunk, sums=("chosen", "rejected"))[:2]
        return tuple(policy_logps(ref_model, seq, par, cfg.logprob_chunk)[0] for seq in seqs)


def packed_step(model, ref_model, packed, ref_logps, cfg, par, grad_scale):
    """The shared-prefix step: one forward of the packed pair gives log pi(y_S|x_L), log pi(y_L|x_L)
    and the Eq. 14 NLL, one backward the exact gradient of Eq. 14; the document runs once."""
    ref_c, ref_r = reference_logps(ref_model, [packed], ref_logps, cfg, par)
    logp_c, logp_r, nll = policy_logps(model, packed, par, cfg.logprob_chunk, "nll", sums=("chosen", "rejected"))
    losses, chosen_rewards, rejected_rewards = longpo_loss(logp_c, logp_r, ref_c, ref_r, cfg.beta)
    loss = total_loss(losses, nll, cfg.lam, cfg.loss)
    (loss * grad_scale).backward()
    return pair_metrics(loss, nll, losses, chosen_rewards, rejected_rewards, logp_c, logp_r)


def pairs_step(model, ref_model, example, chosen, nll_name, ref_logps, cfg, par, pad_id, grad_scale):
    """The reference path (--pack pairs): chosen and rejected one after the other, never in memory
    together. The pair loss gradient is a scalar weight times (grad log p_chosen - grad log
    p_rejected), so: rejected without grad (its log-prob), chosen with grad, rejected with grad,
    each backward with the other side's value as a constant."""
    rejected = prepare_sequence(example["rejected"]["ids"], {"answer": example["rejected"]["is_answer"]},
                                par, pad_id)
    ref_c, ref_r = reference_logps(ref_model, [chosen, rejected], ref_logps, cfg, par)
    with torch.no_grad():
        logp_r = policy_logps(model, rejected, par, cfg.logprob_chunk)[0]
    # chosen pass: d/dtheta of lam * L_pref(logp_c, logp_r = const) + NLL
    logp_c, nll = policy_logps(model, chosen, par, cfg.logprob_chunk, nll_name)
    losses, chosen_rewards, rejected_rewards = longpo_loss(logp_c, logp_r, ref_c, ref_r, cfg.beta)
    loss = total_loss(losses, nll, cfg.lam, cfg.loss)
    (loss * grad_scale).backward()
    # rejected pass: d/dtheta of lam * L_pref(logp_c = const, logp_r)
    logp_r = policy_logps(model, rejected, par, cfg.logprob_chunk)[0]
    losses_r = longpo_loss(logp_c.detach(), logp_r, ref_c, ref_r, cfg.beta)[0]
    (cfg.lam * losses_r.mean() * grad_scale).backward()
    return pair_metrics(loss, nll, losses, chosen_rewards, rejected_rewards, logp_c, logp_r)


@torch.no_grad()
def short_ref_logps(ref_model, example, device):
    """Eq. 13 reference: sum over turns of log pi_S(y_i | C_S,i, I_i), each turn on its own chunk.
    Short inputs fit one device: no sequence parallelism. Returns (chosen, rejected) floats."""
    single = Parallel(0, 1, 1, None, torch.device(device))
    # the same log-prob path as training, on one device; the padding token is never a target
    return tuple(sum(policy_logps(ref_model, prepare_sequence(seq["ids"], {"answer": seq["is_answer"]}, single, 0),
                                  single, 4096)[0].item() for seq in example[side])
                 for side in ("short_chosen", "short_rejected"))


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


# ----------------------------------------------------------------------------- model setup

def resolve_dtypes(cfg, device):
    """(master dtype of the weights, gradients and AdamW states, compute dtype). bf16 is always mixed
    precision: fp32 masters, because an update of lr 5e-7 is far below bf16's resolution of a weight."""
    if cfg.dtype == "auto":
        return (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32, torch.float32)
    if cfg.dtype == "bfloat16":
        return torch.float32, torch.bfloat16
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    return dtype, dtype


def setup_model(model, par, compute_dtype, grad_checkpointing, trainable=True):
    """Ring attention, activation checkpointing and FSDP2 full sharding on a loaded model."""
    model.config.use_cache = False
    # THE swap: every attention layer now runs zigzag ring attention over the SP group (a group of
    # one at SP size 1: the same block kernels, and the branch mask of a packed pair)
    model.set_attn_implementation("ring_attention")
    if grad_checkpointing and trainable:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.to(par.device)
    # FSDP2 does both jobs, with one code path for every world size: weights, grads and AdamW states
    # sharded over ALL ranks (dp x sp), and mixed precision (bf16 compute of fp32 master weights,
    # gradients reduced in fp32), which it applies on a process group of one as well. A single
    # process in its master dtype has nothing to shard or cast and runs the plain module.
    if par.world_size > 1 or compute_dtype != next(model.parameters()).dtype:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                  reduce_dtype=torch.promote_types(compute_dtype, torch.float32))
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
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


# ----------------------------------------------------------------------------- checkpoints

def last_checkpoint(output_dir):
    if not os.path.isdir(output_dir):
        return None
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir) if d.startswith("checkpoint-")
             and d.split("-")[1].isdigit() and os.path.exists(os.path.join(output_dir, d, "trainer_state.json"))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


# What defines a run: --resume must continue with the same (save_every, stop_after, logprob_chunk,
# grad_checkpointing and the like may change; they do not change what is computed).
RUN_DEFINING = ("model", "ref_model", "data", "loss", "beta", "lam", "nll_target", "lr", "warmup_ratio",
                "weight_decay", "max_grad_norm", "max_steps", "grad_accum", "max_length", "rope_theta", "dtype", "seed")


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
    """'fresh' (start in --output-dir), 'resume' (continue the run it holds) or 'finished' (that run
    wrote its final model). Refuses to overwrite a run's work without --overwrite, and to resume a
    run with other run-defining arguments, naming each difference."""
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
    changed = [f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in identity.items() if before.get(k) != v]
    if changed:
        raise UsageError(f"--resume: {out} holds a run with other arguments ({'; '.join(changed)}); resume it with "
                         "the same ones, or start a new run (--overwrite or another --output-dir)")
    return "finished" if os.path.isdir(os.path.join(out, "final")) else "resume"


def clear_output_dir(out):
    """--overwrite: remove a previous run's config, metrics, checkpoints and final model."""
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if name in ("config.json", "metrics.jsonl", "final") or name.startswith("checkpoint-"):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def save_checkpoint(model, optimizer, scheduler, step, cfg, par):
    """Sharded model + optimizer (torch.distributed.checkpoint), scheduler, data position and every
    rank's RNG, written to a temporary folder and renamed: a crash never leaves half a checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if par.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(par)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
               os.path.join(tmp, f"rng_rank{par.rank}.pt"))
    barrier(par)
    if par.rank == 0:
        state = {"step": step, "samples_seen": step * cfg.grad_accum * par.dp_size,
                 "scheduler": scheduler.state_dict()}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier(par)


def load_checkpoint(path, model, optimizer, scheduler, par):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{par.rank}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return trainer_state["step"]


def save_final(model, tokenizer, cfg, par):
    """Gather the full weights and write an HF model that AutoModelForCausalLM.from_pretrained loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if par.rank == 0:
        final = os.path.join(cfg.output_dir, "final")
        config = copy_config(model.config)
        clean = AutoModelForCausalLM.from_config(config)
        clean.load_state_dict(state)
        clean.save_pretrained(final)
        tokenizer.save_pretrained(final)
    barrier(par)


def copy_config(config):
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = True  # for generation after training
    return config


def barrier(par):
    if par.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- training

def record_index(k, n, seed):
    """The k-th sample of the run: epoch k // n in a permutation seeded by (seed, epoch)."""
    epoch, position = divmod(k, n)
    return epoch_order(n, seed, epoch)[position]


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """One epoch's permutation, made once (shuffled anew for every sample, 16000 records cost ~9 ms each)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def world_mean(values, par):
    """Mean of a dict of floats over all ranks (SP replicas agree, so this is the mean over DP)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=par.device)
    if par.world_size > 1:
        dist.all_reduce(t)
        t /= par.world_size
    return dict(zip(values, t.tolist()))


def stop_non_finite(what, cfg):
    raise FloatingPointError(
        f"non-finite {what}; no update was applied. The last good checkpoint is "
        f"{last_checkpoint(cfg.output_dir)}: resume from it with --resume and a lower --lr")


def train_step(step, model, ref_model, data, cfg, par, optimizer, scheduler):
    """One optimiser step: grad_accum samples per DP group, clipping, AdamW, schedule."""
    records, refs, tokenizer = data
    t0, sums, tokens = time.perf_counter(), {}, 0
    sides = ("chosen",) if cfg.loss == "sft" else ("chosen", "rejected")
    for first in range(0, cfg.grad_accum, cfg.micro_batch):  # micro_batch > 1: sft only (check_config)
        idxs = [record_index((step * cfg.grad_accum + micro) * par.dp_size + par.dp_rank, len(records), cfg.seed)
                for micro in range(first, first + cfg.micro_batch)]
        examples = [build_example(records[i], tokenizer, sides, short=False) for i in idxs]
        if cfg.loss == "sft":
            metrics, n = sft_step(model, examples, cfg, par, tokenizer.pad_token_id)
        else:
            metrics, n = micro_step(model, ref_model, examples[0], refs[idxs[0]], cfg, par, tokenizer.pad_token_id)
        bad = torch.tensor(float(not math.isfinite(metrics["loss"])), device=par.device)
        if par.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        if bad.item():
            ids = ", ".join(repr(records[i].get("id", i)) for i in idxs)
            stop_non_finite(f"loss at step {step + 1} (record id {ids} on rank {par.rank})", cfg)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
        tokens += n
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not math.isfinite(grad_norm.item()):  # the same global norm on every rank
        stop_non_finite(f"gradient norm at step {step + 1}", cfg)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # tokens: the world mean of tokens * world / sp is the sum over DP groups (sp replicas each)
    metrics = world_mean({**sums, "tokens": tokens / par.sp_size * par.world_size}, par)
    elapsed = time.perf_counter() - t0
    return {"step": step + 1, **{k: v for k, v in metrics.items() if k != "tokens"},
            "grad_norm": grad_norm.item(), "lr": lr, "tokens_per_s": metrics["tokens"] / elapsed}


def prepare_data(records, cfg, par, tokenizer, compute_dtype):
    """Records filtered by --max-length and their reference log-probs (computed on the SHORT inputs
    where the file has none). Every rank ends with the same records."""
    if cfg.max_length:
        def length(i):
            rec = records[i]
            return max(len(format_dialogue(tokenizer, rec["document"], rec["turns"], side)[0])
                       for side in ("chosen", "rejected"))
        lengths = distributed_map(length, range(len(records)), par, "lengths")
        kept = [i for i, n in enumerate(lengths) if n <= cfg.max_length]
        print0(f"--max-length {cfg.max_length}: kept {len(kept)} of {len(records)} records "
               f"({len(records) - len(kept)} longer ones skipped)")
        if not kept:
            raise UsageError(f"no record of --data {cfg.data} fits --max-length {cfg.max_length}; raise it")
        records = records.select(kept)
    missing = [i for i, ref in enumerate(records.refs) if None in ref]
    if cfg.loss == "longpo" and missing:
        name = cfg.ref_model or cfg.model
        print0(f"{len(missing)} records lack reference log-probs: computing them with {name} on the short inputs")
        ref, ref_tok = load_model_and_tokenizer(name, compute_dtype)  # its own RoPE, not --rope-theta
        ref.to(par.device).eval()
        values = distributed_map(lambda i: short_ref_logps(ref, build_example(records[i], ref_tok), par.device),
                                 missing, par, "reference log-probs")
        for i, value in zip(missing, values):
            records.refs[i] = value
        del ref
    return records, records.refs, tokenizer


def open_metrics(cfg, start_step, par):
    """metrics.jsonl; on resume, drop lines of steps after the checkpoint (they will be redone)."""
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if par.rank != 0:
        return None
    lines = []
    if start_step and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= start_step]
    with open(path, "w") as f:
        f.writelines(lines)
    return open(path, "a")


def train(cfg, par, records):
    master_dtype, compute_dtype = resolve_dtypes(cfg, par.device)
    policy, tokenizer = load_model_and_tokenizer(cfg.model, master_dtype, cfg.rope_theta)
    data = prepare_data(records, cfg, par, tokenizer, compute_dtype)
    ref_model = None
    if cfg.loss == "dpo":
        ref_model = load_model_and_tokenizer(cfg.ref_model or cfg.model, master_dtype)[0]
        ref_model = setup_model(ref_model, par, compute_dtype, False, trainable=False)
    policy = setup_model(policy, par, compute_dtype, cfg.grad_checkpointing)
    total_steps = cfg.max_steps or math.ceil(len(data[0]) / (par.dp_size * cfg.grad_accum))
    optimizer, scheduler = make_optimizer(policy, cfg, total_steps)
    start = 0
    if cfg.resume:
        ckpt = last_checkpoint(cfg.output_dir)
        if ckpt:
            start = load_checkpoint(ckpt, policy, optimizer, scheduler, par)
            print0(f"resumed from {ckpt} at step {start}")
        else:
            print0(f"--resume: no checkpoint in {cfg.output_dir}, starting from step 0")
    metrics_file = open_metrics(cfg, start, par)
    print0(f"training: {len(data[0])} records, {total_steps} steps of {cfg.grad_accum} x {par.dp_size} "
           f"samples, world {par.world_size} = dp {par.dp_size} x sp {par.sp_size}, device {par.device}")
    from tqdm import tqdm
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=par.rank != 0, desc="train")
    for step in bar:
        metrics = train_step(step, policy, ref_model, data, cfg, par, optimizer, scheduler)
        if metrics_file:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in metrics.items()))
        stop = cfg.stop_after and metrics["step"] - start >= cfg.stop_after and metrics["step"] < total_steps
        if stop or (cfg.save_every and metrics["step"] % cfg.save_every == 0):
            save_checkpoint(policy, optimizer, scheduler, metrics["step"], cfg, par)
        if stop:
            print0(f"--stop-after {cfg.stop_after}: stopped at step {metrics['step']}; continue with --resume")
            return
    save_final(policy, tokenizer, cfg, par)
    print0(f"final model: {os.path.join(cfg.output_dir, 'final')}")
    return policy


# ----------------------------------------------------------------------------- memory plan

def memory_plan(cfg):
    """Per-GPU memory of the strategy train() uses: FSDP full sharding over all GPUs, bf16 compute,
    fp32 master weights/grads/AdamW, activation checkpoints at every decoder layer, ring attention
    over sp GPUs, chunked log-softmax; chosen and rejected packed after one copy of the document
    (--pack shared-prefix: one graph of max_length + the rejected branch) or one after the other."""
    from transformers import AutoConfig
    c = PRESETS[cfg.model][1](len(load_tokenizer(cfg.model))) if cfg.model in PRESETS else AutoConfig.from_pretrained(cfg.model)
    H, n_layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or H // hq
    layer = H * (hq + 2 * hkv) * d + hq * d * H + 3 * H * inter + 2 * H  # q, k, v, o, MLP, 2 norms
    root = vocab * H * (1 if c.tie_word_embeddings else 2) + H
    params = n_layers * layer + root
    W, sp = cfg.world_size, cfg.sp_size or cfg.world_size
    packed = cfg.pack == "shared-prefix"
    length = cfg.max_length + (cfg.plan_branch_tokens if packed else 0)  # one graph's tokens
    T = -(-length // sp)  # tokens per GPU
    if W % sp:
        raise UsageError(f"--sp-size {sp} must divide --world-size {W}")
    bf16, fp32 = 2, 4
    rows = [
        ("weights + grads (fp32) + AdamW m, v: 16 B/param sharded over all GPUs", 16 * params / W),
        ("bf16 weights of 2 decoder layers gathered (current + prefetch)", 2 * layer * bf16),
        ("bf16 embedding + output head gathered (root), and their grads", 2 * root * bf16),
        (f"activation checkpoints: {n_layers} layer inputs x {T} tokens x {H} ({'the packed pair' if packed else 'one sequence'})",
         n_layers * T * H * bf16),
        ("one layer recomputed in backward: 4H + 2 Hq D + 3 Hkv D + 4 I per token", T * (4 * H + 2 * hq * d + 3 * hkv * d + 4 * inter) * bf16),
        ("  + activation grads in flight in that layer (2 x I per token)", T * 2 * inter * bf16),
        ("ring: K/V blocks (held + in flight), fp32 out/lse/dq, fp32 dK/dV (held + in flight)",
         2 * 2 * T * hkv * d * bf16 + 2 * T * hq * d * fp32 + 2 * 2 * T * hkv * d * fp32),
        ("branches: K/V of both branches gathered on every GPU, and their fp32 dK/dV",
         (2 * 2 * cfg.plan_branch_tokens * hkv * d * (bf16 + fp32)) if packed else 0),
        (f"log-probs: {cfg.logprob_chunk} x {vocab} fp32 logits, log-softmax, grad; fp32 head and its grad; fp32 grad of final hidden",
         3 * cfg.logprob_chunk * vocab * fp32 + 2 * vocab * H * fp32 + T * H * fp32),
    ]
    peak = sum(b for _, b in rows)
    lines = [f"memory plan: {cfg.model} ({params / 1e9:.2f}B parameters, {n_layers} layers, hidden {H}, "
             f"MLP {inter}, {hq}/{hkv} heads of {d}, vocab {vocab})",
             f"sequence {cfg.max_length} tokens" + (f" + {cfg.plan_branch_tokens} of the rejected branch" if packed else "")
             + f" on {W} GPUs: dp {W // sp} x sp {sp}, {T} tokens per GPU",
             "strategy: FSDP full sharding, bf16 compute, checkpoint every layer, " +
             ("chosen and rejected packed after one copy of the document (--pack shared-prefix)" if packed
              else "chosen and rejected in turn (--pack pairs)")]
    lines += [f"  {b / 1e9:8.2f} GB  {name}" for name, b in rows if b]
    if not packed:
        both = n_layers * T * H * bf16
        lines.append(f"  (holding chosen and rejected graphs at once, as a batch of 2, would add {both / 1e9:.2f} GB)")
    verdict = "fits" if peak <= cfg.gpu_memory_gb * 1e9 else "DOES NOT FIT"
    lines.append(f"{verdict} in {cfg.gpu_memory_gb:g} GB per GPU without CPU offload; before allocator fragmentation")
    lines.append(f"peak per GPU: {peak / 1e9:.2f} GB")
    lines += generation_plan(cfg, params, n_layers, H, inter, hq, hkv, d, sp)
    return "\n".join(lines)


def generation_plan(cfg, params, n_layers, H, inter, hq, hkv, d, sp):
    """Generation (data_gen's rejected answers, eval), sequence-parallel over sp GPUs: no gradients,
    bf16 weights whole on every GPU, each GPU keeps its share of the prompt's K/V (generate_sp)."""
    bf16, fp32, new_tokens, P = 2, 4, 1024, -(-cfg.max_length // sp)
    kv_token = n_layers * 2 * hkv * d * bf16
    gen = [("bf16 weights, whole on every GPU", params * bf16),
           (f"K/V cache: {P} prompt tokens + {new_tokens} generated, {n_layers} layers", (P + new_tokens) * kv_token),
           ("prefill, the layer in flight: input/output, q/k/v/o, MLP gate/up/product, ring K/V blocks, fp32 out",
            P * (2 * H + 2 * (hq + hkv) * d + 3 * inter) * bf16 + 2 * 2 * P * hkv * d * bf16 + P * hq * d * fp32)]
    lines = [f"generation of a {cfg.max_length}-token prompt with sp {sp} (the whole prompt's K/V: "
             f"{cfg.max_length * kv_token / 1e9:.2f} GB):"]
    lines += [f"  {b / 1e9:8.2f} GB  {name}" for name, b in gen]
    return lines + [f"generation peak per GPU: {sum(b for _, b in gen) / 1e9:.2f} GB"]


# ----------------------------------------------------------------------------- benchmark

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


def bench(cfg, par):
    """Per-rank time of one LongPO optimiser step (median of cfg.max_steps or 3, after a warm-up)
    and the peak memory one more step adds on top of the loaded model and optimiser state."""
    master_dtype, compute_dtype = resolve_dtypes(cfg, par.device)
    policy, tokenizer = load_model_and_tokenizer(cfg.model, master_dtype, cfg.rope_theta)
    rec = synthetic_record(tokenizer, cfg.bench_tokens)
    example = build_example(rec, tokenizer)
    refs = (rec["ref_chosen_logp"], rec["ref_rejected_logp"])
    policy = setup_model(policy, par, compute_dtype, cfg.grad_checkpointing)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    cfg = dataclasses.replace(cfg, grad_accum=1)

    def step():
        micro_step(policy, None, example, refs, cfg, par, tokenizer.pad_token_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    times = []
    for _ in range((cfg.max_steps or 3) + 1):
        barrier(par)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    barrier(par)
    peak = step_memory(step, par.device)
    row = torch.tensor([par.rank, sorted(times[1:])[len(times[1:]) // 2], peak / 1e6], dtype=torch.float64,
                       device=par.device)  # nccl takes no CPU tensors
    rows = [row.clone() for _ in range(par.world_size)]
    if par.world_size > 1:
        dist.all_gather(rows, row)
    print0(f"bench: {cfg.model}, long sequences of {len(example['chosen']['ids'])} (chosen) and "
           f"{len(example['rejected']['ids'])} (rejected) tokens, --pack {cfg.pack}, world {par.world_size}, "
           f"sp {par.sp_size}, {torch.get_num_threads()} threads per process")
    kind = "peak allocated" if par.device.type == "cuda" else "peak RSS rise"
    print0(f"{'rank':>4} {'step time (s)':>14} {kind + ' in a step (MB)':>30}")
    for r in (r.tolist() for r in rows):
        print0(f"{int(r[0]):>4} {r[1]:14.3f} {r[2]:30.1f}")


# ----------------------------------------------------------------------------- main

def check_config(cfg):
    try:
        if not 0 <= nll_weight(cfg) <= 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--nll-target {cfg.nll_target!r}: choose sequence, responses, auto or a weight in [0, 1]") from None
    choices = {"loss": ("longpo", "dpo", "sft"),
               "dtype": ("auto", "float32", "float64", "bfloat16"), "pack": ("shared-prefix", "pairs")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    for name in ("grad_accum", "logprob_chunk", "world_size", "plan_branch_tokens"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    for name in ("sp_size", "lr", "lam", "weight_decay", "max_grad_norm", "max_steps", "max_length", "rope_theta",
                 "save_every", "stop_after", "bench_tokens"):
        if not getattr(cfg, name) >= 0:  # also NaN
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0 (0: the default behaviour)")
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
    if not (cfg.plan or cfg.bench_tokens):
        check_sp_size(cfg.sp_size)


def resolve_defaults(cfg):
    """Flags left at 0 take the paper's value, or a demo value for the random tiny model (so that its
    short default run visibly trains). The paper trains its SFT baseline at 2e-5, a usual SFT rate,
    and LongPO and DPO at 5e-7, a usual preference-optimisation rate."""
    tiny = cfg.model == "tiny"
    return dataclasses.replace(cfg, lr=cfg.lr or (1e-4 if tiny else 2e-5 if cfg.loss == "sft" else 5e-7),
                               nll_target=nll_target_of(cfg),  # the run's identity names what was trained
                               grad_accum=cfg.grad_accum or (1 if tiny else 8))


def main(cfg):
    cfg = resolve_defaults(cfg)
    check_config(cfg)
    for flag, name in (("--model", cfg.model), ("--ref-model", cfg.ref_model)):
        if name:
            check_model(name, flag)
    if cfg.plan:
        print(memory_plan(cfg))
        return
    state, records = "bench", None
    if not cfg.bench_tokens:  # every rank, before any process group or model: all or none stop here
        records = load_records(cfg.data)  # validates every record: errors name the line and field
        world = int(os.environ.get("WORLD_SIZE", 1))
        identity = run_identity(cfg, world, cfg.sp_size or world)
        state = check_output_dir(cfg, identity)
        if state == "finished":
            print0(f"{cfg.output_dir} holds this run, finished (final/ exists): nothing to do")
            return
    rank, world_size, device = init_distributed(group_of_one=True)
    par = setup_parallel(cfg.sp_size, rank, world_size, device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: ranks of an SP group must agree
    if rank == 0 and state == "fresh":
        clear_output_dir(cfg.output_dir)  # --overwrite, or leftovers of a run that never started
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "identity": identity}, f, indent=2)
    if cfg.bench_tokens:
        bench(cfg, par)
    else:
        print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        train(cfg, par, records)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, TrainConfig)
