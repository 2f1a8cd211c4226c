"""Short-to-long preference data that the model writes itself (LongPO paper Sec. 3.3 and 4.1).

make_turns (steps 1-4), long_answers (4, rejected), make_record (5-6) walk the paper's steps for one document:
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
Prompts come from longpo.format_dialogue, as in training. Generation follows, shared with eval.py:
generate (short prompts in batches) and generate_long (a document prefilled once for its turns,
sequence-parallel with --sp-size). Deliberate deviations: a random tiny model cannot write questions, so
the built-in demo corpus (planted, checkable facts) has the facts' own; size flags default to the paper's
profile, or a small one for --model tiny. Each random choice and sampled answer draws from its own seeded
stream: the records are the same at any world size, SP size or resume. --out is a folder to which each
rank appends each finished record (or dropped document); a restart skips what is done.

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
import pathlib
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, Cache
from transformers.cache_utils import DynamicLayer

import longpo
from longpo import UsageError, arg, check_at_least, check_sp_size, init_distributed, print0

PAPER = dict(chunk_min=16384, chunk_max=30720, min_doc_len=65537, max_doc_len=131072,
             max_new_tokens=1024, temperature=0.0)
TINY = dict(chunk_min=512, chunk_max=1024, min_doc_len=1024, max_doc_len=32768,
            max_new_tokens=64, temperature=1.0)  # a random model decodes greedily into loops


@dataclass
class DataGenConfig:
    """Generate LongPO preference data (paper Sec. 3.3); size flags not given (None) take the profile's."""
    model: str = arg("tiny", "pi_S: hub id, local dir, or 'tiny'")
    docs: str = arg("demo", "JSONL ('text', optional 'id'), a folder of .txt files, or 'demo'")
    out: str = arg("data/longpo_tiny", "output folder (longpo.py's default --data)")
    chunk_min: int | None = arg(None, "fewest tokens in a chunk (None: profile; paper 16384)")
    chunk_max: int | None = arg(None, "most tokens in a chunk (None: profile; release code 30720)")
    min_doc_len: int | None = arg(None, "fewest tokens in a document (None: profile; paper > 64K)")
    max_doc_len: int | None = arg(None, "most tokens in a document (None: profile; paper < target)")
    turns: int = arg(4, "at most this many chunks (turns) per document")
    max_new_tokens: int | None = arg(None, "answer length limit (None: profile; paper 1024)")
    temperature: float | None = arg(None, "answer sampling temperature (None: profile; paper 0)")
    demo_docs: int = arg(4, "--docs demo: number of documents (drawn from --seed)")
    demo_paragraphs: str = arg("24", "--docs demo: paragraphs (1-64) a document, or A-B")
    rope_theta: float = arg(0.0, "RoPE theta of the LONG-input generation (paper 1e7)")
    max_length: int = arg(0, "training's --max-length: turns trimmed, documents dropped (before their long "
                          "answers) to fit it")
    sp_size: int = arg(1, "ranks that decode each long-input answer together")
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
BATCH = 8  # short prompts generated together
REFUSALS = ("i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't", "i'm unable", "i am unable",
            "as an ai", "as a language model", "i'm not able to", "i am not able to")


# ---------------------------------------------------------- one document's record (Sec. 3.3)

def make_turns(doc, doc_index, model, tokenizer, cfg):
    """Steps 1-4 of one document's record, up to its long inputs: the record so far, each turn with its chosen
    answer (raises Dropped if it gives none); long_answers gives the rejected ones, make_record finishes."""
    text = doc["text"]
    # 1. the document's length: within --min-doc-len..--max-doc-len, and under --max-length
    n_tokens, starts = measure(doc, tokenizer, cfg)
    if cfg.max_length and n_tokens >= cfg.max_length:  # no turn can fit: no generation at all
        raise Dropped("max_length")
    # 2. chunks at paragraph boundaries, --turns of them at random
    chunks = chunk_document(text, starts, cfg.chunk_min, cfg.chunk_max)
    chunks = sorted(random.Random(stream(cfg, doc, "chunks")).sample(chunks, min(cfg.turns, len(chunks))))
    if not chunks:
        raise Dropped("no_chunks")
    # 3. per chunk, 4 questions; one kept at random, behind a lead-in
    turns, filtered = ask_questions(doc, chunks, model, tokenizer, cfg)
    if not turns:
        raise Dropped("questions", filtered)
    # 4. chosen: the answer seeing the chunk only (rejected: long_answers, seeing the whole document)
    chosen = ask(model, tokenizer, [text[a:b] for a, b in (t["chunk"] for t in turns)],
                 [t["instruction"] for t in turns], seeds(cfg, doc, len(turns), "chosen"),
                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    turns = [{**t, "chosen": c} for t, c in zip(turns, chosen)]
    # the turns that fit whatever their long answers will be (2 spare: a token may re-tokenize as two)
    turns = fit_max_length(text, turns, tokenizer, cfg, filtered, room=cfg.max_new_tokens + 2)
    questions = "template" if cfg.docs == "demo" else "model"
    meta = {"doc_index": doc_index, "generator": cfg.model, "questions": questions, "doc_tokens": n_tokens,
            "filtered_turns": filtered, "chunk_tokens": [tokens_in(starts, *t["chunk"]) for t in turns],
            "temperature": cfg.temperature, "rope_theta_long": cfg.rope_theta or None, "seed": cfg.seed}
    return {"id": doc["id"], "document": text, "turns": turns, "meta": meta}


def long_answers(model, tokenizer, cfg, par, doc, turns):
    """Step 4's rejected answers: each turn's instruction after the WHOLE document, the document prefilled
    once for all turns (generate_long), with --rope-theta's rotary embedding; at --sp-size > 1 by the SP
    group, every member's document in turn (one_document)."""
    prompts = [longpo.format_dialogue(tokenizer, doc["text"], [{"instruction": t["instruction"]}])[0]
               for t in turns]
    with long_input(model, cfg.rope_theta):
        answers = generate_long(model, tokenizer, prompts, cfg.max_new_tokens, par, cfg.temperature,
                                seeds=seeds(cfg, doc, len(turns), "rejected"))
    return [text for text, _ in answers]


def make_record(draft, rejected, model, tokenizer, cfg):
    """Steps 5-6: make_turns' draft finished with its turns' rejected answers (raises Dropped: no record)."""
    filtered = draft["meta"]["filtered_turns"]
    # 5. the filters: an empty answer, a refusal, degenerate repetition
    kept, chunk_tokens = [], []
    for turn, r, n in zip(draft["turns"], rejected, draft["meta"]["chunk_tokens"]):
        reason = filter_reason(turn["chosen"]) or filter_reason(r)
        if reason:
            filtered[reason] = filtered.get(reason, 0) + 1
        else:
            kept.append({**turn, "rejected": r})
            chunk_tokens.append(n)
    if not kept:
        raise Dropped("all_turns_filtered", filtered)
    kept = fit_max_length(draft["document"], kept, tokenizer, cfg, filtered)  # text can re-tokenize longer
    # 6. the record, and Eq. 13's reference: the sum over turns of log pi_S(y_i | chunk_i, instruction_i)
    meta = {**draft["meta"], "filtered_turns": filtered, "chunk_tokens": chunk_tokens[:len(kept)]}
    rec = {**draft, "turns": kept, "meta": meta}
    rec["ref_chosen_logp"], rec["ref_rejected_logp"] = longpo.short_reference_logps(model, tokenizer, rec)
    return rec


def one_document(doc, i, model, tokenizer, cfg, par):
    """The record of document i, or the entry saying why it gives none (None: no document this round): this
    rank's steps 1-4, the SP group's decoding of every member's long inputs (a member without any takes part
    all the same), this rank's steps 5-6. An error drops its document (one bad document does not stop every
    restart), but one in an SP group's decoding stops the run: the other members would wait on this one."""
    draft = entry = None
    if doc is not None:  # steps 1-4
        draft, entry = attempt(doc, i, make_turns, doc, i, model, tokenizer, cfg)
    turns = draft["turns"] if draft is not None else None  # None: no long inputs from this rank
    if par.sp_size > 1:  # every member takes part, even with no long inputs; an error stops the run
        rejected = group_answers(model, tokenizer, cfg, par, doc, turns)
    elif turns is not None:  # a group of one: an error drops the document
        rejected, entry = attempt(doc, i, group_answers, model, tokenizer, cfg, par, doc, turns)
    if draft is None or entry is not None:
        return entry  # no document this round (None), or the entry of one dropped
    record, entry = attempt(doc, i, make_record, draft, rejected, model, tokenizer, cfg)  # steps 5-6
    return record if entry is None else entry


def measure(doc, tokenizer, cfg):
    """(tokens, each token's start offset) of a document whose length is within the flags' range."""
    enc = tokenizer(doc["text"], add_special_tokens=False, return_offsets_mapping=True,
                    split_special_tokens=True)  # the document is text: a special token's literal too
    if not cfg.min_doc_len <= len(enc["input_ids"]) <= cfg.max_doc_len:
        raise Dropped("doc_length")
    return len(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]


def tokens_in(starts, a, b):
    """Tokens of the text that start inside the character span [a, b) (starts: each token's offset)."""
    return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)


def chunk_document(text, starts, chunk_min, chunk_max):
    """Non-overlapping [start, end) chunks of chunk_min..chunk_max tokens of text, cut at paragraph
    boundaries (blank lines): each chunk ends at the furthest one within chunk_max tokens, where none is at
    the furthest line break, else between tokens. starts: the character offset of each token of text."""
    count = functools.partial(tokens_in, starts)
    borders = [[m.end() for m in re.finditer(sep, text)] + [len(text)] for sep in (r"\n[ \t]*\n\s*", r"\n")]
    borders.append(starts[1:] + [len(text)])
    chunks, a = [], 0
    while a < len(text):
        for level in borders:  # paragraphs, then lines, then tokens
            fit = bisect.bisect_right(level, chunk_max, key=lambda b: count(a, b))  # count grows with b
            if fit and level[fit - 1] > a:
                break
        b = level[fit - 1]
        if count(a, b) >= chunk_min:
            chunks.append((a, b))
        a = b
    return chunks


def ask_questions(doc, chunks, model, tokenizer, cfg):
    """Step 3: per chunk, 4 questions from the model (the demo corpus: its facts' own), one of them kept at
    random, behind a random lead-in. Returns (turns, the chunks filtered for want of questions)."""
    pieces = [doc["text"][a:b] for a, b in chunks]
    if cfg.docs == "demo":  # a random model writes no questions: those of the chunk's facts
        lists = [[f["question"] for f in doc["facts"] if f["sentence"] in p][:4] for p in pieces]
    else:
        lists = map(parse_questions, ask(model, tokenizer, pieces, [QUESTION_PROMPT] * len(pieces),
                                         seeds(cfg, doc, len(pieces), "questions"),
                                         max_new_tokens=QUESTION_TOKENS, temperature=0.7, top_p=0.9))
    turns, filtered = [], {}
    for j, ((a, b), questions) in enumerate(zip(chunks, lists)):
        if len(questions) < (1 if cfg.docs == "demo" else 4):  # a demo chunk has 1 or more facts
            filtered["questions"] = filtered.get("questions", 0) + 1
            continue
        question = random.Random(stream(cfg, doc, j, "question")).choice(questions[:4])
        lead_in = random.Random(stream(cfg, doc, j, 0, "lead-in")).choice(LEAD_INS)
        turns.append({"instruction": with_lead_in(lead_in, question), "chunk": [a, b]})
    return turns, filtered


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


def with_lead_in(lead_in, question):
    """'Based on the text above,' + question, lower-casing a leading question word (not a name)."""
    first, _, rest = question.partition(" ")
    if first.lower() in QUESTION_WORDS:
        question = f"{first.lower()} {rest}".strip()
    return f"{lead_in} {question}"


def fit_max_length(text, turns, tokenizer, cfg, filtered, room=0):
    """--max-length (training's, longpo.trained_length): the first turns whose pair fits it, with `room`
    tokens a turn left for a rejected answer not yet written (there "."); the turns cut are counted in
    `filtered`. None fits: Dropped."""
    if not cfg.max_length:
        return turns
    for n in range(len(turns), 0, -1):
        pair = {"document": text, "turns": [{"rejected": ".", **t} for t in turns[:n]]}
        if longpo.trained_length(longpo.build_example(pair, tokenizer)) + n * room <= cfg.max_length:
            if n < len(turns):
                filtered["max_length"] = filtered.get("max_length", 0) + len(turns) - n
            return turns[:n]
    raise Dropped("max_length", filtered)


def filter_reason(answer):
    """Why an answer is unusable (None if usable): empty, refusal, or degenerate repetition."""
    text = answer.strip()
    if not text:
        return "empty"
    if re.search(rf"\b(?:{'|'.join(map(re.escape, REFUSALS))})\b", text.lower()[:300]):  # whole words
        return "refusal"
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    if len(words) >= 20 and len(set(grams)) < 0.5 * len(grams):
        return "repetition"
    data = text.encode()
    if len(data) >= 64 and len(zlib.compress(data, 9)) < 0.2 * len(data):
        return "repetition"
    return None


def stream(cfg, doc, *where):
    """The key of one random choice or sampled answer: the seed, the document's id (its text's hash) and
    where in it (turn, role). Each its own: the data is a function of the seed and the documents alone."""
    return "|".join(map(str, (cfg.seed, doc["id"], *where)))


def seeds(cfg, doc, n, role):
    """The sampling seeds (63-bit) of n answers of one role (questions, chosen, rejected) to a document."""
    keys = (stream(cfg, doc, i, role).encode() for i in range(n))
    return [int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1 for key in keys]


# ---------------------------------------------------------- generation, one process and sequence-parallel

def load_for_inference(name, device):
    """(model, tokenizer) for generation and scoring: bf16 on CUDA, fp32 on CPU, in eval mode."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return longpo.load_model(name, dtype).to(device).eval(), longpo.load_tokenizer(name)


def stop_token_ids(tokenizer, model=None):
    """Tokens that end an answer: the template's end-of-turn specials (Llama-3's <|eot_id|>, ChatML's
    <|im_end|>: not always the eos), the eos, and those of the model's generation config."""
    ids, is_answer = longpo.format_dialogue(tokenizer, "", [{"instruction": "?", "answer": "ok"}], "answer")
    special = set(longpo.special_tokens(tokenizer).values())
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = [t for t, a in zip(ids, is_answer) if a and t in special] + [tokenizer.eos_token_id]
    stops += configured if isinstance(configured, list) else [configured]
    return sorted({t for t in stops if t is not None})


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
        if not self.is_initialized:  # the prefill: its tokens, then the room
            B, H, n, D = key.shape
            self.keys, self.values = (x.new_empty(B, H, n + self.room, D) for x in (key, value))
            self.is_initialized = True
        n = self.length + key.shape[2]
        self.keys[:, :, self.length:n], self.values[:, :, self.length:n] = key, value
        self.length = n
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_seq_length(self):
        return self.length


def common_prefix(prompts):
    """How many tokens all prompts begin with, leaving each one of its own (whose logits begin its answer)."""
    return min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)


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
def generate_long(model, tokenizer, prompts, max_new_tokens, par, temperature=0.0, top_p=1.0, seeds=None):
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
    stops, results = stop_token_ids(tokenizer, model), []
    try:
        seq = longpo.prepare_sequence(prompts[0][:n], {}, par, tokenizer.pad_token_id) if n else None
        cache = prefill(model, seq, max(map(len, prompts)) - n + max_new_tokens, par)
        kwargs = dict(cache=cache, use_cache=True, ring_group=par.sp_group)
        n_prefix = cache.layers[0].length
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
    return results


def ask(model, tokenizer, contexts, instructions, seeds, **sampling):
    """Answers of the model to each (context, instruction) on short inputs, BATCH at a time, with longpo's
    chat formatting, each sampled from its own seed."""
    prompts = [longpo.format_dialogue(tokenizer, c, [{"instruction": i}])[0]
               for c, i in zip(contexts, instructions)]
    texts = []
    for k in range(0, len(prompts), BATCH):
        texts += generate(model, tokenizer, prompts[k:k + BATCH], seeds=seeds[k:k + BATCH], **sampling)[0]
    return texts


@contextlib.contextmanager
def long_input(model, theta):
    """--rope-theta: the model with the rotary embedding of that theta (0: its own) while inside. The
    weights do not depend on theta, so the one model serves both the short and the long passes."""
    decoder = model.get_decoder()
    short = decoder.rotary_emb
    if theta:
        config = copy.deepcopy(model.config)
        longpo.set_rope_theta(config, theta)
        decoder.rotary_emb = type(short)(config).to(short.inv_freq.device, short.inv_freq.dtype)  # as loaded
    try:
        yield model
    finally:
        decoder.rotary_emb = short


# ---------------------------------------------------------- the demo corpus

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
COPY_WORDS = (16, 32)  # fewest and most words of a copy document
COPY_INSTRUCTION = "Repeat the text above."


def parse_paragraphs(spec):
    """--demo-paragraphs: "N" or "A-B" -> (A, B) within 1..MAX_DEMO_PARAGRAPHS."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(spec))
    lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if not 1 <= lo <= hi <= MAX_DEMO_PARAGRAPHS:
        raise UsageError(f"--demo-paragraphs {spec!r}: give N or A-B within 1..{MAX_DEMO_PARAGRAPHS} (two "
                         "facts a paragraph, no place twice in a document)")
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


def copy_corpus(n_docs, seed=0):
    """Documents "Words:" + 16-32 distinct random words of the demo corpus (one token each) to repeat
    (eval's copy task, the miniature's copy data): the varying length leaves no fixed look-back to repeat,
    so a model must copy by content."""
    numbers, filler_words = [str(n) for n in range(10, 100)], re.findall(r"\w+", " ".join(FILLER))
    words = sorted(set(PLACES + ITEMS + numbers + filler_words))
    rng = random.Random(f"copy-{seed}")
    return [{"id": f"copy-{seed}-{d}", "facts": [],
             "text": "Words: " + " ".join(rng.sample(words, rng.randint(*COPY_WORDS)))}
            for d in range(n_docs)]


# ---------------------------------------------------------- plumbing: input, the output folder, ranks

def read_docs(spec, demo=(4, 24, 0), mine=lambda i: True):
    """The input documents in order, each {"id", "text"}: the demo corpus (with its facts), a folder of .txt
    files (the id: the file's name), or a JSONL with 'text' and an optional 'id' (else the text's hash: a
    resumed run finds it wherever it moved). Ids are unique. Only the documents mine(index) keep their text,
    the others' is None (45K documents of 128K tokens are ~20 GB of text: each rank holds its share)."""
    docs = demo_corpus(*demo) if spec == "demo" else []
    if os.path.isdir(spec):
        docs = [{"id": p.stem, "text": p.read_text(encoding="utf-8", errors="replace") if mine(i) else None}
                for i, p in enumerate(sorted(pathlib.Path(spec).glob("*.txt")))]
    elif os.path.isfile(spec):
        docs = read_jsonl(spec, mine)
    if not docs:
        raise UsageError(f"--docs {spec}: no such file or folder, or no document in it (give a JSONL file, "
                         "a folder of .txt files, or 'demo')")
    first = {}
    for i, doc_id in enumerate(doc["id"] for doc in docs):
        if first.setdefault(doc_id, i) != i:
            raise UsageError(f"--docs {spec}: documents {first[doc_id] + 1} and {i + 1} have the same id "
                             f"{doc_id!r} (the same text, when they have no id); resuming needs unique ids: "
                             "remove the duplicate")
    return docs


def read_jsonl(path, mine):
    """The documents of a JSONL (as read_docs), each line checked."""
    docs = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError("needs a string field 'text'")
            except ValueError as e:  # bad JSON, bad UTF-8, or no text
                raise UsageError(f"{path}:{lineno}: {e}; fix or remove the line") from None
            doc_id = str(rec["id"]) if rec.get("id") is not None else text_id(rec["text"])
            docs.append({"id": doc_id, "text": rec["text"] if mine(len(docs)) else None})
    return docs


def text_id(text):
    """The id of a document without one: a hash of its text."""
    return "sha1-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def resolve(cfg):
    """The size flags not given from the profile (PAPER, TINY for --model tiny); the flags checked."""
    profile = TINY if cfg.model == "tiny" else PAPER
    cfg = dataclasses.replace(cfg, **{k: v for k, v in profile.items() if getattr(cfg, k) is None})
    if cfg.docs == "demo":
        check_at_least(cfg, ("demo_docs",), 1)
        parse_paragraphs(cfg.demo_paragraphs)
    if not 0 < cfg.chunk_min <= cfg.chunk_max:
        raise UsageError(f"need 0 < --chunk-min ({cfg.chunk_min}) <= --chunk-max ({cfg.chunk_max})")
    if not 0 <= cfg.min_doc_len <= cfg.max_doc_len:
        raise UsageError(f"need 0 <= --min-doc-len ({cfg.min_doc_len}) <= --max-doc-len ({cfg.max_doc_len})")
    check_at_least(cfg, ("turns", "max_new_tokens", "sp_size"), 1)
    check_at_least(cfg, ("temperature", "rope_theta"), 0)
    check_at_least(cfg, ("max_length",), 0, " (0: no limit)")
    if not cfg.plan:
        check_sp_size(cfg.sp_size)
    return cfg


# --out is a folder: args.json (the arguments that started it), and per rank rank<r>.jsonl, its records,
# and rank<r>.dropped, the documents that gave none (and why), each line flushed when its document is
# done. A restart skips every document any rank has done, at any world size; no rank ever waits for
# another, and no merge: longpo.py and eval.py read the folder (its records in document order).

def check_out(cfg):
    """Every rank, before any work: an --out folder is continued only with the arguments that started it; a
    file, or a folder that no run of ours started, is never touched. Returns the arguments the records
    depend on: all but --sp-size (the same records at any)."""
    path, args = os.path.join(cfg.out, "args.json"), dataclasses.asdict(cfg)
    del args["sp_size"]
    foreign = os.path.isdir(cfg.out) and os.listdir(cfg.out) and not os.path.exists(path)
    if os.path.isfile(cfg.out) or foreign:
        raise UsageError(f"--out {cfg.out} exists and is no data_gen.py output folder; choose another --out")
    if os.path.exists(path):
        with open(path) as f:
            changed = longpo.changed_arguments(json.load(f), args)
        if changed:
            raise UsageError(f"--out {cfg.out} holds work done with other arguments ({changed}); rerun with "
                             "the same arguments to continue it, or choose another --out")
    return args


def start_out(cfg, args, par):
    """The ids of the documents any rank has finished, kept or dropped, read once rank 0 has made the
    folder with the run's arguments and cut a line a kill tore (that document is done again)."""
    if par.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        for path in glob.glob(os.path.join(cfg.out, "rank*.*")):
            with open(path, "rb+") as f:
                f.truncate(f.read().rfind(b"\n") + 1)
        if not os.path.exists(os.path.join(cfg.out, "args.json")):
            with open(os.path.join(cfg.out, "args.json"), "w") as f:
                json.dump(args, f, indent=2)
    longpo.barrier(par)  # before any rank reads it or works: the folder is ready
    done = set()
    for path in glob.glob(os.path.join(cfg.out, "rank*.*")):
        with open(path, "rb") as f:
            done.update(json.loads(line)["id"] for line in f)
    return done


def generation_plan(cfg):
    """Per-GPU memory of generating from a --max-doc-len prompt over --sp-size GPUs (generate_long): bf16
    weights whole on every GPU, its share of the K/V and the generated tokens', one prefill layer; beside
    them (the test suite checks them against this file's prefill traced on fake tensors)."""
    c = longpo.load_config(cfg.model)
    with torch.device("meta"):  # shapes only
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())
    H, d = c.hidden_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_token = c.num_hidden_layers * 2 * c.num_key_value_heads * d * 2  # bf16 K and V of a token
    P, new = -(-cfg.max_doc_len // cfg.sp_size), cfg.max_new_tokens  # this GPU's prompt tokens
    rows = [(None, "bf16 weights, whole on every GPU (one copy; --rope-theta swaps the rotary only)",
             2 * params),
            (None, f"K/V cache: {P} prompt tokens + {new} generated (+ a turn's own), {c.num_hidden_layers} "
             "layers", (P + new) * kv_token),
            (None, "prefill, at its peak in a layer's MLP: the residual and the normed input, the norm's "
             "fp32 upcast, 3 of gate/up/silu/product", P * (2 * H * 2 + H * 4 + 3 * c.intermediate_size * 2))]
    whole = cfg.max_doc_len * kv_token / 2**30
    return longpo.plan_report([f"generation of a {cfg.max_doc_len}-token prompt by {cfg.model} with sp "
                               f"{cfg.sp_size} (the whole prompt's K/V: {whole:.2f} GiB):"], rows)


class Dropped(Exception):
    """A document that gives no record: the reason (counted in the summary) and the turns filtered."""
    def __init__(self, reason, filtered=None):
        super().__init__(reason)
        self.reason, self.filtered = reason, filtered or {}


def write_records(docs, mine, model, tokenizer, cfg, par):
    """This rank's documents, each record (or why it gave none) appended to its file in --out and flushed
    before the next starts; with --sp-size, in rounds of each member's next document (one_document).
    Returns this rank's summary: records, dropped documents by reason, turns filtered by reason."""
    rounds = torch.tensor([len(mine)], device=par.device)
    if par.sp_size > 1:  # a member with fewer documents still takes part in the others' decoding
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=par.sp_group)
    summary = {"records": 0, "dropped": Counter(), "turns_filtered": Counter()}
    for k in tqdm(range(int(rounds)), desc="documents", disable=par.rank != 0):
        i = mine[k] if k < len(mine) else None
        entry = one_document(docs[i] if i is not None else None, i, model, tokenizer, cfg, par)
        if entry is None:  # no document of this rank's in this round
            continue
        kind = "dropped" if "dropped" in entry else "jsonl"
        with open(os.path.join(cfg.out, f"rank{par.rank}.{kind}"), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")  # on disk before the next document starts
        summary["records"] += "dropped" not in entry
        summary["dropped"].update([entry["dropped"]] if "dropped" in entry else [])
        summary["turns_filtered"].update((entry.get("meta") or entry)["filtered_turns"])
    return summary


def attempt(doc, i, step, *args):
    """(step(*args), None), or (None, the entry of document i dropped by it: why, or the error's 1st line)."""
    try:
        return step(*args), None
    except Dropped as d:
        return None, {"id": doc["id"], "doc_index": i, "dropped": d.reason, "filtered_turns": d.filtered}
    except Exception as e:  # out of memory, a template that fails, ...
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    if torch.cuda.is_available():  # out of the except block: the error, its frames (their tensors) gone
        torch.cuda.synchronize()  # a broken device (an illegal access, ECC) raises here and stops the run
        torch.cuda.empty_cache()  # what the failed document held
    tqdm.write(f"document {doc['id']!r} dropped: {error}")
    return None, {"id": doc["id"], "doc_index": i, "dropped": "error", "filtered_turns": {}, "error": error}


def group_answers(model, tokenizer, cfg, par, doc, turns):
    """This rank's rejected answers (turns None: none): every member's long inputs, decoded by the whole
    SP group in the same order on every rank (lockstep)."""
    everyone = [None if turns is None else (doc, turns)] * par.sp_size
    if par.sp_size > 1:
        dist.all_gather_object(everyone, everyone[0], group=par.sp_group)
    answers = [None if job is None else long_answers(model, tokenizer, cfg, par, *job) for job in everyone]
    return answers[par.sp_rank]


def main(cfg):
    cfg = resolve(cfg)
    longpo.check_model(cfg.model)  # every rank checks flags and files before any model
    if cfg.plan:
        return print(generation_plan(cfg))
    args = check_out(cfg)
    rank, world_size, device = init_distributed()
    par = longpo.setup_parallel(cfg.sp_size, rank, world_size, device)
    ours = lambda i: i % world_size == rank  # noqa: E731  (this rank's documents)
    docs = read_docs(cfg.docs, (cfg.demo_docs, cfg.demo_paragraphs, cfg.seed), ours)
    done = start_out(cfg, args, par)
    mine = [i for i, doc in enumerate(docs) if ours(i) and doc["id"] not in done]
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    print0(f"{len(docs)} documents, {len(done)} already done, {world_size} rank(s)")
    model, tokenizer = load_for_inference(cfg.model, device)
    summary = write_records(docs, mine, model, tokenizer, cfg, par)
    print(f"rank {rank}: {len(mine)} documents done into {cfg.out}: {json.dumps(summary)}", flush=True)
    return summary


if __name__ == "__main__":
    longpo.run_cli(main, DataGenConfig)
