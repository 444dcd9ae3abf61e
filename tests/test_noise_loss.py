"""The noise and loss options (issue 20, part 7): each timestep sampler against its density, Huber/smooth-L1 and
their schedules against kohya's formulas, zero-terminal SNR, multires noise, input perturbation, debiased
weighting, their metadata and one-line refusals, and that each option changes what a tiny training does."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from helpers import main_error, train_tiny
from safetensors import safe_open

from sdlora.archs import load_config
from sdlora.config import make_config
from sdlora.errors import SdloraError
from sdlora.train import losses as L
from sdlora.train import noise as N
from sdlora.train import timesteps as T
from sdlora.train.step import Batch, DiffusionObjective, FlowObjective, batch_loss, draw_noise, per_sample_loss

# ---- the densities, written here: σ = sigmoid(s·n), n ~ N(0, 1), then shifted by k


def logit_normal_pdf(u: torch.Tensor, s: float) -> torch.Tensor:
    logit = torch.log(u / (1 - u))
    return torch.exp(-logit ** 2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * u * (1 - u))


def shifted_pdf(x: torch.Tensor, s: float, k: float) -> torch.Tensor:
    """The density of kσ/(1 + (k - 1)σ): σ = x/(k - (k - 1)x), dσ/dx = k/(k - (k - 1)x)²."""
    d = k - (k - 1) * x
    return logit_normal_pdf(x / d, s) * k / d ** 2


def flux_k(h: int, w: int) -> float:
    tokens = (h // 2) * (w // 2)
    return math.exp(0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256))


BINS, N_DRAWS = 40, 200_000


def chi2(samples: torch.Tensor, pdf) -> float:
    """Pearson's χ² of `samples` over BINS equal bins of (0, 1) against `pdf`, each bin's probability integrated
    by the midpoint rule on 2,000 points."""
    edges = torch.linspace(0, 1, BINS + 1, dtype=torch.float64)
    fine = 2000
    mids = (torch.arange(BINS * fine, dtype=torch.float64) + 0.5) / (BINS * fine)
    p = pdf(mids).view(BINS, fine).sum(1) / (BINS * fine)
    assert abs(p.sum().item() - 1) < 1e-3  # the density integrates to 1 (the test's own check)
    counts = torch.histc(samples.double(), BINS, 0, 1)
    assert counts.sum().item() == len(samples) and edges[-1] == 1
    expected = p * len(samples)
    keep = expected >= 5
    return (((counts - expected) ** 2 / expected)[keep]).sum().item(), int(keep.sum()) - 1


def critical(df: int, z: float = 3.09) -> float:
    """χ² quantile at p = 0.999 (z = 3.09), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


SD3 = FlowMatchEulerDiscreteScheduler.from_config(load_config("sd3", "scheduler")).config  # shift 3
FLUX_DEV = FlowMatchEulerDiscreteScheduler.from_config(load_config("flux", "scheduler")).config  # dynamic shift
SHAPE = (N_DRAWS, 16, 40, 24)  # 20 × 12 = 240 image tokens
CASES = {  # kind, config, --sigmoid-scale, --discrete-flow-shift: the density, and one it must not match
    "uniform": ("uniform", SD3, 1.0, None, lambda x: torch.ones_like(x), lambda x: logit_normal_pdf(x, 1.0)),
    "sigmoid": ("sigmoid", SD3, 1.5, None, lambda x: logit_normal_pdf(x, 1.5), lambda x: logit_normal_pdf(x, 1.3)),
    "logit-normal sd3": ("logit-normal", SD3, 1.0, None, lambda x: shifted_pdf(x, 1.0, 3.0),
                         lambda x: shifted_pdf(x, 1.0, 2.7)),
    "logit-normal flux-dev": (None, FLUX_DEV, 1.0, None, lambda x: shifted_pdf(x, 1.0, flux_k(40, 24)),
                              lambda x: logit_normal_pdf(x, 1.0)),
    "shift": ("shift", SD3, 0.8, 2.0, lambda x: shifted_pdf(x, 0.8, 2.0), lambda x: shifted_pdf(x, 0.8, 2.3)),
    "shift default": ("shift", SD3, 1.0, None, lambda x: shifted_pdf(x, 1.0, 3.0), lambda x: shifted_pdf(x, 1, 2.5)),
    "flux-shift": ("flux-shift", SD3, 1.2, None, lambda x: shifted_pdf(x, 1.2, flux_k(40, 24)),
                   lambda x: shifted_pdf(x, 1.2, 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_timestep_sampler_draws_its_density(case):
    kind, config, scale, shift, pdf, wrong = CASES[case]
    sigma = T.draw(kind, torch.Size(SHAPE), torch.Generator().manual_seed(7), config, scale, shift)
    assert sigma.shape == (N_DRAWS,) and sigma.min() >= 0 and sigma.max() < 1
    stat, df = chi2(sigma, pdf)
    assert stat < critical(df), (case, stat, df)
    bad, df = chi2(sigma, wrong)  # the test tells a near miss apart
    assert bad > 3 * critical(df), (case, bad)


def test_the_default_sampling_is_what_sdlora_drew_before_and_flow_objectives_use_the_options():
    spec = SimpleNamespace(packed_latents=False, train_guidance=None)
    obj = FlowObjective(FlowMatchEulerDiscreteScheduler(shift=3.0), spec, SimpleNamespace())
    shape = torch.Size((64, 16, 8, 8))
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", 64, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(obj.timesteps(shape, torch.Generator().manual_seed(1)), 3 * u / (1 + 2 * u),
                               rtol=0, atol=0)
    obj.sampling, obj.flow_shift = "shift", 5.0
    torch.testing.assert_close(obj.timesteps(shape, torch.Generator().manual_seed(1)), 5 * u / (1 + 4 * u),
                               rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_a_runs_flow_objective_draws_as_its_sampling_says(arch):
    from sdlora import archs
    from sdlora.train import recipe

    sched = FlowMatchEulerDiscreteScheduler.from_config(load_config(arch, "scheduler"))
    shape = torch.Size((16, 16, 32, 24))
    runs = [({}, None, 1.0, None), ({"timestep_sampling": "flux-shift"}, "flux-shift", 1.0, None),
            ({"timestep_sampling": "shift", "discrete_flow_shift": 1.7, "sigmoid_scale": 0.5}, "shift", 0.5, 1.7)]
    for flags, kind, scale, shift in runs:
        cfg = make_config(dict(images="x", prompt="p") | flags)
        obj = recipe.objective(cfg, archs.get(arch), sched, SimpleNamespace(guidance_embeds=False), "flow")
        want = T.draw(kind, shape, torch.Generator().manual_seed(5), sched.config, scale, shift)
        assert torch.equal(obj.timesteps(shape, torch.Generator().manual_seed(5)), want)


# ---- losses


def test_huber_and_smooth_l1_are_kohyas_formulas_and_l2_is_the_square():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g) * 2, torch.randn(3, 4, 5, 5, generator=g)
    c = torch.tensor([0.05, 0.3, 1.0])
    d = pred - target
    cc = c.view(-1, 1, 1, 1)
    torch.testing.assert_close(L.elementwise(pred, target, "huber", c), 2 * cc * (torch.sqrt(d ** 2 + cc ** 2) - cc))
    torch.testing.assert_close(L.elementwise(pred, target, "smooth_l1", c), 2 * (torch.sqrt(d ** 2 + cc ** 2) - cc))
    torch.testing.assert_close(L.elementwise(pred, target, "l2"), d ** 2, rtol=0, atol=0)
    # the shape that names them: quadratic well below c, linear (2c|d|) well above
    small, big = torch.tensor([[1e-3]], dtype=torch.float64), torch.tensor([[1e3]], dtype=torch.float64)
    one = torch.tensor([0.1])
    assert L.elementwise(small, 0 * small, "huber", one).item() == pytest.approx(1e-6, rel=1e-3)
    assert L.elementwise(big, 0 * big, "huber", one).item() == pytest.approx(2 * 0.1 * 1e3, rel=1e-3)


def test_huber_schedules_follow_kohyas_formulas_on_ddpm_and_flow():
    sched = DDPMScheduler.from_config(load_config("sd15", "scheduler"))
    eps = DiffusionObjective(sched)
    t = torch.tensor([0, 100, 500, 999])
    acp = sched.alphas_cumprod[t].double()
    c, scale = 0.2, 1.5
    opts = dict(kind="huber", huber_c=c, huber_scale=scale)
    snr = L.huber_threshold(L.LossOptions(**opts, huber_schedule="snr"), eps, t)
    torch.testing.assert_close(snr.double(), (1 - c) / (1 + ((1 - acp) / acp).sqrt()) ** 2 + c)
    exp_ = L.huber_threshold(L.LossOptions(**opts, huber_schedule="exponential"), eps, t)
    torch.testing.assert_close(exp_.double(), torch.exp(-(-math.log(c) / 1000) * t.double()) * scale)
    const = L.huber_threshold(L.LossOptions(**opts, huber_schedule="constant"), eps, t)
    assert const.tolist() == pytest.approx([c * scale] * 4)
    flow = FlowObjective(FlowMatchEulerDiscreteScheduler(shift=3.0), SimpleNamespace(packed_latents=False,
                                                                                      train_guidance=None), None)
    s = torch.tensor([0.0, 0.25, 0.5, 0.9])
    torch.testing.assert_close(L.huber_threshold(L.LossOptions(**opts, huber_schedule="snr"), flow, s),
                               (1 - c) / (1 + s / (1 - s)) ** 2 + c)
    torch.testing.assert_close(L.huber_threshold(L.LossOptions(**opts, huber_schedule="exponential"), flow, s),
                               scale * c ** s)


def test_a_per_element_weight_multiplies_in_and_all_ones_changes_nothing():
    eps = DiffusionObjective(DDPMScheduler.from_config(load_config("sd15", "scheduler")))
    g = torch.Generator().manual_seed(1)
    pred, target, t = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g), torch.tensor([3, 900])
    for opts in (L.L2, L.LossOptions(kind="huber"), L.LossOptions(kind="smooth_l1", huber_schedule="constant")):
        plain = L.per_sample(pred, target, opts, eps, t)
        assert torch.equal(L.per_sample(pred, target, opts, eps, t, torch.ones(2, 1, 6, 6)), plain)
        half = torch.zeros(2, 1, 6, 6)
        half[..., :3] = 1
        c = L.huber_threshold(opts, eps, t) if opts.kind != "l2" else None
        want = L.elementwise(pred, target, opts.kind, c)[..., :3].mean(dim=(1, 2, 3)) / 2
        torch.testing.assert_close(L.per_sample(pred, target, opts, eps, t, half), want)


def test_debiased_weights_are_kohyas_formula_with_the_snr_capped():
    t = torch.tensor([0, 1, 10, 300, 999])
    for arch, pred in (("sd15", "epsilon"), ("sd21", "v_prediction"), ("sdxl", "epsilon")):
        sched = DDPMScheduler.from_config(load_config(arch, "scheduler"))
        assert sched.config.prediction_type == pred
        acp = sched.alphas_cumprod[t].double()
        snr = torch.clamp(acp / (1 - acp), max=1000)
        want = 1 / (snr + 1) if pred == "v_prediction" else 1 / snr.sqrt()
        torch.testing.assert_close(L.debiased_weights(DiffusionObjective(sched), t).double(), want, rtol=1e-5, atol=0)


def test_batch_loss_applies_the_objectives_loss_and_debiased_weights():
    class Zero(torch.nn.Module):  # predicts 0: the ε target is the noise itself
        def forward(self, x, t, cond, added_cond_kwargs=None):
            return SimpleNamespace(sample=torch.zeros_like(x))

    obj = DiffusionObjective(DDPMScheduler.from_config(load_config("sd15", "scheduler")))
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([5, 700])
    batch = [Batch(latents, torch.zeros(2, 1, 1), None, noise, t, n_instance=2)]
    obj.loss = L.LossOptions(kind="huber", huber_schedule="constant", huber_c=0.5, debiased=True)
    per = (2 * 0.5 * (torch.sqrt(noise ** 2 + 0.25) - 0.5)).mean(dim=(1, 2, 3))
    acp = obj.scheduler.alphas_cumprod[t]
    torch.testing.assert_close(batch_loss(Zero(), obj, batch), (per * (1 - acp).sqrt() / acp.sqrt()).mean())


# ---- noise


def test_zero_terminal_snr_ends_the_schedule_in_pure_noise():
    sched = DDPMScheduler.from_config(load_config("sd21", "scheduler"))
    z = N.zero_terminal_snr(sched)
    assert z.alphas_cumprod[-1].item() == 0 and sched.alphas_cumprod[-1].item() > 1e-3
    torch.testing.assert_close(z.alphas_cumprod[0], sched.alphas_cumprod[0])  # the first step keeps its level
    assert (z.alphas_cumprod[1:] < z.alphas_cumprod[:-1]).all()  # still decreasing
    x0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(z.add_noise(x0, eps, torch.tensor([999])), eps)  # the last step is the noise alone


def test_multires_noise_statistics():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 4, 64, 64, generator=g)
    out = N.pyramid(noise, torch.Generator().manual_seed(1), 6, 0.3)
    assert out.std().item() == pytest.approx(1, abs=1e-5) and abs(out.mean().item()) < 0.01

    def lag1(x):  # correlation of horizontally adjacent values
        a, b = x[..., :-1].flatten(), x[..., 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    def dc(x):  # variance of each (sample, channel) map's mean: 1/(H·W) for white noise
        return x.mean(dim=(2, 3)).var().item() * 64 * 64

    # white noise: no correlation between neighbours, map means of variance 1/(H·W); kohya's level 0 is a second
    # full-size noise, so the coarse levels (weights discount^i, i >= 1) meet a white variance of 2
    assert abs(lag1(noise)) < 0.005 and 0.7 < dc(noise) < 1.3
    strong = N.pyramid(noise, torch.Generator().manual_seed(1), 6, 0.8)
    weak = N.pyramid(noise, torch.Generator().manual_seed(1), 6, 0.1)
    assert 0.2 < lag1(strong) < 0.35 and dc(strong) > 100  # the low frequencies carry far more energy
    assert 0.01 < lag1(out) < 0.03 and 0.0005 < lag1(weak) < 0.003  # and less as the discount falls
    assert dc(weak) < dc(out) < dc(strong)
    # one level is a second full-size noise (kohya's level 0), then unit variance
    g2 = torch.Generator().manual_seed(1)
    torch.rand((), generator=g2)
    both = noise + torch.randn(noise.shape, generator=g2)
    torch.testing.assert_close(N.pyramid(noise, torch.Generator().manual_seed(1), 1, 0.3), both / both.std())


def test_input_perturbation_noises_the_input_and_keeps_the_target():
    obj = DiffusionObjective(DDPMScheduler.from_config(load_config("sd15", "scheduler")))
    latents = torch.zeros(8, 4, 16, 16)
    plain, t0, none = draw_noise(latents, obj, torch.Generator().manual_seed(3))
    obj.noise = N.NoiseOptions(ip_gamma=0.1)
    noise, t, given = draw_noise(latents, obj, torch.Generator().manual_seed(3))
    assert none is None and torch.equal(noise, plain)
    g = torch.Generator().manual_seed(3)
    torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(given, noise + 0.1 * torch.randn(latents.shape, generator=g), rtol=0, atol=0)

    class Echo(torch.nn.Module):  # predicts its input: the loss shows what the input was
        def forward(self, x, t, cond, added_cond_kwargs=None):
            return SimpleNamespace(sample=x)

    t = torch.full((8,), 999)
    got = per_sample_loss(Echo(), obj, latents, None, noise, t, input_noise=given)
    want = (obj.scheduler.add_noise(latents, given, t) - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want)


# ---- the options in a run: refusals, metadata, and what they change


@pytest.mark.parametrize("flags,says", [
    (["--loss", "huber", "--huber-c", "0"], "--huber-c must be in (0, 1]"),
    (["--loss", "huber", "--huber-c", "2", "--huber-schedule", "exponential"], "--huber-c must be in (0, 1]"),
    (["--huber-c", "0.2"], "--huber-c applies to --loss huber or smooth_l1"),
    (["--multires-noise-discount", "0.5"], "--multires-noise-discount has no effect without"),
    (["--multires-noise-iterations", "30"], "--multires-noise-iterations must be between 0 (off) and 20"),
    (["--ip-noise-gamma", "-0.1"], "--ip-noise-gamma must be between 0"),
    (["--timestep-sampling", "uniform", "--sigmoid-scale", "2"], "--sigmoid-scale has no effect"),
    (["--discrete-flow-shift", "2"], "--discrete-flow-shift applies to --timestep-sampling shift"),
])
def test_bad_values_are_refused_in_one_line(capsys, flags, says):
    err = main_error(capsys, "train", "--images", "x", "--prompt", "p", *flags)
    assert says in err


@pytest.mark.parametrize("model,flags,says", [
    ("tiny", {"timestep_sampling": "shift"}, "--timestep-sampling is for rectified-flow models"),
    ("tiny", {"sigmoid_scale": 2.0}, "--sigmoid-scale is for rectified-flow models"),
    ("tiny", {"zero_terminal_snr": True}, "--zero-terminal-snr needs a v-prediction model"),
    ("tiny-sd3", {"zero_terminal_snr": True}, "--zero-terminal-snr is for ε/v-prediction models"),
    ("tiny-sd3", {"debiased_estimation": True}, "--debiased-estimation is for ε/v-prediction models"),
])
def test_options_a_family_cannot_train_are_refused_before_any_step(tmp_path, model, flags, says):
    with pytest.raises(SdloraError, match=r"^" + says.replace("(", r"\(").replace("/", ".")) as e:
        train_tiny(tmp_path / "x.safetensors", model=model, steps=1, **flags)
    assert "\n" not in str(e.value) and "drop" in str(e.value)


def _md(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _weights(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _differs(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return any(not torch.equal(wa[k], wb[k]) for k in wa)


EPS_OPTIONS = {  # tiny SD 1.x (ε): each option alone
    "huber": dict(loss="huber"), "smooth_l1": dict(loss="smooth_l1", huber_schedule="exponential"),
    "debiased": dict(debiased_estimation=True), "multires": dict(multires_noise_iterations=4),
    "ip_noise": dict(ip_noise_gamma=0.1),
}
RUN = dict(steps=2, no_eval_loss=True, lr=1e-2)


@pytest.mark.slow
def test_each_eps_option_changes_a_tiny_training_and_is_recorded_as_kohya_does(trained_adapter):
    base = trained_adapter("plain", **RUN)
    md = _md(base.path)
    assert (md["ss_loss_type"], md["ss_huber_schedule"], md["ss_huber_c"], md["ss_zero_terminal_snr"],
            md["ss_debiased_estimation"], md["ss_multires_noise_iterations"], md["ss_ip_noise_gamma"]) == (
        "l2", "snr", "0.1", "False", "False", "None", "None")
    assert "ss_timestep_sampling" not in md  # a flow-model key
    for name, opts in EPS_OPTIONS.items():
        r = trained_adapter(name, **RUN, **opts)
        assert _differs(base.path, r.path), name
        md = _md(r.path)
        want = {"huber": {"ss_loss_type": "huber"}, "smooth_l1": {"ss_loss_type": "smooth_l1",
                                                                 "ss_huber_schedule": "exponential"},
                "debiased": {"ss_debiased_estimation": "True"}, "multires": {"ss_multires_noise_iterations": "4",
                                                                             "ss_multires_noise_discount": "0.3"},
                "ip_noise": {"ss_ip_noise_gamma": "0.1"}}[name]
        assert {k: md[k] for k in want} == want, name


@pytest.mark.slow
def test_eps_options_together_change_a_tiny_sdxl_training(tmp_path):
    run = dict(model="tiny-sdxl", steps=1, no_eval_loss=True, no_text_encoder=True, lr=1e-2)
    a = train_tiny(tmp_path / "a.safetensors", **run)
    b = train_tiny(tmp_path / "b.safetensors", loss="smooth_l1", huber_schedule="constant", huber_c=0.3,
                   debiased_estimation=True, multires_noise_iterations=6, multires_noise_discount=0.5,
                   ip_noise_gamma=0.1, **run)
    assert _differs(a.path, b.path)
    md = _md(b.path)
    assert (md["ss_loss_type"], md["ss_huber_schedule"], md["ss_huber_c"], md["ss_debiased_estimation"],
            md["ss_multires_noise_discount"]) == ("smooth_l1", "constant", "0.3", "True", "0.5")


@pytest.mark.slow
def test_zero_terminal_snr_changes_a_v_prediction_training(tmp_path):
    a = train_tiny(tmp_path / "a.safetensors", model="tiny-sd2", **RUN)
    b = train_tiny(tmp_path / "b.safetensors", model="tiny-sd2", zero_terminal_snr=True, debiased_estimation=True,
                   **RUN)
    assert _differs(a.path, b.path)
    assert b.model.noise_scheduler.alphas_cumprod[-1] > 0  # the model's own schedule (for sampling) is untouched
    md = _md(b.path)
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_debiased_estimation"] == "True"


@pytest.mark.slow
def test_timestep_sampling_changes_a_flow_training_and_is_recorded(tmp_path):
    run = dict(model="tiny-sd3", steps=1, no_eval_loss=True, no_text_encoder=True, lr=1e-2)
    a = train_tiny(tmp_path / "a.safetensors", **run)
    b = train_tiny(tmp_path / "b.safetensors", timestep_sampling="shift", discrete_flow_shift=1.5, sigmoid_scale=2.0,
                   **run)
    assert _differs(a.path, b.path)
    ma, mb = _md(a.path), _md(b.path)
    assert (ma["ss_timestep_sampling"], ma["ss_sigmoid_scale"], ma["ss_discrete_flow_shift"]) == (
        "logit_normal", "1.0", "None")
    assert (mb["ss_timestep_sampling"], mb["ss_sigmoid_scale"], mb["ss_discrete_flow_shift"]) == (
        "shift", "2.0", "1.5")
    assert make_config(dict(images="x", prompt="p", timestep_sampling="flux-shift")).timestep_sampling == "flux-shift"


@pytest.mark.slow
def test_resume_holds_the_recipe_and_older_checkpoints_ran_with_the_defaults(tmp_path):
    import json

    from sdlora.train import ckpt

    out = tmp_path / "r.safetensors"
    train_tiny(out, steps=2, save_every=1, no_eval_loss=True)
    manifest = ckpt.checkpoint_root(out) / "step-000001" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["identity"]["loss"] == "l2" and m["identity"]["multires_noise_iterations"] == 0
    with pytest.raises(SdloraError, match=r"settings differ \(loss: checkpoint 'l2', now 'huber'\)"):
        train_tiny(out, steps=2, resume="latest", loss="huber", no_eval_loss=True)
    for k in ("loss", "huber_c", "multires_noise_iterations", "timestep_sampling"):  # as sdlora before them wrote it
        del m["identity"][k]
    manifest.write_text(json.dumps(m))
    assert train_tiny(out, steps=2, resume="latest", no_eval_loss=True).steps == 2
