"""Short-to-long preference data that the model writes itself (LongPO paper Sec. 3.3 and 4.1).

For every long document:
  1. keep it if its token length is within [--min-doc-len, --max-doc-len] (paper: > 64K, < target);
  2. cut it into chunks of --chunk-min..--chunk-max tokens at paragraph boundaries (then lines, then
     tokens); keep at most --turns random chunks;
  3. per chunk, ask the model for 4 diverse questions needing comprehension and synthesis of the
     chunk (temperature 0.7, top-p 0.9), keep the chunk only if 4 parse, pick one and prefix a
     lead-in such as "Based on the text above,";
  4. chosen = the model's answer seeing only the chunk; rejected = its answer seeing the whole
     document (greedy as the paper; --temperature for the release code's sampling; --rope-theta
     raises RoPE theta for the long-input generation only);
  5. drop turns with an empty answer, a refusal or degenerate repetition (counted per reason);
  6. pack a document's kept turns into one record (Eq. 13) with the reference log-probs on the SHORT
     inputs (longpo.short_reference_logps, the generating model with its own RoPE).
Prompts come from longpo.format_dialogue, as in training. Generation lives here, shared with eval.py:
generate (short prompts in batches), and generate_long (a document's prompts: the document prefilled once,
sequence-parallel with --sp-size, each rank holding its share of its K/V).

Deliberate deviations: a random tiny model cannot write questions, so the built-in demo corpus
(documents with planted, checkable facts) has template questions, the facts' own. Size flags
default to the paper's profile, or a small one for --model tiny. --answers gold / copy write the demo
corpus's planted answers / "repeat the text" records: the miniature's data (its model: test_longpo.py small).

Each random choice and sampled answer draws from its own seeded stream (seed, document, turn, role):
the records are the same at any world size, SP size or resume. Never loses work: --out is a folder to
which each rank appends each finished record (or dropped document); a restart skips what is done.

    python data_gen.py                                       # tiny model, demo corpus, CPU
    torchrun --nproc_per_node 8 data_gen.py --model mistralai/Mistral-7B-Instruct-v0.2 \\
        --docs long_docs.jsonl --max-doc-len 122368 --max-length 131072 --rope-theta 1e7 \\
        --out data/longpo_128k                              # one 8-GPU node
    torchrun --nproc_per_node 8 data_gen.py ... --sp-size 4  # 512K documents: each long answer over 4 GPUs
    python data_gen.py --plan --model DIR --max-doc-len 515584 --sp-size 4   # generation memory per GPU
"""
import bisect
import contextlib
import copy
import dataclasses
import functools
import glob
import hashlib
import json
import os
import random
import re
import time
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, Cache
from transformers.cache_utils import DynamicLayer

import longpo
from longpo import (UsageError, arg, check_at_least, check_sp_size, init_distributed, one_process, print0,
                    setup_parallel, use_kernel)

PAPER = dict(chunk_min=16384, chunk_max=30720, min_doc_len=65537, max_doc_len=131072,
             max_new_tokens=1024, temperature=0.0)
TINY = dict(chunk_min=512, chunk_max=1024, min_doc_len=1024, max_doc_len=32768,
            max_new_tokens=64, temperature=1.0)  # a random model decodes greedily into loops


@dataclass
class DataGenConfig:
    """Generate LongPO preference data (paper Sec. 3.3); size flags at 0 / -1 take the profile's value."""
    model: str = arg("tiny", "pi_S: hub id, local dir, or 'tiny'")
    docs: str = arg("demo", "JSONL ('text', 'id'), .txt file or folder, or 'demo'")
    out: str = arg("data/longpo_tiny", "output folder (longpo.py's default --data)")
    chunk_min: int = arg(0, "fewest tokens in a chunk (0: profile; paper 16384)")
    chunk_max: int = arg(0, "most tokens in a chunk (0: profile; release code 30720)")
    min_doc_len: int = arg(0, "fewest tokens in a document (0: profile; paper > 64K)")
    max_doc_len: int = arg(0, "most tokens in a document (0: profile; paper < target)")
    turns: int = arg(4, "at most this many chunks (turns) per document")
    max_new_tokens: int = arg(0, "answer length limit (0: profile; paper 1024)")
    temperature: float = arg(-1.0, "answer sampling temperature (-1: profile; paper 0)")
    answers: str = arg("model", "model (the paper) | gold | copy (demo corpus only)")
    demo_docs: int = arg(4, "--docs demo: number of documents (drawn from --seed)")
    demo_paragraphs: str = arg("24", "--docs demo: paragraphs (1-64) a document, or A-B")
    rope_theta: float = arg(0.0, "RoPE theta of the LONG-input generation (paper 1e7)")
    max_length: int = arg(0, "training's --max-length: turns trimmed, documents dropped (before their long "
                          "answers) to fit it")
    sp_size: int = arg(1, "ranks that decode each long-input answer together")
    batch_size: int = arg(8, "short prompts generated together")
    attn_kernel: str = arg("auto", "auto | cudnn | sdpa_flash | flash_attn | cpu | plain")
    plan: bool = arg(False, "print generation memory per GPU and exit")
    seed: int = arg(0, "seed of the demo corpus, chunk and question choice, sampling")


QUESTION_PROMPT = (
    "Write 4 different questions about the text above. Each question should require understanding, "
    "analysing or bringing together information from different parts of the text, not just looking "
    "up one detail. Make each question clear and answerable on its own. Reply only with a numbered "
    "list: 1. ... 2. ... 3. ... 4. ...")
LEAD_INS = ("Based on the text above,", "Using the text above,", "According to the text above,",
            "With reference to the text above,")
QUESTION_WORDS = {"what", "how", "why", "which", "who", "whom", "whose", "where", "when", "in", "to",
                  "is", "are", "was", "were", "do", "does", "did", "can", "could", "should", "would",
                  "explain", "describe", "compare", "summarize", "summarise", "according"}
QUESTION_TOKENS = 512  # the question list's token limit
REFUSALS = ("i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't", "i'm unable", "i am unable",
            "as an ai", "as a language model", "i'm not able to", "i am not able to")


# ---------------------------------------------------------- chunks, questions, filters

def paragraph_spans(text):
    """[start, end) of the paragraphs of text (separated by blank lines), each end extended to the
    next paragraph's start so that consecutive spans tile the text."""
    starts = [0] + [m.end() for m in re.finditer(r"\n[ \t]*\n\s*", text)]
    starts = [s for s in starts if s < len(text)]
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(text)])]


def split_span(text, start, end, count, starts, limit):
    """Pieces of text[start:end] of at most `limit` tokens: at line breaks, else at token borders."""
    if count(start, end) <= limit:
        return [(start, end)]
    line_ends = [start + m.end() for m in re.finditer(r"\n", text[start:end]) if start + m.end() < end]
    if not line_ends:  # one over-long line: cut between tokens
        first = bisect.bisect_left(starts, start)
        borders = [starts[j] for j in range(first + limit, bisect.bisect_left(starts, end), limit)]
        return list(zip([start] + borders, borders + [end]))
    pieces, first = [], start
    for a, b in zip([start] + line_ends, line_ends + [end]):  # greedy over lines
        if count(first, b) > limit and a > first:
            pieces += split_span(text, first, a, count, starts, limit)
            first = a
    return pieces + split_span(text, first, end, count, starts, limit)


def tokens_in(starts, a, b):
    """Tokens of the text that start inside the character span [a, b) (starts: each token's offset)."""
    return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)


def chunk_document(text, starts, chunk_min, chunk_max):
    """Non-overlapping [start, end) chunks of chunk_min..chunk_max tokens of text, cut at paragraph
    boundaries (then lines, then tokens). starts: the character offset of each token of text."""
    count = functools.partial(tokens_in, starts)
    pieces = [p for a, b in paragraph_spans(text) for p in split_span(text, a, b, count, starts, chunk_max)]
    chunks, current = [], []
    for piece in pieces + [None]:
        if piece is not None and (not current or count(current[0][0], piece[1]) <= chunk_max):
            current.append(piece)
            continue
        if current and count(current[0][0], current[-1][1]) >= chunk_min:
            chunks.append((current[0][0], current[-1][1]))
        current = [piece] if piece is not None else []
    return chunks


def parse_questions(reply):
    """Questions of a numbered list ("1.", "1)", "Q1:", "**1.**", "Question 1:"), in order; lines
    of other text are ignored and a question may continue on its next line."""
    questions = []
    item = re.compile(r"^\s*(?:[*_#>-]+\s*)?(?:q(?:uestion)?\s*)?(\d{1,2})\s*[.):\-]\**\s*(.+)$", re.I)
    for line in reply.splitlines():
        m = item.match(line)
        if m and int(m.group(1)) == len(questions) + 1:
            questions.append(m.group(2).strip(" *_"))
        elif questions and line.strip() and not re.match(r"^\s*\d", line) and not questions[-1].endswith("?"):
            questions[-1] += " " + line.strip()
    return [q for q in questions if q]


def filter_reason(answer):
    """Why an answer is unusable (None if usable): empty, refusal, or degenerate repetition."""
    text = answer.strip()
    if not text:
        return "empty"
    if any(phrase in text.lower()[:300] for phrase in REFUSALS):
        return "refusal"
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    if len(words) >= 20 and len(set(grams)) < 0.5 * len(grams):
        return "repetition"
    data = text.encode()
    if len(data) >= 64 and len(zlib.compress(data, 9)) < 0.2 * len(data):
        return "repetition"
    return None


def with_lead_in(lead_in, question):
    """'Based on the text above,' + question, lower-casing a leading question word (not a name)."""
    first, _, rest = question.partition(" ")
    if first.lower() in QUESTION_WORDS:
        question = f"{first.lower()} {rest}".strip()
    return f"{lead_in} {question}"


# ---------------------------------------------------------- generation

def load_for_inference(name, device):
    """(model, tokenizer) for generation and scoring: bf16 on CUDA, fp32 on CPU, in eval mode."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = longpo.load_model_and_tokenizer(name, dtype)
    return model.to(device).eval(), tokenizer


def stop_token_ids(tokenizer, model=None):
    """Tokens that end an answer: the template's end-of-turn specials (Llama-3's <|eot_id|>, ChatML's
    <|im_end|>: not always the eos), the eos, and those of the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = [*template_stops(tokenizer), tokenizer.eos_token_id]
    stops += configured if isinstance(configured, list) else [configured]
    return sorted({t for t in stops if t is not None})


@functools.lru_cache(maxsize=4)  # rendered once per tokenizer, not per prompt
def template_stops(tokenizer):
    ids, is_answer = longpo.format_dialogue(tokenizer, "", [{"instruction": "?", "answer": "ok"}], "answer")
    special = set(longpo.special_tokens(tokenizer).values())
    return tuple(t for t, a in zip(ids, is_answer) if a and t in special)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, par=None, seeds=None):
    """Decode token-id prompts until an end-of-turn token: greedy at temperature 0, else each row sampled
    from its own generator (seeds[i]): a row's answer depends on its prompt and seed alone. Returns
    (texts, new tokens). One process: the rows together, left-padded, with a K/V cache; with par of SP
    size > 1, one prompt at a time, sequence-parallel (generate_long), the same texts on every rank."""
    seeds = seeds or [0] * len(prompts)
    if par is not None and par.sp_size > 1:
        results = [generate_long(model, tokenizer, [p], max_new_tokens, par, temperature, top_p, [seed])[0]
                   for p, seed in zip(prompts, seeds)]
        return [text for text, _ in results], sum(n for _, n in results)
    device, width, stops = model.device, max(map(len, prompts)), set(stop_token_ids(tokenizer, model))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # every prompt from position 0, after its padding
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    cache, new = room_cache(model, max_new_tokens), [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()  # (B, V)
        for i, row in enumerate(new):
            if not row or row[-1] not in stops:
                row.append(next_token(logits[i], temperature, top_p, generators[i]))
        if all(row[-1] in stops for row in new):
            break
        ids = torch.tensor([[row[-1]] for row in new], device=device)  # finished rows repeat their stop token
        mask, positions = F.pad(mask, (0, 1), value=1), positions[:, -1:] + 1
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return texts, sum(map(len, new))


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


class RoomLayer(DynamicLayer):
    """One layer's K/V cache with room for `room` more tokens reserved at its first update (the prefill),
    so a decoding step writes in place and copies nothing (transformers' DynamicLayer concatenates: at a
    122K-token prompt, the whole cache moves per token). `length` may be cut back."""

    def __init__(self, room):
        super().__init__()
        self.room, self.length = room, 0

    def update(self, key, value, *args, **kwargs):  # (B, Hkv, T, D)
        if not self.is_initialized:  # the prefill attends to all of its own tokens
            n = key.shape[2]
            B, H, _, D = key.shape
            self.keys = key.new_empty(B, H, n + self.room, D)
            self.values = value.new_empty(B, H, n + self.room, D)
            self.keys[:, :, :n], self.values[:, :, :n] = key, value
            self.length, self.is_initialized = n, True
            return key, value
        n = self.length + key.shape[2]
        self.keys[:, :, self.length:n], self.values[:, :, self.length:n] = key, value
        self.length = n
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_seq_length(self):
        return self.length


def common_prefix(prompts):
    """How many tokens all prompts begin with, leaving each one of its own (whose logits begin its answer)."""
    n = min(map(len, prompts)) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != prompts[0][i]), n)
    return n


def room_cache(model, room):
    return Cache(layers=[RoomLayer(room) for _ in range(model.config.num_hidden_layers)])


def prefill(model, seq, room, par):
    """This rank's share of the K/V of a prefix (seq: prepare_sequence's, a multiple of 2 x sp tokens, so no
    padding to leave out; None: no prefix), run once with ring attention, in a cache with room for `room`
    more tokens."""
    cache = room_cache(model, room)
    if seq is not None:
        model.get_decoder()(input_ids=seq.input_ids, position_ids=seq.position_ids, cache=cache,
                            use_cache=True, ring_group=par.sp_group)
    return cache


@torch.no_grad()
def generate_long(model, tokenizer, prompts, max_new_tokens, par, temperature=0.0, top_p=1.0, seeds=None,
                  stats=None):
    """Answers to prompts that share a prefix (one document's turns), decoded by par's SP group (in one
    process, a group of one): [(text, new tokens)], the same on every rank. The shared prefix, cut to a
    multiple of 2 x sp tokens, is prefilled ONCE (prefill), each rank keeping ITS part of every layer's K/V;
    each prompt's own tokens, then its answer, run as decoding steps: every query attends to every rank's part
    of the prefix and to the tokens after it (on every rank, counted on one), merged by the exact lse rule
    (ring_attention.decode_attention), so every rank computes the same logits and token (sampling from
    the same seeded stream). Before the next prompt the cache is cut back to the prefix."""
    seeds, n = seeds or [0] * len(prompts), common_prefix(prompts) // (2 * par.sp_size) * (2 * par.sp_size)
    attn = model.config._attn_implementation
    model.set_attn_implementation("ring_attention")
    decoder, head = model.get_decoder(), model.get_output_embeddings().weight
    head = head.to(torch.promote_types(head.dtype, torch.float32))  # fp32 logits, as in training
    stops, results, clock = stop_token_ids(tokenizer, model), [], time.perf_counter()
    try:
        seq = longpo.prepare_sequence(prompts[0][:n], {}, par, tokenizer.pad_token_id) if n else None
        cache = prefill(model, seq, max(map(len, prompts)) - n + max_new_tokens, par)
        kwargs = dict(cache=cache, use_cache=True, ring_group=par.sp_group)
        n_prefix, prefill_s, clock = cache.layers[0].length, time.perf_counter() - clock, time.perf_counter()
        for prompt, seed in zip(prompts, seeds):
            generator, new, feed = torch.Generator(device=par.device).manual_seed(seed), [], prompt[n:]
            while not new or (new[-1] not in stops and len(new) < max_new_tokens):
                start = len(prompt) + len(new) - len(feed)  # the position of feed's first token
                hidden = decoder(input_ids=torch.tensor([feed], device=par.device), ring_decode=n_prefix,
                                 position_ids=torch.arange(start, start + len(feed), device=par.device)[None],
                                 **kwargs).last_hidden_state
                logits = F.linear(hidden[0, -1].to(head.dtype), head)
                new.append(next_token(logits, temperature, top_p, generator))
                feed = new[-1:]
            for layer in cache.layers:
                layer.length = n_prefix  # back to the prefix: the next prompt's own tokens follow it
            results.append((tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)))
    finally:
        model.set_attn_implementation(attn)
    if stats is not None:
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        cache_bytes = sum(t.numel() * t.element_size() for t in tensors)
        stats.update(prefill_s=prefill_s, decode_s=time.perf_counter() - clock,
                     new_tokens=sum(k for _, k in results), cache_bytes=cache_bytes)
    return results


def ask(model, tokenizer, contexts, instructions, seeds, cfg, **sampling):
    """Answers of the model to each (context, instruction) on short inputs, --batch-size at a time, with
    longpo's chat formatting; each sampled from its own seed."""
    prompts = [longpo.format_dialogue(tokenizer, c, [{"instruction": i}])[0]
               for c, i in zip(contexts, instructions)]
    texts, n_new = [], 0
    for k in range(0, len(prompts), cfg.batch_size):
        batch = slice(k, k + cfg.batch_size)
        t, n = generate(model, tokenizer, prompts[batch], seeds=seeds[batch], **sampling)
        texts += t
        n_new += n
    return texts, n_new


def long_answers(long_model, tokenizer, doc, turns, cfg, par):
    """The rejected answers: each turn's instruction after the WHOLE document, the document prefilled once
    for all turns (generate_long); [(text, new tokens)]."""
    prompts = [longpo.format_dialogue(tokenizer, doc["text"], [{"instruction": t["instruction"]}])[0]
               for t in turns]
    return generate_long(long_model, tokenizer, prompts, cfg.max_new_tokens, par, cfg.temperature,
                         seeds=seeds(cfg, doc, len(turns), "rejected"))


# ---------------------------------------------------------- records

def stream(cfg, doc, *where):
    """The key of one random choice or sampled answer: the seed, the document's id (its text's hash) and
    where in it (turn, role). Each its own: the data is a function of the seed and the documents alone."""
    return "|".join(map(str, (cfg.seed, doc["id"], *where)))


def seed_of(key):
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1  # a 63-bit torch seed


def seeds(cfg, doc, n, role):
    """The sampling seeds of n answers of one role (questions, chosen, rejected) to a document."""
    return [seed_of(stream(cfg, doc, i, role)) for i in range(n)]


class Dropped(Exception):
    """A document that gives no record: the reason (counted in the summary), the turns filtered, and for
    a failure inside it ("error") one line of the error."""
    def __init__(self, reason, filtered=None, error=None):
        super().__init__(reason)
        self.reason, self.filtered, self.error = reason, filtered or {}, error


def attempt(fn, *args):
    """fn(*args), an error inside it (out of memory, a template that fails) made Dropped("error"): one bad
    document is recorded with its error and the run goes on, instead of stopping every restart on it."""
    try:
        return fn(*args)
    except Dropped:
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    # out of the except block, the error and the frames it held (their tensors) are gone
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a broken device (an illegal access, ECC) raises here and stops the run
        torch.cuda.empty_cache()  # what the failed document held
    raise Dropped("error", error=error)


@functools.lru_cache(maxsize=4)
def longest_token(tokenizer):
    """Characters in the longest vocabulary entry: no token covers more of a text."""
    return max(map(len, tokenizer.get_vocab()))


def measure(doc, tokenizer, cfg):
    """(tokens, each token's start offset) of a document whose length is within the flags' range."""
    text = doc["text"]
    # Cheap bounds before tokenizing: a token covers at least one UTF-8 byte (plus a BOS or dummy
    # prefix) and at most its longest vocabulary entry, so a document far outside the length range
    # (a 20 MB one-line file) is dropped in microseconds instead of a minute and gigabytes.
    too_short = len(text.encode("utf-8", "surrogatepass")) + 2 < cfg.min_doc_len
    if too_short or len(text) > cfg.max_doc_len * longest_token(tokenizer):
        raise Dropped("doc_length")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    split_special_tokens=True)  # the document is text: a special token's literal too
    if not cfg.min_doc_len <= len(enc["input_ids"]) <= cfg.max_doc_len:
        raise Dropped("doc_length")
    return len(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]


def make_record(doc, doc_index, models, tokenizer, cfg, counts):
    """One process: the record of a document (raises Dropped), the steps of the module docstring in
    order; counts collects generated tokens. models: (the model, the rotary embedding of its long-input
    passes or None: long_rotary)."""
    model, rotary = models
    if cfg.answers == "copy":
        return copy_record(doc, doc_index, tokenizer, cfg)
    draft = start_record(doc, doc_index, model, tokenizer, cfg, counts)  # steps 1-4: the short inputs
    if cfg.answers == "gold":
        return gold_record(draft, tokenizer, cfg)
    with long_input(model, rotary) as long_model:  # 4. the rejected answers: the whole document
        rejected = long_answers(long_model, tokenizer, doc, draft["turns"], cfg, one_process(model.device))
    counts["generated"] += sum(n for _, n in rejected)
    return finish_record(draft, [text for text, _ in rejected], model, tokenizer, cfg)  # steps 5-6


def long_rotary(model, theta):
    """--rope-theta: the rotary embedding of the long-input passes. The weights do not depend on theta,
    so the one model serves both passes, this swapped in for the long ones (long_input)."""
    if not theta or model is None:
        return None
    config, short = copy.deepcopy(model.config), model.get_decoder().rotary_emb
    longpo.set_rope_theta(config, theta)
    return type(short)(config).to(short.inv_freq.device, short.inv_freq.dtype)  # as a loaded model has it


@contextlib.contextmanager
def long_input(model, rotary):
    """The model with its rotary embedding swapped for `rotary` (None: its own) while inside."""
    decoder = model.get_decoder()
    short = decoder.rotary_emb
    decoder.rotary_emb = rotary or short
    try:
        yield model
    finally:
        decoder.rotary_emb = short


def start_record(doc, doc_index, model, tokenizer, cfg, counts):
    """Everything on SHORT inputs: length, chunks, questions, the chosen answers. Returns the draft record,
    whose turns still need their rejected (long-input) answers; raises Dropped if the document gives none."""
    text = doc["text"]
    n_tokens, starts = measure(doc, tokenizer, cfg)  # 1. the document's length
    if cfg.max_length and n_tokens >= cfg.max_length:  # cannot fit with any answer: no generation at all
        raise Dropped("max_length")
    chunks = chunk_document(text, starts, cfg.chunk_min, cfg.chunk_max)  # 2. chunks, --turns of them
    chunks = sorted(random.Random(stream(cfg, doc, "chunks")).sample(chunks, min(cfg.turns, len(chunks))))
    if not chunks:
        raise Dropped("no_chunks")
    turns, asked, filtered = ask_questions(doc, chunks, model, tokenizer, cfg, counts)  # 3. the questions
    if not turns:
        raise Dropped("questions", filtered)
    draft = {"doc": doc, "doc_index": doc_index, "turns": turns, "asked": asked, "filtered": filtered,
             "doc_tokens": n_tokens, "starts": starts}
    if cfg.answers == "model":  # 4. the chosen answers: the chunk only
        chosen, n = ask(model, tokenizer, [text[t["chunk"][0]:t["chunk"][1]] for t in turns],
                        [t["instruction"] for t in turns], seeds(cfg, doc, len(turns), "chosen"), cfg,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        counts["generated"] += n
        # before the long-input answers: the turns that fit --max-length whatever those answers will be
        kept = fit_max_length(text, [{**t, "chosen": c, "rejected": "."} for t, c in zip(turns, chosen)],
                              tokenizer, cfg, filtered, slack=cfg.max_new_tokens + 2)
        draft["turns"], draft["chosen"] = turns[:len(kept)], chosen[:len(kept)]
    return draft


def ask_questions(doc, chunks, model, tokenizer, cfg, counts):
    """Step 3: per chunk, 4 questions from the model (the demo corpus: its facts' own), one of them kept at
    random (--answers gold: all), each behind a random lead-in. Returns (turns, the questions asked, the
    chunks filtered for want of questions)."""
    pieces = [doc["text"][a:b] for a, b in chunks]
    if cfg.docs == "demo":  # a random model writes no questions: the facts' own
        replies = [template_questions(p, doc["facts"]) for p in pieces]
    else:
        replies, n = ask(model, tokenizer, pieces, [QUESTION_PROMPT] * len(pieces),
                         seeds(cfg, doc, len(pieces), "questions"), cfg,
                         max_new_tokens=QUESTION_TOKENS, temperature=0.7, top_p=0.9)
        counts["generated"] += n
    turns, asked, filtered = [], [], {}
    for j, ((a, b), reply) in enumerate(zip(chunks, replies)):
        questions = parse_questions(reply)
        if len(questions) < (1 if cfg.docs == "demo" else 4):  # the template lists the chunk's facts
            filtered["questions"] = filtered.get("questions", 0) + 1
            continue
        if cfg.answers != "gold":  # gold: all the chunk's facts
            questions = [random.Random(stream(cfg, doc, j, "question")).choice(questions[:4])]
        for k, question in enumerate(questions):
            asked.append(question)
            lead_in = random.Random(stream(cfg, doc, j, k, "lead-in")).choice(LEAD_INS)
            turns.append({"instruction": with_lead_in(lead_in, question), "chunk": [a, b]})
    return turns, asked, filtered


def fit_max_length(text, turns, tokenizer, cfg, filtered, slack=0):
    """--max-length (training's, longpo.trained_length): the first turns whose trained sequence fits it with
    `slack` tokens a turn left for answers not yet written (a generated token may re-tokenize as two at
    an answer's border: 2 spare); the turns cut are counted in `filtered`. None fits: Dropped."""
    if not cfg.max_length:
        return turns
    for n in range(len(turns), 0, -1):
        example = longpo.build_example({"document": text, "turns": turns[:n]}, tokenizer)
        if longpo.trained_length(example) + n * slack <= cfg.max_length:
            if n < len(turns):
                filtered["max_length"] = filtered.get("max_length", 0) + len(turns) - n
            return turns[:n]
    raise Dropped("max_length", filtered)


def finish_record(draft, rejected, model, tokenizer, cfg):
    """The filters, the record and its reference log-probs, given the rejected (long-input) answers."""
    kept, filtered = [], draft["filtered"]
    for turn, c, r in zip(draft["turns"], draft["chosen"], rejected):  # 5. the filters
        reason = filter_reason(c) or filter_reason(r)
        if reason:
            filtered[reason] = filtered.get(reason, 0) + 1
        else:
            kept.append({**turn, "chosen": c, "rejected": r})
    if not kept:
        raise Dropped("all_turns_filtered", filtered)
    # 6. the record, and Eq. 13's reference: the sum over turns of log pi_S(y_i | chunk_i, instruction_i)
    rec = draft_record(draft, kept, cfg, tokenizer, cfg.model, temperature=cfg.temperature,
                       rope_theta_long=cfg.rope_theta or None)
    rec["ref_chosen_logp"], rec["ref_rejected_logp"] = longpo.short_reference_logps(model, tokenizer, rec)
    return rec


def sp_record(doc, doc_index, models, tokenizer, cfg, par, counts):
    """--sp-size: this rank's short-input work (doc None: none this round), then the SP group's decoding of
    every member's long prompts, in which every member takes part. The record (or None), or Dropped."""
    (model, rotary), draft, dropped = models, None, None
    try:  # an error here is this rank's alone and drops the document; one in the decoding, the group's
        draft = attempt(start_record, doc, doc_index, model, tokenizer, cfg, counts) if doc else None
    except Dropped as reason:
        dropped = reason
    with long_input(model, rotary) as long_model:
        rejected = sp_rejected_answers(draft, long_model, tokenizer, cfg, par, counts)
    if dropped:
        raise dropped
    return attempt(finish_record, draft, rejected, model, tokenizer, cfg) if draft else None


def sp_rejected_answers(draft, long_model, tokenizer, cfg, par, counts):
    """--sp-size: every member's document and turns (None: none this round) are gathered, each document's
    long prompts decoded by the whole SP group (long_answers), and each rank keeps its own answers."""
    everyone = [None] * par.sp_size
    dist.all_gather_object(everyone, draft and (draft["doc"], draft["turns"]), group=par.sp_group)
    mine = []
    for member, work in enumerate(everyone):  # the same order on every rank: lockstep
        if work is not None:
            answers = long_answers(long_model, tokenizer, *work, cfg, par)
            if member == par.sp_rank:
                mine = [text for text, _ in answers]
                counts["generated"] += sum(n for _, n in answers)
    return mine


# ---------------------------------------------------------- the demo corpus and the miniature

PLACE_HEADS = "Al Bar Cor Dun El Fen Gal Har Ist Kel Lor Mor Nor Pel Ros Tam".split()
PLACE_TAILS = ["wick", "ford", "mere", "holt", "stead", "by", "ton", "dale"]
PLACES = [a + b for a in PLACE_HEADS for b in PLACE_TAILS]  # 128 one-word names: Alwick, Barford, ...
ITEMS = ["maps", "lanterns", "ledgers", "bells", "keys", "crates", "clocks", "banners", "barrels",
         "compasses", "telescopes", "anchors"]
FILLER = ["The morning fog lifted slowly over the valley.",
          "Travellers often stopped to rest by the old well.",
          "Records from that season were kept with great care.",
          "The wind carried the smell of pine and salt.",
          "Few visitors remembered the road that led there.", "Merchants argued about prices until dusk.",
          "A narrow stair climbed past the empty courtyard.", "Rain had softened the path along the river."]
MAX_DEMO_PARAGRAPHS = len(PLACES) // 2  # two facts a paragraph, no place twice in a document
COPY_WORDS = (16, 32)  # fewest and most words of an --answers copy record
COPY_INSTRUCTION = "Repeat the text above."


def parse_paragraphs(spec):
    """--demo-paragraphs: "N" or "A-B" -> (A, B) within 1..MAX_DEMO_PARAGRAPHS."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(spec))
    lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if not 1 <= lo <= hi <= MAX_DEMO_PARAGRAPHS:
        raise UsageError(f"--demo-paragraphs {spec!r}: give N or A-B within 1..{MAX_DEMO_PARAGRAPHS} (two "
                         "facts a "
                         "paragraph, no place twice in a document)")
    return lo, hi


def demo_corpus(n_docs=4, paragraphs=24, seed=0):
    """Synthetic documents with planted, checkable facts: paragraphs of filler sentences, each with two
    facts "At Barwick 57 maps were counted." (no place twice in a document: every question "How many maps
    are there at Barwick?" has one answer, 10-99, right after its place). paragraphs: a count, or "A-B"."""
    lo, hi = parse_paragraphs(paragraphs)
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        n_paragraphs = rng.randint(lo, hi) if hi > lo else lo
        places = rng.sample(PLACES, 2 * n_paragraphs)
        paras, facts = [], []
        for k in range(n_paragraphs):
            sentences = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
            for place in places[2 * k:2 * k + 2]:
                thing, n = rng.choice(ITEMS), rng.randint(10, 99)
                fact = f"At {place} {n} {thing} were counted."
                sentences.insert(rng.randint(0, len(sentences)), fact)
                facts.append({"sentence": fact, "question": f"How many {thing} are there at {place}?",
                              "answer": str(n), "place": place})
            paras.append(" ".join(sentences))
        docs.append({"id": f"demo-{seed}-{d}" if seed else f"demo-{d}", "text": "\n\n".join(paras),
                     "facts": facts})
    return docs


def gold_answer(place, number):
    """The miniature's answer form: the place, then its number, as the document has them."""
    return f"At {place} {number}."


def copy_corpus(n_docs, seed=0):
    """Documents "Words:" + 16-32 distinct random words of the demo corpus (one token each), for --answers
    copy: the varying length leaves no fixed look-back to repeat, so the model must copy by content."""
    numbers, filler_words = [str(n) for n in range(10, 100)], re.findall(r"\w+", " ".join(FILLER))
    words = sorted(set(PLACES + ITEMS + numbers + filler_words))
    rng = random.Random(f"copy-{seed}")
    return [{"id": f"copy-{seed}-{d}", "facts": [],
             "text": "Words: " + " ".join(rng.sample(words, rng.randint(*COPY_WORDS)))}
            for d in range(n_docs)]


def template_questions(chunk_text, facts):
    """The numbered list a perfect question writer would give for this chunk, from its facts."""
    inside = [f["question"] for f in facts if f["sentence"] in chunk_text]
    return "\n".join(f"{i + 1}. {q}" for i, q in enumerate(inside[:4]))


def gold_record(draft, tokenizer, cfg):
    """--answers gold: the planted answers ("At Barwick 57.") as chosen, the place with another number of
    the document as rejected; no reference log-probs. The questions in random order: in document order
    a model learns to answer by elimination (turn 2 = the fact turn 1 skipped) instead of matching."""
    doc, n_turns = draft["doc"], len(draft["turns"])
    fact = {f["question"]: f for f in doc["facts"]}
    numbers = sorted({f["answer"] for f in doc["facts"]})
    turns = []
    for i in random.Random(stream(cfg, doc, "gold-order")).sample(range(n_turns), n_turns):
        place, right = fact[draft["asked"][i]]["place"], fact[draft["asked"][i]]["answer"]
        others = [n for n in numbers if n != right] or [str(int(right) % 90 + 10)]
        wrong = random.Random(stream(cfg, doc, i, "gold-wrong")).choice(others)
        turns.append({**draft["turns"][i], "chosen": gold_answer(place, right),
                      "rejected": gold_answer(place, wrong)})
    return draft_record(draft, turns, cfg, tokenizer, "gold")


def copy_record(doc, doc_index, tokenizer, cfg):
    """--answers copy: "Repeat the text above.", chosen = the document, rejected = its words in
    reverse order; no reference log-probs (no model ran)."""
    text, (n_tokens, starts) = doc["text"], measure(doc, tokenizer, cfg)
    turn = {"instruction": COPY_INSTRUCTION, "chunk": [0, len(text)], "chosen": text,
            "rejected": " ".join(reversed(text.split()))}
    draft = {"doc": doc, "doc_index": doc_index, "doc_tokens": n_tokens, "filtered": {}, "starts": starts}
    return draft_record(draft, [turn], cfg, tokenizer, "copy")


def draft_record(draft, turns, cfg, tokenizer, generator, **more_meta):
    """The record as written: the document, these turns (those that fit --max-length), their origin."""
    turns = fit_max_length(draft["doc"]["text"], turns, tokenizer, cfg, draft["filtered"])
    meta = {"doc_index": draft["doc_index"], "generator": generator,
            "questions": "template" if cfg.docs == "demo" else "model",
            "doc_tokens": draft["doc_tokens"], "filtered_turns": draft["filtered"],
            "chunk_tokens": [tokens_in(draft["starts"], *t["chunk"]) for t in turns], **more_meta,
            "seed": cfg.seed}
    return {"id": draft["doc"]["id"], "document": draft["doc"]["text"], "turns": turns, "meta": meta}


# ---------------------------------------------------------- input

def text_id(text):
    """The id of a document without one: a hash of its text, so that a resumed run recognises it
    wherever it moved in the file."""
    return "sha1-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Docs:
    """The input documents by index, each read from disk when needed: the demo corpus, a folder of .txt
    files, or a JSONL with 'text' (optional 'id'; else the text's hash), checked once."""

    def __init__(self, spec, demo=(4, 24, 0), copy=False):
        self.spec = spec
        if spec == "demo":
            self.sources = copy_corpus(demo[0], demo[2]) if copy else demo_corpus(*demo)
            self.ids = [d["id"] for d in self.sources]
        elif os.path.isdir(spec):
            self.sources = sorted(glob.glob(os.path.join(spec, "*.txt")))
            if not self.sources:
                raise UsageError(f"--docs {spec}: the folder holds no .txt files")
            self.ids = [os.path.splitext(os.path.basename(p))[0] for p in self.sources]
        elif os.path.isfile(spec):
            self.sources, self.ids = self.index_jsonl(spec)
        else:
            raise UsageError(f"--docs {spec}: no such file or folder (give a JSONL file, a folder of .txt "
                             "files, or 'demo')")
        seen = {}
        for i, doc_id in enumerate(self.ids):
            if doc_id in seen:
                raise UsageError(f"--docs {spec}: documents {seen[doc_id] + 1} and {i + 1} have the same id "
                                 f"{doc_id!r} (the same text, when they have no id); resuming needs unique "
                                 "ids: remove the duplicate")
            seen[doc_id] = i

    @staticmethod
    def index_jsonl(spec):
        offsets, ids, offset = [], [], 0
        with open(spec, "rb") as f:
            for lineno, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise ValueError("needs a string field 'text'")
                except ValueError as e:  # bad JSON, bad UTF-8, or no text
                    raise UsageError(f"{spec}:{lineno}: {e}; fix or remove the line") from None
                offsets.append(start)
                ids.append(str(rec["id"]) if rec.get("id") is not None else text_id(rec["text"]))
        return offsets, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        source = self.sources[i]
        if isinstance(source, dict):
            return source
        if isinstance(source, str):
            with open(source, encoding="utf-8", errors="replace") as f:
                return {"id": self.ids[i], "text": f.read()}
        with open(self.spec, "rb") as f:
            f.seek(source)
            return {"id": self.ids[i], "text": json.loads(f.readline())["text"]}


def resolve(cfg):
    """Fill profile-dependent flags (0 / -1); check the rest."""
    if cfg.answers == "copy" and (cfg.chunk_min or cfg.chunk_max):
        raise UsageError("--answers copy repeats the whole document (its chunk): drop --chunk-min/max")
    profile = TINY if cfg.model == "tiny" else PAPER
    cfg = dataclasses.replace(cfg, **{k: v for k, v in profile.items()
                                      if getattr(cfg, k) == (-1.0 if k == "temperature" else 0)})
    if cfg.answers not in ("model", "gold", "copy"):
        raise UsageError(f"--answers {cfg.answers!r}: choose model, gold or copy")
    if cfg.answers != "model" and (cfg.docs != "demo" or cfg.sp_size > 1):
        raise UsageError(f"--answers {cfg.answers} needs the built-in corpus (--docs demo) and runs no model "
                         "(--sp-size 1)")
    if cfg.docs == "demo" and cfg.demo_docs < 1:
        raise UsageError(f"--demo-docs {cfg.demo_docs} must be >= 1")
    parse_paragraphs(cfg.demo_paragraphs)
    if not 0 < cfg.chunk_min <= cfg.chunk_max:
        raise UsageError(f"need 0 < --chunk-min ({cfg.chunk_min}) <= --chunk-max ({cfg.chunk_max})")
    if not 0 <= cfg.min_doc_len <= cfg.max_doc_len:
        raise UsageError(f"need 0 <= --min-doc-len ({cfg.min_doc_len}) <= --max-doc-len ({cfg.max_doc_len})")
    check_at_least(cfg, ("turns", "max_new_tokens", "batch_size", "sp_size"), 1)
    if not (cfg.temperature >= 0 and cfg.rope_theta >= 0):
        raise UsageError(f"--temperature ({cfg.temperature}) and --rope-theta ({cfg.rope_theta}) must be "
                         ">= 0")
    check_at_least(cfg, ("max_length",), 0, " (0: no limit)")
    use_kernel(cfg.attn_kernel)
    if not cfg.plan:
        check_sp_size(cfg.sp_size)
    return cfg


# ---------------------------------------------------------- never losing work
# --out is a folder: args.json (the arguments that started it), and per rank rank<r>.jsonl, its records,
# and rank<r>.dropped, the documents that gave none (and why), each line flushed when its document is
# done. A restart skips every document any rank has done, at any world size; no rank ever waits for
# another, and no merge: longpo.py and eval.py read the folder (its records in document order).

def out_files(folder):
    return glob.glob(os.path.join(folder, "rank*.jsonl")) + glob.glob(os.path.join(folder, "rank*.dropped"))


def read_done(folder):
    """The ids of the documents any rank has finished, kept or dropped (a line a kill tore was cut by
    start_out: that document is done again)."""
    done = set()
    for path in out_files(folder):
        with open(path, "rb") as f:
            done.update(json.loads(line)["id"] for line in f)
    return done


HARMLESS = ("batch_size", "attn_kernel")  # may change between the runs that fill a folder


def run_arguments(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in HARMLESS}


def check_out(cfg):
    """Every rank, before any work: an --out folder is continued only with the arguments that started it;
    a file, or a folder that no run of ours started, is never touched."""
    path = os.path.join(cfg.out, "args.json")
    foreign = os.path.isdir(cfg.out) and os.listdir(cfg.out) and not os.path.exists(path)
    if os.path.isfile(cfg.out) or foreign:
        raise UsageError(f"--out {cfg.out} exists and is no data_gen.py output folder; choose another --out")
    if os.path.exists(path):
        with open(path) as f:
            changed = longpo.changed_arguments(json.load(f), run_arguments(cfg))
        if changed:
            raise UsageError(f"--out {cfg.out} holds work done with other arguments ({changed}); rerun with "
                             "the same arguments to continue it, or choose another --out")


def start_out(cfg):
    """Rank 0, before any rank starts: the folder with the run's arguments; a line a kill tore is cut."""
    os.makedirs(cfg.out, exist_ok=True)
    for path in out_files(cfg.out):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    if not os.path.exists(os.path.join(cfg.out, "args.json")):
        with open(os.path.join(cfg.out, "args.json"), "w") as f:
            json.dump(run_arguments(cfg), f, indent=2)


# ---------------------------------------------------------- generation memory plan

def generation_plan(cfg):
    """Per-GPU memory of generating from a --max-doc-len prompt over --sp-size GPUs (generate_long): bf16
    weights whole on every GPU, its share of the K/V and the generated tokens', one prefill layer; beside
    them (the test suite checks them against this file's prefill traced on fake tensors)."""
    c = longpo.load_config(cfg.model)
    with torch.device("meta"):  # shapes only
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())
    H, n_layers, inter, hkv = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or H // c.num_attention_heads
    bf16, fp32, new, P = 2, 4, cfg.max_new_tokens, -(-cfg.max_doc_len // cfg.sp_size)
    kv_token = n_layers * 2 * hkv * d * bf16
    rows = [("params", "bf16 weights, whole on every GPU (one copy; --rope-theta swaps the rotary only)",
             params * bf16),
            ("cache and temporaries",
             f"K/V cache: {P} prompt tokens + {new} generated (+ a turn's own), {n_layers} layers",
             (P + new) * kv_token),
            ("cache and temporaries", "prefill, at its peak in a layer's MLP: the residual and the normed "
             "input, the norm's fp32 upcast, 3 of gate/up/silu/product",
             P * (2 * H * bf16 + H * fp32 + 3 * inter * bf16))]
    whole = cfg.max_doc_len * kv_token / 2**30
    return longpo.plan_report([f"generation of a {cfg.max_doc_len}-token prompt by {cfg.model} with sp "
                               f"{cfg.sp_size} (the whole prompt's K/V: {whole:.2f} GiB):"], rows)


# ---------------------------------------------------------- main

def write_records(docs, mine, models, tokenizer, cfg, counts, rank, world_size, device):
    """This rank's documents, each record (or why it gave none) appended to its file in --out and flushed
    before the next starts. With --sp-size, in rounds of each member's next document (sp_record).
    Returns this rank's summary: records, dropped documents by reason, turns filtered by reason."""
    par, rounds, t0 = None, len(mine), time.perf_counter()
    summary = {"records": 0, "dropped": {}, "turns_filtered": {}}
    if cfg.sp_size > 1:
        par = setup_parallel(cfg.sp_size, rank, world_size, device)
        longest = torch.tensor([len(mine)], device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=par.sp_group)
        rounds = int(longest)  # a member with fewer documents still takes part in the others' decoding
    files = {kind: open(os.path.join(cfg.out, f"rank{rank}.{kind}"), "a", encoding="utf-8")
             for kind in ("jsonl", "dropped")}
    bar = tqdm(range(rounds), desc="documents", disable=rank != 0)
    for k in bar:
        i = mine[k] if k < len(mine) else None
        entry = one_document(docs[i] if i is not None else None, i, models, tokenizer, cfg, par, counts, rank)
        if entry is None:  # no document of this rank's in this round
            continue
        out = files["dropped" if "dropped" in entry else "jsonl"]
        out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        out.flush()  # finished work is on disk before the next document starts
        tally(summary, entry)
        elapsed = time.perf_counter() - t0
        bar.set_postfix(docs_per_s=f"{(k + 1) / elapsed:.2f}",
                        tokens_per_s=f"{counts['generated'] / elapsed:.0f}", refresh=False)
    for f in files.values():
        f.close()
    return summary


def one_document(doc, i, models, tokenizer, cfg, par, counts, rank):
    """The record of document i (doc None: none this round, None), or, when it gives none, the entry
    saying why: the reason, the turns filtered, and an error's first line."""
    try:
        if par is None:
            return attempt(make_record, doc, i, models, tokenizer, cfg, counts)
        return sp_record(doc, i, models, tokenizer, cfg, par, counts)
    except Dropped as d:
        entry = {"id": doc["id"], "doc_index": i, "dropped": d.reason, "filtered_turns": d.filtered}
        if d.error:
            entry["error"] = d.error
            tqdm.write(f"rank {rank}: document {doc['id']!r} dropped: {d.error}")
        return entry


def tally(summary, entry):
    """Count a written entry, a record or a dropped document's, in this rank's summary."""
    if "dropped" in entry:
        summary["dropped"][entry["dropped"]] = summary["dropped"].get(entry["dropped"], 0) + 1
    else:
        summary["records"] += 1
    for reason, n in (entry.get("meta") or entry)["filtered_turns"].items():
        summary["turns_filtered"][reason] = summary["turns_filtered"].get(reason, 0) + n


def main(cfg):
    cfg = resolve(cfg)
    longpo.check_model(cfg.model)  # every rank checks flags and files before any process group or model
    if cfg.plan:
        return print(generation_plan(cfg))
    docs = Docs(cfg.docs, (cfg.demo_docs, cfg.demo_paragraphs, cfg.seed), cfg.answers == "copy")
    check_out(cfg)
    rank, world_size, device = init_distributed()
    if rank == 0:
        start_out(cfg)
    if world_size > 1:
        dist.barrier()  # before any work: the folder is ready
    done = read_done(cfg.out)
    mine = [i for i in range(len(docs)) if i % world_size == rank and docs.ids[i] not in done]
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    print0(f"{len(docs)} documents, {len(done)} already done, {world_size} rank(s)")
    if cfg.answers != "model":  # the planted answers or the copies: no model runs
        model, tokenizer = None, longpo.load_tokenizer(cfg.model)
    else:
        model, tokenizer = load_for_inference(cfg.model, device)
    counts, t0 = {"generated": 0}, time.perf_counter()  # only the long-input passes see a raised theta:
    models = (model, long_rotary(model, cfg.rope_theta))
    summary = write_records(docs, mine, models, tokenizer, cfg, counts, rank, world_size, device)
    summary["generated_tokens_per_s"] = round(counts["generated"] / (time.perf_counter() - t0), 1)
    print(f"rank {rank}: {len(mine)} documents done into {cfg.out}: {json.dumps(summary)}", flush=True)
    return summary


if __name__ == "__main__":
    longpo.run_cli(main, DataGenConfig)
