"""--clip-skip and --max-token-length (issue 20 part 5): the conditioning `step.encode_text` gives against A1111's
chunking and the clip-skip layer, written independently here; the families they apply to and the one-line errors
where they do not; training records them as kohya does and warns about each caption still cut; `generate` (and the
app, which calls the same Session) conditions on the same layer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdlora.config import make_config
from sdlora.errors import SdloraError
from sdlora.formats.read import read_adapter
from sdlora.models import load_base
from sdlora.train import long_prompts
from sdlora.train.step import encode_text
from tests.helpers import DOG, make_images, train_tiny

# a caption of 176 tiny-CLIP tokens: three chunks at --max-token-length 225, the last one part-filled
WORDS = ("sks dog, a photo of a small brown dog sitting on green grass, sunny day, " * 3).strip()


@pytest.fixture(scope="session")
def sd1():
    return load_base("tiny")


@pytest.fixture(scope="session")
def sdxl():
    return load_base("tiny-sdxl")


def with_text(spec, clip_skip=None, chunks=1):
    return dataclasses.replace(spec, text_encoders=tuple(
        dataclasses.replace(t, clip_skip=clip_skip, chunks=chunks) if t in spec.clip_hidden() else t
        for t in spec.text_encoders))


def a1111_chunks(tok, caption: str, n: int) -> torch.Tensor:
    """A1111's `tokenize_line` without emphasis and with comma backtracking off: the caption's tokens in chunks of
    75, each padded with the end token to 75, then [start] + chunk + [end]; after a chunk's first end token the
    family's padding token (A1111's id_pad: CLIP-L's is the end token, OpenCLIP's "!"). n chunks, empty ones
    [start, end, pad...]."""
    tokens = tok(caption, add_special_tokens=False).input_ids
    start, end = tok.convert_tokens_to_ids(tok.bos_token), tok.convert_tokens_to_ids(tok.eos_token)
    pad = tok.convert_tokens_to_ids(tok.pad_token)
    rows = []
    for i in range(n):
        part = tokens[75 * i: 75 * (i + 1)]
        row = [start] + part + [end] * (75 - len(part)) + [end]
        first_end = row.index(end)
        rows.append(row[:first_end + 1] + [pad] * (76 - first_end))
    return torch.tensor(rows)


def test_long_caption_chunks_equal_a1111s_sd1(sd1):
    """SD 1.x at --max-token-length 225 and clip skip 2: three 77-token chunks, each encoded alone, its layer -2
    through the final layer norm, side by side in sequence (231 tokens)."""
    tok, te = sd1.tokenizer, sd1.text_encoder
    assert 152 < len(tok(WORDS).input_ids) < 227  # longer than two chunks, shorter than three
    ids = a1111_chunks(tok, WORDS, 3)
    with torch.no_grad():
        want = torch.cat([te.final_layer_norm(te(row[None], output_hidden_states=True).hidden_states[-2])
                          for row in ids], dim=1)
        got, pooled = encode_text(with_text(sd1.spec, 2, 3), list(sd1.text_encoders.values()), [WORDS])
    assert pooled is None and got.shape == (1, 231, want.shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_long_caption_chunks_equal_a1111s_sdxl(sdxl):
    """SDXL at 150: both encoders' penultimate layers per chunk, side by side on features, chunks in sequence; the
    pooled bigG output is the first chunk's (kohya's pool2[::n], A1111's first chunk)."""
    (tok1, te1), (tok2, te2) = sdxl.text_encoders.values()
    with torch.no_grad():
        outs = []
        for r1, r2 in zip(a1111_chunks(tok1, WORDS, 2), a1111_chunks(tok2, WORDS, 2)):
            o1 = te1(r1[None], output_hidden_states=True)
            o2 = te2(r2[None], output_hidden_states=True)
            outs.append((torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2.text_embeds))
        want = torch.cat([h for h, _ in outs], dim=1)
        got, pooled = encode_text(with_text(sdxl.spec, None, 2), list(sdxl.text_encoders.values()), [WORDS])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, outs[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_clip_skip_is_hidden_states_minus_n(sd1, sdxl, n):
    """SD 1.x: hidden_states[-N] then the final layer norm (N = 1: the last hidden state itself); SDXL:
    hidden_states[-N] of both encoders, without the norm (N = 2: its own conditioning; N = 1 is refused)."""
    prompt = "sks dog on the grass"
    tok, te = sd1.tokenizer, sd1.text_encoder
    ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = te(ids, output_hidden_states=True).hidden_states
        want = te.final_layer_norm(hs[-n])
        got, _ = encode_text(with_text(sd1.spec, n), list(sd1.text_encoders.values()), [prompt])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if n == 1:
        with pytest.raises(SdloraError, match="reads the penultimate CLIP layer already"):
            long_prompts.check_clip_skip(sdxl.spec, {t.attr: sdxl.modules[t.attr] for t in sdxl.spec.clip_hidden()}, 1)
        return
    with torch.no_grad():
        parts = []
        for tok_, te_ in sdxl.text_encoders.values():
            ids = tok_([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
            parts.append(te_(ids, output_hidden_states=True).hidden_states[-n])
        got, _ = encode_text(with_text(sdxl.spec, n), list(sdxl.text_encoders.values()), [prompt])
        default, _ = encode_text(sdxl.spec, list(sdxl.text_encoders.values()), [prompt])
    torch.testing.assert_close(got, torch.cat(parts, dim=-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(got, default) == (n == 2)


@pytest.mark.parametrize("model, settings, needle", [
    ("tiny-flux", dict(clip_skip=2), "--clip-skip does not apply to FLUX.1: it conditions on no CLIP hidden states"),
    ("tiny-sd3", dict(max_token_length=150), "--max-token-length 150 does not apply to SD 3.x: its T5 encoder"),
    ("tiny-sdxl", dict(clip_skip=1), "--clip-skip 1: SDXL reads the penultimate CLIP layer already"),
    ("tiny", dict(clip_skip=13), "--clip-skip 13 is more than the 12 layers of SD 1.x's text_encoder"),
])
def test_families_refuse_what_does_not_apply_in_one_line(model, settings, needle):
    cfg = make_config(dict(images=str(DOG), prompt="sks dog", model=model) | settings)
    with pytest.raises(SdloraError, match=needle) as e:
        long_prompts.apply(cfg, load_base(model))
    assert "\n" not in str(e.value)


def test_sd3_clip_skip_reaches_its_clip_encoders_only():
    """SD 3.x: clip skip acts on CLIP-L and bigG (penultimate by default), not on T5."""
    base = load_base("tiny-sd3")
    cfg = make_config(dict(images=str(DOG), prompt="sks dog", model="tiny-sd3", clip_skip=3))
    spec = long_prompts.apply(cfg, base)
    assert [(t.kind, t.clip_skip) for t in spec.text_encoders] == [("clip", 3), ("clip", 3), ("t5", None)]
    assert spec.pipeline_clip_skip() == 1  # diffusers' SD3 pipeline: hidden_states[-(1 + 2)]
    with torch.no_grad():
        a, _ = encode_text(spec, list(base.text_encoders.values()), ["sks dog"])
        b, _ = encode_text(base.spec, list(base.text_encoders.values()), ["sks dog"])
    n_clip = 77
    assert not torch.equal(a[:, :n_clip], b[:, :n_clip]) and torch.equal(a[:, n_clip:], b[:, n_clip:])


@pytest.mark.slow
def test_training_records_both_and_names_each_caption_still_cut(tmp_path):
    """A run at clip skip 2 and 150 tokens: kohya's keys, a text cache of 154-token entries, and a warning that
    names the caption longer than 150 tokens and not the one that now fits."""
    images = make_images(tmp_path / "imgs", 3, size=(64, 64))
    (images / "img_0.txt").write_text("sks dog, " + "a small brown dog on green grass, " * 4)  # 117 tokens: fits
    (images / "img_1.txt").write_text("sks dog, " + "a small brown dog on green grass, " * 8)  # 225: cut
    lines = []
    r = train_tiny(tmp_path / "o.safetensors", images=images, steps=2, no_eval_loss=True, clip_skip=2,
                   max_token_length=150, log=lines.append)
    md = read_adapter(r.path).metadata
    assert (md["ss_clip_skip"], md["ss_max_token_length"]) == ("2", "150")
    warn = next(ln for ln in lines if "caption(s) are longer than the text encoder reads" in ln)
    assert "1 caption(s)" in warn and "img_1.png" in warn and "img_0.png" not in warn
    assert "CLIP the first 152" in warn and "--max-token-length 225" in warn
    spec = r.base.spec
    assert [(t.clip_skip, t.chunks) for t in spec.text_encoders] == [(2, 2)]


def test_the_text_cache_keys_on_clip_skip_and_chunks(sd1):
    """Conditioning at another layer or length is another cache entry; without either the key is what it was."""
    from sdlora.cache import EmbeddingCache

    encoders = list(sd1.text_encoders.values())
    keys = {(n, c): EmbeddingCache(encoders, with_text(sd1.spec, n, c), None).key("sks dog")
            for n, c in [(None, 1), (2, 1), (None, 2), (2, 2)]}
    assert len(set(keys.values())) == 4
    assert keys[(None, 1)] == EmbeddingCache(encoders, sd1.spec, None).key("sks dog")


@pytest.mark.slow
def test_generate_conditions_on_the_clip_skip_layer(sd1, tmp_path):
    """`generate --clip-skip 2` (the Session the app drives too) makes the image the pipeline makes from embeddings
    computed here: layer -2 through the final layer norm, for the prompt and the empty negative prompt (A1111);
    the PNG says "Clip skip: 2" as A1111 writes it."""
    from sdlora.infer.session import Session
    from sdlora.infer.settings import Settings

    session = Session(base=sd1)
    s = Settings(prompt="sks dog", steps=2, width=64, height=64, clip_skip=2)
    [(image, params)] = session.generate(s, {})
    tok, te = sd1.tokenizer, sd1.text_encoder

    def emb(p):
        ids = tok([p], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])

    from sdlora.infer.session import make_scheduler

    pipe = sd1.pipeline(scheduler=make_scheduler(s.scheduler, sd1.scheduler_config))
    want = pipe(prompt_embeds=emb("sks dog"), negative_prompt_embeds=emb(""), num_inference_steps=2,
                guidance_scale=s.guidance, width=64, height=64, generator=torch.Generator("cpu").manual_seed(0),
                output_type="pil").images[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))
    [(plain, _)] = session.generate(dataclasses.replace(s, clip_skip=None), {})
    assert not np.array_equal(np.asarray(image), np.asarray(plain))
    assert params.extra["Clip skip"] == "2"


def test_sample_grids_and_class_images_condition_as_the_run(sd1, sdxl):
    """What sample grids and class images pass the pipeline for a model fresh from a run (its spec carries the clip
    skip and chunks): SD 1.x the run's own embeddings (231 tokens at 225), SDXL diffusers' clip_skip (N - 2); a model
    left as it loads gets the bare prompt."""
    from sdlora.infer.text import prompt_args

    run_sd1 = dataclasses.replace(sd1, spec=with_text(sd1.spec, 2, 3))
    args = prompt_args(run_sd1, WORDS)
    with torch.no_grad():
        want, _ = encode_text(run_sd1.spec, list(sd1.text_encoders.values()), [WORDS])
        empty, _ = encode_text(run_sd1.spec, list(sd1.text_encoders.values()), [""])
    assert set(args) == {"prompt_embeds", "negative_prompt_embeds"} and args["prompt_embeds"].shape[1] == 231
    assert torch.equal(args["prompt_embeds"], want) and torch.equal(args["negative_prompt_embeds"], empty)
    assert prompt_args(dataclasses.replace(sdxl, spec=with_text(sdxl.spec, 3)), "p") == {"prompt": "p", "clip_skip": 1}
    assert prompt_args(sd1, "p", "n") == {"prompt": "p", "negative_prompt": "n"}
    assert prompt_args(sdxl, "p", clip_skip=2) == {"prompt": "p"}  # SDXL's own layer
