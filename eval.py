"""Evaluate what LongPO promises: long-context gain AND short-context retention.

Long context: RULER-style tasks made in code at any --lengths (needle in a haystack: single, multi-key,
multi-value, multi-query; variable tracking; QA), the miniature's facts (README), InfiniteBench files
(En.QA, En.MC, En.Sum), and pref: reward accuracy and margin (Eq. 12) on held-out pairs' LONG inputs. Short
context: mc, multiple choice on JSONL files (MMLU style); kl, KL(policy || baseline) on the pairs' SHORT
inputs; copy, the miniature's short skill. Answers are greedy; under torchrun all processes form one ring.
The models share one tokenizer. --out, the JSON of every score, is replaced after each task.

    python eval.py                                   # the tiny run's final model vs its base model
    torchrun --nproc_per_node 8 eval.py --model runs/mistral-128k/final --lengths 4k,16k,64k,128k \\
        --tasks ruler,infbench,mc,kl,pref --infbench data/infbench --mc data/mmlu.jsonl \\
        --pref-data data/heldout_128k --out runs/eval-128k.json
"""
import dataclasses
import itertools
import json
import os
import random
import re
import string
from collections import Counter
from statistics import fmean

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_gen
import longpo
from longpo import UsageError, arg, check_at_least


@dataclasses.dataclass
class EvalConfig:
    """Long-context gain and short-context retention of models, against a baseline."""
    model: str = arg("runs/longpo-tiny/final", "model(s), comma-separated")
    baseline: str = arg("auto", "compared with; KL reference (auto: run's base)")
    tasks: str = arg("ruler,kl,pref", "of ruler,facts,copy,infbench,mc,kl,pref")
    lengths: str = arg("1k,2k", "ruler, facts prompts (infbench: the largest)")
    samples: int = arg(1, "ruler, facts prompts per task, length and depth")
    infbench: str = arg("", "folder with longbook_{qa,choice,sum}_eng.jsonl")
    mc: str = arg("", "multiple-choice JSONL files, comma-separated")
    pref_data: str = arg("data/longpo_tiny", "held-out pairs (kl, pref)")
    max_pairs: int = arg(16, "at most this many preference records")
    out: str = arg("runs/eval.json", "JSON of all scores (replaced)")
    seed: int = arg(0, "seed of the synthetic prompts")


TASKS = ("ruler", "facts", "copy", "infbench", "mc", "kl", "pref")
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "qa")
HAYSTACK = [s + "." for s in (  # RULER's noise haystack, sentence by sentence
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. A quiet "
    "afternoon passed without much news. The river kept its usual pace past the mill. Nobody in the village "
    "could remember a warmer spring. Letters arrived late that week. The baker opened his shop an hour "
    "early. Clouds gathered over the hills and then moved on").split(". ")]
NAMES = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "harbor", "indigo", "juniper",
         "kestrel", "lumen", "meadow", "nimbus", "orchid", "pebble", "quartz", "raven", "sierra", "tundra"]
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the needle (ruler) or the asked fact (facts) is in the context
COPY_LISTS = 64  # held-out word lists of the copy task
INFBENCH = {  # task: file, instruction (our words), answer tokens
    "en_qa": ("longbook_qa_eng.jsonl",
              "Answer the question about the book above as briefly as possible.\n\nQuestion: {input}", 48),
    "en_mc": ("longbook_choice_eng.jsonl", "Which option answers the question about the book above? "
              "Reply with its letter.\n\nQuestion: {input}\n{options}", 16),
    "en_sum": ("longbook_sum_eng.jsonl", "Summarize the book above in a few paragraphs.", 512),
}


# ---------------------------------------------------------- scorers

def normalize_answer(text):
    """Lower case, no punctuation, no articles, single spaces (SQuAD / InfiniteBench style)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def f_measure(common, n_prediction, n_reference):
    """F1 = 2 P R / (P + R) of P = common / n_prediction, R = common / n_reference: 2 common / (n_p + n_r)."""
    return 2 * common / max(1, n_prediction + n_reference)


def token_f1(prediction, reference):
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    return f_measure(sum((Counter(pred) & Counter(ref)).values()), len(pred), len(ref))


def rouge_l(prediction, reference):
    """ROUGE-L F-measure on whitespace tokens (longest common subsequence)."""
    a, b = prediction.lower().split(), reference.lower().split()
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return f_measure(prev[-1], len(a), len(b))


def parse_option(prediction, options):
    """Index of the option an answer chose: a letter ('B', 'B)', '(C)', 'Answer: D') or the text of one."""
    m = (re.match(r"\(([A-D])\)|([A-D])(?:[.):]|$)", prediction.strip())  # "B", "B)", "(B)"; not "A good"
         or re.search(r"(?:[Aa]nswer|[Oo]ption)(?: is)?\s*:?\s*\(?([A-D])\b", prediction))
    letter = m and next(g for g in m.groups() if g)
    if letter and ord(letter) - 65 < len(options):
        return ord(letter) - 65
    said, texts = normalize_answer(prediction), [normalize_answer(str(opt)) for opt in options]
    found = [i for i, text in enumerate(texts) if text and text in said]
    return found[0] if len(found) == 1 else None


def recall_score(prediction, expected):
    """RULER's string-match-all: the share of expected strings found in the prediction."""
    return sum(e.lower() in prediction.lower() for e in expected) / len(expected)


def first_number(prediction, expected):
    """facts: the answer's first number is the planted one."""
    return float(re.findall(r"\d+", prediction)[:1] == [expected])


# ---------------------------------------------------------- prompts of the long tasks

def parse_lengths(spec):
    items = [item.strip().lower() for item in spec.split(",")]
    for item in items:
        if not re.fullmatch(r"0*[1-9]\d*k?", item):
            raise UsageError(f"--lengths: {item!r} is not a length like 4096 or 4k")
    return [int(item.rstrip("k")) * (1024 if item.endswith("k") else 1) for item in items]


def ruler_sample(task, rng):
    """(needles, question, expected, max_new_tokens) of one prompt; needles are sentences."""
    keys, values = rng.sample(NAMES, 4), [str(rng.randint(1000000, 9999999)) for _ in range(4)]
    magic = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    ask = f"What is the special magic number for {keys[0]} mentioned in the text?"
    if task == "niah_single":
        return magic[:1], ask, values[:1], 24
    if task == "niah_multikey":
        return magic, ask, values[:1], 24
    if task == "niah_multivalue":
        return ([f"One of the special magic numbers for {keys[0]} is: {v}." for v in values],
                f"What are all the special magic numbers for {keys[0]} mentioned in the text?", values, 64)
    if task == "niah_multiquery":
        names = f"{', '.join(keys[:-1])} and {keys[-1]}"
        return magic, f"What are the special magic numbers for {names} mentioned in the text?", values, 64
    if task == "vt":  # multi-hop: VAR A = n, VAR B = VAR A, ...
        names = [k.upper() for k in keys]
        chain = [f"VAR {names[0]} = {values[0]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return (chain, f"Find all variables that are assigned the value {values[0]} in the text above.",
                names, 48)
    place, count = rng.choice(NAMES).capitalize(), str(rng.randint(12, 999))  # qa
    passage = f"Records of the harbour of {place} show that it kept exactly {count} lanterns lit every night."
    return [passage], f"How many lanterns did the harbour of {place} keep lit every night?", [count], 24


def build_ruler_prompt(tokenizer, needles, depth, question, length, rng):
    """(Prompt ids of at most, and about, `length` tokens: the haystack with needles[0] at `depth`, the
    others at random depths (vt's chain in order after it), then the question; its context)."""
    others = [(rng.random(), n) for n in needles[1:]]
    if needles[0].startswith("VAR"):
        others = [(depth + (1 - depth) * (i + 1) / len(needles), n) for i, n in enumerate(needles[1:])]
    placed = sorted([(depth, needles[0])] + others, key=lambda x: x[0])

    def assemble(n_chars):  # the haystack's first n_chars characters, the needles between its sentences
        hay, total = [], 0
        while total < n_chars:
            hay.append(HAYSTACK[len(hay) % len(HAYSTACK)][:n_chars - total])
            total += len(hay[-1]) + 1
        for d, needle in reversed(placed):
            hay.insert(round(d * len(hay)), needle)
        turn = [{"instruction": f"{question} Answer briefly."}]
        return longpo.format_dialogue(tokenizer, " ".join(hay), turn)[0], " ".join(hay)

    lo, hi = 0, 256  # the most characters that fit: exponential, then binary search
    while len(assemble(hi)[0]) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(assemble(mid)[0]) <= length else (lo, mid)
    return assemble(lo)


def facts_prompt(tokenizer, length, depth, seed):
    """(Prompt ids, expected number): a held-out demo document (facts "At Barwick 57 maps were counted.")
    cut after the most paragraphs that fit `length` tokens, a question about its fact nearest `depth`."""
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
    if lo == 0 or (lo == len(paragraphs) and len(build(lo)[0]) < length):  # no paragraph, or all and short
        raise UsageError(f"--lengths {length}: the facts task's prompts take {len(build(1)[0])} (one "
                         f"paragraph) to about {len(build(len(paragraphs))[0])} tokens with this tokenizer")
    return build(lo)


def long_prompts(tokenizer, task, lengths, cfg):
    """[(task, length, ids, max_new_tokens, expected)] of `task`, ruler (its six tasks) or facts: DEPTHS x
    --samples prompts per task and length, each from a seed of its own."""
    prompts = []
    names = RULER_TASKS if task == "ruler" else ("facts",)
    for name, length, depth, s in itertools.product(names, lengths, DEPTHS, range(cfg.samples)):
        if name == "facts":
            seed = random.Random(f"facts-{cfg.seed}-{length}-{depth}-{s}").randrange(1 << 30) + (1 << 30)
            (ids, expected), max_new = facts_prompt(tokenizer, length, depth, seed), 8
        else:
            rng = random.Random(f"{cfg.seed}-{name}-{length}-{depth}-{s}")
            needles, question, expected, max_new = ruler_sample(name, rng)
            ids = build_ruler_prompt(tokenizer, needles, depth, question, length, rng)[0]
        prompts.append((name, length, ids, max_new, expected))
    return prompts


def truncate_middle(ids, max_len):
    """Keep the first and last max_len/2 tokens (InfiniteBench's truncation)."""
    return ids if len(ids) <= max_len else ids[:max_len // 2] + ids[len(ids) - (max_len - max_len // 2):]


# ---------------------------------------------------------- the tasks

def eval_prompts(model, tokenizer, prompts, score, par=None):
    """{task: {"avg": mean over lengths, length: mean score}} of [(task, length, ids, max_new, expected)],
    each answer greedy, on one device or sequence-parallel over par's ring."""
    scores = {}
    for task, length, ids, max_new, expected in tqdm(prompts, desc="prompts", leave=False):
        answer = score(data_gen.generate(model, tokenizer, [ids], max_new, par=par)[0][0], expected)
        scores.setdefault(task, {}).setdefault(str(length), []).append(answer)
    per_length = {task: {n: fmean(v) for n, v in by_len.items()} for task, by_len in scores.items()}
    return {task: {"avg": fmean(list(v.values())), **v} for task, v in per_length.items()}


def eval_copy(model, tokenizer, cfg, par=None):
    """Exact copies, and the share of words in place, of COPY_LISTS held-out lists of 16-32 words, each
    followed by "Repeat the text above." (data_gen.copy_corpus, a seed far from any training one)."""
    exact, words = [], []
    for doc in tqdm(data_gen.copy_corpus(COPY_LISTS, seed=(1 << 30) + cfg.seed), desc="copy", leave=False):
        text = doc["text"]
        ids = longpo.format_dialogue(tokenizer, text, [{"instruction": data_gen.COPY_INSTRUCTION}])[0]
        n_words = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        got = data_gen.generate(model, tokenizer, [ids], n_words + 8, par=par)[0][0].split()
        want = text.split()
        exact.append(float(got == want))
        words.append(sum(a == b for a, b in zip(got, want)) / len(want))
    return {"exact": fmean(exact), "words": fmean(words)}


def eval_infbench(model, tokenizer, tasks, max_len, par=None):
    """Mean score per task of {task: examples}: En.QA token F1, En.MC accuracy of the chosen option, En.Sum
    ROUGE-L, each the best over the answers given; the books cut from the middle to prompts of max_len."""
    scores = {}
    for task, items in tasks.items():
        _, template, max_new = INFBENCH[task]
        for ex in tqdm(items, desc=task, leave=False):
            options = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(ex.get("options", [])))
            turn = [{"instruction": template.format(input=ex.get("input", ""), options=options)}]
            book = tokenizer(ex["context"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            room = max(0, max_len - len(longpo.format_dialogue(tokenizer, "", turn)[0]) - max_new)
            ids = longpo.format_dialogue(tokenizer, tokenizer.decode(truncate_middle(book, room)), turn)[0]
            answer = data_gen.generate(model, tokenizer, [ids], max_new, par=par)[0][0]  # greedy
            answers = [str(a) for a in (ex["answer"] if isinstance(ex["answer"], list) else [ex["answer"]])]
            if task == "en_mc":
                right = [i for i, option in enumerate(ex["options"]) if str(option) in answers]
                score = float(parse_option(answer, ex["options"]) in right)
            else:
                score = max((token_f1 if task == "en_qa" else rouge_l)(answer, a) for a in answers)
            scores.setdefault(task, []).append(score)
    return {task: fmean(values) for task, values in scores.items()}


@torch.no_grad()
def continuation_logp(model, tokenizer, prompt, continuation):
    """log p(continuation | prompt) summed over the continuation's tokens (plain text, no template)."""
    p_ids = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    c_ids = longpo.encode_after(tokenizer, prompt, continuation, as_text=True)  # as it follows the prompt
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + p_ids + c_ids], device=model.device)
    logps = F.log_softmax(model(input_ids=ids).logits[0, -len(c_ids) - 1:-1].float(), -1)  # (len(c_ids), V)
    return logps.gather(-1, ids[0, -len(c_ids):, None]).sum().item()


def eval_mc(model, tokenizer, items):
    """acc: the choice of highest log-likelihood; acc_norm: per character of the choice."""
    acc = acc_norm = 0
    for ex in items:
        logps = [continuation_logp(model, tokenizer, f"Question: {ex['question']}\nAnswer:", f" {c}")
                 for c in ex["choices"]]
        norm = [lp / max(1, len(str(c))) for lp, c in zip(logps, ex["choices"])]
        acc += int(logps.index(max(logps)) == ex["answer"])  # the first of equal ones
        acc_norm += int(norm.index(max(norm)) == ex["answer"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


@torch.no_grad()
def eval_kl(model, ref_model, tokenizer, records):
    """Mean per-token KL(policy || reference) and log-prob change of the chosen answers on the SHORT
    inputs (each turn's chunk and instruction): short-context retention (LongPO's own constraint pulls
    the policy on the LONG input towards pi_S on the short one)."""
    kl_sum, delta_sum, n = 0.0, 0.0, 0
    for rec in records:
        for turn in rec["turns"]:
            seq, is_answer = longpo.short_dialogue(tokenizer, rec, turn, "chosen")
            ids = torch.tensor([seq], device=model.device)
            targets, mask = longpo.shifted_targets(seq, is_answer)
            pos = mask.nonzero().squeeze(-1).to(model.device)
            t = targets.to(model.device)[pos][:, None]
            # the logits of the answer positions only (a 30K-token chunk's are GBs)
            logp = F.log_softmax(model(input_ids=ids, logits_to_keep=pos).logits[0].float(), -1)
            ref_logp = logp if ref_model is model else F.log_softmax(
                ref_model(input_ids=ids, logits_to_keep=pos).logits[0].float(), -1)
            kl_sum += (logp.exp() * (logp - ref_logp)).sum().item()
            delta_sum += (logp.gather(-1, t) - ref_logp.gather(-1, t)).sum().item()
            n += len(pos)
    return {"kl": kl_sum / max(n, 1), "logp_change": delta_sum / max(n, 1), "tokens": n}


@torch.no_grad()
def eval_pref(model, tokenizer, records, par, beta):
    """Reward accuracy and margin of the policy on the LONG inputs: Eq. 12's rewards against the data's
    short-input reference log-probs; the pair packed after one copy of the document, as training runs it."""
    attn, margins = model.config._attn_implementation, []
    model.set_attn_implementation("ring_attention")  # a packed pair needs its branch mask
    for rec in records:
        example = longpo.build_example(rec, tokenizer)
        if longpo.shared_prefix(example, par.sp_size):  # a pair too short to share is skipped, as in training
            seq = longpo.prepare_packed(example, par, tokenizer.pad_token_id)
            logps = longpo.sequence_logps(model, seq, par)
            refs = [torch.tensor([rec[f"ref_{side}_logp"]], dtype=torch.float64, device=par.device)
                    for side in ("chosen", "rejected")]
            _, chosen, rejected = longpo.longpo_loss(logps["chosen"], logps["rejected"], *refs, beta)
            margins.append((chosen - rejected).item())
    model.set_attn_implementation(attn)
    n = max(1, len(margins))
    return {"reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n}


# ---------------------------------------------------------- glue: input files, the table, main

def read_jsonl(path, fields, flag):
    """The objects of a JSONL file; a bad line or a missing field names the flag, file and line."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in [(lineno, line) for lineno, line in enumerate(f, 1) if line.strip()]:
            try:
                items.append(json.loads(line))
            except ValueError as e:
                raise UsageError(f"{flag} {path}:{lineno}: not valid JSON ({e})") from None
            missing = [k for k in fields if not isinstance(items[-1], dict) or k not in items[-1]]
            if missing:
                raise UsageError(f"{flag} {path}:{lineno}: field '{missing[0]}' is missing (needs "
                                 f"{', '.join(fields)})")
    if not items:
        raise UsageError(f"{flag} {path} holds no examples")
    return items


def load_infbench(folder):
    """{task: examples} of the InfiniteBench files found in the folder."""
    paths = {task: os.path.join(folder, name) for task, (name, _, _) in INFBENCH.items()}
    tasks = {task: read_jsonl(path, ("context", "answer", "options")[:2 + (task == "en_mc")], "--infbench")
             for task, path in paths.items() if os.path.isfile(path)}
    if not tasks:
        raise UsageError(f"--infbench {folder}: none of {', '.join(v[0] for v in INFBENCH.values())} found")
    return tasks


def load_mc(spec):
    """{file name: examples} of the --mc files, each answer (an index, or a letter A, B, ...) an index."""
    sets = {}
    for path in spec.split(","):
        items = read_jsonl(path, ("question", "choices", "answer"), "--mc")
        for i, ex in enumerate(items, 1):
            if isinstance(ex["answer"], str) and len(ex["answer"]) == 1 and ex["answer"].isalpha():
                ex["answer"] = ord(ex["answer"].upper()) - 65  # a letter
            if not (isinstance(ex["choices"], list) and type(ex["answer"]) is int
                    and 0 <= ex["answer"] < len(ex["choices"])):
                raise UsageError(f"--mc {path}: example {i}: 'choices' must be a list and 'answer' the index "
                                 "or letter of one")
        sets[os.path.splitext(os.path.basename(path))[0]] = items
    return sets


def prepare_inputs(cfg, tasks):
    """Every flag, model name and input file checked, and the inputs of the tasks made, before any model
    loads: a mistake found after hours of generation at 128K would lose them."""
    if not tasks or set(tasks) - set(TASKS):
        raise UsageError(f"--tasks {cfg.tasks!r}: choose from {', '.join(TASKS)}")
    check_at_least(cfg, ("samples", "max_pairs"), 1)
    if os.path.isdir(cfg.out) or cfg.out.endswith(os.sep):  # a folder where the file goes
        raise UsageError(f"--out {cfg.out} is a folder; use a file: {os.path.join(cfg.out, 'eval.json')}")
    inputs = {**resolve_models(cfg), "records": [], "lengths": parse_lengths(cfg.lengths)}
    for task, loader in (("infbench", load_infbench), ("mc", load_mc)):
        if task in tasks:  # an empty --infbench or --mc fails there, naming its flag
            inputs[task] = loader(getattr(cfg, task))
    if {"kl", "pref"} & set(tasks):
        if not os.path.exists(cfg.pref_data):
            raise UsageError(f"--pref-data {cfg.pref_data} does not exist: run data_gen.py or drop kl, pref")
        records = longpo.Records(cfg.pref_data, need_ref=True)
        inputs["records"] = records.select(range(min(len(records), cfg.max_pairs)))
    tokenizer = longpo.load_tokenizer(inputs["models"][0])  # every model's: kl compares their tokens
    if any(longpo.load_tokenizer(m).get_vocab() != tokenizer.get_vocab() for m in inputs["models"][1:]):
        raise UsageError(f"--model {cfg.model}: the models' tokenizers differ; evaluate them one run each")
    for task in [t for t in ("ruler", "facts") if t in tasks]:  # facts fails at a length it cannot fill
        inputs[task] = long_prompts(tokenizer, task, inputs["lengths"], cfg)
    return inputs


def resolve_models(cfg):
    """{"models": the baseline first, "baseline": '' for none, "beta": pref's}. The baseline (--baseline
    auto) and beta are those of the longpo.py run whose final/ is the first --model (its config.json);
    beta 0.1, the paper's, for a model no run trained."""
    names = list(dict.fromkeys(n.strip() for n in cfg.model.split(",")))  # an empty one fails check_model
    run_config = os.path.join(os.path.dirname(os.path.abspath(names[0])), "config.json")
    run = json.load(open(run_config)) if os.path.isdir(names[0]) and os.path.isfile(run_config) else {}
    baseline = run.get("model", "") if cfg.baseline == "auto" else cfg.baseline
    for name, flag in [(n, "--model") for n in names] + [(baseline, "--baseline")] * bool(baseline):
        longpo.check_model(name, flag)
    models = list(dict.fromkeys([baseline] * bool(baseline) + names))
    return {"models": models, "baseline": baseline, "beta": run.get("beta", 0.1)}


def summary_row(res):
    """The paper-style columns of one model's results."""
    ruler, niah = res.get("ruler", {}), RULER_TASKS[:4]
    row = {f"{task}/{k}": v for task in ("facts", "copy") for k, v in res.get(task, {}).items()}
    row.update({f"ruler/{task}": by_len["avg"] for task, by_len in ruler.items()})
    if ruler:  # the paper's RULER average: the mean of its categories NIAH, VT, QA; and by length
        row["ruler/niah"] = fmean([ruler[t]["avg"] for t in niah])
        for n in ruler["qa"]:  # "avg", then each length
            row[f"ruler/{n}"] = fmean([fmean([ruler[t][n] for t in niah]), ruler["vt"][n], ruler["qa"][n]])
    row.update({f"infbench/{k}": v for k, v in res.get("infbench", {}).items()})
    row.update({f"{name}/{k}": v for name, scores in res.get("mc", {}).items() for k, v in scores.items()})
    row.update({k: v for k, v in res.get("kl", {}).items() if k != "tokens"})  # kl, logp_change
    if "pref" in res:
        row["pref/acc"], row["pref/margin"] = res["pref"]["reward_accuracy"], res["pref"]["reward_margin"]
    return row


def report(results, baseline):
    """Print the table of every model's summary row (and the baseline -> model deltas); return its rows."""
    rows = {name: summary_row(res) for name, res in results.items()}
    if baseline and len(rows) == 2:  # every model has the same columns: it ran the same tasks
        first, second = rows.values()
        rows["delta"] = {c: second[c] - first[c] for c in second}
    columns, width = list(next(iter(rows.values()))), max(len(n) for n in rows) + 2
    print(" " * width + " ".join(f"{c:>{max(9, len(c))}}" for c in columns))
    for label, row in rows.items():
        print(f"{label:<{width}}" + " ".join(f"{row[c]:>{max(9, len(c))}.4f}" for c in columns))
    return rows


def write_json(path, payload):
    """Atomically (a temporary file, then a rename): a kill never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)


def main(cfg):
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    inputs = prepare_inputs(cfg, tasks)  # every rank, before any process group or model
    rank, world_size, device = longpo.init_distributed()
    par = longpo.setup_parallel(0, rank, world_size, device)  # one ring over all processes
    models, lengths, records = inputs["models"], inputs["lengths"], inputs["records"]
    settings = {**dataclasses.asdict(cfg), "baseline_resolved": inputs["baseline"], "world_size": world_size,
                "beta_resolved": inputs["beta"]}
    out = {"settings": settings, "complete": False, "results": {name: {} for name in models}}
    first = data_gen.load_for_inference(models[0], device)  # kl's reference (the baseline, else the first)
    loaded = ((m, first if m == models[0] else data_gen.load_for_inference(m, device)) for m in models)
    for name, (model, tokenizer) in loaded:  # each loaded as its turn comes (the one before it still held)
        jobs = {"pref": lambda: eval_pref(model, tokenizer, records, par, inputs["beta"]),
                "ruler": lambda: eval_prompts(model, tokenizer, inputs["ruler"], recall_score, par),
                "facts": lambda: eval_prompts(model, tokenizer, inputs["facts"], first_number, par)["facts"],
                "copy": lambda: eval_copy(model, tokenizer, cfg, par),
                "infbench": lambda: eval_infbench(model, tokenizer, inputs["infbench"], max(lengths), par),
                "mc": lambda: {mc_set: eval_mc(model, tokenizer, items)
                               for mc_set, items in inputs["mc"].items()},
                "kl": lambda: eval_kl(model, first[0], tokenizer, records)}
        for task in [t for t in jobs if t in tasks]:  # in this order, each task's scores on disk at once
            out["results"][name][task] = jobs[task]()
            if rank == 0:
                write_json(cfg.out, out)
    if rank == 0:  # "complete" is false until every task of every model finished
        out.update(complete=True, table=report(out["results"], inputs["baseline"]))
        write_json(cfg.out, out)
        print(f"scores: {cfg.out}")


if __name__ == "__main__":
    longpo.run_cli(main, EvalConfig)
