"""Short-to-long preference data that the model writes itself (LongPO paper Sec. 3.3 and 4.1).

For every long document (method.md, "Data generation"):
  1. keep it if its token length is within [--min-doc-len, --max-doc-len] (paper: > 64K, < target);
  2. cut it into chunks of --chunk-min..--chunk-max tokens at paragraph boundaries (blank lines),
     falling back to line, then token boundaries for an over-long paragraph; keep at most --turns
     random chunks;
  3. per chunk, ask the model for 4 diverse questions needing comprehension and synthesis of the
     chunk (temperature 0.7, top-p 0.9), parse the numbered list, keep the chunk only if 4 parse,
     pick one at random and prefix a lead-in such as "Based on the text above,";
  4. chosen = the model's answer seeing only the chunk; rejected = its answer seeing the whole
     document (greedy as in the paper; --temperature for the release code's sampling; --rope-theta
     raises RoPE theta for the long-input generation only);
  5. drop turns with an empty answer, a refusal or degenerate repetition (counted per reason);
  6. pack a document's kept turns into one record (Eq. 13) with the reference log-probs
     sum_i log pi_S(y_i | chunk_i, instruction_i), computed by the generating model on the SHORT
     inputs with its own RoPE, so training never needs the reference model.
Prompts are built by longpo.format_dialogue, the same function training uses.

Deliberate deviation: a random tiny model cannot write questions, so the built-in demo corpus
(synthetic documents with planted, checkable facts) has a template question source
(`--questions template`); `--questions auto` (default) means template for the demo corpus and
model otherwise, and the choice is recorded in every record's meta. Sizes default to a profile:
the paper's (chunks 16K-30K tokens, documents 64K-128K tokens, 1024 new tokens, greedy) for real
models and a small one for the presets `tiny` and `small` (so the default run takes seconds); an
explicit flag always wins. `--answers gold` writes the demo corpus's planted answers instead of the
model's and `--answers copy` "repeat the text" records of random words (no model runs): the data
that trains the miniature's short-context model (README).

Never loses work: under torchrun each rank takes every world_size-th document and appends finished
records (and dropped documents, with the reason) to its own files in <out>.parts/, flushed one by
one; a restart with the same arguments skips every document already there, whatever the world
size; at the end rank 0 merges the parts into <out> in document order and writes <out>.meta.json
(arguments, model, library versions, summary).

Documents longer than one GPU can hold (512K tokens: the prompt's K/V alone is 69 GB for Mistral-7B):
--sp-size W makes each group of W ranks decode every member's long prompts together, sequence-
parallel (longpo.generate_sp: ring-attention prefill, each rank keeping its share of the K/V); the
short-input work stays one document per rank.

Commands:
    python data_gen.py                                        # tiny model, demo corpus, CPU
    torchrun --nproc_per_node 8 data_gen.py --model mistralai/Mistral-7B-Instruct-v0.2 \\
        --docs long_docs.jsonl --out data/longpo_128k.jsonl --rope-theta 1e7   # one 8-GPU node
    torchrun --nproc_per_node 8 data_gen.py ... --sp-size 8   # 512K documents: long answers over 8 GPUs
    torchrun --nproc_per_node 2 data_gen.py --bench-tokens 16384 --sp-size 2   # generation benchmark
"""
import bisect
import dataclasses
import functools
import glob
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import longpo
from ring_attention import UsageError, init_distributed, print0, run_cli

PAPER = dict(chunk_min=16384, chunk_max=30720, min_doc_len=65537, max_doc_len=131072,
             max_new_tokens=1024, temperature=0.0)
TINY = dict(chunk_min=512, chunk_max=1024, min_doc_len=1024, max_doc_len=32768,
            max_new_tokens=64, temperature=1.0)  # a random model decodes greedily into loops


@dataclass
class DataGenConfig:
    """Generate LongPO preference data (paper Sec. 3.3). Size flags left at 0 / -1 come from a
    profile: the paper's for real models, a small one for --model tiny."""
    model: str = field(default="tiny", metadata={"help": "pi_S: hub id, local dir, or 'tiny'"})
    docs: str = field(default="demo", metadata={"help": "JSONL with a 'text' field (optional 'id'), a folder of .txt files, one .txt file, or 'demo'"})
    out: str = field(default="data/longpo_tiny.jsonl", metadata={"help": "output JSONL (longpo.py's default input)"})
    chunk_min: int = field(default=0, metadata={"help": "fewest tokens in a chunk (0: profile; paper 16384)"})
    chunk_max: int = field(default=0, metadata={"help": "most tokens in a chunk (0: profile; paper <= 32768, code 30720)"})
    min_doc_len: int = field(default=0, metadata={"help": "fewest tokens in a document (0: profile; paper > 64K)"})
    max_doc_len: int = field(default=0, metadata={"help": "most tokens in a document (0: profile; paper < target length)"})
    turns: int = field(default=4, metadata={"help": "at most this many chunks (turns) per document"})
    max_new_tokens: int = field(default=0, metadata={"help": "answer length limit (0: profile; paper 1024)"})
    temperature: float = field(default=-1.0, metadata={"help": "answer sampling temperature, 0 greedy (-1: profile; paper greedy, code 1.0)"})
    question_tokens: int = field(default=512, metadata={"help": "token limit of the question list"})
    questions: str = field(default="auto", metadata={"help": "auto | model | template (template: demo corpus only)"})
    answers: str = field(default="model", metadata={"help": "model: the model writes chosen (chunk) and rejected (whole document) answers, as the paper | gold: demo corpus only, chosen = the planted fact's place and number (At Barwick 57.), rejected = the place with another number of the document | copy: documents of random demo-corpus words, Repeat the text above., chosen = the document; gold and copy run no model and write no reference log-probs (the data that trains the miniature's short-context model from scratch with --loss sft: copy first, then gold; README)"})
    demo_docs: int = field(default=4, metadata={"help": "--docs demo: number of documents (the corpus is drawn from --seed)"})
    demo_paragraphs: str = field(default="24", metadata={"help": "--docs demo: paragraphs per document, two facts each (1 to 64), or a range A-B drawn per document (e.g. 1-4: short documents to learn from)"})
    rope_theta: float = field(default=0.0, metadata={"help": "RoPE theta for the LONG-input generation (paper 1e7; 0: keep)"})
    sp_size: int = field(default=1, metadata={"help": "ranks that decode each long-input (rejected) answer together, sequence-parallel (ring-attention prefill, K/V sharded); must divide the number of processes; short-input work stays one document per rank"})
    batch_size: int = field(default=8, metadata={"help": "short prompts generated together"})
    skip_bad: bool = field(default=False, metadata={"help": "count and skip malformed input lines instead of stopping"})
    bench_tokens: int = field(default=0, metadata={"help": "benchmark: greedy decoding of --max-new-tokens tokens after a synthetic prompt of about this many tokens, sequence-parallel over --sp-size ranks (1: one process, the same code); prints each rank's cache bytes, prefill seconds and decoding tokens/s; writes nothing"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out and the work in <out>.parts/ (otherwise a rerun continues the same run and refuses other arguments)"})
    allow_empty: bool = field(default=False, metadata={"help": "exit 0 even when no document yields a record"})
    seed: int = field(default=0, metadata={"help": "seed of the demo corpus, chunk choice, question choice and sampling"})


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
REFUSALS = ("i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't", "i'm unable", "i am unable",
            "as an ai", "as a language model", "i'm not able to", "i am not able to")


# ----------------------------------------------------------------------------- pure functions

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


PLACE_HEADS = ["Al", "Bar", "Cor", "Dun", "El", "Fen", "Gal", "Har", "Ist", "Kel", "Lor", "Mor", "Nor", "Pel", "Ros", "Tam"]
PLACE_TAILS = ["wick", "ford", "mere", "holt", "stead", "by", "ton", "dale"]
PLACES = [a + b for a in PLACE_HEADS for b in PLACE_TAILS]  # 128 one-word names: Alwick, Barford, ...
ITEMS = ["maps", "lanterns", "ledgers", "bells", "keys", "crates", "clocks", "banners", "barrels",
         "compasses", "telescopes", "anchors"]
FILLER = ["The morning fog lifted slowly over the valley.", "Travellers often stopped to rest by the old well.",
          "Records from that season were kept with great care.", "The wind carried the smell of pine and salt.",
          "Few visitors remembered the road that led there.", "Merchants argued about prices until dusk.",
          "A narrow stair climbed past the empty courtyard.", "Rain had softened the path along the river."]
MAX_DEMO_PARAGRAPHS = len(PLACES) // 2  # two facts a paragraph, no place twice in a document
COPY_WORDS = (16, 32)  # fewest and most words of an --answers copy record


def parse_paragraphs(spec):
    """--demo-paragraphs: "N" or "A-B" -> (A, B) within 1..MAX_DEMO_PARAGRAPHS."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(spec))
    lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if not 1 <= lo <= hi <= MAX_DEMO_PARAGRAPHS:
        raise UsageError(f"--demo-paragraphs {spec!r}: give N or A-B within 1..{MAX_DEMO_PARAGRAPHS} (two facts a "
                         "paragraph, no place twice in a document)")
    return lo, hi


def demo_corpus(n_docs=4, paragraphs=24, seed=0):
    """Synthetic documents with planted, checkable facts: paragraphs of filler sentences, each with
    two facts "At Barwick 57 maps were counted." (no place twice in a document, so every question
    "How many maps are there at Barwick?" has one answer, a number from 10 to 99). The number
    follows its place: an answer that restates the place ("At Barwick 57.", gold_answer) then
    finds it by the copy a small model learns first (README, LongPO in miniature).
    paragraphs: a count, or "A-B" (a count drawn per document)."""
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
                facts.append({"sentence": fact, "question": f"How many {thing} are there at {place}?", "answer": str(n),
                              "place": place})
            paras.append(" ".join(sentences))
        docs.append({"id": f"demo-{seed}-{d}" if seed else f"demo-{d}", "text": "\n\n".join(paras), "facts": facts})
    return docs


def gold_answer(place, number):
    """The miniature's answer form: the place, then its number, as the document has them."""
    return f"At {place} {number}."


def copy_corpus(n_docs, seed=0):
    """Documents "Words:" + 16-32 distinct words drawn at random from the demo corpus's words (names,
    numbers, items, filler; one token each), for --answers copy. The copy's distance varies with the
    length, so no fixed look-back repeats one: the model has to copy by content, the kind of lookup
    that answering "At Barwick" with 57 from "At Barwick 57" takes (which word its copy keys on was
    probed: README, the miniature)."""
    words = sorted(set(PLACES + ITEMS + [str(n) for n in range(10, 100)] + re.findall(r"\w+", " ".join(FILLER))))
    rng = random.Random(f"copy-{seed}")
    return [{"id": f"copy-{seed}-{d}", "text": "Words: " + " ".join(rng.sample(words, rng.randint(*COPY_WORDS))),
             "facts": []} for d in range(n_docs)]


def template_questions(chunk_text, facts):
    """The numbered list a perfect question writer would give for this chunk, from its facts."""
    inside = [f["question"] for f in facts if f["sentence"] in chunk_text]
    return "\n".join(f"{i + 1}. {q}" for i, q in enumerate(inside[:4]))


# ----------------------------------------------------------------------------- input

def text_id(text):
    """The id of a document without one: a hash of its text, so that a resumed run recognises it
    wherever it moved in the file."""
    return "sha1-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Docs:
    """The input documents by index, each read from disk when needed (a corpus of long documents need
    not fit in memory): the built-in demo corpus, a folder of .txt files, one .txt file, or a JSONL
    file with a 'text' field (optional 'id'; else a hash of the text), validated line by line once."""

    def __init__(self, spec, skip_bad=False, demo=(4, 24, 0), copy=False):
        self.spec, self.bad_lines = spec, 0
        if spec == "demo":
            self.sources = copy_corpus(demo[0], demo[2]) if copy else demo_corpus(*demo)
            self.ids = [d["id"] for d in self.sources]
        elif os.path.isdir(spec):
            self.sources = sorted(glob.glob(os.path.join(spec, "*.txt")))
            if not self.sources:
                raise UsageError(f"--docs {spec}: the folder holds no .txt files")
            self.ids = [os.path.splitext(os.path.basename(p))[0] for p in self.sources]
        elif os.path.isfile(spec) and spec.endswith(".txt"):  # one document
            self.sources, self.ids = [spec], [os.path.splitext(os.path.basename(spec))[0]]
        elif os.path.isfile(spec):
            self.sources, self.ids = self._index_jsonl(spec, skip_bad)
        else:
            raise UsageError(f"--docs {spec}: no such file or folder (give a JSONL file, a .txt file, a folder of "
                             ".txt files, or 'demo')")
        seen = {}
        for i, doc_id in enumerate(self.ids):
            if doc_id in seen:
                raise UsageError(f"--docs {spec}: documents {seen[doc_id] + 1} and {i + 1} have the same id {doc_id!r} "
                                 "(the same text, when they have no id); resuming needs unique ids: remove the duplicate")
            seen[doc_id] = i

    def _index_jsonl(self, spec, skip_bad):
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
                    if not skip_bad:
                        raise UsageError(f"{spec}:{lineno}: {e}; fix the line or pass --skip-bad") from None
                    self.bad_lines += 1
                    continue
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
    """Fill profile-dependent flags (0 / -1) and the question source; check the rest."""
    profile = TINY if cfg.model in longpo.PRESETS else PAPER
    cfg = dataclasses.replace(cfg, **{k: v for k, v in profile.items()
                                      if getattr(cfg, k) == (-1.0 if k == "temperature" else 0)})
    if cfg.questions == "auto":
        cfg = dataclasses.replace(cfg, questions="template" if cfg.docs == "demo" else "model")
    if cfg.questions not in ("model", "template"):
        raise UsageError(f"--questions {cfg.questions!r}: choose auto, model or template")
    if cfg.questions == "template" and cfg.docs != "demo":
        raise UsageError("--questions template needs the facts of the built-in corpus (--docs demo); "
                         "real documents need --questions model")
    if cfg.answers not in ("model", "gold", "copy"):
        raise UsageError(f"--answers {cfg.answers!r}: choose model, gold or copy")
    if cfg.answers != "model" and (cfg.questions != "template" or cfg.sp_size > 1):
        raise UsageError(f"--answers {cfg.answers} needs the built-in corpus (--docs demo, --questions template) "
                         "and runs no model (--sp-size 1)")
    if cfg.docs == "demo" and cfg.demo_docs < 1:
        raise UsageError(f"--demo-docs {cfg.demo_docs} must be >= 1")
    parse_paragraphs(cfg.demo_paragraphs)
    if not 0 < cfg.chunk_min <= cfg.chunk_max:
        raise UsageError(f"need 0 < --chunk-min ({cfg.chunk_min}) <= --chunk-max ({cfg.chunk_max})")
    if not 0 <= cfg.min_doc_len <= cfg.max_doc_len:
        raise UsageError(f"need 0 <= --min-doc-len ({cfg.min_doc_len}) <= --max-doc-len ({cfg.max_doc_len})")
    if cfg.bench_tokens < 0:
        raise UsageError(f"--bench-tokens {cfg.bench_tokens} must be >= 0")
    for name in ("turns", "max_new_tokens", "question_tokens", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    if not (cfg.temperature >= 0 and cfg.rope_theta >= 0):
        raise UsageError(f"--temperature ({cfg.temperature}) and --rope-theta ({cfg.rope_theta}) must be >= 0")
    if cfg.sp_size < 1:
        raise UsageError(f"--sp-size {cfg.sp_size} must be >= 1")
    longpo.check_sp_size(cfg.sp_size)
    if os.path.isdir(cfg.out) or cfg.out.endswith(os.sep):
        raise UsageError(f"--out {cfg.out} is a folder; give the output file, e.g. {os.path.join(cfg.out, 'longpo.jsonl')}")
    return cfg


# ----------------------------------------------------------------------------- generation

def ask(model, tokenizer, contexts, instructions, cfg, batched, **sampling):
    """Answers of the model to each (context, instruction), with longpo's chat formatting."""
    prompts = [longpo.format_dialogue(tokenizer, c, [{"instruction": i}])[0] for c, i in zip(contexts, instructions)]
    step = cfg.batch_size if batched else 1
    texts, n_new = [], 0
    for k in range(0, len(prompts), step):
        t, n = longpo.generate(model, tokenizer, prompts[k:k + step], **sampling)
        texts += t
        n_new += n
    return texts, n_new


@functools.lru_cache(maxsize=4)
def longest_token(tokenizer):
    """Characters in the longest vocabulary entry: no token covers more of a text."""
    return max(map(len, tokenizer.get_vocab()))


def make_record(doc, doc_index, models, tokenizer, cfg, counts):
    """(record or None, why dropped, turns filtered by reason); counts collects generated tokens.
    One process writes the rejected answers itself; under --sp-size the SP group does (main)."""
    model, long_model = models
    state = start_record(doc, doc_index, model, tokenizer, cfg, counts)
    if not isinstance(state, dict):
        return state
    rejected, n = ask(long_model, tokenizer, [doc["text"]] * len(state["turns"]),
                      [t["instruction"] for t in state["turns"]], cfg, False,
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # long prompts one at a time
    counts["generated"] += n
    return finish_record(state, rejected, model, tokenizer, cfg)


def start_record(doc, doc_index, model, tokenizer, cfg, counts):
    """Everything on SHORT inputs: length filter, chunks, questions, chosen answers. Returns the
    record so far (a dict with the turns still to answer on the long input), or (None, why dropped,
    turns filtered) as make_record does."""
    text = doc["text"]
    # Cheap bounds before tokenizing: a token covers at least one UTF-8 byte (plus a BOS or dummy
    # prefix) and at most its longest vocabulary entry, so a document far outside the length range
    # (a 20 MB one-line file) is dropped in microseconds instead of a minute and gigabytes.
    if len(text.encode("utf-8", "surrogatepass")) + 2 < cfg.min_doc_len or len(text) > cfg.max_doc_len * longest_token(tokenizer):
        return None, "doc_length", {}
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n_tokens = len(enc["input_ids"])
    if not cfg.min_doc_len <= n_tokens <= cfg.max_doc_len:
        return None, "doc_length", {}
    if cfg.answers == "copy":
        return copy_record(doc, doc_index, n_tokens, cfg)
    starts = [a for a, _ in enc["offset_mapping"]]
    chunks = chunk_document(text, starts, cfg.chunk_min, cfg.chunk_max)
    rng = random.Random(f"{cfg.seed}-{doc['id']}")
    chunks = sorted(rng.sample(chunks, min(cfg.turns, len(chunks))))
    if not chunks:
        return None, "no_chunks", {}
    torch.manual_seed(cfg.seed * 1_000_003 + doc_index)  # sampling is reproducible per document
    pieces = [text[a:b] for a, b in chunks]
    if cfg.questions == "template":
        replies = [template_questions(p, doc["facts"]) for p in pieces]
    else:
        replies, n = ask(model, tokenizer, pieces, [QUESTION_PROMPT] * len(pieces), cfg, True,
                         max_new_tokens=cfg.question_tokens, temperature=0.7, top_p=0.9)
        counts["generated"] += n
    turns, asked, filtered = [], [], {}
    for (a, b), reply in zip(chunks, replies):
        questions = parse_questions(reply)
        if len(questions) < (1 if cfg.questions == "template" else 4):  # the template lists the chunk's facts
            filtered["questions"] = filtered.get("questions", 0) + 1
            continue
        for question in questions if cfg.answers == "gold" else [rng.choice(questions[:4])]:  # gold: all facts
            asked.append(question)
            turns.append({"instruction": with_lead_in(rng.choice(LEAD_INS), question), "chunk": [a, b]})
    if not turns:
        return None, "questions", filtered
    if cfg.answers == "gold":
        return gold_record(doc, doc_index, turns, asked, n_tokens, starts, filtered, cfg, rng)
    chosen, n = ask(model, tokenizer, [text[t["chunk"][0]:t["chunk"][1]] for t in turns],
                    [t["instruction"] for t in turns], cfg, True, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature)
    counts["generated"] += n
    return {"doc": doc, "doc_index": doc_index, "turns": turns, "chosen": chosen, "filtered": filtered,
            "doc_tokens": n_tokens, "starts": starts}


def gold_record(doc, doc_index, turns, asked, n_tokens, starts, filtered, cfg, rng):
    """--answers gold: (record, None, filtered) with the planted answers ("At Barwick 57.") as chosen
    and the place with another number of the document (the nearest mistake) as rejected; no
    reference log-probs (no model ran). The questions come in random order: in document order a
    model learns to answer by elimination (turn 2 = the fact turn 1 skipped) instead of matching."""
    fact = {f["question"]: f for f in doc["facts"]}
    numbers = sorted({f["answer"] for f in doc["facts"]})
    order = rng.sample(range(len(turns)), len(turns))
    turns, asked = [turns[i] for i in order], [asked[i] for i in order]
    for turn, question in zip(turns, asked):
        place, right = fact[question]["place"], fact[question]["answer"]
        wrong = rng.choice([n for n in numbers if n != right] or [str(int(right) % 90 + 10)])
        turn["chosen"], turn["rejected"] = gold_answer(place, right), gold_answer(place, wrong)
    rec = {"id": doc["id"], "document": doc["text"], "turns": turns,
           "meta": {"doc_index": doc_index, "generator": "gold", "questions": cfg.questions, "doc_tokens": n_tokens,
                    "filtered_turns": filtered, "chunk_tokens": [tokens_in(starts, *t["chunk"]) for t in turns],
                    "seed": cfg.seed}}
    return rec, None, filtered


def copy_record(doc, doc_index, n_tokens, cfg):
    """--answers copy: (record, None, {}): "Repeat the text above.", chosen = the document, rejected =
    its words in reverse order; no reference log-probs (no model ran)."""
    text = doc["text"]
    turn = {"instruction": "Repeat the text above.", "chunk": [0, len(text)], "chosen": text,
            "rejected": " ".join(reversed(text.split()))}
    rec = {"id": doc["id"], "document": text, "turns": [turn],
           "meta": {"doc_index": doc_index, "generator": "copy", "questions": cfg.questions, "doc_tokens": n_tokens,
                    "filtered_turns": {}, "chunk_tokens": [n_tokens], "seed": cfg.seed}}
    return rec, None, {}


def finish_record(state, rejected, model, tokenizer, cfg):
    """The filters, the record and its reference log-probs, given the rejected (long-input) answers."""
    kept, filtered = [], state["filtered"]
    for turn, c, r in zip(state["turns"], state["chosen"], rejected):
        reason = filter_reason(c) or filter_reason(r)
        if reason:
            filtered[reason] = filtered.get(reason, 0) + 1
        else:
            kept.append({**turn, "chosen": c, "rejected": r})
    if not kept:
        return None, "all_turns_filtered", filtered
    rec = {"id": state["doc"]["id"], "document": state["doc"]["text"], "turns": kept,
           "meta": {"doc_index": state["doc_index"], "generator": cfg.model, "questions": cfg.questions,
                    "doc_tokens": state["doc_tokens"], "filtered_turns": filtered,
                    "chunk_tokens": [tokens_in(state["starts"], *t["chunk"]) for t in kept],
                    "temperature": cfg.temperature, "rope_theta_long": cfg.rope_theta or None, "seed": cfg.seed}}
    # Eq. 13 reference: sum over turns of log pi_S(y_i | chunk_i, instruction_i), short inputs only
    device = next(model.parameters()).device
    rec["ref_chosen_logp"], rec["ref_rejected_logp"] = longpo.short_ref_logps(
        model, longpo.build_example(rec, tokenizer), device)
    return rec, None, filtered


def sp_rejected_answers(state, long_model, tokenizer, cfg, par, counts):
    """--sp-size: the SP group writes the rejected answers of every member's document together. Each
    rank did its own document's short-input work (data-parallel, as with one process per document);
    the long prompts of all members are gathered and each is decoded by the whole group
    (longpo.generate_sp); each rank keeps its own answers."""
    prompts = []
    if isinstance(state, dict):
        text = state["doc"]["text"]
        prompts = [(longpo.format_dialogue(tokenizer, text, [{"instruction": t["instruction"]}])[0],
                    cfg.seed * 1_000_003 + state["doc_index"] * 64 + i) for i, t in enumerate(state["turns"])]
    everyone = [None] * par.sp_size
    dist.all_gather_object(everyone, prompts, group=par.sp_group)
    mine = []
    for member, member_prompts in enumerate(everyone):  # the same order on every rank: lockstep
        for prompt, seed in member_prompts:
            text, n = longpo.generate_sp(long_model, tokenizer, prompt, cfg.max_new_tokens, par, cfg.temperature,
                                         seed=seed)
            if member == par.sp_rank:
                mine.append(text)
                counts["generated"] += n
    return mine


# ----------------------------------------------------------------------------- never losing work

def read_parts(folder):
    """What any rank has finished, as light entries (no document text): kept records with where their
    line is, and dropped documents. A line torn by a kill is ignored: that document is done again."""
    records, dropped = [], []
    for path in sorted(glob.glob(os.path.join(folder, "rank*.jsonl"))):
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                start, offset = offset, offset + len(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if "dropped" in entry:
                    dropped.append(entry)
                else:
                    records.append({"id": entry["id"], "doc_index": entry["meta"]["doc_index"],
                                    "turns": len(entry["turns"]), "filtered_turns": entry["meta"]["filtered_turns"],
                                    "path": path, "offset": start})
    return records, dropped


def open_part(path):
    """Append handle of this rank's part file, first cutting a torn last line."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


HARMLESS = ("batch_size", "overwrite", "allow_empty")  # may change when a run is continued


def run_arguments(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in HARMLESS}


def check_out(cfg):
    """Every rank, before any work: <out>.parts/ may only be continued with the arguments that started
    it, and an --out that no run of these arguments wrote is never replaced without --overwrite."""
    folder = cfg.out + ".parts"
    path = os.path.join(folder, "args.json")
    if cfg.overwrite:
        return
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = [f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in run_arguments(cfg).items() if before.get(k) != v]
        if changed:
            raise UsageError(f"{folder} holds work done with other arguments ({'; '.join(changed)}); rerun with "
                             "the same arguments to continue it, or pass --overwrite to start over")
    elif os.path.exists(cfg.out):
        raise UsageError(f"--out {cfg.out} exists and no run with these arguments wrote it (no {path}); pass "
                         "--overwrite to replace it, or choose another --out")


def start_parts(cfg):
    """Rank 0: the parts folder with the run's arguments; --overwrite first removes earlier results."""
    folder = cfg.out + ".parts"
    if cfg.overwrite:
        shutil.rmtree(folder, ignore_errors=True)
        for path in (cfg.out, cfg.out + ".meta.json"):
            if os.path.exists(path):
                os.remove(path)
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, "args.json")):
        with open(os.path.join(folder, "args.json"), "w") as f:
            json.dump(run_arguments(cfg), f, indent=2)


def summarise(records, dropped, n_docs, bad_lines):
    filtered, reasons = {}, {}
    for entry in records + dropped:
        for reason, n in entry.get("filtered_turns", {}).items():
            filtered[reason] = filtered.get(reason, 0) + n
    for d in dropped:
        reasons[d["dropped"]] = reasons.get(d["dropped"], 0) + 1
    return {"documents_in": n_docs, "bad_lines_skipped": bad_lines, "kept": len(records),
            "dropped_documents": reasons, "turns_kept": sum(r["turns"] for r in records),
            "turns_filtered": filtered}


def merge(cfg, n_docs, bad_lines, stats):
    """Rank 0: the parts into one JSONL in document order, line by line and atomically (tmp file,
    then rename), plus <out>.meta.json."""
    import transformers
    records, dropped = read_parts(cfg.out + ".parts")
    records = sorted({r["id"]: r for r in records}.values(), key=lambda r: r["doc_index"])  # once each
    tmp = cfg.out + ".tmp"
    with open(tmp, "wb") as out:
        for rec in records:
            with open(rec["path"], "rb") as part:
                part.seek(rec["offset"])
                out.write(part.readline())
    os.replace(tmp, cfg.out)
    summary = {**summarise(records, dropped, n_docs, bad_lines), **stats}
    meta = {"args": dataclasses.asdict(cfg), "model": cfg.model,
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "summary": summary}
    with open(cfg.out + ".meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    return summary


# ----------------------------------------------------------------------------- main

def bench(cfg, par, device):
    """Sequence-parallel generation of one long prompt: what each rank holds and how long it takes."""
    model, tokenizer = longpo.load_for_inference(cfg.model, device)
    rec = longpo.synthetic_record(tokenizer, cfg.bench_tokens)
    prompt = longpo.format_dialogue(tokenizer, rec["document"], [{"instruction": rec["turns"][0]["instruction"]}])[0]
    longpo.generate_sp(model, tokenizer, prompt[:256], 4, par)  # warm-up
    stats = {}
    longpo.generate_sp(model, tokenizer, prompt, cfg.max_new_tokens, par, stats=stats)
    row = torch.tensor([par.rank, stats["cache_bytes"] / 1e6, stats["prefill_s"], stats["new_tokens"], stats["decode_s"]],
                       dtype=torch.float64, device=device)
    rows = [row.clone() for _ in range(par.world_size)]
    if par.world_size > 1:
        dist.all_gather(rows, row)
    print0(f"bench: {cfg.model}, prompt of {len(prompt)} tokens, sp {par.sp_size}, {torch.get_num_threads()} threads per process")
    print0(f"{'rank':>4} {'cache (MB)':>11} {'prefill (s)':>12} {'new tokens':>11} {'decode tokens/s':>16}")
    for r in (r.tolist() for r in rows):
        print0(f"{int(r[0]):>4} {r[1]:11.2f} {r[2]:12.3f} {int(r[3]):>11} {r[3] / max(r[4], 1e-9):16.1f}")



def write_records(docs, mine, models, tokenizer, cfg, counts, rank, world_size, device):
    """This rank's documents, each record (or the reason it was dropped) appended to its part file
    and flushed before the next starts. With --sp-size, in rounds: in each, every member of an SP
    group does its next document's short-input work, then the group decodes all their long prompts."""
    from tqdm import tqdm
    (model, long_model), par, rounds, t0 = models, None, len(mine), time.perf_counter()
    if cfg.sp_size > 1:
        par = longpo.setup_parallel(cfg.sp_size, rank, world_size, device)
        longest = torch.tensor([len(mine)], device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=par.sp_group)
        rounds = int(longest)  # a member with fewer documents still takes part in the others' decoding
    with open_part(os.path.join(cfg.out + ".parts", f"rank{rank}.jsonl")) as part:
        bar = tqdm(range(rounds), desc="documents", disable=rank != 0)
        for k in bar:
            i = mine[k] if k < len(mine) else None
            doc = docs[i] if i is not None else None
            if par is None:
                result = make_record(doc, i, models, tokenizer, cfg, counts)
            else:
                state = start_record(doc, i, model, tokenizer, cfg, counts) if doc else None
                rejected = sp_rejected_answers(state, long_model, tokenizer, cfg, par, counts)
                result = finish_record(state, rejected, model, tokenizer, cfg) if isinstance(state, dict) else state
            if doc is None:
                continue
            rec, reason, filtered = result
            entry = rec or {"id": doc["id"], "doc_index": i, "dropped": reason, "filtered_turns": filtered}
            part.write(json.dumps(entry, ensure_ascii=False) + "\n")
            part.flush()  # finished work is on disk before the next document starts
            elapsed = time.perf_counter() - t0
            bar.set_postfix(docs_per_s=f"{(k + 1) / elapsed:.2f}", tokens_per_s=f"{counts['generated'] / elapsed:.0f}", refresh=False)


def main(cfg):
    cfg = resolve(cfg)
    longpo.check_model(cfg.model)  # every rank checks flags and files before any process group or model
    if cfg.bench_tokens:
        rank, world_size, device = init_distributed()
        par = (longpo.setup_parallel(cfg.sp_size, rank, world_size, device) if world_size > 1
               else longpo.Parallel(0, 1, 1, None, device))
        return bench(cfg, par, device)
    docs = Docs(cfg.docs, cfg.skip_bad, (cfg.demo_docs, cfg.demo_paragraphs, cfg.seed), cfg.answers == "copy")
    check_out(cfg)
    rank, world_size, device = init_distributed()
    folder = cfg.out + ".parts"
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        start_parts(cfg)
    if world_size > 1:
        dist.barrier()
    records, dropped = read_parts(folder)
    done = {e["id"] for e in records + dropped}
    mine = [i for i in range(len(docs)) if i % world_size == rank and docs.ids[i] not in done]
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    print0(f"{len(docs)} documents, {len(done)} already done, {world_size} rank(s)")
    if cfg.answers != "model":  # the planted answers or the copies: no model runs
        model, tokenizer = None, longpo.load_tokenizer(cfg.model)
    else:
        model, tokenizer = longpo.load_for_inference(cfg.model, device)
    long_model = model
    if cfg.rope_theta and model is not None:  # only the long-input generation sees the raised theta
        long_model = longpo.load_for_inference(cfg.model, device, cfg.rope_theta)[0]
    counts, t0 = {"generated": 0}, time.perf_counter()
    write_records(docs, mine, (model, long_model), tokenizer, cfg, counts, rank, world_size, device)
    elapsed = time.perf_counter() - t0
    stats = torch.tensor([counts["generated"], elapsed], dtype=torch.float64, device=device)  # nccl: on the GPU
    if world_size > 1:
        dist.barrier()
        dist.all_reduce(stats)  # generated tokens summed; seconds summed over ranks
    if rank == 0:
        generated, seconds = stats.tolist()
        summary = merge(cfg, len(docs), docs.bad_lines, {
            "generated_tokens_this_run": int(generated),
            "generated_tokens_per_s": round(generated / max(seconds / world_size, 1e-9), 1)})
        print0(f"wrote {summary['kept']} records to {cfg.out}; summary: {json.dumps(summary)}")
        if not summary["kept"] and not cfg.allow_empty:
            raise UsageError(f"no document of --docs {cfg.docs} gave a record (dropped: {summary['dropped_documents']}, "
                             f"turns filtered: {summary['turns_filtered']}); check --min-doc-len/--max-doc-len and "
                             "--chunk-min/--chunk-max against your documents, or pass --allow-empty")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, DataGenConfig)
