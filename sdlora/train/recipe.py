"""A run's noise and loss recipe (issue 20): the objective of the base model's family with the config's noise
options (noise.py), loss options (losses.py) and, for rectified flow, its timestep sampling (timesteps.py); and the
options a family cannot train, refused in one line before any work."""

from __future__ import annotations

from sdlora.errors import SdloraError
from sdlora.train import losses as L
from sdlora.train import noise as N
from sdlora.train import step as S

FLOW_ONLY = ("timestep_sampling", "discrete_flow_shift")  # and --sigmoid-scale other than 1
DIFFUSION_ONLY = ("zero_terminal_snr", "debiased_estimation")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(cfg, spec, prediction_type: str) -> None:
    """Refuse what the family (`spec`, trained as `prediction_type`) cannot train with this recipe."""
    flow = spec.objective == "flow"
    given = [f for f in (DIFFUSION_ONLY if flow else FLOW_ONLY) if getattr(cfg, f)]
    if not flow and cfg.sigmoid_scale != 1:
        given.append("sigmoid_scale")
    if given:
        kind = ("ε/v-prediction models (a DDPM noise schedule)" if flow else
                "rectified-flow models (SD 3.x, FLUX.1)")
        raise SdloraError(f"{_flag(given[0])} is for {kind}; {spec.label} trains "
                          f"{'with rectified flow' if flow else 'with ' + prediction_type}: drop {_flag(given[0])}")
    if cfg.zero_terminal_snr and prediction_type != "v_prediction":
        raise SdloraError(f"--zero-terminal-snr needs a v-prediction model (at the last step the input is pure noise, "
                          f"which an ε-model cannot denoise from; Lin et al. 2023); {spec.label} here predicts "
                          f"{prediction_type}: drop --zero-terminal-snr or use a v-prediction model")


def objective(cfg, spec, noise_scheduler, denoiser_config, prediction_type: str):
    """The family's training objective with the run's noise and loss options (checked first)."""
    check(cfg, spec, prediction_type)
    if cfg.zero_terminal_snr:
        noise_scheduler = N.zero_terminal_snr(noise_scheduler)
    obj = S.objective_for(spec, noise_scheduler, denoiser_config)
    obj.noise, obj.loss = N.NoiseOptions.of(cfg), L.LossOptions.of(cfg)
    if spec.objective == "flow":
        obj.sampling, obj.sigmoid_scale, obj.flow_shift = (cfg.timestep_sampling, cfg.sigmoid_scale,
                                                           cfg.discrete_flow_shift)
    return obj
