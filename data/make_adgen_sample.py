"""Write the bundled ADGEN-format sample: ``data/adgen_sample/{train,dev}.json``.

Each line is one JSON object in the AdvertiseGen form::

    {"content": "类型#上衣*版型#宽松*颜色#白色*...", "summary": "这件白色纯棉衬衫，宽松版型不挑身材，..."}

The text is written here, from attribute templates: every attribute value maps to a fixed phrase
and the summary is assembled from those phrases in a fixed order. So the summary is a function of the
content, which a prefix can learn while an untuned tiny model cannot produce it. Summaries are kept
between 15 and 40 characters so that a model of a few layers can learn them.

The output is deterministic: the same seeds give byte-identical files. Run from the repository root::

    python data/make_adgen_sample.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Garment kinds: the sub-type key, its values, and the attributes only that kind has.
KINDS = {
    "上衣": {
        "opener": "这件",
        "subtype": ("衣样式", ["衬衫", "T恤", "卫衣", "毛衣", "外套", "针织衫"]),
        "own": ["衣领型", "袖长"],
    },
    "裤": {
        "opener": "这条",
        "subtype": ("裤型", ["阔腿裤", "直筒裤", "哈伦裤", "铅笔裤", "工装裤"]),
        "own": ["裤长", "裤腰型"],
    },
    "裙": {
        "opener": "这条",
        "subtype": ("裙型", ["A字裙", "百褶裙", "包臀裙", "半身裙", "连衣裙"]),
        "own": ["裙长"],
    },
}

# Attribute value -> the phrase it contributes to the summary.
PHRASES = {
    "版型": {"宽松": "宽松版型不挑身材", "修身": "修身剪裁勾勒曲线", "显瘦": "显瘦版型拉长比例"},
    "图案": {
        "条纹": "经典条纹",
        "格子": "复古格纹",
        "印花": "精致印花",
        "纯色": "纯色设计",
        "刺绣": "细腻刺绣点缀",
        "字母": "字母图案吸睛",
    },
    "衣领型": {
        "圆领": "圆领修饰脸型",
        "v领": "v领显脖子修长",
        "翻领": "翻领干练利落",
        "立领": "立领更显气质",
        "连帽": "连帽设计更添活力",
    },
    "袖长": {"短袖": "短袖清爽透气", "长袖": "长袖四季可穿", "七分袖": "七分袖露出手腕"},
    "裤长": {
        "九分裤": "九分长度露出脚踝",
        "七分裤": "七分长度清爽利落",
        "长裤": "长款包裹双腿",
        "短裤": "短款活力十足",
    },
    "裤腰型": {"高腰": "高腰拉长腿部线条", "松紧腰": "松紧腰头穿脱方便"},
    "裙长": {"短裙": "短款俏皮减龄", "中长裙": "中长款优雅大方", "长裙": "长款飘逸灵动"},
    "风格": {
        "简约": "简约又百搭",
        "复古": "复古韵味十足",
        "休闲": "休闲舒适",
        "街头": "街头感满满",
        "文艺": "文艺气息浓厚",
        "通勤": "通勤日常都合适",
        "甜美": "甜美又可爱",
    },
}
# Material value -> the word used before the garment name ("纯棉衬衫").
MATERIALS = {"棉": "纯棉", "牛仔布": "牛仔", "针织": "针织", "雪纺": "雪纺", "羊毛": "羊毛", "蕾丝": "蕾丝"}
COLORS = ["白色", "黑色", "红色", "蓝色", "粉色", "灰色", "绿色", "黄色", "卡其色"]
CLOSING_WITHOUT_STYLE = "值得入手"

# Order of the keys in ``content`` (as in AdvertiseGen: type first, garment details last).
CONTENT_ORDER = [
    "类型",
    "版型",
    "材质",
    "颜色",
    "风格",
    "图案",
    "衣样式",
    "裤型",
    "裙型",
    "衣领型",
    "袖长",
    "裤长",
    "裤腰型",
    "裙长",
]
# Order of the phrases in ``summary`` (after "<opener><color><material><garment>，").
SUMMARY_ORDER = ["版型", "图案", "衣领型", "袖长", "裤长", "裤腰型", "裙长"]
MIN_SUMMARY, MAX_SUMMARY = 15, 40


def summarize(attrs: dict[str, str]) -> str:
    """The summary that ``attrs`` (key -> value, as in ``content``) determine."""
    kind = KINDS[attrs["类型"]]
    garment = attrs[kind["subtype"][0]]
    head = kind["opener"] + attrs["颜色"] + MATERIALS.get(attrs.get("材质", ""), "") + garment
    body = [PHRASES[key][attrs[key]] for key in SUMMARY_ORDER if key in attrs]
    closing = PHRASES["风格"][attrs["风格"]] if "风格" in attrs else CLOSING_WITHOUT_STYLE
    return "，".join([head, *body, closing]) + "。"


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """One random attribute set: type, garment and color always, two to four optional attributes."""
    kind_name = rng.choice(sorted(KINDS))
    kind = KINDS[kind_name]
    sub_key, sub_values = kind["subtype"]
    attrs = {"类型": kind_name, sub_key: rng.choice(sub_values), "颜色": rng.choice(COLORS)}
    optional = ["材质", "风格", "图案"] + kind["own"] + (["版型"] if kind_name != "裙" else [])
    for key in rng.sample(optional, rng.randint(2, min(4, len(optional)))):
        values = sorted(MATERIALS) if key == "材质" else sorted(PHRASES[key])
        attrs[key] = rng.choice(values)
    return attrs


def make_record(rng: random.Random) -> dict[str, str]:
    """A record whose summary fits the length window (too long attribute sets are redrawn)."""
    while True:
        attrs = sample_attributes(rng)
        summary = summarize(attrs)
        if MIN_SUMMARY <= len(summary) <= MAX_SUMMARY:
            content = "*".join(f"{key}#{attrs[key]}" for key in CONTENT_ORDER if key in attrs)
            return {"content": content, "summary": summary}


def write_split(path: Path, count: int, seed: int) -> None:
    """Write ``count`` records as JSON lines (UTF-8, no ASCII escaping, ``\\n`` line ends)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for _ in range(count):
            out.write(json.dumps(make_record(rng), ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "adgen_sample")
    parser.add_argument("--train", type=int, default=2000, help="number of train lines")
    parser.add_argument("--dev", type=int, default=200, help="number of dev lines")
    parser.add_argument("--seed", type=int, default=20230401, help="train seed; dev uses seed + 1")
    args = parser.parse_args(argv)
    write_split(args.out / "train.json", args.train, args.seed)
    write_split(args.out / "dev.json", args.dev, args.seed + 1)
    print(f"wrote {args.train} train and {args.dev} dev lines to {args.out}")


if __name__ == "__main__":
    main()
