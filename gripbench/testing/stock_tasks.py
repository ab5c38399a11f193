"""Tiny offline copies of eight stock lmms-eval benchmarks, in each stock task's dataset schema.

`write_stock_tasks(root)` writes, for every stock task in `STOCK`, a folder
`root/<prefix><task>/` holding

* `<task>.parquet`: `n` procedurally drawn samples (small PIL images embedded through a
  `datasets.Image()` feature) with every column the stock utils/YAML read, typed as in the
  real Hugging Face dataset;
* `<prefix><task>.yaml`: the stock YAML (with any `include:`d template merged in), renamed
  (`task: <prefix><task>`), pointed at the parquet file (`dataset_path: parquet`,
  `dataset_kwargs: {data_files: {<evaluated split>: <absolute path>}}`), without `token:`,
  `dataset_name:` (a hub config name), `tag:`/`group:` membership, `include:` or (gqa only)
  `process_docs:`. Everything else (`metric_list`, `filter_list`, `generation_kwargs`,
  `lmms_eval_specific_kwargs`, `process_results`, ...) keeps the stock values (re-serialised,
  `!function` tags kept), so `!function utils.X` runs the stock code;
* `utils.py`: a byte copy of the stock task folder's `utils.py`.

Load them with `TaskManager(include_path=str(root), include_defaults=False)`. Output is
deterministic: the same call writes the same bytes (images use PIL's bitmap font, seeds are
fixed per task and sample, and sample i does not depend on `n`).

Results keys and per-sample values (lmms-eval 0.7.3; a result key is `"<metric>,<filter>"`,
`out["results"][task][key]`; each logged sample in `out["samples"][task]` carries every metric
`process_results` returned for it, under the bare metric name):

| stock task | headline result key | per-sample value (`sample[metric]`) | aggregation |
|---|---|---|---|
| pope | `pope_accuracy,none` | dict `{question_id, score, prediction, ground_truth}` | mean of `score` |
| mme | `mme_perception_score,none` | dict `{question_id, category, score}` (1) | acc + acc+ over pairs (2) |
| textvqa_val | `exact_match,none` | float, soft VQA score in [0, 1] (3) | mean |
| gqa | `exact_match,none` | float 0/1 | mean |
| chartqa | `relaxed_overall,none` | float 0/1 (4) | mean |
| ocrbench | `ocrbench_accuracy,none` | dict `{question_type, score, prediction, ground_truth}`, score int 0/1 | sum / 1000 (5) |
| scienceqa_img | `exact_match,none` | float 0/1 | mean |
| ai2d | `exact_match,flexible-extract` | float 0/1 (after the regex filter) | mean |

(1) a sample carries only the key of its category's kind: `mme_perception_score` or
`mme_cognition_score`. (2) per category, the mean over image pairs of acc (0..100) + acc+
(100 iff both questions right), summed over the categories present: 0..200 x categories, not
a mean; asserts that every question_id has exactly 2 samples (a `limit` splitting a pair
raises AssertionError "MME only supports pairwise evaluation"). (3) also `submission`: dict
`{question_id, answer}`. (4) also `relaxed_human_split` or `relaxed_augmented_split`, by the
doc's `type`. (5) added into a module-level dict, see below. Every result also carries
`<metric>_stderr,<filter>`, `_stderr_clt` and `_stderr_clustered` keys; for the custom
aggregations (pope, mme, ocrbench) `_stderr` is "N/A" but `_stderr_clt` is still a number
(computed as if the scores were a mean): ignore it.

Traps in the stock code, kept as they are:

* ocrbench: `ocrbench_aggregate_accuracy` adds every score into the module-level dict
  `OCRBench_score` of its `utils` module and never resets it, then returns the total / 1000
  whatever the number of samples (8 samples, 4 right: 0.004). lmms-eval 0.7.3 executes
  `utils.py` afresh (no `sys.modules` entry) every time it loads the YAML, and
  `simple_evaluate(tasks=[name])` loads it on each call (even with the same `TaskManager`), so
  evaluating by *name* starts at zero each time; evaluating one loaded `Task` object again
  (`simple_evaluate(tasks=[task_obj])`, as a runner that caches tasks would) adds up: 0.004,
  then 0.008. `reset_ocrbench_score(task_obj)` zeroes it. The aggregation also writes
  `results/ocrbench_results.txt`, and textvqa's `submission` aggregation
  `submissions/textvqa_submission_<time>.json`, under the *working directory* when no
  `cli_args.output_path` is given (and ocrbench prints a line of dashes to stdout).
* mme: a metric with no samples (here `mme_cognition_score`, since these copies only use
  perception categories) is absent from the results.
* textvqa: `doc_to_target: "answer"` names no column, so the logged `target` is the literal
  text "answer" (as with the real data); `process_results` normalises `doc["answers"]` in
  place (the logged doc shows the normalised list).

Per-task data (n samples each; columns not read by lmms-eval are filled with plausible values).
Column names and types follow the stock upload scripts (chartqa, ocrbench, ai2d) and the hub
datasets' published features as known offline; they were not checked against the hub here.

* pope (split `test`): `id` str, `question_id` str, `question` "Is there a <color> <shape> in
  the image?", `answer` "yes"/"no" (one of each per consecutive pair, order drawn), `image_source`
  str, `image`, `category` (adversarial/popular/random). The image shows the object iff yes.
* mme (split `test`): `question_id` "<category>/<k>.png" shared by exactly the two consecutive
  questions about one image, one "Yes" and one "No" (order drawn), `question` ending in
  " Please answer yes or no.", `answer` "Yes"/"No", `category` from the Perception list
  (existence, count, position, color, OCR; two pairs per category in turn), `image`. n is
  rounded up to an even number so that pairs stay whole.
* textvqa_val (split `validation`): `image_id` str, `question_id` int32, `question`,
  `question_tokens` list[str], `image`, `image_width`/`image_height` int32, `flickr_original_url`,
  `flickr_300k_url` str, `answers` list of 10 str (the word shown in the image, `answers[0]`,
  appears 10, 3 or 2 times in turn, the others once each, so the soft score of answering it
  is 1, 0.9 or 0.6),
  `image_classes` list[str], `set_name` "val", `ocr_tokens` list[str].
* gqa (split `testdev`): `id`, `imageId`, `question`, `answer` (one word: a color, a shape,
  yes/no, left/right), `fullAnswer`, `isBalanced` bool, `groups` {global, local},
  `types` {structural, semantic, detailed}, `semanticStr`, and `image`. DIFFERS from the hub
  layout: the stock YAML loads the `testdev_balanced_instructions` config and its
  `process_docs` (`gqa_process_docs`) adds an `image` column by looking `imageId` up in a
  second hub config (`testdev_balanced_images`). The local copy stores that `image` column
  directly in the instructions parquet and drops `process_docs` from the YAML (the stock
  `gqa_doc_to_visual`/`gqa_doc_to_text` then see exactly the docs `process_docs` would make).
  The real instructions' `entailed`, `equivalent`, `annotations` and `semantic` columns are
  not written (nothing in lmms-eval reads them).
* chartqa (split `test`): `type` "human_test"/"augmented_test" (one of each per consecutive
  pair), `question`, `answer` str (an integer, a difference, or a bar label), `image` (a bar
  chart). Wrong numeric answers are far outside the 5% relaxed tolerance.
* ocrbench (split `test`): `dataset` (source name; "HME100k" for the formula type, which the
  scorer treats specially), `question`, `question_type` cycling through the ten category
  names the aggregation sums, `answer` list[str] (1-2 accepted strings), `image`.
* scienceqa_img (split `test`): `image`, `question`, `choices` list[str] (2-4), `answer` int8
  index, `hint` (empty for every other sample), `task`, `grade`, `subject`, `topic`,
  `category`, `skill`, `lecture`, `solution` str.
* ai2d (split `test`): `question`, `options` list[str] (4), `answer` str index ("0".."3"),
  `image`.

`correct_answer(task, doc)` / `wrong_answer(task, doc)` give a reply each stock scorer counts
right / wrong (used by `gripbench.testing.scripted.right_half`).
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import yaml

STOCK = ("pope", "mme", "textvqa_val", "gqa", "chartqa", "ocrbench", "scienceqa_img", "ai2d")

# stock task -> (folder under lmms_eval/tasks, YAML file)
_SOURCE = {
    "pope": ("pope", "pope.yaml"),
    "mme": ("mme", "mme.yaml"),
    "textvqa_val": ("textvqa", "textvqa_val.yaml"),
    "gqa": ("gqa", "gqa.yaml"),
    "chartqa": ("chartqa", "chartqa.yaml"),
    "ocrbench": ("ocrbench", "ocrbench.yaml"),
    "scienceqa_img": ("scienceqa", "scienceqa_img.yaml"),
    "ai2d": ("ai2d", "ai2d.yaml"),
}
# keys dropped from the stock YAML: hub access, group membership, and the include (merged in)
_DROP = ("include", "tag", "group", "dataset_name", "dataset_kwargs", "process_docs")


def stock_tasks_dir() -> Path:
    import lmms_eval

    return Path(lmms_eval.__file__).resolve().parent / "tasks"


def stock_name(task: str) -> str:
    """The stock task a local task name copies (the longest stock name it ends with)."""
    if task in STOCK:
        return task
    for name in sorted(STOCK, key=len, reverse=True):
        if task.endswith(name):
            return name
    raise KeyError(f"{task!r} is not a copy of one of {', '.join(STOCK)}")


# ----------------------------------------------------------------------------- YAML

class _Function(str):
    """A `!function utils.X` tag, kept as text."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def _load_yaml(path: Path) -> dict:
    """A stock YAML with its `include:`s merged in (the included file first, as lmms-eval does)."""
    config = yaml.load(path.read_text(), Loader=_Loader) or {}
    includes = config.get("include")
    if includes is None:
        return config
    merged: dict = {}
    for inc in reversed([includes] if isinstance(includes, str) else list(includes)):
        inc_path = Path(inc) if os.path.isabs(inc) else path.parent / inc
        merged.update(_load_yaml(inc_path))
    merged.update(config)
    merged.pop("include", None)
    return merged


def _eval_split(config: dict) -> str:
    """The split lmms-eval evaluates: the test split, else the validation split."""
    split = config.get("test_split") or config.get("validation_split")
    if not split:
        raise ValueError(f"task {config.get('task')!r} names neither a test nor a validation split")
    return split


def _local_yaml(config: dict, local: str, parquet: Path) -> str:
    config = dict(config)
    split = _eval_split(config)
    for key in _DROP:
        config.pop(key, None)
    out = {"task": local, "dataset_path": "parquet", "dataset_kwargs": {"data_files": {split: str(parquet)}}}
    out.update((k, v) for k, v in config.items() if k not in out)
    return yaml.dump(out, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)


# ----------------------------------------------------------------------------- drawing

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 60, 170), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)


def _rng(task: str, seed: int, i: int | str) -> random.Random:
    return random.Random(zlib.crc32(f"{task}:{seed}:{i}".encode()))


def _font():
    from PIL import ImageFont

    try:  # the bitmap font: the same pixels on every machine (FreeType rendering can differ)
        return ImageFont.load_default_imagefont()
    except AttributeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _canvas(w: int = 64, h: int = 64, bg=BACKGROUND):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), bg)
    return img, ImageDraw.Draw(img)


def _shape(draw, shape: str, box: tuple[int, int, int, int], color: str) -> None:
    fill = COLORS[color]
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _objects_image(objects: list[tuple[str, str]], w: int | None = None, h: int = 64):
    """Objects (color, shape) drawn left to right, 16 px each, in one row (at least 4 px apart)."""
    w = max(64, 20 * len(objects)) if w is None else w
    img, draw = _canvas(w, h)
    step = w // max(1, len(objects))
    for k, (color, shape) in enumerate(objects):
        x = k * step + (step - 16) // 2
        _shape(draw, shape, (x, h // 2 - 8, x + 15, h // 2 + 7), color)
    return img


def _text_image(lines: list[str] | str, w: int = 96, h: int = 32, fg=(20, 20, 20), bg=BACKGROUND):
    img, draw = _canvas(w, h, bg)
    lines = [lines] if isinstance(lines, str) else lines
    font = _font()
    y = (h - 12 * len(lines)) // 2
    for line in lines:
        draw.text((4, y), line, fill=fg, font=font)
        y += 12
    return img


def _bar_chart(labels: list[str], values: list[int], w: int = 128, h: int = 64):
    img, draw = _canvas(w, h, (255, 255, 255))
    font = _font()
    step, top = w // len(labels), max(values)
    for k, (label, value) in enumerate(zip(labels, values)):
        x = k * step + 3
        bar = int((h - 26) * value / top)
        draw.rectangle((x, h - 14 - bar, x + step - 9, h - 14), fill=COLORS[list(COLORS)[k % len(COLORS)]])
        draw.text((x, h - 13), label, fill=(0, 0, 0), font=font)
        draw.text((x, h - 26 - bar), str(value), fill=(0, 0, 0), font=font)
    return img


def _png(img) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _other(rng: random.Random, options: Iterable[str], *exclude: str) -> str:
    return rng.choice([o for o in options if o not in exclude])


# ----------------------------------------------------------------------------- datasets

def _pope(n: int, seed: int):
    from datasets import Features, Image, Value

    rows = []
    for i in range(n):
        block = _rng("pope", seed, f"block{i // 2}")
        answer = ("yes", "no")[(i + block.randrange(2)) % 2]
        rng = _rng("pope", seed, i)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        others = [(c, s) for c in COLORS for s in SHAPES if (c, s) != (color, shape)]
        objects = rng.sample(others, 2) + ([(color, shape)] if answer == "yes" else [rng.choice(others)])
        rng.shuffle(objects)
        rows.append({"id": str(i), "question_id": str(i + 1), "question": f"Is there {_a(color)} {shape} in the image?",
                     "answer": answer, "image_source": f"COCO_val2014_{rng.randrange(10 ** 6):012d}",
                     "image": _png(_objects_image(objects)), "category": ("adversarial", "popular", "random")[i % 3]})
    features = Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                         "answer": Value("string"), "image_source": Value("string"), "image": Image(),
                         "category": Value("string")})
    return rows, features


_MME_CATEGORIES = ("existence", "count", "position", "color", "OCR")
_WORDS = ("stop", "coffee", "exit", "pizza", "taxi", "hotel", "bank", "sale", "open", "books", "cafe", "park",
          "bakery", "market", "garage", "museum")


def _mme_pair(k: int, seed: int):
    rng = _rng("mme", seed, f"pair{k}")
    category = _MME_CATEGORIES[(k // 2) % len(_MME_CATEGORIES)]
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if category == "existence":
        absent = _other(rng, SHAPES, shape)
        img = _objects_image([(color, shape)])
        yes, no = f"Is there {_a(shape)} in this image?", f"Is there {_a(absent)} in this image?"
    elif category == "count":
        count = rng.randint(2, 3)
        img = _objects_image([(color, shape)] * count)
        wrong = count + 1
        yes, no = f"Are there {count} {shape}s in the image?", f"Are there {wrong} {shape}s in the image?"
    elif category == "position":
        color2, shape2 = _other(rng, COLORS, color), _other(rng, SHAPES, shape)
        img = _objects_image([(color, shape), (color2, shape2)])
        yes = f"Is the {color} {shape} on the left of the {color2} {shape2}?"
        no = f"Is the {color} {shape} on the right of the {color2} {shape2}?"
    elif category == "color":
        img = _objects_image([(color, shape)])
        yes, no = f"Is the {shape} {color}?", f"Is the {shape} {_other(rng, COLORS, color)}?"
    else:
        word = rng.choice(_WORDS)
        img = _text_image(word.upper())
        yes = f'Is the word in the image "{word}"?'
        no = f'Is the word in the image "{_other(rng, _WORDS, word)}"?'
    questions = [(yes, "Yes"), (no, "No")]
    rng.shuffle(questions)
    image = _png(img)
    return [{"question_id": f"{category}/{k:04d}.png", "image": image, "question": f"{q} Please answer yes or no.",
             "answer": a, "category": category} for q, a in questions]


def _mme(n: int, seed: int):
    from datasets import Features, Image, Value

    rows = [row for k in range((n + 1) // 2) for row in _mme_pair(k, seed)]
    features = Features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "category": Value("string")})
    return rows, features


_TEXTVQA_COUNTS = (10, 3, 2)  # copies of answers[0] among the ten answers: soft score 1, 0.9, 0.6
_TEXTVQA_QUESTIONS = ("what does the sign say?", "what word is written on the board?", "what is written in the image?")


def _textvqa(n: int, seed: int):
    from datasets import Features, Image, Sequence, Value

    rows = []
    for i in range(n):
        rng = _rng("textvqa_val", seed, i)
        word = rng.choice(_WORDS)
        k = _TEXTVQA_COUNTS[i % len(_TEXTVQA_COUNTS)]
        # the other annotators' answers are distinct, so answers[0] stays the most frequent one
        answers = [word] * k + rng.sample([w for w in _WORDS if w != word], 10 - k)
        answers = answers[:1] + rng.sample(answers[1:], len(answers) - 1)
        question = _TEXTVQA_QUESTIONS[i % len(_TEXTVQA_QUESTIONS)]
        img = _text_image(word.upper(), 96, 32)
        image_id = f"{rng.getrandbits(64):016x}"
        rows.append({"image_id": image_id, "question_id": 34602 + i, "question": question,
                     "question_tokens": question.rstrip("?").split(), "image": _png(img), "image_width": img.width,
                     "image_height": img.height, "flickr_original_url": f"https://example.invalid/{image_id}_o.jpg",
                     "flickr_300k_url": f"https://example.invalid/{image_id}_z.jpg", "answers": answers,
                     "image_classes": ["Sign"], "set_name": "val", "ocr_tokens": [word.upper()]})
    features = Features({"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                         "question_tokens": Sequence(Value("string")), "image": Image(), "image_width": Value("int32"),
                         "image_height": Value("int32"), "flickr_original_url": Value("string"),
                         "flickr_300k_url": Value("string"), "answers": Sequence(Value("string")),
                         "image_classes": Sequence(Value("string")), "set_name": Value("string"),
                         "ocr_tokens": Sequence(Value("string"))})
    return rows, features


def _gqa(n: int, seed: int):
    from datasets import Features, Image, Value

    rows = []
    for i in range(n):
        rng = _rng("gqa", seed, i)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        color2, shape2 = _other(rng, COLORS, color), _other(rng, SHAPES, shape)
        objects = [(color, shape), (color2, shape2)]
        kind = i % 4
        if kind == 0:
            q, a, full, types = f"What color is the {shape}?", color, f"The {shape} is {color}.", ("query", "attr", "color")
            sem = f"select: {shape} ->query: color"
        elif kind == 1:
            q, a, full, types = f"Which shape is {color}?", shape, f"The {color} object is a {shape}.", ("query", "cat", "category")
            sem = f"select: {color} object ->query: name"
        elif kind == 2:
            present = rng.random() < 0.5
            asked = (color, shape) if present else (_other(rng, COLORS, color, color2), shape)
            a = "yes" if present else "no"
            q = f"Is there {_a(asked[0])} {asked[1]} in the picture?"
            full = f"Yes, there is {_a(asked[0])} {asked[1]}." if present else f"No, there is no {asked[0]} {asked[1]}."
            types, sem = ("verify", "obj", "exist"), f"select: {asked[1]} ->filter color: {asked[0]} ->exist: ?"
        else:
            rng.shuffle(objects)
            left = objects[0] == (color, shape)
            a = "left" if left else "right"
            q = f"Is the {color} {shape} to the left or to the right of the {color2} {shape2}?"
            full = f"The {color} {shape} is to the {a} of the {color2} {shape2}."
            types, sem = ("choose", "rel", "relChooser"), f"select: {shape2} ->choose rel: {shape},to the left of|to the right of"
        image_id = f"n{rng.randrange(10 ** 5, 10 ** 6)}"
        rows.append({"id": str(20240000 + i), "imageId": image_id, "question": q, "answer": a, "fullAnswer": full,
                     "isBalanced": True, "groups": {"global": None, "local": f"{kind:02d}-{a}"},
                     "types": dict(zip(("structural", "semantic", "detailed"), types)), "semanticStr": sem,
                     "image": _png(_objects_image(objects))})
    features = Features({"id": Value("string"), "imageId": Value("string"), "question": Value("string"),
                         "answer": Value("string"), "fullAnswer": Value("string"), "isBalanced": Value("bool"),
                         "groups": {"global": Value("string"), "local": Value("string")},
                         "types": {"structural": Value("string"), "semantic": Value("string"), "detailed": Value("string")},
                         "semanticStr": Value("string"), "image": Image()})
    return rows, features


_CHART_LABELS = ("cats", "dogs", "fish", "owls", "bees", "ants")


def _chartqa(n: int, seed: int):
    from datasets import Features, Image, Value

    rows = []
    for i in range(n):
        block = _rng("chartqa", seed, f"block{i // 2}")
        kind = ("human_test", "augmented_test")[(i + block.randrange(2)) % 2]
        rng = _rng("chartqa", seed, i)
        labels = rng.sample(_CHART_LABELS, 4)
        values = rng.sample(range(5, 95), 4)
        which = i % 3
        if which == 0:
            j = rng.randrange(4)
            q, a = f"What is the value of {labels[j]}?", str(values[j])
        elif which == 1:
            q, a = "Which category has the highest value?", labels[values.index(max(values))]
        else:
            j, k = rng.sample(range(4), 2)
            q, a = f"What is the difference between {labels[j]} and {labels[k]}?", str(abs(values[j] - values[k]))
        rows.append({"type": kind, "question": q, "answer": a, "image": _png(_bar_chart(labels, values))})
    features = Features({"type": Value("string"), "question": Value("string"), "answer": Value("string"), "image": Image()})
    return rows, features


# the ten categories `ocrbench_aggregate_accuracy` sums, with a source dataset and a question each
_OCR_TYPES = (
    ("Regular Text Recognition", "IIIT5K", "what is written in the image?"),
    ("Irregular Text Recognition", "svtp", "what is written in the image?"),
    ("Artistic Text Recognition", "WordArt", "what is written in the image?"),
    ("Handwriting Recognition", "IAM", "what is written in the image?"),
    ("Digit String Recognition", "ORAND", "what is the number in the image?"),
    ("Non-Semantic Text Recognition", "Non-Semantic Text", "what are the characters in the image?"),
    ("Scene Text-centric VQA", "textVQA", "what is the name of the shop?"),
    ("Doc-oriented VQA", "docVQA", "What is the total amount?"),
    ("Key Information Extraction", "FUNSD",
     "What is the company name in the image? Answer this question using the text in the image directly."),
    ("Handwritten Mathematical Expression Recognition", "HME100k",
     "Please write out the expression of the formula in the image using LaTeX format."),
)


def _ocrbench(n: int, seed: int):
    from datasets import Features, Image, Sequence, Value

    rows = []
    for i in range(n):
        rng = _rng("ocrbench", seed, i)
        qtype, source, question = _OCR_TYPES[i % len(_OCR_TYPES)]
        if qtype == "Digit String Recognition":
            answer = ["".join(rng.choice("0123456789") for _ in range(6))]
        elif qtype == "Non-Semantic Text Recognition":
            answer = ["".join(rng.choice("bcdfghjkmnpqrstvwxz") for _ in range(5))]
        elif qtype == "Doc-oriented VQA":
            amount = f"{rng.randrange(10, 99)}.{rng.randrange(10, 99)}"
            answer = [f"${amount}", amount]
        elif qtype == "Key Information Extraction":
            answer = [rng.choice(("ACME CORP", "GLOBEX", "INITECH", "UMBRELLA"))]
        elif qtype == "Handwritten Mathematical Expression Recognition":
            a, b = rng.randrange(2, 9), rng.randrange(1, 9)
            answer = [f"x ^ {{ {a} }} + {b}"]
        else:
            answer = [rng.choice(_WORDS)]
        text = answer[0].replace(" ", "") if source == "HME100k" else answer[0]
        rows.append({"dataset": source, "question": question, "question_type": qtype, "answer": answer,
                     "image": _png(_text_image(text, 96, 32))})
    features = Features({"dataset": Value("string"), "question": Value("string"), "question_type": Value("string"),
                         "answer": Sequence(Value("string")), "image": Image()})
    return rows, features


def _scienceqa(n: int, seed: int):
    from datasets import Features, Image, Sequence, Value

    rows = []
    for i in range(n):
        rng = _rng("scienceqa_img", seed, i)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        n_choices = 2 + i % 3
        if i % 2 == 0:
            question, right, pool, topic = f"Which color is the {shape}?", color, list(COLORS), "colors"
        else:
            question, right, pool, topic = "Which shape is shown in the picture?", shape, list(SHAPES) + ["star"], "shapes"
        choices = [right] + rng.sample([p for p in pool if p != right], n_choices - 1)
        rng.shuffle(choices)
        rows.append({"image": _png(_objects_image([(color, shape)])), "question": question, "choices": choices,
                     "answer": choices.index(right), "hint": "" if i % 2 else "Look at the picture.",
                     "task": "closed choice", "grade": f"grade{1 + i % 6}", "subject": "natural science", "topic": topic,
                     "category": "Identify objects", "skill": "Identify colors and shapes", "lecture": "",
                     "solution": f"The picture shows a {color} {shape}."})
    features = Features({"image": Image(), "question": Value("string"), "choices": Sequence(Value("string")),
                         "answer": Value("int8"), "hint": Value("string"), "task": Value("string"),
                         "grade": Value("string"), "subject": Value("string"), "topic": Value("string"),
                         "category": Value("string"), "skill": Value("string"), "lecture": Value("string"),
                         "solution": Value("string")})
    return rows, features


def _ai2d(n: int, seed: int):
    from datasets import Features, Image, Sequence, Value

    rows = []
    for i in range(n):
        rng = _rng("ai2d", seed, i)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        count = rng.randint(1, 4)
        if i % 2 == 0:
            question, right = f"How many {shape}s are in the diagram?", str(count)
            options = [right] + rng.sample([str(c) for c in range(1, 6) if c != count], 3)
        else:
            question, right = f"What color are the {shape}s in the diagram?", color
            options = [right] + rng.sample([c for c in COLORS if c != color], 3)
        rng.shuffle(options)
        rows.append({"question": question, "options": options, "answer": str(options.index(right)),
                     "image": _png(_objects_image([(color, shape)] * count))})
    features = Features({"question": Value("string"), "options": Sequence(Value("string")), "answer": Value("string"),
                         "image": Image()})
    return rows, features


_BUILDERS = {"pope": _pope, "mme": _mme, "textvqa_val": _textvqa, "gqa": _gqa, "chartqa": _chartqa,
             "ocrbench": _ocrbench, "scienceqa_img": _scienceqa, "ai2d": _ai2d}


def build_dataset(task: str, n: int = 8, seed: int = 0):
    """The `datasets.Dataset` of `n` samples of a stock task's local copy (mme: n rounded up to even)."""
    from datasets import Dataset

    rows, features = _BUILDERS[task](n, seed)
    return Dataset.from_list(rows, features=features)


# ----------------------------------------------------------------------------- answers

def correct_answer(task: str, doc: dict) -> str:
    """A reply the stock scorer of `task` (a stock or local name) counts fully right for `doc`."""
    task = stock_name(task)
    if task in ("pope", "mme", "gqa", "chartqa"):
        return doc["answer"]
    if task == "textvqa_val":
        return doc["answers"][0]
    if task == "ocrbench":
        return doc["answer"][0]
    if task == "scienceqa_img":
        return chr(ord("A") + int(doc["answer"]))
    if task == "ai2d":
        return chr(ord("A") + int(doc["answer"]))
    raise KeyError(task)


def wrong_answer(task: str, doc: dict) -> str:
    """A reply the stock scorer of `task` counts wrong (score 0) for `doc`."""
    task = stock_name(task)
    if task == "pope":
        return "no" if doc["answer"].lower() == "yes" else "yes"
    if task == "mme":
        return "No" if doc["answer"].lower() == "yes" else "Yes"
    if task == "textvqa_val":
        return "unanswerable" if "unanswerable" not in doc["answers"] else "zzzz"
    if task == "gqa":
        return "nothing"
    if task == "chartqa":
        try:
            return str(int(float(doc["answer"])) * 2 + 7)
        except ValueError:
            return "nothing"
    if task == "ocrbench":
        return "unreadable"
    if task == "scienceqa_img":
        return chr(ord("A") + (int(doc["answer"]) + 1) % len(doc["choices"]))
    if task == "ai2d":
        return chr(ord("A") + (int(doc["answer"]) + 1) % len(doc["options"]))
    raise KeyError(task)


def reset_ocrbench_score(task) -> bool:
    """Zero the module-level `OCRBench_score` dict behind a loaded lmms-eval `Task`'s stock
    ocrbench aggregation (see the module docstring); False when the task has none."""
    found = False
    for fn in task.aggregation().values():
        scores = getattr(fn, "__globals__", {}).get("OCRBench_score")
        if isinstance(scores, dict):
            for key in scores:
                scores[key] = 0
            found = True
    return found


# ----------------------------------------------------------------------------- writing

def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_parquet(ds, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        ds.to_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_stock_tasks(root: Path, n: int = 8, tasks=STOCK, prefix: str = "local_", seed: int = 0) -> dict[str, str]:
    """Write local copies of the stock `tasks` under `root`; returns stock name -> local task name.

    Each `root/<prefix><task>/` gets `<task>.parquet` (n samples; mme: n rounded up to even),
    `<prefix><task>.yaml` and the stock `utils.py`. Point lmms-eval at them with
    `TaskManager(include_path=str(root), include_defaults=False)`."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    root = Path(root).resolve()
    source = stock_tasks_dir()
    names = {}
    for task in tasks:
        if task not in _SOURCE:
            raise KeyError(f"unknown stock task {task!r}; known: {', '.join(STOCK)}")
        folder, yaml_file = _SOURCE[task]
        local = f"{prefix}{task}"
        out = root / local
        out.mkdir(parents=True, exist_ok=True)
        parquet = out / f"{task}.parquet"
        _write_parquet(build_dataset(task, n, seed), parquet)
        config = _load_yaml(source / folder / yaml_file)
        _write_atomic(out / f"{local}.yaml", _local_yaml(config, local, parquet).encode())
        _write_atomic(out / "utils.py", (source / folder / "utils.py").read_bytes())
        names[task] = local
    return names
