"""Pure data handling: caption sidecars, prompt rules, tag shuffle and dropout, aspect buckets, epoch batches."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.data.buckets import make_buckets, nearest_bucket
from sdlora.data.captions import PromptRules, read_caption, tag_frequency
from sdlora.data.examples import Example, build_examples
from sdlora.data.images import image_size, load_image
from sdlora.data.schedule import epoch_batches


def _png(path: Path, size=(16, 16), color=(200, 10, 10), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


# ---------------------------------------------------------------- captions

def test_txt_and_caption_sidecars_are_found_and_txt_wins(tmp_path):
    a, b, c, d = (_png(tmp_path / f"{n}.png") for n in "abcd")
    (tmp_path / "a.txt").write_text("  red ball,\n  grass  \n", encoding="utf-8")
    (tmp_path / "b.caption").write_text("\ufeffblue sky", encoding="utf-8")  # BOM as Windows editors write it
    (tmp_path / "c.txt").write_text("from txt", encoding="utf-8")
    (tmp_path / "c.caption").write_text("from caption", encoding="utf-8")
    (tmp_path / "d.txt").write_text("   \n", encoding="utf-8")  # empty caption = no caption
    assert read_caption(a) == "red ball, grass"  # whitespace collapsed
    assert read_caption(b) == "blue sky"
    assert read_caption(c) == "from txt"
    assert read_caption(d) is None
    assert read_caption(tmp_path / "none.png") is None


def test_trigger_substitution_prepending_and_the_prompt_for_uncaptioned_images():
    r = PromptRules(prompt="a photo of sks dog", trigger="sks dog")
    assert r.base_caption(None) == "a photo of sks dog"
    assert r.base_caption("") == "a photo of sks dog"
    assert r.base_caption("{trigger}, red ball, {trigger} again") == "sks dog, red ball, sks dog again"
    assert r.base_caption("red ball, grass") == "sks dog, red ball, grass"  # trigger put first when missing
    assert r.base_caption("grass, sks dog") == "grass, sks dog"  # present: left where the author put it


def test_tag_shuffle_keeps_the_first_n_in_place_and_permutes_the_rest_uniformly():
    tags = ["sks dog", "red ball", "grass", "sky", "tree", "sun"]
    caption = ", ".join(tags)
    n = 6000
    for keep in (0, 1, 2):
        r = PromptRules("p", "sks dog", shuffle_tags=True, keep_tags=keep)
        rng = random.Random(5)
        slots, orders = Counter(), Counter()
        for _ in range(n):
            out = r.final(caption, rng).split(", ")
            assert out[:keep] == tags[:keep]
            assert sorted(out) == sorted(tags)
            orders[tuple(out[keep:])] += 1
            slots.update(enumerate(out[keep:]))
        tail = tags[keep:]
        k = len(tail)
        # each free slot holds each tail tag with probability 1/k: every (slot, tag) count is Binomial(n, 1/k)
        p, sd = 1 / k, math.sqrt(n * (1 / k) * (1 - 1 / k))
        for slot, tag in itertools.product(range(k), tail):
            assert abs(slots[slot, tag] - n * p) < 4 * sd, (keep, slot, tag, slots[slot, tag], n * p)
        # and each of the k! orders is equally likely: Pearson's chi-square with k!-1 degrees of freedom stays within
        # 4 of its standard deviations sqrt(2 df) above its mean df. At this n a biased swap-with-any-index shuffle
        # scores 1.4-4x the bound (and 7-10 sd on the slot counts), a cyclic or last-tag-fixed one 35-360x.
        e, df = n / math.factorial(k), math.factorial(k) - 1
        chi2 = sum((orders[o] - e) ** 2 / e for o in itertools.permutations(tail))
        assert sum(orders.values()) == n and chi2 < df + 4 * math.sqrt(2 * df), (keep, chi2, df)
    same = [PromptRules("p", "t", True, 1).final(caption, random.Random(9)) for _ in range(2)]
    assert same[0] == same[1]  # seeded: reproducible
    assert PromptRules("p", "t").final(caption, random.Random(0)) == caption  # no shuffle: untouched


def test_caption_dropout_rate_is_close_to_p():
    n = 20000
    for p in (0.1, 0.5):
        r = PromptRules("p", "t", dropout=p)
        rng = random.Random(123)
        dropped = sum(r.final("sks dog, ball", rng) == "" for _ in range(n))
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(dropped / n - p) < 4 * sd, (p, dropped / n)
    assert all(PromptRules("p", "t").final("x", random.Random(i)) == "x" for i in range(50))


def test_tag_frequency_counts_tags_across_captions():
    assert tag_frequency(["sks dog, red ball, grass", "sks dog,red ball", "sks dog", " , "]) == {
        "sks dog": 3, "red ball": 2, "grass": 1}


# ---------------------------------------------------------------- buckets

@pytest.mark.parametrize("resolution,step", [(64, 8), (512, 64), (768, 64), (1024, 64), (1024, 32)])
def test_buckets_are_step_multiples_within_the_area_and_ratio(resolution, step):
    buckets = make_buckets(resolution, step)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    assert len(buckets) == len(set(buckets)) >= 3
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= area
        assert w * (h + step) > area  # the tallest height that fits: no bucket wastes a whole row of pixels
        assert max(w / h, h / w) <= 2.0
    assert any(w > h for w, h in buckets) and any(w < h for w, h in buckets)


def test_nearest_bucket_picks_the_closest_aspect_ratio():
    buckets = make_buckets(512, 64)
    for size in [(1000, 500), (500, 1000), (640, 480), (480, 640), (777, 777), (3000, 100)]:
        got = nearest_bucket(size, buckets)

        def dist(b, size=size):
            return abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1]))

        assert dist(got) == min(dist(b) for b in buckets), (size, got)
    assert nearest_bucket((777, 777), buckets) == (512, 512)
    assert nearest_bucket((3000, 100), buckets) == max(buckets, key=lambda b: b[0] / b[1])  # widest
    assert nearest_bucket((100, 3000), buckets) == max(buckets, key=lambda b: b[1] / b[0])  # tallest


def test_load_image_returns_the_bucket_size_with_exif_orientation_and_alpha_on_white(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8)
    p = tmp_path / "wide.png"
    Image.fromarray(arr).save(p)
    x = load_image(p, (80, 48))
    assert x.shape == (3, 48, 80) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert load_image(p, 32).shape == (3, 32, 32)
    # a JPEG stored landscape with EXIF "rotate 90": it is a portrait image
    q = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(q, exif=exif)
    assert image_size(q) == (60, 100)
    assert load_image(q, (48, 80)).shape == (3, 80, 48)
    # transparent pixels become white, not black
    t = _png(tmp_path / "t.png", (16, 16), (0, 0, 0, 0), mode="RGBA")
    assert torch.equal(load_image(t, 16), torch.ones(3, 16, 16))


def test_build_examples_uses_sidecar_captions_and_buckets(tmp_path):
    wide = _png(tmp_path / "wide.png", (100, 50))
    tall = _png(tmp_path / "tall.png", (40, 80))
    (tmp_path / "wide.txt").write_text("{trigger}, beach", encoding="utf-8")
    rules = PromptRules("a photo of sks dog", "sks dog")
    buckets = make_buckets(64, 8)
    ex = build_examples([wide, tall], rules, 64, buckets)
    assert [e.caption for e in ex] == ["sks dog, beach", "a photo of sks dog"]
    assert [e.size for e in ex] == [nearest_bucket((100, 50), buckets), nearest_bucket((40, 80), buckets)]
    assert ex[0].size[0] > ex[0].size[1] and ex[1].size[0] < ex[1].size[1]
    assert [e.size for e in build_examples([wide, tall], rules, 64, None)] == [(64, 64), (64, 64)]
    cls = build_examples([wide], rules, 64, None, fixed_caption="a dog", is_class=True)
    assert cls[0].caption == "a dog" and cls[0].is_class


def test_epoch_batches_never_mix_sizes_and_yield_each_example_repeats_times():
    sizes = [(80, 48)] * 5 + [(48, 80)] * 3 + [(64, 64)] * 4
    examples = [Example(Path(f"{i}.png"), "c", s) for i, s in enumerate(sizes)]
    for bs, repeats in [(1, 1), (2, 3), (4, 2), (3, 1)]:
        batches = epoch_batches(examples, bs, repeats, epoch=0, seed=7)
        for b in batches:
            assert len({examples[i].size for i in b}) == 1
            assert 1 <= len(b) <= bs
        assert Counter(i for b in batches for i in b) == {i: repeats for i in range(len(examples))}
        expected = sum(math.ceil(n * repeats / bs) for n in Counter(sizes).values())
        assert len(batches) == expected  # one short batch per size at most
    a = epoch_batches(examples, 2, 2, epoch=3, seed=7)
    assert a == epoch_batches(examples, 2, 2, epoch=3, seed=7)  # deterministic: a resumed run replays it
    assert a != epoch_batches(examples, 2, 2, epoch=4, seed=7)  # a new order every epoch
    assert a != epoch_batches(examples, 2, 2, epoch=3, seed=8)


def test_trigger_is_matched_as_a_whole_word():
    from sdlora.data.captions import PromptRules

    rules = PromptRules("a sks dog", "sks")
    assert rules.base_caption("sksx on grass") == "sks, sksx on grass"  # "sksx" is another word
    assert rules.base_caption("photo of sks dog") == "photo of sks dog"
