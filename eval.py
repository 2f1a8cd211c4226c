"""Evaluate what LongPO promises: long-context gain AND short-context retention.

Long context:
  * RULER-style synthetic tasks generated in code at any --lengths with the model's tokenizer:
    needle in a haystack (single, multi-key, multi-value, multi-query; needle depths spread over
    the context), variable tracking (multi-hop), and QA over a haystack with a planted passage.
    Greedy decoding; score = share of the expected strings found in the answer (RULER's recall).
  * InfiniteBench files (--infbench DIR): En.QA (token F1), En.MC (accuracy of the chosen option),
    En.Sum (ROUGE-L), over-long inputs truncated from the middle as that benchmark does.
  * Preference metrics on held-out LongPO pairs (--pref-data): the policy's reward accuracy and
    margin on the LONG inputs against the data's short-input reference log-probs (Eq. 12),
    computed sequence-parallel under torchrun (--sp-size, ring attention prefill).
Short context:
  * Log-likelihood multiple choice on JSONL files in the common question/choices/answer format
    (MMLU, ARC, HellaSwag, Winogrande style): acc and length-normalised acc_norm.
  * The intrinsic check that matches LongPO's constraint: mean per-token KL(policy || reference) and
    mean log-prob change of the answers on the SHORT inputs of the preference data (--ref-model).

Output: a table like the paper's (rows models, columns tasks), --baseline MODEL side by side with
deltas, the needle's scores by depth and length, and every score and setting as JSON in --out.
Long inputs are sequence-parallel under torchrun with --sp-size: the preference scoring (ring
attention) and the RULER / InfiniteBench generation (data_gen.generate_long). The built-in haystack
and demo multiple-choice set are synthetic: the tiny default shows the machinery, not quality.

    python eval.py                                   # the tiny run's final model vs its base model
    python eval.py --model tiny --baseline ""        # one model
    torchrun --nproc_per_node 8 eval.py --model runs/mistral-128k/final --sp-size 8 \\
        --baseline mistralai/Mistral-7B-Instruct-v0.2 --lengths 4k,16k,64k,128k \\
        --infbench data/infbench --mc data/mmlu.jsonl,data/arc_c.jsonl --pref-data data/heldout.jsonl
"""
import dataclasses
import itertools
import json
import os
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_gen
import longpo
from longpo import (UsageError, check_at_least, check_output_file, check_runtime, check_sp_size,
                            init_distributed, print0, setup_parallel)


@dataclass
class EvalConfig:
    """Long-context gain and short-context retention of a model, optionally against a baseline."""
    model: str = field(default="runs/longpo-tiny/final", metadata={"help": "model(s), comma-separated: hub id or dir"})
    baseline: str = field(default="auto", metadata={"help": "model to compare with (auto: a longpo.py run's base)"})
    ref_model: str = field(default="", metadata={"help": "reference for the KL check (default: the baseline)"})
    tasks: str = field(default="ruler,mc,kl,pref", metadata={"help": "of ruler, facts, copy, infbench, mc, kl, pref"})
    lengths: str = field(default="1k,2k", metadata={"help": "RULER and facts prompt lengths (k = 1024), e.g. 4k,128k"})
    depths: int = field(default=5, metadata={"help": "needle depths spread over [0, 1]"})
    samples: int = field(default=1, metadata={"help": "RULER samples per task, length and depth"})
    copy_lists: int = field(default=64, metadata={"help": "copy task: held-out word lists to repeat"})
    haystack: str = field(default="", metadata={"help": "haystack text or JSONL ('text') file (default: filler)"})
    infbench: str = field(default="", metadata={"help": "folder with longbook_{qa,choice,sum}_eng.jsonl"})
    infbench_max_len: int = field(default=131072, metadata={"help": "InfiniteBench truncation length (middle cut)"})
    infbench_limit: int = field(default=0, metadata={"help": "examples per InfiniteBench task (0: all)"})
    mc: str = field(default="demo", metadata={"help": "comma list of multiple-choice JSONL files, or 'demo'"})
    pref_data: str = field(default="data/longpo_tiny.jsonl", metadata={"help": "held-out preference pairs (kl, pref)"})
    max_pairs: int = field(default=16, metadata={"help": "at most this many preference records"})
    beta: float = field(default=0.0, metadata={"help": "beta of the pref rewards (0: the trained run's, else 0.1)"})
    sp_size: int = field(default=0, metadata={"help": "sequence-parallel group size for long inputs (0: all ranks)"})
    out: str = field(default="runs/eval.json", metadata={"help": "JSON of all scores (taken: the next free name)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})
    attn_kernel: str = field(default="auto", metadata={"help": "auto | cudnn | sdpa_flash | flash_attn | cpu | plain"})
    timeout_minutes: float = field(default=30.0, metadata={"help": "a collective waiting longer fails the job"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic tasks"})


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A quiet afternoon passed without much news. The river kept its usual pace past the mill. "
          "Nobody in the village could remember a warmer spring. Letters arrived late that week. "
          "The baker opened his shop an hour early. Clouds gathered over the hills and then moved on.")
NAMES = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "harbor", "indigo", "juniper",
         "kestrel", "lumen", "meadow", "nimbus", "orchid", "pebble", "quartz", "raven", "sierra", "tundra"]


# ----------------------------------------------------------------------------- scorers

def normalize_answer(text):
    """Lower case, no punctuation, no articles, single spaces (SQuAD / InfiniteBench style)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def token_f1(prediction, reference):
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction, reference):
    """ROUGE-L F-measure on whitespace tokens (longest common subsequence)."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def parse_option(prediction, options):
    """Index of the option a free-text answer chose: a letter A-D (alone, 'B)', '(C)', 'Answer: D'),
    else the option whose text it contains; None if neither."""
    text = prediction.strip()
    m = (re.match(r"\(([A-D])\)|([A-D])(?:[.):]|$)", text)  # "B", "B.", "B) ...", "(B)"; not "A good ..."
         or re.search(r"(?:[Aa]nswer|[Oo]ption)(?: is)?\s*:?\s*\(?([A-D])\b", text))
    letter = m and next(g for g in m.groups() if g)
    if letter and ord(letter) - 65 < len(options):
        return ord(letter) - 65
    said = normalize_answer(prediction)
    found = [i for i, opt in enumerate(options) if normalize_answer(str(opt)) and normalize_answer(str(opt)) in said]
    return found[0] if len(found) == 1 else None


def recall_score(prediction, expected):
    """RULER's string-match-all: the share of expected strings found in the prediction."""
    low = prediction.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


# ----------------------------------------------------------------------------- RULER-style tasks

def parse_lengths(spec):
    out = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not re.fullmatch(r"\d+k?", item) or not int(item.rstrip("k")):
            raise UsageError(f"--lengths: {item!r} is not a length like 4096 or 4k")
        out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
    return out


def haystack_sentences(path):
    text = FILLER
    if path:
        if not os.path.isfile(path):
            raise UsageError(f"--haystack {path} is not a file")
        if path.endswith(".jsonl"):
            text = " ".join(str(ex["text"]) for ex in read_jsonl(path, ("text",), "--haystack"))
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    return [s.strip() + "." for s in re.split(r"\.\s+", " ".join(text.split())) if s.strip()]


def ruler_sample(task, rng):
    """(needles, question, expected, max_new_tokens); needles are sentences, the first one placed at
    the requested depth and the others at random depths."""
    keys = rng.sample(NAMES, 4)
    values = [str(rng.randint(1000000, 9999999)) for _ in range(4)]
    magic = "One of the special magic numbers for {} is: {}."
    if task == "niah_single":
        question = f"What is the special magic number for {keys[0]} mentioned in the text?"
        return [magic.format(keys[0], values[0])], question, values[:1], 24
    if task == "niah_multikey":
        return ([magic.format(k, v) for k, v in zip(keys, values)],
                f"What is the special magic number for {keys[0]} mentioned in the text?", values[:1], 24)
    if task == "niah_multivalue":
        return ([magic.format(keys[0], v) for v in values],
                f"What are all the special magic numbers for {keys[0]} mentioned in the text?", values, 64)
    if task == "niah_multiquery":
        return ([magic.format(k, v) for k, v in zip(keys, values)],
                f"What are the special magic numbers for {', '.join(keys[:-1])} and {keys[-1]} mentioned in the text?",
                values, 64)
    if task == "vt":  # multi-hop: VAR A = n, VAR B = VAR A, ...
        names = [k.upper() for k in keys]
        chain = [f"VAR {names[0]} = {values[0]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return chain, f"Find all variables that are assigned the value {values[0]} in the text above.", names, 48
    if task == "qa":
        place, count = rng.choice(NAMES).capitalize(), str(rng.randint(12, 999))
        passage = f"Records of the harbour of {place} show that it kept exactly {count} lanterns lit every night."
        return [passage], f"How many lanterns did the harbour of {place} keep lit every night?", [count], 24
    raise ValueError(f"unknown RULER task {task!r}")


def facts_prompt(tokenizer, length, depth, seed):
    """The miniature's task: a held-out demo document (data_gen.demo_corpus, facts "At Barwick 57 maps
    were counted.") cut after the most paragraphs that fit a prompt of at most `length` tokens,
    and a question about its fact nearest to `depth`. Returns (prompt ids, expected number)."""
    doc = data_gen.demo_corpus(1, data_gen.MAX_DEMO_PARAGRAPHS, seed)[0]
    paragraphs = doc["text"].split("\n\n")

    def build(k):
        fact = doc["facts"][round(depth * (2 * k - 1))]
        question = data_gen.with_lead_in(data_gen.LEAD_INS[0], fact["question"])
        ids = longpo.format_dialogue(tokenizer, "\n\n".join(paragraphs[:k]), [{"instruction": question}])[0]
        return ids, fact["answer"]
    lo, hi = 0, len(paragraphs) + 1  # the most paragraphs that fit: build(lo) fits, build(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(build(mid)[0]) <= length else (lo, mid)
    if lo == 0:
        raise UsageError(f"--lengths {length}: too short for a prompt with one paragraph of the facts task")
    ids, expected = build(lo)
    if lo == len(paragraphs) and len(ids) < length:
        raise UsageError(f"--lengths {length}: the facts task's documents hold at most about {len(ids)} tokens "
                         "with this tokenizer; give shorter --lengths")
    return ids, expected


def facts_prompts(tokenizer, lengths, cfg):
    """[(length, prompt ids, expected)] of the facts task: --depths fact positions x --samples
    documents per length, drawn from --seed (seeds far from data_gen's: held-out documents)."""
    depths = [i / max(1, cfg.depths - 1) for i in range(cfg.depths)]
    prompts = []
    for length, depth, s in itertools.product(lengths, depths, range(cfg.samples)):
        seed = random.Random(f"facts-{cfg.seed}-{length}-{depth}-{s}").randrange(1 << 30) + (1 << 30)
        prompts.append((length, *facts_prompt(tokenizer, length, depth, seed)))
    return prompts


def check_facts(names, lengths, cfg):
    """Before any model loads: every facts prompt, for each model's tokenizer (facts_prompt names a
    length that does not fit). Returns {model name: prompts}."""
    return {name: facts_prompts(longpo.load_tokenizer(name), lengths, cfg) for name in dict.fromkeys(names)}


def eval_facts(model, tokenizer, prompts, par=None):
    """Answer accuracy per prompt length: the first number of the greedy answer is the planted one."""
    scores = {}
    for length, ids, expected in tqdm(prompts, desc="facts", leave=False):
        numbers = re.findall(r"\d+", greedy(model, tokenizer, ids, 8, par))
        scores.setdefault(str(length), []).append(float(numbers[:1] == [expected]))
    per_length = {n: sum(v) / len(v) for n, v in scores.items()}
    return {"avg": sum(per_length.values()) / len(per_length), **per_length}


def eval_copy(model, tokenizer, cfg, par=None):
    """The miniature's short skill that its long pairs never train: "Repeat the text above." after a
    held-out list of 16-32 words (data_gen.copy_corpus, a seed far from any training one), answered
    greedily. Exact copies, and the share of words right at their place."""
    exact, words = [], []
    for doc in tqdm(data_gen.copy_corpus(cfg.copy_lists, seed=(1 << 30) + cfg.seed), desc="copy", leave=False):
        text = doc["text"]
        ids = longpo.format_dialogue(tokenizer, text, [{"instruction": data_gen.COPY_INSTRUCTION}])[0]
        answer = greedy(model, tokenizer, ids, len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 8, par)
        want, got = text.split(), answer.split()
        exact.append(float(got == want))
        words.append(sum(a == b for a, b in zip(got, want)) / len(want))
    return {"exact": sum(exact) / len(exact), "words": sum(words) / len(words)}


RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "qa")


def build_ruler_prompt(tokenizer, sentences, needles, depth, question, length, rng):
    """Prompt token ids of (about, at most) `length` tokens: haystack sentences with needles[0] at
    `depth` and the others at random depths, then the question. Returns (ids, context)."""
    others = [(rng.random(), n) for n in needles[1:]]
    if len(needles) > 1 and needles[1].startswith("VAR"):
        others = [(min(1.0, depth + (1 - depth) * (i + 1) / len(needles)), n) for i, n in enumerate(needles[1:])]
    placed = sorted([(depth, needles[0])] + others, key=lambda x: x[0])
    instruction = f"{question} Answer briefly."

    def assemble(n_sentences, tail=""):
        hay = [sentences[i % len(sentences)] for i in range(n_sentences)] + ([tail] if tail else [])
        for d, needle in reversed(placed):
            hay.insert(round(d * len(hay)), needle)
        context = " ".join(hay)
        return longpo.format_dialogue(tokenizer, context, [{"instruction": instruction}])[0], context

    lo, hi = 0, 1
    while len(assemble(hi)[0]) <= length:  # exponential then binary search on whole sentences
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(assemble(mid)[0]) <= length else (lo, mid)
    tail = sentences[lo % len(sentences)]  # fill the rest with a prefix of the next sentence
    a, b = 0, len(tail) + 1
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if len(assemble(lo, tail[:mid])[0]) <= length else (a, mid)
    return assemble(lo, tail[:a])


def greedy(model, tokenizer, ids, max_new_tokens, par=None):
    """Greedy answer to one prompt: on one device, or sequence-parallel over par's SP group."""
    return data_gen.generate(model, tokenizer, [ids], max_new_tokens, par=par)[0][0]


def eval_ruler(model, tokenizer, sentences, lengths, cfg, par=None):
    """Scores per task and length (mean over depths and samples), and of the single needle per depth."""
    depths = [i / max(1, cfg.depths - 1) for i in range(cfg.depths)]
    scores, heat = {}, {}
    jobs = [(t, n, d, s) for t in RULER_TASKS for n in lengths for d in depths for s in range(cfg.samples)]
    for task, length, depth, s in tqdm(jobs, desc="ruler", leave=False):
        rng = random.Random(f"{cfg.seed}-{task}-{length}-{depth}-{s}")
        needles, question, expected, max_new = ruler_sample(task, rng)
        ids, _ = build_ruler_prompt(tokenizer, sentences, needles, depth, question, length, rng)
        score = recall_score(greedy(model, tokenizer, ids, max_new, par), expected)
        scores.setdefault(task, {}).setdefault(str(length), []).append(score)
        if task == "niah_single":
            heat.setdefault(f"{depth:.2f}", {}).setdefault(str(length), []).append(score)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    per_length = {t: {n: mean(v) for n, v in by_len.items()} for t, by_len in scores.items()}
    return ({t: {"avg": mean(list(v.values())), **v} for t, v in per_length.items()},
            {d: {n: mean(v) for n, v in row.items()} for d, row in heat.items()})


# ----------------------------------------------------------------------------- InfiniteBench

INFBENCH = {  # file, prompt (our words), answer tokens, scorer
    "en_qa": ("longbook_qa_eng.jsonl",
              "Answer the question about the book above as briefly as possible.\n\nQuestion: {input}", 48),
    "en_mc": ("longbook_choice_eng.jsonl",
              "Which option answers the question about the book above? Reply with its letter.\n\n"
              "Question: {input}\n{options}", 16),
    "en_sum": ("longbook_sum_eng.jsonl", "Summarize the book above in a few paragraphs.", 512),
}


def truncate_middle(ids, max_len):
    """Keep the first and last max_len/2 tokens (InfiniteBench's truncation)."""
    if len(ids) <= max_len:
        return ids
    return ids[:max_len // 2] + ids[len(ids) - (max_len - max_len // 2):]


def load_infbench(cfg):
    """{task: examples} of the InfiniteBench files in --infbench, checked line by line up front."""
    names = ", ".join(v[0] for v in INFBENCH.values())
    if not os.path.isdir(cfg.infbench):
        raise UsageError(f"--infbench {cfg.infbench} is not a folder (with {names})")
    tasks = {}
    for task, (name, _, _) in INFBENCH.items():
        path, fields = os.path.join(cfg.infbench, name), ("context", "answer", "options")[:3 if task == "en_mc" else 2]
        if os.path.exists(path):
            tasks[task] = read_jsonl(path, fields, "--infbench")[:cfg.infbench_limit or None]
    if not tasks:
        raise UsageError(f"--infbench {cfg.infbench}: none of {names} found")
    return tasks


def eval_infbench(model, tokenizer, cfg, tasks, par=None):
    scores = {}
    for task, items in tasks.items():
        _, template, max_new = INFBENCH[task]
        values = []
        for ex in items:
            answers = ex["answer"] if isinstance(ex["answer"], list) else [ex["answer"]]
            options = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(ex.get("options", [])))
            instruction = template.format(input=ex.get("input", ""), options=options)
            context_ids = tokenizer(ex["context"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            overhead = len(longpo.format_dialogue(tokenizer, "", [{"instruction": instruction}])[0])
            context = tokenizer.decode(truncate_middle(context_ids, max(0, cfg.infbench_max_len - overhead - max_new)))
            ids = longpo.format_dialogue(tokenizer, context, [{"instruction": instruction}])[0]
            pred = greedy(model, tokenizer, ids, max_new, par)
            if task == "en_qa":
                values.append(max(token_f1(pred, str(a)) for a in answers))
            elif task == "en_mc":
                gold = [i for i, o in enumerate(ex["options"]) if str(o) in map(str, answers)]
                values.append(float(parse_option(pred, ex["options"]) in gold))
            else:
                values.append(max(rouge_l(pred, str(a)) for a in answers))
        if values:
            scores[task] = sum(values) / len(values)
    return scores


# ----------------------------------------------------------------------------- short-context retention

def demo_mc(seed=0, n=24):
    """Short multiple-choice questions about a stated fact (the demo's stand-in for MMLU-style files)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        name, count = rng.choice(NAMES).capitalize(), rng.randint(10, 99)
        choices = [str(count)] + [str(c) for c in rng.sample([c for c in range(10, 100) if c != count], 3)]
        rng.shuffle(choices)
        items.append({"question": f"{name} keeps exactly {count} lanterns. How many lanterns does {name} keep?",
                      "choices": choices, "answer": choices.index(str(count))})
    return items


def read_jsonl(path, fields, flag):
    """The objects of a JSONL file; a bad line or a missing field names the flag, file and line."""
    where = f"{flag} {path}"
    if not os.path.isfile(path):
        raise UsageError(f"{where} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{where}:{lineno}: not valid JSON ({e})") from None
            missing = [k for k in fields if not isinstance(ex, dict) or k not in ex]
            if missing:
                raise UsageError(f"{where}:{lineno}: field '{missing[0]}' is missing (needs {', '.join(fields)})")
            items.append(ex)
    if not items:
        raise UsageError(f"{where} holds no examples")
    return items


def mc_answer(answer, choices):
    """Index of the right choice: an int index, the text of a choice ("8" among "6", "8", "10"), or a
    letter A, B, ...; None if it names none."""
    if type(answer) is int:
        return answer if 0 <= answer < len(choices) else None
    if not isinstance(answer, str):
        return None
    texts = [str(c).strip() for c in choices]
    if answer.strip() in texts:
        return texts.index(answer.strip())
    letter = answer.strip().upper()
    return ord(letter) - 65 if len(letter) == 1 and 0 <= ord(letter) - 65 < len(choices) else None


def load_mc(spec):
    sets = {}
    for path in spec.split(","):
        if path == "demo":
            sets["demo_mc"] = demo_mc()
            continue
        items = []
        for lineno, ex in enumerate(read_jsonl(path, ("question", "choices", "answer"), "--mc"), 1):
            if not (isinstance(ex["choices"], list) and len(ex["choices"]) >= 2):
                raise UsageError(f"{path}: example {lineno}: field 'choices' must be a list of at least 2 answers")
            answer = mc_answer(ex["answer"], ex["choices"])
            if answer is None:
                raise UsageError(f"{path}: example {lineno}: field 'answer' = {ex['answer']!r} names no choice "
                                 "(an index, a letter, or the text of a choice)")
            items.append({"question": ex["question"], "choices": ex["choices"], "answer": answer})
        sets[os.path.splitext(os.path.basename(path))[0]] = items
    return sets


@torch.no_grad()
def continuation_logp(model, tokenizer, prompt, continuation):
    """log p(continuation | prompt) summed over the continuation's tokens (plain text, no template)."""
    p_ids, c_ids = (tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # as text
                    for text in (prompt, continuation))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + p_ids + c_ids], device=next(model.parameters()).device)
    logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][-len(c_ids):].sum().item()


def eval_mc(model, tokenizer, items):
    """acc: the choice of highest log-likelihood; acc_norm: per character of the choice."""
    acc = acc_norm = 0
    for ex in items:
        prompt = f"Question: {ex['question']}\nAnswer:"
        logps = [continuation_logp(model, tokenizer, prompt, " " + str(c)) for c in ex["choices"]]
        norm = [lp / max(1, len(str(c))) for lp, c in zip(logps, ex["choices"])]
        acc += int(max(range(len(logps)), key=logps.__getitem__) == ex["answer"])
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == ex["answer"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


@torch.no_grad()
def eval_kl(model, ref_model, tokenizer, records):
    """Mean per-token KL(policy || reference) and mean per-token log-prob change of the chosen answers
    on the SHORT inputs (chunk + instruction): what LongPO's constraint keeps small."""
    kl_sum, delta_sum, n = 0.0, 0.0, 0
    device = next(model.parameters()).device
    for rec in records:
        for turn in rec["turns"]:  # the short input of each turn: its chunk, its instruction, the chosen answer
            seq, is_answer = longpo.short_dialogue(tokenizer, rec, turn, "chosen")
            ids = torch.tensor([seq], device=device)
            targets, mask = longpo.shifted_targets(seq, is_answer)
            pos = mask.nonzero().squeeze(-1).to(device)
            logp = F.log_softmax(model(input_ids=ids).logits[0, pos].float(), -1)
            ref_logp = F.log_softmax(ref_model(input_ids=ids).logits[0, pos].float(), -1)
            kl_sum += (logp.exp() * (logp - ref_logp)).sum().item()
            t = targets.to(device)[pos]
            delta_sum += (logp.gather(-1, t[:, None]) - ref_logp.gather(-1, t[:, None])).sum().item()
            n += len(pos)
    return {"kl": kl_sum / max(n, 1), "logp_change": delta_sum / max(n, 1), "tokens": n}


@torch.no_grad()
def eval_pref(model, tokenizer, records, par, beta, chunk=4096):
    """Reward accuracy and margin of the policy on the LONG inputs (Eq. 12 rewards against the data's
    short-input reference log-probs), sequence-parallel over par's SP group (model running ring
    attention); each pair packed as in training, so the document runs once."""
    acc = margin = 0.0
    pad = tokenizer.pad_token_id
    for rec in records:
        ex = longpo.build_example(rec, tokenizer)
        packed = longpo.prepare_packed(ex, par, pad, nll=[0.0] * len(ex["chosen"]["ids"]))
        seqs = [packed] if packed else [longpo.prepare_sequence(ex[side]["ids"], {side: ex[side]["is_answer"]}, par,
                                                                pad) for side in ("chosen", "rejected")]
        refs = [torch.tensor([rec[f"ref_{side}_logp"]], dtype=torch.float64, device=par.device)
                for side in ("chosen", "rejected")]
        _, chosen, rejected = longpo.longpo_loss(*longpo.answer_logps(model, seqs, par, chunk), *refs, beta)
        acc += float(chosen.item() > rejected.item())
        margin += (chosen - rejected).item()
    return {"reward_accuracy": acc / len(records), "reward_margin": margin / len(records)}


# ----------------------------------------------------------------------------- glue

def free_name(path, overwrite):
    """path, or, when it exists and overwrite is off, the first free path-1.ext, path-2.ext, ..."""
    if overwrite or not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    return next(f"{stem}-{i}{ext}" for i in itertools.count(1) if not os.path.exists(f"{stem}-{i}{ext}"))


def prepare_inputs(cfg, tasks):
    """Every flag and input file checked and read before any model is loaded: a mistake found after
    hours of generation at 128K would lose them. Returns the inputs of the tasks and the output paths."""
    unknown = set(tasks) - {"ruler", "facts", "copy", "infbench", "mc", "kl", "pref"}
    if unknown or not tasks:
        raise UsageError(f"--tasks {cfg.tasks!r}: choose from ruler, facts, copy, infbench, mc, kl, pref")
    check_at_least(cfg, ("depths", "samples", "copy_lists", "max_pairs", "infbench_max_len"), 1)
    if cfg.infbench_limit < 0 or not cfg.beta >= 0:
        raise UsageError("--infbench-limit and --beta must be >= 0")
    check_runtime(cfg)
    check_sp_size(cfg.sp_size)
    lengths = parse_lengths(cfg.lengths) if {"ruler", "facts"} & set(tasks) else None
    for name in model_names(cfg):
        longpo.check_model(name, "--model")
    if cfg.ref_model:
        longpo.check_model(cfg.ref_model, "--ref-model")
    inputs = {"lengths": lengths}
    if "ruler" in tasks:
        inputs["sentences"] = haystack_sentences(cfg.haystack)
    if "infbench" in tasks:
        if not cfg.infbench:
            raise UsageError("--tasks infbench needs --infbench DIR")
        inputs["infbench"] = load_infbench(cfg)
    if "mc" in tasks:
        inputs["mc"] = load_mc(cfg.mc)
    inputs["records"] = []
    if {"kl", "pref"} & set(tasks):
        if not os.path.exists(cfg.pref_data):
            raise UsageError(f"--pref-data {cfg.pref_data} does not exist: create it first with `python data_gen.py`, "
                             "or drop kl and pref from --tasks")
        records = longpo.Records(cfg.pref_data, need_ref=True)
        inputs["records"] = records.select(range(min(len(records), cfg.max_pairs)))
    check_output_file("--out", cfg.out, "eval.json")
    inputs["out"] = free_name(cfg.out, cfg.overwrite)
    if inputs["out"] != cfg.out:
        print0(f"{cfg.out} exists: writing {inputs['out']} instead (--overwrite replaces it)")
    return inputs


def model_names(cfg):
    names = [n.strip() for n in cfg.model.split(",") if n.strip()]
    if not names:
        raise UsageError("--model is empty: give a model, or several separated by commas")
    return list(dict.fromkeys(names))


def trained_run(cfg):
    """The config.json of the longpo.py run whose final/ is the first --model: its base model, beta."""
    first = model_names(cfg)[0]
    path = os.path.join(os.path.dirname(os.path.abspath(first)), "config.json")
    if not (os.path.isdir(first) and os.path.exists(path)):
        return {}
    with open(path) as f:
        return json.load(f)


def answer_tasks(name, model, tokenizer, ref_model, tasks, inputs, cfg, results, save, par=None):
    """Everything but the SP scoring: RULER and InfiniteBench generation (on one device, or
    sequence-parallel over par's SP group), multiple choice, KL; each task's scores go into results
    and to disk (save) as soon as it finishes."""
    if "ruler" in tasks:
        results["ruler"], results["needle_by_depth"] = eval_ruler(model, tokenizer, inputs["sentences"],
                                                                  inputs["lengths"], cfg, par)
        save()
    if "facts" in tasks:
        results["facts"] = eval_facts(model, tokenizer, inputs["facts"][name], par)
        save()
    if "copy" in tasks:
        results["copy"] = eval_copy(model, tokenizer, cfg, par)
        save()
    if "infbench" in tasks:
        results["infbench"] = eval_infbench(model, tokenizer, cfg, inputs["infbench"], par)
        save()
    if "mc" in tasks:
        results["mc"] = {set_name: eval_mc(model, tokenizer, items) for set_name, items in inputs["mc"].items()}
        save()
    if "kl" in tasks:
        results["kl"] = eval_kl(model, ref_model, tokenizer, inputs["records"])
        save()


def summary_row(res):
    """The paper-style columns of one model's results."""
    row = {f"facts/{n}": v for n, v in res.get("facts", {}).items()}
    row.update({f"copy/{k}": v for k, v in res.get("copy", {}).items()})
    for task, by_len in res.get("ruler", {}).items():
        row[f"ruler/{task}"] = by_len["avg"]
    if res.get("ruler"):  # the paper's RULER average: the mean of its three categories NIAH, VT, QA
        niah = [v["avg"] for t, v in res["ruler"].items() if t.startswith("niah")]
        categories = [sum(niah) / len(niah), res["ruler"]["vt"]["avg"], res["ruler"]["qa"]["avg"]]
        row["ruler/niah"], row["ruler/avg"] = categories[0], sum(categories) / 3
    row.update({f"infbench/{k}": v for k, v in res.get("infbench", {}).items()})
    for set_name, v in res.get("mc", {}).items():
        row[f"{set_name}/acc"], row[f"{set_name}/acc_norm"] = v["acc"], v["acc_norm"]
    if "kl" in res:
        row["kl"], row["logp_change"] = res["kl"]["kl"], res["kl"]["logp_change"]
    if "pref" in res:
        row["pref/acc"], row["pref/margin"] = res["pref"]["reward_accuracy"], res["pref"]["reward_margin"]
    return row


def format_table(rows):
    """rows: {row label: {column: value}} -> a text table, one row per model (and delta)."""
    columns = list(rows[next(iter(rows))])
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + " ".join(f"{c:>{max(9, len(c))}}" for c in columns)]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}" + " ".join(f"{row.get(c, float('nan')):>{max(9, len(c))}.4f}" for c in columns))
    return "\n".join(lines)


def print_ruler(results):
    """RULER per task and length, and the single needle's score per depth and length, of each model."""
    print("\nRULER by length (mean over depths)")
    for label, res in results.items():
        for task, by_len in res["ruler"].items():
            print(f"  {label} {task}: " + ", ".join(f"{n}: {v:.3f}" for n, v in by_len.items() if n != "avg"))
    print("\nsingle needle by depth in the context (0: its start) and length")
    for label, res in results.items():
        for depth, by_len in sorted(res["needle_by_depth"].items()):
            print(f"  {label} depth {depth}: " + ", ".join(f"{n}: {v:.2f}" for n, v in by_len.items()))


def write_json(path, payload):
    """Atomically (a temporary file, then a rename): a kill never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)


def main(cfg):
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    inputs = prepare_inputs(cfg, tasks)  # every rank, before any process group or model
    models, baseline, ref_name, beta = resolve_models(cfg)
    if "facts" in tasks:
        inputs["facts"] = check_facts(list(models.values()), inputs["lengths"], cfg)
    rank, world_size, device = init_distributed(cfg.timeout_minutes)
    par = setup_parallel(cfg.sp_size, rank, world_size, device)
    results = {label: {} for label in models}
    settings = {**dataclasses.asdict(cfg), "baseline_resolved": baseline, "ref_model_resolved": ref_name,
                "beta_resolved": beta, "world_size": world_size}

    def save(table=None):  # rank 0; "complete" is false until every task of every model finished
        if rank == 0:
            write_json(inputs["out"], {"settings": settings, "complete": table is not None, "results": results,
                                       **({"table": table} if table else {})})
    loaded = {name: data_gen.load_for_inference(name, device) for name in dict.fromkeys(models.values())}  # each once
    if "pref" in tasks:  # phase 1, every rank: sequence-parallel scoring of the long inputs
        for label, name in models.items():
            model, tokenizer = loaded[name]
            model.set_attn_implementation("ring_attention")  # a packed pair needs its branch mask
            results[label]["pref"] = eval_pref(model, tokenizer, inputs["records"], par, beta)
            model.set_attn_implementation("sdpa")  # generation below runs on one device
            save()
    # phase 2: generation and short-input scoring; on rank 0 alone, or with an SP group of several,
    # on every rank (each group decodes sequence-parallel, all compute the same scores, rank 0 writes)
    if rank == 0 or par.sp_size > 1:
        ref_model = None
        if "kl" in tasks:
            ref_model = (loaded.get(ref_name) or data_gen.load_for_inference(ref_name, device))[0]
        for label, name in models.items():
            answer_tasks(name, *loaded[name], ref_model, tasks, inputs, cfg, results[label], save, par)
    if rank == 0:
        save(table=report(results, baseline, tasks))
        print(f"scores: {inputs['out']}")


def resolve_models(cfg):
    """(table label -> model, the baseline ('' for none), the KL reference, the rewards' beta): the
    baseline and beta default to the trained run's (--baseline auto, --beta 0)."""
    run, names = trained_run(cfg), model_names(cfg)
    baseline = run.get("model", "") if cfg.baseline == "auto" else cfg.baseline
    if baseline:
        longpo.check_model(baseline, "--baseline")
    models = {name: name for name in names}
    if baseline:
        models = {(baseline if baseline not in names else f"{baseline} (baseline)"): baseline, **models}
    return models, baseline, cfg.ref_model or baseline or names[0], cfg.beta or run.get("beta", 0.1)


def report(results, baseline, tasks):
    """Print the table of every model's summary row (and baseline -> model deltas); return its rows."""
    rows = {label: summary_row(res) for label, res in results.items()}
    if baseline and len(rows) == 2:
        first, second = rows.values()
        rows["delta"] = {c: second[c] - first.get(c, float("nan")) for c in second}
    print(format_table(rows), flush=True)
    if "ruler" in tasks:
        print_ruler(results)
    return rows


if __name__ == "__main__":
    longpo.run_cli(main, EvalConfig)
