"""Tiny stand-ins for the recipes' downloads, with the real archive and file layouts.

Each ``make_*`` writes the archive(s) into a directory (what ``--data-dir`` points at) and returns the
archive paths; :func:`write_checksums` writes a sha256 list for them (``DEEPNET_RECIPE_CHECKSUMS``).
The text is generated: sentences over a small English vocabulary with a word-by-word "German"/"French"
counterpart, hyphenated compounds, punctuation and quotes, so tokenization, compound splitting and
detokenization all have something to do.
"""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

EN = ["the", "house", "is", "small", "we", "see", "a", "green", "tree", "today", "children", "play",
      "in", "garden", "city", "council", "votes", "new", "law", "old", "bridge", "river", "people", "read"]
DE = ["das", "Haus", "ist", "klein", "wir", "sehen", "einen", "grünen", "Baum", "heute", "Kinder", "spielen",
      "im", "Garten", "Stadt", "Rat", "stimmt", "neues", "Gesetz", "alte", "Brücke", "Fluss", "Leute", "lesen"]
FR = ["la", "maison", "est", "petite", "nous", "voyons", "un", "vert", "arbre", "aujourd'hui", "enfants", "jouent",
      "dans", "jardin", "ville", "conseil", "vote", "nouvelle", "loi", "vieux", "pont", "rivière", "gens", "lisent"]
AN = [w + "o" for w in EN]


def sentence_pairs(n: int, seed: int, other: List[str] = DE) -> List[Tuple[str, str]]:
    """``n`` (English, other) sentence pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        idx = [rng.randrange(len(EN)) for _ in range(rng.randint(3, 9))]
        en = [EN[i] for i in idx]
        xx = [other[i] for i in idx]
        if rng.random() < 0.3:  # a hyphenated compound on both sides
            j = rng.randrange(len(en))
            en[j] = en[j] + "-" + EN[(idx[j] + 1) % len(EN)]
            xx[j] = xx[j] + "-" + other[(idx[j] + 1) % len(other)]
        end = rng.choice([".", "!", "?", ", right?"])
        en_s, xx_s = " ".join(en).capitalize() + end, " ".join(xx).capitalize() + end
        if rng.random() < 0.2:
            en_s, xx_s = f'"{en_s}"', f'"{xx_s}"'
        pairs.append((en_s, xx_s))
    return pairs


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_500_000_000
    tar.addfile(info, io.BytesIO(data))


def _tgz(path: Path, files: Dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            _add(tar, name, text)
    return path


def _lines(items) -> str:
    return "".join(item + "\n" for item in items)


def _sgm(setid: str, lang: str, sentences: List[str], kind: str) -> str:
    head = f'<{kind}set setid="{setid}" srclang="any" trglang="{lang}">\n'
    body = ['<doc sysid="ref" docid="doc-1" genre="news" origlang="en">', "<p>"]
    body += [f'<seg id="{i}">{s}</seg>' for i, s in enumerate(sentences, start=1)]
    body += ["</p>", "</doc>", f"</{kind}set>"]
    return head + _lines(body)


def make_wmt17(root: Path) -> List[Path]:
    root.mkdir(parents=True, exist_ok=True)
    europarl, crawl, nc = sentence_pairs(40, 1), sentence_pairs(40, 2), sentence_pairs(40, 3)
    dev, test = sentence_pairs(10, 4), sentence_pairs(12, 5)
    return [
        _tgz(root / "training-parallel-europarl-v7.tgz", {
            "training/europarl-v7.de-en.en": _lines(e for e, _ in europarl),
            "training/europarl-v7.de-en.de": _lines(d for _, d in europarl),
            "training/europarl-v7.fr-en.en": _lines(e for e, _ in europarl[:5]),
        }),
        _tgz(root / "training-parallel-commoncrawl.tgz", {
            "commoncrawl.de-en.en": _lines(e for e, _ in crawl),
            "commoncrawl.de-en.de": _lines(d for _, d in crawl),
            "commoncrawl.de-en.annotation": _lines("http://example.com" for _ in crawl),
        }),
        _tgz(root / "training-parallel-nc-v12.tgz", {
            "training/news-commentary-v12.de-en.en": _lines(e for e, _ in nc),
            "training/news-commentary-v12.de-en.de": _lines(d for _, d in nc),
        }),
        _tgz(root / "dev.tgz", {
            "dev/newstest2013.en": _lines(e for e, _ in dev),
            "dev/newstest2013.de": _lines(d for _, d in dev),
            "dev/newstest2013-src.en.sgm": _sgm("newstest2013", "en", [e for e, _ in dev], "src"),
        }),
        _tgz(root / "test-full.tgz", {
            "test-full/newstest2014-deen-src.en.sgm": _sgm("newstest2014", "en", [e for e, _ in test], "src"),
            "test-full/newstest2014-deen-ref.de.sgm": _sgm("newstest2014", "de", [d for _, d in test], "ref"),
            "test-full/newstest2014-deen-src.de.sgm": _sgm("newstest2014", "de", [d for _, d in test], "src"),
            "test-full/newstest2014-deen-ref.en.sgm": _sgm("newstest2014", "en", [e for e, _ in test], "ref"),
        }),
    ]


def _iwslt_xml(setid: str, lang: str, sentences: List[str]) -> str:
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>",
             f'<srcset setid="{setid}" srclang="{lang}">', '<doc docid="535" genre="lectures">',
             "<url>http://www.ted.com/talks/example.html</url>", "<description>TED talk</description>",
             "<keywords>talks, science</keywords>", "<talkid>535</talkid>", "<title>An example</title>"]
    lines += [f'<seg id="{i}"> {s} </seg>' for i, s in enumerate(sentences, start=1)]
    lines += ["</doc>", "</srcset>", "</mteval>"]
    return _lines(lines)


def _iwslt_tags(sentences: List[str], lang: str) -> str:
    meta = ["<url>http://www.ted.com/talks/example.html</url>", "<keywords>talks, science</keywords>",
            "<speaker>Jane Doe</speaker>", "<talkid>1</talkid>", f"<title>Talk title {lang}</title>",
            "<description>TED Talk Subtitles and Transcript: an example</description>",
            '<reviewer href="http://www.ted.com/profiles/1">R</reviewer>',
            '<translator href="http://www.ted.com/profiles/2">T</translator>']
    return _lines(meta[:6] + sentences[:30] + meta + sentences[30:])


def make_iwslt14(root: Path) -> List[Path]:
    root.mkdir(parents=True, exist_ok=True)
    train = sentence_pairs(70, 11)
    files = {
        "de-en/train.tags.de-en.de": _iwslt_tags([d for _, d in train], "de"),
        "de-en/train.tags.de-en.en": _iwslt_tags([e for e, _ in train], "en"),
    }
    for k, name in enumerate(["TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012"]):
        pairs = sentence_pairs(3, 20 + k)
        for lang, side in (("en", 0), ("de", 1)):
            files[f"de-en/IWSLT14.{name}.de-en.{lang}.xml"] = _iwslt_xml(f"IWSLT14.{name}", lang,
                                                                         [p[side] for p in pairs])
    return [_tgz(root / "de-en.tgz", files)]


def make_opus100(root: Path) -> List[Path]:
    root.mkdir(parents=True, exist_ok=True)
    base = "opus-100-corpus/v1.0"
    files = {"opus-100-corpus/README": "OPUS-100 (fixture)\n"}
    for pair, other, seed, splits in (("en-fr", FR, 32, ("train", "dev", "test")),
                                      ("an-en", AN, 33, ("train",))):
        xx = pair.replace("en", "").strip("-")
        for split in splits:
            pairs = sentence_pairs({"train": 40, "dev": 6, "test": 8}[split], seed + len(split), other)
            files[f"{base}/supervised/{pair}/opus.{pair}-{split}.en"] = _lines(e for e, _ in pairs)
            files[f"{base}/supervised/{pair}/opus.{pair}-{split}.{xx}"] = _lines(x for _, x in pairs)
    zs = sentence_pairs(5, 40, FR)
    files[f"{base}/zero-shot/de-fr/opus.de-fr-test.de"] = _lines(e for e, _ in zs)
    files[f"{base}/zero-shot/de-fr/opus.de-fr-test.fr"] = _lines(x for _, x in zs)
    return [_tgz(root / "opus-100-corpus-v1.0.tar.gz", files)]


def write_checksums(archives: List[Path], path: Path) -> Path:
    lines = [f"{hashlib.sha256(a.read_bytes()).hexdigest()}  {a.name}" for a in archives]
    path.write_text("# fixture archives\n" + _lines(lines))
    return path
