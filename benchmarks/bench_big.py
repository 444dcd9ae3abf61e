"""Full-size FLUX.1-dev and SD 3.5 Large on this machine's memory: write the models (random weights, real shapes)
to disk without ever holding them, then train 2 steps with a quantised base and measure peak RSS, load time and
s/step. Not a test: numbers for benchmarks/RESULTS.md.

    python benchmarks/bench_big.py write flux-folder     # diffusers folder, bf16, shards <= 2 GB (34 GB)
    python benchmarks/bench_big.py write flux-files      # flux1-dev fp8 + clip_l + t5xxl_fp8_e4m3fn + ae (17 GB)
    python benchmarks/bench_big.py write sd35-folder     # SD 3.5 Large folder (T5 shards hard-linked from FLUX's)
    python benchmarks/bench_big.py run flux-folder nf4   # sdlora train ... under /usr/bin/time -v; one table row
    python benchmarks/bench_big.py delete flux-folder

Models go to $SDLORA_BENCH_MODELS (default /work/bench-models), never the repository. Every tensor is made when
it is written and dropped right after: a folder's shards (<= 2 GB each) are written one at a time with
safetensors' `save_file`; a single file, which `save_file` can only write from a dict holding every tensor, is
written by hand in the safetensors format (8-byte header length, JSON header of dtypes/shapes/offsets, then the
bytes in order), its header computed from the shapes first. Weights are random, scaled 1/sqrt(fan-in) (norm scales
1, biases 0) so that 57 blocks of activations stay finite; they come from one pool of normal numbers, sliced at
a per-tensor offset, for speed (writing 12 B values from a fresh generator each would take minutes more).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdlora import archs  # noqa: E402
from sdlora.formats import dit  # noqa: E402

MODELS = Path(os.environ.get("SDLORA_BENCH_MODELS", "/work/bench-models"))
SHARD = 2 * 10**9
_POOL = None
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def pool() -> torch.Tensor:
    global _POOL
    if _POOL is None:
        _POOL = torch.randn(1 << 26, generator=torch.Generator().manual_seed(0))
    return _POOL


def make(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor of `shape`: weights ~ N(0, 1/fan-in), norm scales 1, biases 0."""
    n = 1
    for s in shape:
        n *= s
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) < 2:
        if leaf == "bias":
            return torch.zeros(shape, dtype=dtype)
        return torch.ones(shape, dtype=dtype) if "norm" in name or "ln_" in name or leaf == "scale" else \
            torch.full(shape, 0.02).to(dtype)
    fan_in = n // shape[0]
    p = pool()
    start = zlib.crc32(name.encode()) % (len(p) - 1)
    reps = -(-(start + n) // len(p))
    flat = (p.repeat(reps) if reps > 1 else p)[start:start + n]
    return (flat * (1.0 / fan_in ** 0.5)).to(dtype).reshape(shape)


# ---------------------------------------------------------------- writers


def write_streaming(path: Path, entries: list[tuple[str, tuple, torch.dtype]], metadata: dict | None = None,
                    produce=make) -> int:
    """Write one .safetensors file tensor by tensor: the header from `entries` (name, shape, dtype) first, then
    each tensor made by `produce(name, shape, dtype)`, written, and dropped. The format: u64 little-endian header
    length, the JSON header (padded with spaces to 8 bytes), the tensors' bytes at their offsets."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            t = produce(name, shape, dtype).contiguous()
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
    tmp.replace(path)
    return offset


def write_sharded(folder: Path, entries, stem: str, index_name: str, dtype_of) -> None:
    """A diffusers/transformers component's weights as shards of at most SHARD bytes, one shard in memory at a time
    (safetensors' own `save_file`), with the index file `from_pretrained` reads."""
    from safetensors.torch import save_file

    groups, cur, size = [], [], 0
    for name, shape in entries:
        n = dtype_of(name, shape).itemsize
        for s in shape:
            n *= s
        if cur and size + n > SHARD:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else f"{stem}.safetensors"
        tensors = {name: make(name, shape, dtype_of(name, shape)) for name, shape in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / fname), {"format": "pt"})
        del tensors
        weight_map |= {name: fname for name, _ in group}
    if len(groups) > 1:
        (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def _bf16(_name, _shape):
    return torch.bfloat16


def _config_of(arch: str, attr: str, variant: str = "") -> dict:
    return archs.load_config(arch, attr + (f"_{variant}" if variant else ""))


def write_component(root: Path, arch: str, attr: str, variant: str = "", link_from: Path | None = None,
                    override: dict | None = None) -> None:
    """One component of a diffusers folder: config.json and shards of its meta model's parameters (bf16; the VAE
    fp32). `link_from`: an identical component folder whose files are hard-linked instead (T5-XXL)."""
    sub = root / attr
    sub.mkdir(parents=True, exist_ok=True)
    if link_from is not None:
        for f in link_from.iterdir():
            if not (sub / f.name).exists():
                os.link(f, sub / f.name)
        return
    cfg = _config_of(arch, attr, variant) | (override or {})
    (sub / "config.json").write_text(json.dumps(cfg, indent=2))
    with torch.device("meta"):
        model = archs.build(cfg)
    persistent = set(model.state_dict())
    entries = [(n, tuple(p.shape)) for n, p in [*model.named_parameters(), *model.named_buffers()] if n in persistent]
    diffusers_part = "_class_name" in cfg
    write_sharded(sub, entries, "diffusion_pytorch_model" if diffusers_part else "model",
                  ("diffusion_pytorch_model" if diffusers_part else "model") + ".safetensors.index.json",
                  (lambda n, s: torch.float32) if attr == "vae" else _bf16)


def write_tokenizers(root: Path, spec) -> dict:
    """Tokenizers as sdlora builds them offline: CLIP's from the shipped BPE file; for T5-XXL (whose tokenizer
    sdlora does not ship) the tiny character-level one, whose ids all lie inside T5's vocabulary."""
    from sdlora.archs.clip_tokenizer import clip_tokenizer
    from sdlora.tiny import tiny_tokenizer

    index = {}
    for t in spec.text_encoders:
        tok = tiny_tokenizer() if t.kind == "t5" else clip_tokenizer(t.pad_token)
        tok.save_pretrained(str(root / t.tokenizer_attr))
        index[t.tokenizer_attr] = ["transformers", type(tok).__name__]
    return index


def write_folder(root: Path, arch: str, variant: str = "", t5_from: Path | None = None) -> None:
    spec = archs.get(arch)
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": spec.pipeline, "_diffusers_version": "0.42.1"}
    for attr in [spec.denoiser, *(t.attr for t in spec.text_encoders), "vae"]:
        t5 = any(t.attr == attr and t.kind == "t5" for t in spec.text_encoders)
        write_component(root, arch, attr, variant if attr == spec.denoiser else "",
                        t5_from if t5 and t5_from else None)
        cls = _config_of(arch, attr, variant if attr == spec.denoiser else "")
        index[attr] = ["diffusers", cls["_class_name"]] if "_class_name" in cls else ["transformers",
                                                                                      cls["architectures"][0]]
        print(f"  {attr} written", flush=True)
    index |= write_tokenizers(root, spec)
    (root / "scheduler").mkdir(exist_ok=True)
    sched = _config_of(arch, "scheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    index["scheduler"] = ["diffusers", sched["_class_name"]]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def write_shallow(root: Path, full: Path, arch: str = "flux", depth: dict | None = None) -> None:
    """The full-width model with a few blocks (`depth`, FLUX: 2 double + 4 single): its text encoders, VAE and
    tokenizers hard-linked from the full folder `full`. Every per-phase memory figure of the full run but the
    transformer's own (which grows per block, linearly) shows in minutes instead of an hour."""
    import shutil

    shutil.copytree(full, root, copy_function=os.link, ignore=shutil.ignore_patterns("transformer"))
    write_component(root, arch, "transformer", override=depth or {"num_layers": 2, "num_single_layers": 4})


def original_entries(arch: str, variant: str, fp8: bool) -> list[tuple[str, tuple, torch.dtype]]:
    """The tensors of a BFL / SAI single file of the real-size transformer (names by `dit.tensor_sources`, read
    backwards): fused weights whole, matrices fp8 e4m3fn as the shared fp8 files have them (`fp8`), else bf16."""
    cfg = _config_of(arch, "transformer", variant)
    with torch.device("meta"):
        model = archs.build(cfg)
    shapes = dict((n, p.shape) for n, p in [*model.named_parameters(), *model.named_buffers()])
    rows: dict[str, list] = {}
    for name, pieces in dit.tensor_sources(arch, model).items():
        for orig, a, b in pieces:
            n = shapes[name][0] if a is None else b
            r = rows.setdefault(orig, [0, tuple(shapes[name][1:])])
            r[0] = max(r[0], n)
    out = []
    for orig, (n, rest) in rows.items():
        shape = (n, *rest)
        dtype = torch.float8_e4m3fn if fp8 and len(shape) >= 2 else torch.bfloat16
        out.append(((("model.diffusion_model." if arch == "sd3" else "") + orig), shape, dtype))
    return out


def hf_entries(arch: str, attr: str, prefix: str, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """A text encoder's tensors in transformers' own layout (CLIP with ComfyUI's `text_model.` level)."""
    with torch.device("meta"):
        model = archs.build(_config_of(arch, attr))
    level = "text_model." if type(model).__name__ == "CLIPTextModel" else ""
    return [(prefix + level + n, tuple(p.shape), dtype) for n, p in model.named_parameters()]


def write_ae(path: Path, arch: str) -> None:
    """`ae.safetensors`: the VAE in the LDM layout without prefix (small: built and converted whole)."""
    from sdlora.merge import vae_to_ldm_state

    cfg = _config_of(arch, "vae")
    with torch.device("meta"):
        vae = archs.build(cfg)
    entries = [(k.removeprefix("first_stage_model."), tuple(v.shape), torch.float32)
               for k, v in vae_to_ldm_state(vae).items()]
    write_streaming(path, entries)


def write_files(root: Path, arch: str, variant: str, fp8: bool, t5_fp8: bool) -> None:
    """The single-file forms: the transformer in BFL's / SAI's layout, `clip_l` (and `clip_g`), `t5xxl`, `ae`."""
    spec = archs.get(arch)
    root.mkdir(parents=True, exist_ok=True)
    name = {"flux": "flux1-dev", "sd3": "sd3.5_large"}[arch] + ("-fp8" if fp8 else "")
    t0 = time.time()
    n = write_streaming(root / f"{name}.safetensors", original_entries(arch, variant, fp8))
    print(f"  {name}.safetensors {n / 1e9:.1f} GB in {time.time() - t0:.0f} s", flush=True)
    for t in spec.text_encoders:
        role = t.ldm_prefix.split(".")[1]
        fp8_t5 = t.kind == "t5" and t5_fp8
        fname = f"{role}_fp8_e4m3fn.safetensors" if fp8_t5 else f"{role}.safetensors"
        if (root / fname).exists():
            continue
        entries = hf_entries(arch, t.attr, "", torch.bfloat16)
        if fp8_t5:
            entries = [(k, s, torch.float8_e4m3fn if len(s) >= 2 else d) for k, s, d in entries]
        write_streaming(root / fname, entries)
        print(f"  {fname} written", flush=True)
    write_ae(root / "ae.safetensors", arch)
    write_tokenizers(root / "tokenizers", spec)


# ---------------------------------------------------------------- runs

CASES = {  # name -> (model path under MODELS, extra sdlora arguments)
    "flux-folder": ("flux-folder", []),
    "flux-files": ("flux-files/flux1-dev-fp8.safetensors",
                   ["--clip-l", "flux-files/clip_l.safetensors", "--t5xxl", "flux-files/t5xxl_fp8_e4m3fn.safetensors",
                    "--ae", "flux-files/ae.safetensors"]),
    "sd35-folder": ("sd35-folder", []),
    "flux-shallow": ("flux-shallow", []),
    "sd35-files": ("sd35-files/sd3.5_large-fp8.safetensors",
                   ["--clip-l", "sd35-files/clip_l.safetensors", "--clip-g", "sd35-files/clip_g.safetensors",
                    "--t5xxl", "sd35-files/t5xxl_fp8_e4m3fn.safetensors", "--ae", "sd35-files/ae.safetensors"]),
}


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def traced(args: list[str], env: dict, trace: Path, timeout: float) -> tuple[int, int, str]:
    """Run `args`, writing `trace` (seconds, RSS GB, peak-so-far GB, the output line or "") with one row a second
    and one per line of output (progress bars split at carriage returns), so each phase's memory can be read off.
    (exit code, peak RSS bytes from the kernel's rusage, all output)."""
    import threading

    t0 = time.time()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    out, peak = [], [0]
    rows = open(trace, "w", buffering=1)  # written as it goes: `tail -f` it to watch a run

    def note(line: str) -> None:
        r = _rss(p.pid)
        peak[0] = max(peak[0], r)
        rows.write(f"{time.time() - t0:.1f}\t{r / GB:.3f}\t{peak[0] / GB:.3f}\t{line}\n")

    def reader() -> None:
        buf = b""
        while chunk := p.stdout.read1(4096):
            buf += chunk
            *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                if line.strip():
                    text = line.decode(errors="replace")
                    out.append(text)
                    note(text)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    status = None
    while status is None:
        pid, st, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(st)
            break
        if time.time() - t0 > timeout:
            p.kill()
        note("")
        time.sleep(1.0)
    th.join(5)
    p.returncode = status
    rows.close()
    return status, usage.ru_maxrss * 1024, "\n".join(out)


GB = 1e9


def run_case(case: str, precision: str, steps: int, images: Path, timeout: float = 5400, mixed: str = "no") -> dict:
    """`sdlora train` on a written model in a child process, under the shared big-memory lock (flock on
    /tmp/sdlora-bigmem.lock, so two big jobs never share the 24 GB), its memory traced (`traced`); load time =
    process start to the first step, s/step from the step marks (SDLORA_STEP_TIMES)."""
    import fcntl

    model, extra = CASES[case]
    out = MODELS / "runs" / f"{case}-{precision}"
    out.mkdir(parents=True, exist_ok=True)
    marks = out / "marks.txt"
    marks.unlink(missing_ok=True)
    import shutil

    shutil.rmtree(out / "cache", ignore_errors=True)  # every run encodes its text and latents itself
    args = [sys.executable, "-m", "sdlora", "train", "--model", str(MODELS / model),
            *[str(MODELS / a) if a.endswith(".safetensors") else a for a in extra],
            "--images", str(images), "--prompt", "sks dog", "--base-precision", precision, "--te-precision", precision,
            "--t5xxl-max-token-length", "77", "--mixed-precision", mixed, "--resolution", "64",
            "--steps", str(steps), "--no-eval-loss", "--overwrite",
            "--out", str(out / "adapter.safetensors"), "--cache-dir", str(out / "cache")]
    env = dict(os.environ, SDLORA_STEP_TIMES=str(marks), PYTHONPATH=str(ROOT),
               SDLORA_T5_TOKENIZER=str(next((t for t in (MODELS / model.split("/")[0] / "tokenizers" / a
                                                         for a in ("tokenizer_3", "tokenizer_2")) if t.is_dir()),
                                            "")))  # single files carry no tokenizer: the T5 one beside them
    with open("/tmp/sdlora-bigmem.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load = os.getloadavg()
        t0 = time.time()
        rc, rss, text = traced(args, env, out / "trace.tsv", timeout)
    (out / "output.txt").write_text(text)
    # marks: "start <unix time>" when the first step starts, "step N cached=K <unix time>" after each step
    times = [float(line.split()[-1]) for line in marks.read_text().splitlines()] if marks.exists() else []
    result = {"case": case, "precision": precision, "mixed_precision": mixed, "rc": rc, "peak_rss_gb": rss / GB,
              "wall_s": time.time() - t0, "load_s": (times[0] - t0) if times else None,
              "step_s": [b - a for a, b in zip(times, times[1:])], "loadavg": load,
              "verified": "does not verify" not in text and rc == 0,
              "error": text.strip().splitlines()[-25:] if rc else None,
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(args)}
    with open(MODELS / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = ["| model | precision | peak RSS | load (to step 1) | s/step (steps 1, 2) | ok | load avg | date |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = ", ".join(f"{s:.0f}" for s in r["step_s"])
        load = f"{r['load_s']:.0f} s" if r["load_s"] is not None else "-"
        out.append(f"| {r['case']} | {r['precision']} | {r['peak_rss_gb']:.2f} GB | {load} | {steps} | "
                   f"{'yes' if r['rc'] == 0 else 'rc ' + str(r['rc'])} | {r['loadavg'][0]:.1f} | {r['date']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("write", "run", "delete", "table"))
    ap.add_argument("case", nargs="?", choices=("flux-folder", "flux-files", "sd35-folder", "sd35-files",
                                                         "flux-shallow"))
    ap.add_argument("precision", nargs="?", default="nf4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5400, help="seconds before the run is killed")
    ap.add_argument("--mixed-precision", default="no", help="what quantised layers compute in: 'no' (fp32) on a CPU "
                    "without bf16 instructions (AVX-512 BF16/AMX), where bf16 matmuls are ~3x slower; bf16 on a GPU")
    args = ap.parse_args()
    MODELS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.action == "table":
        print(table(MODELS / "results.jsonl"))
    elif args.action == "delete":
        import shutil

        shutil.rmtree(MODELS / args.case)
    elif args.action == "write":
        if args.case == "flux-folder":
            write_folder(MODELS / "flux-folder", "flux")
        elif args.case == "sd35-folder":
            t5 = MODELS / "flux-folder" / "text_encoder_2"
            write_folder(MODELS / "sd35-folder", "sd3", "large", t5 if t5.exists() else None)
        elif args.case == "flux-shallow":
            write_shallow(MODELS / "flux-shallow", MODELS / "flux-folder")
        elif args.case == "flux-files":
            write_files(MODELS / "flux-files", "flux", "", fp8=True, t5_fp8=True)
        else:
            write_files(MODELS / "sd35-files", "sd3", "large", fp8=True, t5_fp8=True)  # fp8: 8 GB, not 16
        print(f"{args.case} written in {time.time() - t0:.0f} s")
    else:
        r = run_case(args.case, args.precision, args.steps, ROOT / "datasets" / "dog", args.timeout,
                     args.mixed_precision)
        print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
