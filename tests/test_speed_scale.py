"""Speed and scale options of `sdlora train` on the built-in tiny model: --compile, --attention, --channels-last,
the deferred loss read-back (NaN still stops the run), the effective-batch log line, the FSDP config (refused on
CPU, where accelerate cannot shard), and benchmarks/gpu_check.py's CPU modes. Speed numbers are not tested here:
benchmarks/bench_train.py --configs no no+compile ... prints them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.formats.file_io import load
from tests.helpers import ROOT, make_images, sub_env, train_tiny

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
pytestmark = pytest.mark.usefixtures("cache_dir")


def assert_close_adapters(a: Path, b: Path, atol: float) -> None:
    sa, sb = load(a)[0], load(b)[0]
    assert sa.keys() == sb.keys()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert worst <= atol, f"largest difference {worst:.3g} > {atol:g}"
    assert sum(t.abs().sum() for k, t in sa.items() if "lora_up" in k) > 0  # trained, not the zero init


# ---------------------------------------------------------------- --compile

# inductor generates and compiles C++ kernels for the whole UNet: about 3 minutes on 2 cores with a cold cache, a
# fifth of the suite; it runs with SDLORA_SLOW_TESTS=1. aot_eager runs the same path (accelerate's dynamo plugin,
# graph capture of the PEFT-wrapped UNet, AOTAutograd's forward/backward split) in seconds, in every run.
BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("SDLORA_SLOW_TESTS") else [])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_run_trains_the_same_adapter_as_the_eager_run(tmp_path, backend, trained_adapter):
    # UNet only and no eval loss: one graph (forward + backward) to compile
    kw = dict(steps=2, no_text_encoder=True, no_eval_loss=True)
    eager = trained_adapter("eager", **kw)
    compiled = train_tiny(tmp_path / "compiled.safetensors", compile=True, compile_backend=backend, **kw)
    assert compiled.steps == eager.steps == 2
    assert_close_adapters(eager.path, compiled.path, atol=1e-5)


@pytest.mark.slow
@pytest.mark.subprocess
def test_compile_without_a_cxx_compiler_is_refused_in_one_line_before_the_model_loads(tmp_path, cache_dir):
    images = make_images(tmp_path / "imgs", 1, (64, 64))
    p = subprocess.run([sys.executable, "-m", "sdlora", "train", "--model", "tiny", "--images", str(images),
                        "--prompt", "sks dog", "--steps", "1", "--compile", "--out", str(tmp_path / "x.safetensors")],
                       cwd=ROOT, env=sub_env(cache_dir, CXX=str(tmp_path / "no-such-g++")), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]  # sdlora's exit status for a refused setting
    errors = [line for line in p.stderr.splitlines() if line.startswith("sdlora: error:")]
    assert len(errors) == 1 and "--compile on CPU needs a C++ compiler" in errors[0], p.stderr[-2000:]
    assert "install one" in errors[0] and "without --compile" in errors[0]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- attention, channels-last

@pytest.mark.xdist_group("speed-default")
@pytest.mark.parametrize("option", [{"attention": "math"}, {"attention": "eager"}, {"attention": "flash"},
                                    {"channels_last": True}], ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.slow
def test_speed_options_train_the_same_adapter_as_the_default(tmp_path, option, trained_adapter):
    kw = dict(steps=2, no_eval_loss=True)
    default = trained_adapter("default", **kw)  # trained once, shared by the options (one xdist worker)
    other = train_tiny(tmp_path / "other.safetensors", **kw, **option)
    assert_close_adapters(default.path, other.path, atol=1e-4)


def test_gpu_only_attention_kernels_are_refused_on_cpu(tmp_path):
    for name in ("efficient", "cudnn", "xformers"):
        with pytest.raises(SdloraError, match=f"--attention {name} needs"):
            train_tiny(tmp_path / f"{name}.safetensors", steps=1, attention=name)


def test_unknown_attention_is_refused_by_the_config():
    from sdlora.config import make_config

    with pytest.raises(SdloraError, match="--attention must be one of sdpa, flash"):
        make_config(dict(images=str(ROOT / "datasets" / "dog"), prompt="sks dog", attention="sage"))


# ---------------------------------------------------------------- the loop's read-back of losses

@pytest.mark.slow
def test_a_diverging_run_still_stops_on_the_first_non_finite_loss_and_saves_nothing(tmp_path):
    # losses are read from the device every few steps, not every step; a NaN/Inf is still reported with its step
    # and stops the run before the adapter is written
    out = tmp_path / "nan.safetensors"
    with pytest.raises(SdloraError, match=r"loss became (nan|inf) at step \d+; the adapter was not saved"):
        train_tiny(out, steps=6, lr=1e30, max_grad_norm=0.0, no_eval_loss=True)
    assert not out.exists()


def test_the_log_states_the_effective_batch_and_that_the_lr_is_not_scaled(tmp_path):
    from sdlora.config import make_config
    from sdlora.train.loop import train

    lines = []
    train(make_config(dict(images=str(ROOT / "datasets" / "dog"), prompt="sks dog", model="tiny", steps=1,
                           batch_size=2, grad_accum=3, lr=1e-3, no_eval_loss=True,
                           out=str(tmp_path / "a.safetensors"))), log=lines.append)
    assert ("effective batch: 2 × 3 accumulation × 1 processes = 6 instance images per optimizer step; "
            "lr 0.001 as given, not scaled with the batch or process count") in lines


# ---------------------------------------------------------------- FSDP

FSDP_CONFIG = ROOT / "configs" / "accelerate-fsdp.yaml"


@pytest.mark.parametrize("config,model", [("accelerate-fsdp.yaml", "tiny"), ("accelerate-fsdp-flux.yaml", "tiny-flux"),
                                          ("accelerate-fsdp-sd3.yaml", "tiny-sd3")])
def test_the_fsdp_configs_are_accelerate_fsdp2_configs_wrapping_blocks_of_their_model(config, model):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(ROOT / "configs" / config))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.mixed_precision == "bf16"
    assert cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    from sdlora.models import load_base

    classes = {type(m).__name__ for m in load_base(model).denoiser.modules()}
    assert set(cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")) <= classes


@pytest.mark.slow
@pytest.mark.subprocess
def test_fsdp_on_cpu_is_refused_in_one_line_per_process(tmp_path, cache_dir):
    # accelerate runs FSDP on GPUs only: on CPU its state silently becomes plain multi-process (MULTI_CPU); sdlora
    # says so instead of training unsharded
    images = make_images(tmp_path / "imgs", 2, (64, 64))
    p = subprocess.run([*ACCELERATE, "--config_file", str(FSDP_CONFIG), "--main_process_port", "0", "-m", "sdlora",
                        "train", "--model", "tiny", "--images", str(images), "--prompt", "sks dog", "--steps", "1",
                        "--no-text-encoder", "--out", str(tmp_path / "f.safetensors")],
                       cwd=ROOT, env=sub_env(cache_dir, ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    output = p.stdout + p.stderr  # both processes write to the same pipes: lines may interleave
    assert "sdlora: error: the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only (here: " \
           "MULTI_CPU on cpu)" in output, output[-3000:]
    assert not (tmp_path / "f.safetensors").exists()


# ---------------------------------------------------------------- benchmarks/gpu_check.py

GPU_CHECK = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]


@pytest.mark.subprocess
def test_gpu_check_dry_run_lists_every_row_without_torch_work(tmp_path):
    out = tmp_path / "plan.md"
    p = subprocess.run([*GPU_CHECK, "--dry-run", "--out", str(out)], cwd=ROOT, env=sub_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    table = out.read_text(encoding="utf-8")
    for row in ("sd15 512px b1", "sd15 512px b4 gc", "sdxl 1024px b4", "sd15 b1 adamw8bit", "sd15 b1 schedulefree",
                "preset subject-sdxl-12gb", "sd15 b4 compile", "sd15 b4 attention efficient",
                "flux 1024px b1 gc swap 28", "sd35m 1024px b1 gc swap 12", "preset subject-flux-dev-8gb",
                "preset subject-sd35l-12gb", "preset subject-sdxl-8gb"):
        assert f"| {row} |" in table
    assert table in p.stdout + "\n"


@pytest.mark.slow
@pytest.mark.subprocess
def test_gpu_check_quick_cpu_run_prints_and_writes_a_table_within_its_budget(tmp_path):
    out = tmp_path / "check.md"
    p = subprocess.run([*GPU_CHECK, "--device", "cpu", "--quick", "--budget-s", "5", "--out", str(out)], cwd=ROOT,
                       env=sub_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    table = out.read_text(encoding="utf-8")
    assert table.startswith("## gpu_check: CPU") and "| row | it/s | peak | reserved | s total | note |" in table
    rows = {line.split("|")[1].strip(): line
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["tiny 64px b1"].rstrip().endswith("| ok |"), rows["tiny 64px b1"]
    assert any("skipped: budget" in r for r in rows.values())  # 5 s cannot hold every row: the rest are listed
    assert all(("| ok |" in r) or ("skipped" in r) or ("failed:" in r) for k, r in rows.items() if k != "row")
    assert table in p.stdout


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_on_a_machine_without_cuda_says_so_and_measures_nothing(tmp_path):
    out = tmp_path / "check.md"
    p = subprocess.run([*GPU_CHECK, "--out", str(out)], cwd=ROOT, env=sub_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no CUDA GPU here" in p.stdout and "--device cpu --quick" in p.stdout
    assert not out.exists()


AVERAGE_SCRIPT = '''
import torch
from accelerate import Accelerator
from sdlora.train.scale import average_gradients

acc = Accelerator()  # as the loop sets processes up (reads ACCELERATE_USE_CPU)
rank = acc.process_index
params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1))]
params[0].grad = torch.full((3,), float(rank))
params[1].grad = torch.arange(4.0).view(2, 2) * (rank + 1)
average_gradients(params)  # params[2] has no gradient: skipped
assert torch.equal(params[0].grad, torch.full((3,), 0.5)), params[0].grad
assert torch.equal(params[1].grad, torch.arange(4.0).view(2, 2) * 1.5), params[1].grad
assert params[2].grad is None
print(f"averaged on rank {rank}", flush=True)  # one write: the two processes share the pipe
acc.wait_for_everyone()
acc.end_training()  # destroys the process group: gloo's threads must not outlive the interpreter (SIGABRT)
'''


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_whole_lora_weights_gradients_are_averaged_across_real_processes(tmp_path, cache_dir):
    # under FSDP the LoRA weights are not sharded, so FSDP does not reduce their gradients: scale.average_gradients
    # does, in one all-reduce (here two CPU processes over gloo)
    script = tmp_path / "average.py"
    script.write_text(AVERAGE_SCRIPT, encoding="utf-8")
    p = subprocess.run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                        "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script)],
                       cwd=ROOT, env=sub_env(cache_dir, ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert sorted(re.findall(r"averaged on rank (\d)", p.stdout)) == ["0", "1"], p.stdout
