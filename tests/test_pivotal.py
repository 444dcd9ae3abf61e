"""Pivotal tuning (`--pivotal N`, issue 21): new tokens for the trigger in every CLIP text encoder, learnt with the
LoRA; the embeddings bundled in the LoRA file as A1111 reads them and written as an embedding file that diffusers'
`load_textual_inversion`, A1111 and ComfyUI read; generate/verify/inspect/convert/merge with them.

References: diffusers' own `load_textual_inversion` + `encode_prompt` (the text-encoder output), and A1111's reading
of `bundle_emb` keys and of embedding data, restated below from `extensions-builtin/Lora/networks.py`
(`load_network`) and `modules/textual_inversion/textual_inversion.py` (`create_embedding_from_data`).
"""

from __future__ import annotations

import pytest
import safetensors.torch as st
import torch

from tests.helpers import DOG, main_error, run_main, train_tiny

PIV = dict(prompt="a ohwx dog", trigger="ohwx", pivotal=2, pivotal_init="dog")
PROMPT = "a photo of ohwx dog"


def a1111_bundle(sd: dict) -> dict:
    """A1111 networks.py `load_network`, its bundle_emb branch: {name: embedding data}."""
    bundle = {}
    for key, w in sd.items():
        head, _, part = key.partition(".")
        if head == "bundle_emb":
            emb_name, vec_name = part.split(".", 1)
            d = bundle.get(emb_name, {})
            if vec_name.split(".")[0] == "string_to_param":
                _, k2 = vec_name.split(".", 1)
                d["string_to_param"] = {k2: w}
            else:
                d[vec_name] = w
            bundle[emb_name] = d
    return bundle


def a1111_shape(data: dict) -> tuple[int, int]:
    """textual_inversion.py `create_embedding_from_data`: (vectors, shape), the shape being what A1111 compares with
    the model's expected width (SD 1.x 768, SD 2.x 1024, SDXL 768 + 1280)."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        emb = next(iter(params.values()))
        return emb.shape[0], emb.shape[-1]
    if "clip_g" in data and "clip_l" in data:
        return data["clip_g"].shape[0], data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    assert len(data) == 1, "embedding file has multiple terms in it"  # "diffuser concepts": one tensor
    emb = next(iter(data.values()))
    return emb.shape[0], emb.shape[-1]


@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    """Tiny SD 1.x: UNet LoRA + 2 new tokens; the tokens alone for steps 1-2, then the LoRA alone (steps 3-4); a
    checkpoint at step 2. No text-encoder LoRA, so the text encoder's output is the tokens' alone."""
    out = tmp_path_factory.mktemp("piv") / "ohwx.safetensors"
    result = train_tiny(out, no_text_encoder=True, steps=4, save_every=2, pivotal_steps=2, **PIV)
    return out, result


def test_only_the_new_tokens_train_and_the_vocabulary_stays_bit_identical(sd1):
    from sdlora.lora.tokens import NewTokens
    from sdlora.models import load_base
    from sdlora.train.pivotal import init_vectors

    out, result = sd1
    fresh = load_base("tiny")
    emb = result.base.text_encoder.get_input_embeddings()
    assert isinstance(emb, NewTokens)
    old = fresh.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb.base.weight, old) and not emb.base.weight.requires_grad
    vec = st.load_file(out)["bundle_emb.ohwx.string_to_param.*"]
    assert vec.shape == (2, old.shape[1])
    start = init_vectors("dog", fresh.tokenizer, fresh.text_encoder, 2)  # "dog" is 3 characters: its last 2
    assert torch.equal(start, old[fresh.tokenizer("og", add_special_tokens=False).input_ids])
    assert (vec - start).abs().max() > 1e-4  # trained
    # the base tokenizer is untouched: the new tokens live on the model's copy
    assert "ohwx" not in fresh.tokenizer.get_vocab() and "ohwx" in result.base.tokenizer.get_vocab()


def test_pivotal_steps_train_the_tokens_first_then_the_lora(sd1):
    out, _ = sd1
    ckpt = st.load_file(out.with_name("ohwx-checkpoints") / "step-000002" / "adapter.safetensors")
    final = st.load_file(out)
    key = "bundle_emb.ohwx.string_to_param.*"
    ups = [k for k in final if k.endswith("lora_up.weight")]
    assert ups and all(not ckpt[k].any() for k in ups)  # steps 1-2: the LoRA did not move (its up starts at 0)
    assert any(final[k].any() for k in ups)  # steps 3-4: it did
    assert torch.equal(ckpt[key], final[key])  # the tokens froze at step 2


def test_diffusers_load_textual_inversion_gives_the_same_text_encoder_output(sd1):
    from sdlora.formats.embeddings import file_path
    from sdlora.models import load_base
    from sdlora.train import step as S

    out, result = sd1
    base = result.base
    ours, _ = S.encode_text(base.spec, list(base.text_encoders.values()), [PROMPT])
    pipe = load_base("tiny").pipeline()
    pipe.load_textual_inversion(str(file_path(out, "ohwx")), token="ohwx")
    theirs, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    plain = load_base("tiny")
    before, _ = S.encode_text(plain.spec, list(plain.text_encoders.values()), [PROMPT])
    assert (ours - before).abs().max() > 1e-3  # the trigger reads the learnt tokens, not its characters


def test_files_follow_a1111_and_comfyui_layouts(sd1):
    from sdlora.formats.embeddings import file_path

    out, result = sd1
    width = result.base.text_encoder.get_input_embeddings().weight.shape[1]
    sd = st.load_file(out)
    bundle = a1111_bundle(sd)
    assert list(bundle) == ["ohwx"] and list(bundle["ohwx"]) == ["string_to_param"]
    assert a1111_shape(bundle["ohwx"]) == (2, width)
    side = st.load_file(file_path(out, "ohwx"))
    assert list(side) == ["emb_params"]  # one tensor: A1111's "diffusers concept", ComfyUI's only value
    assert a1111_shape(side) == (2, width)
    assert torch.equal(side["emb_params"], sd["bundle_emb.ohwx.string_to_param.*"])


def test_verify_inspect_convert_and_merge_keep_the_embedding(sd1, tmp_path, capsys):
    out, _ = sd1
    r = run_main(capsys, "verify", out)
    assert r.returncode == 0, r.out + r.err
    assert "loads the bundled embedding(s) 'ohwx'" in r.stdout and "ohwx: 2 token(s)" in r.stdout
    assert "load_lora_weights rejects the file as written" in r.stdout
    r = run_main(capsys, "inspect", out)
    assert "embedding     ohwx: 2 token(s)" in r.stdout
    sd = st.load_file(out)
    k = tmp_path / "k.safetensors"
    assert run_main(capsys, "convert", out, k, "--to", "kohya").returncode == 0
    assert torch.equal(st.load_file(k)["bundle_emb.ohwx.string_to_param.*"], sd["bundle_emb.ohwx.string_to_param.*"])
    d = tmp_path / "d.safetensors"
    assert run_main(capsys, "convert", out, d, "--to", "diffusers").returncode == 0
    assert not any(x.startswith("bundle_emb") for x in st.load_file(d))  # diffusers' loader rejects them
    assert torch.equal(st.load_file(tmp_path / "d-embeddings" / "ohwx.safetensors")["emb_params"],
                       sd["bundle_emb.ohwx.string_to_param.*"])
    m = tmp_path / "merged.safetensors"
    r = run_main(capsys, "merge", "--model", "tiny", "--lora", out, "--out", m)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if "is not merged" in x]
    assert len(lines) == 1 and "ohwx" in lines[0]
    assert (tmp_path / "merged-embeddings" / "ohwx.safetensors").is_file()


def test_generate_loads_the_tokens_whole_at_any_strength(sd1):
    from sdlora.formats.read import read_adapter
    from sdlora.infer.blend import Blender
    from sdlora.models import load_base
    from sdlora.train import step as S

    out, result = sd1
    base = load_base("tiny")
    tok0, emb0 = base.tokenizer, base.text_encoder.get_input_embeddings()
    blender = Blender(base)
    name = blender.add(read_adapter(out)).file.name
    blender.set_strengths({name: 0.3})
    with blender.tokens() as att:
        assert torch.equal(att.vectors()["ohwx"]["te"], st.load_file(out)["bundle_emb.ohwx.string_to_param.*"])
        ours, _ = S.encode_text(base.spec, list(base.text_encoders.values()), [PROMPT])
    trained, _ = S.encode_text(result.base.spec, list(result.base.text_encoders.values()), [PROMPT])
    torch.testing.assert_close(ours, trained, rtol=0, atol=1e-6)  # no TE LoRA: the tokens alone, unscaled
    assert base.tokenizer is tok0 and base.text_encoder.get_input_embeddings() is emb0  # detached exactly


def test_bad_pivotal_input_is_one_line(tmp_path, capsys):
    common = ["train", "--model", "tiny", "--images", DOG, "--steps", "2", "--out", tmp_path / "x.safetensors"]
    # the tiny tokenizer reads single characters: "x" is one token of its vocabulary
    err = main_error(capsys, *common, "--prompt", "a x dog", "--trigger", "x", "--pivotal", "1",
                     "--pivotal-init", "dog")
    assert "already one token of the vocabulary" in err and "'x'" in err
    err = main_error(capsys, *common, "--prompt", "a ohwx dog", "--pivotal", "1", "--pivotal-init", "dog")
    assert "--pivotal needs --trigger WORD" in err
    err = main_error(capsys, *common, "--prompt", "a ohwx dog", "--trigger", "ohwx", "--pivotal", "1")
    assert "--pivotal-init WORD" in err
    err = main_error(capsys, *common, "--prompt", "a OH.wx dog", "--trigger", "OH.wx", "--pivotal", "1",
                     "--pivotal-init", "dog")
    assert "one lower-case word" in err
    err = main_error(capsys, *common, "--prompt", "a ohwx dog", "--trigger", "ohwx", "--pivotal", "1",
                     "--pivotal-init", "dog", "--pivotal-steps", "2")
    assert "--pivotal-steps must be between 0 and --steps - 1 (1)" in err
    err = main_error(capsys, *common, "--prompt", "a ohwx dog", "--pivotal-init", "dog")
    assert "--pivotal-init needs --pivotal N" in err


@pytest.mark.slow
def test_sdxl_both_encoders_match_diffusers_and_a1111(tmp_path):
    from sdlora.formats.embeddings import file_path
    from sdlora.models import load_base
    from sdlora.train import step as S

    out = tmp_path / "x.safetensors"
    result = train_tiny(out, model="tiny-sdxl", no_text_encoder=True, steps=2, **PIV)
    base = result.base
    sd = st.load_file(out)
    bundle = a1111_bundle(sd)
    widths = [base.modules[a].get_input_embeddings().weight.shape[1] for a in ("text_encoder", "text_encoder_2")]
    assert sorted(bundle["ohwx"]) == ["clip_g", "clip_l"] and a1111_shape(bundle["ohwx"]) == (2, sum(widths))
    side = st.load_file(file_path(out, "ohwx"))
    assert sorted(side) == ["clip_g", "clip_l"]
    ours, pooled = S.encode_text(base.spec, list(base.text_encoders.values()), [PROMPT])
    pipe = load_base("tiny-sdxl").pipeline()  # diffusers' documented SDXL way: one call per encoder
    pipe.load_textual_inversion(side["clip_l"], token="ohwx", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(side["clip_g"], token="ohwx", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, theirs_pooled, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model,keys", [("tiny-sd3", ["clip_g", "clip_l"]), ("tiny-flux", ["clip_l"])])
def test_dit_families_learn_clip_tokens_and_t5_reads_the_plain_word(tmp_path, model, keys):
    from sdlora.infer.session import Session
    from sdlora.infer.settings import Settings
    from sdlora.lora.tokens import pipeline_prompts

    out = tmp_path / "x.safetensors"
    result = train_tiny(out, model=model, steps=2, sample_every=2, sample_steps=2, **PIV)  # a grid: the tokens too
    assert sorted(a1111_bundle(st.load_file(out))["ohwx"]) == keys and len(result.samples) == 1
    base = result.base
    t5 = next(t for t in base.spec.text_encoders if t.kind == "t5")
    assert "ohwx" not in base.tokenizers[t5.tokenizer_attr].get_vocab()  # T5 keeps the plain word
    session = Session(model)
    session.add(out)
    name = next(iter(session.blender.adapters))
    session.blender.set_strengths({name: 1.0})
    with session.blender.tokens():
        pipe = session.base.pipeline()
        call = pipeline_prompts(pipe, session.base.spec, session.base.tokenizers, PROMPT, None)
    t5_key = "prompt" if len(call) == 1 else f"prompt_{len(base.spec.text_encoders)}"
    assert call[t5_key if len(call) > 1 else "prompt"] == PROMPT
    if len(call) > 1:  # SD 3.x: no TextualInversionLoaderMixin, so sdlora expands the CLIP prompts itself
        assert call["prompt"] == call["prompt_2"] == "a photo of ohwx ohwx_1 dog"
    images = session.generate(Settings(prompt=PROMPT, steps=2, num_images=1, seed=0), {name: 0.5})
    assert len(images) == 1 and images[0][0].size[0] > 0
    assert session.base.tokenizers[base.spec.text_encoders[0].tokenizer_attr].get_vocab().get("ohwx") is None


@pytest.mark.slow
def test_sd2_one_encoder_matches_diffusers(tmp_path):
    from sdlora.formats.embeddings import file_path
    from sdlora.models import load_base
    from sdlora.train import step as S

    out = tmp_path / "x.safetensors"
    result = train_tiny(out, model="tiny-sd2", no_text_encoder=True, steps=2, **PIV)
    base = result.base
    width = base.text_encoder.get_input_embeddings().weight.shape[1]
    assert a1111_shape(a1111_bundle(st.load_file(out))["ohwx"]) == (2, width)
    ours, _ = S.encode_text(base.spec, list(base.text_encoders.values()), [PROMPT])
    pipe = load_base("tiny-sd2").pipeline()
    pipe.load_textual_inversion(str(file_path(out, "ohwx")), token="ohwx")
    theirs, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_continues_the_tokens_exactly(sd1, tmp_path):
    out, _ = sd1
    again = tmp_path / "ohwx.safetensors"
    train_tiny(again, no_text_encoder=True, steps=4, save_every=2, pivotal_steps=2,
               resume=str(out.with_name("ohwx-checkpoints") / "step-000002"), **PIV)
    a, b = st.load_file(out), st.load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_layouts_round_trip_and_unknown_bundle_keys_stay_unknown():
    from sdlora.errors import SdloraError
    from sdlora.formats import embeddings as E

    g = torch.Generator().manual_seed(0)
    xl = {"te1": torch.randn(3, 8, generator=g), "te2": torch.randn(3, 12, generator=g)}
    one = {"te": torch.randn(2, 8, generator=g)}
    tensors = E.to_bundle({"ohwx": xl, "zqv": one}) | {"bundle_emb.odd.hypernet": torch.zeros(2)}
    assert sorted(tensors) == ["bundle_emb.odd.hypernet", "bundle_emb.ohwx.clip_g", "bundle_emb.ohwx.clip_l",
                               "bundle_emb.zqv.string_to_param.*"]
    rest, back = E.split_bundle(tensors)
    assert list(rest) == ["bundle_emb.odd.hypernet"]
    assert all(torch.equal(back["ohwx"][c], xl[c]) for c in xl) and torch.equal(back["zqv"]["te"], one["te"])
    assert a1111_shape(a1111_bundle(tensors)["ohwx"]) == (3, 20)
    assert sorted(E.to_file(xl)) == ["clip_g", "clip_l"] and list(E.to_file(one)) == ["emb_params"]
    assert torch.equal(E.from_file({"*": one["te"]})["te"], one["te"])  # a diffusers-style single tensor
    with pytest.raises(SdloraError, match="same token count"):
        E.split_bundle({"bundle_emb.x.clip_l": torch.zeros(2, 8), "bundle_emb.x.clip_g": torch.zeros(3, 12)})


def test_checkpoints_from_before_pivotal_still_resume():
    """The --pivotal settings define a run; a checkpoint written before they existed ran with their defaults."""
    from sdlora.train.ckpt import IDENTITY, _defaults

    new = ("pivotal", "pivotal_init", "pivotal_lr", "pivotal_steps")
    assert set(new) <= set(IDENTITY)
    assert {k: _defaults()[k] for k in new} == {"pivotal": 0, "pivotal_init": None, "pivotal_lr": 3e-4,
                                                "pivotal_steps": 0}
