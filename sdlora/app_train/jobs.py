"""Training jobs: each a `sdlora train` process of its own (a crash or an out-of-memory kill ends the job, not the
app), run one at a time from a queue by a worker thread, so that a job goes on when no page is open.

A job lives in its own folder under the app's jobs folder: `images/` (uploads), `out/` (the adapter, checkpoints,
sample grids and loss curve of the run), `train.log` (what the process printed) and `progress.jsonl` (the run's
--progress-file: JSON lines of its steps, losses and sample grids, read as they come). Stop sends the process
SIGINT, which `sdlora train` takes as Ctrl-C: it finishes the step under way and saves a checkpoint and the
adapter, and Resume runs it again with --resume latest, which continues exactly. A finished job's adapter is
copied into --adapters (under a free name: nothing there is replaced), the only place the app writes adapters.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.app_train.form import to_flags
from sdlora.errors import SdloraError

MAX_JOBS = 200  # job folders under the jobs folder (uploads create one each)
QUEUED, RUNNING, STOPPING, STOPPED, DONE, FAILED, CANCELLED = (
    "queued", "running", "stopping", "stopped", "done", "failed", "cancelled")
INTERRUPTED = (130, -signal.SIGINT)  # `sdlora train` after Ctrl-C (before its main() runs: killed by SIGINT)


def adapter_name(text: str) -> str:
    """A file name (without .safetensors) for an adapter a page names."""
    return re.sub(r"[^\w\-]+", "-", text or "").strip("-.")[:80] or "lora"


@dataclass
class Job:
    id: str
    folder: Path
    name: str  # the adapter's name: <--adapters>/<name>.safetensors once done (or <name>-2, ... if taken)
    model: str
    settings: dict  # the page's training settings (TrainConfig fields, no paths)
    images: Path  # the dataset: the job's upload folder or a folder under --data-root
    state: str = QUEUED
    error: str = ""  # the line that says why it failed
    saved: Path | None = None  # the adapter in --adapters
    steps: int = 0  # of the run (from its first progress line)
    step: int = 0
    losses: list = field(default_factory=list)  # (step, loss)
    samples: list = field(default_factory=list)  # sample grid PNGs, in order
    resumable: bool = False  # a checkpoint to continue from
    queued_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    runs: list = field(default_factory=list)  # (start, end) of each of its processes
    segment: list = field(default_factory=list)  # (time, step) of this process's steps: the ETA's rate
    returncode: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    offset: int = 0  # bytes of progress.jsonl read

    @property
    def out(self) -> Path:
        return self.folder / "out" / f"{self.name}.safetensors"

    @property
    def log(self) -> Path:
        return self.folder / "train.log"

    @property
    def progress_file(self) -> Path:
        return self.folder / "progress.jsonl"

    def argv(self, cache: Path, resume: bool) -> list[str]:
        """The `sdlora train` command line of the job: its paths set here, the page's settings as flags."""
        return [sys.executable, "-m", "sdlora", "train", f"--images={self.images}", f"--model={self.model}",
                f"--out={self.out}", f"--output-dir={self.out.parent}", f"--progress-file={self.progress_file}",
                f"--cache-dir={cache}", *to_flags(self.settings)] + (["--resume=latest"] if resume else [])

    def read_progress(self) -> None:
        """Take the whole lines the run appended to its progress file since the last call."""
        try:
            with open(self.progress_file, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line being written is read at the next call
        self.offset += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "start":
                self.steps, self.step, self.segment = int(e["steps"]), int(e["start_step"]), [(e["time"], 0)]
                self.losses = [x for x in self.losses if x[0] <= self.step]  # a resumed run repeats none
            elif e.get("event") == "step":
                self.step = int(e["step"])
                self.losses.append((self.step, float(e["loss"])))
                self.segment.append((e["time"], self.step))
            elif e.get("event") == "sample":
                self.samples.append(Path(e["path"]))

    def eta(self) -> float | None:
        """Seconds left at the rate of this process's steps since its first step was read (None before two reads;
        the first step pays for warm-up)."""
        steps = [(t, s) for t, s in self.segment if s]
        if len(steps) < 2 or steps[-1][1] <= steps[0][1] or self.state != RUNNING:
            return None
        (t0, s0), (t1, s1) = steps[0], steps[-1]
        return (self.steps - s1) * (t1 - t0) / (s1 - s0)

    def status(self) -> str:
        """One line for the page: the state, step, smoothed loss and ETA, the error or the saved file."""
        if self.state == DONE:
            return f"job {self.id} done: {self.step}/{self.steps} steps; saved {self.saved.name} in --adapters"
        if self.state == FAILED:
            return f"job {self.id} failed: {self.error}"
        if self.state == QUEUED:
            return f"job {self.id} queued" + (f" (resumes at step {self.step})" if self.step else "")
        if self.state == CANCELLED:
            return f"job {self.id} cancelled before it started"
        if self.state == STOPPED:
            return (f"job {self.id} stopped at step {self.step}/{self.steps}; Resume continues it" if self.resumable
                    else f"job {self.id} stopped before its first step; Resume starts it again")
        parts = [f"job {self.id} {self.state}: step {self.step}/{self.steps or '?'}"]
        if self.losses:
            ema = None
            for _, v in self.losses[-50:]:
                ema = v if ema is None else 0.9 * ema + 0.1 * v
            parts.append(f"loss {ema:.4f}")
        if (eta := self.eta()) is not None:
            parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        return ", ".join(parts)


def error_line(log: Path, returncode: int) -> str:
    """Why a run failed, in one line: its `sdlora: error:` line, or the last line it printed (a traceback's), or
    the signal that killed it (SIGKILL: most often the out-of-memory killer)."""
    try:
        lines = [s.strip() for s in re.split(r"[\r\n]+", log.read_text(encoding="utf-8", errors="replace"))]
    except OSError:
        lines = []
    lines = [s for s in lines if s and not re.search(r"\d+/\d+ \[", s)]  # not a progress bar
    said = [s for s in lines if s.startswith("sdlora: error:")]
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return (f"the training process was killed ({name}"
                + (": out of memory?" if -returncode == signal.SIGKILL else "") + ")")
    return said[-1] if said else (f"exit code {returncode}: {lines[-1]}" if lines else f"exit code {returncode}")


class Runner:
    """The app's jobs and their queue; a worker thread runs one `sdlora train` process at a time."""

    def __init__(self, root: Path, adapters: Path, env: dict | None = None, poll: float = 0.5):
        self.root, self.adapters, self.poll = Path(root).resolve(), Path(adapters).resolve(), poll
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache = self.root / "cache"  # latents and text embeddings, shared by the jobs
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.env = env
        self.worker: threading.Thread | None = None
        self.closing = False
        atexit.register(self.shutdown)

    # ---- what the page asks
    def new_folder(self) -> tuple[str, Path]:
        """A new job folder (for uploads, then the job): its id and path."""
        with self.lock:
            if sum(1 for p in self.root.iterdir() if p.is_dir() and p.name.isdigit()) >= MAX_JOBS:
                raise SdloraError(f"the app holds {MAX_JOBS} job folders, the most it keeps; remove old ones from "
                                  f"its jobs folder")
            n = 1 + max((int(p.name) for p in self.root.iterdir() if p.name.isdigit()), default=0)
            while True:
                try:
                    (self.root / f"{n:04d}").mkdir()
                    return f"{n:04d}", self.root / f"{n:04d}"
                except FileExistsError:
                    n += 1

    def submit(self, job_id: str, name: str, model: str, settings: dict, images: Path) -> Job:
        """Queue a job in folder `job_id` (new_folder) training on `images`; its settings are checked first (the
        error is the page's, the job is not queued)."""
        from sdlora.config import make_config

        folder = self.root / job_id
        if not re.fullmatch(r"\d{4,}", job_id or "") or not folder.is_dir():
            raise SdloraError(f"no job folder {job_id!r}; upload the images again")
        with self.lock:
            if job_id in self.jobs:
                raise SdloraError(f"job {job_id} exists already; upload into a new job")
            job = Job(job_id, folder, adapter_name(name), model, dict(settings), Path(images), queued_at=time.time())
            make_config(settings | {"images": str(images), "model": model, "out": str(job.out),
                                    "output_dir": str(job.out.parent)})
            self.jobs[job_id] = job
            self.queue.append(job_id)
            self._start_worker()
            self.wake.notify_all()
        return job

    def stop(self, job_id: str) -> str:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return "no such job"
            if job.state == QUEUED:
                self.queue.remove(job_id)
                job.state = STOPPED if job.resumable or job.step else CANCELLED
                return job.status()
            if job.state == RUNNING:
                job.state = STOPPING
                if job.proc is not None:  # else _run sees STOPPING before it starts the process
                    job.proc.send_signal(signal.SIGINT)  # `sdlora train`'s Ctrl-C: finish the step, save, exit 130
                return f"job {job_id} stopping: finishing step {job.step + 1}, then saving a checkpoint"
            return job.status()

    def resume(self, job_id: str) -> str:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return "no such job"
            if job.state not in (STOPPED, CANCELLED, FAILED):
                return job.status()
            job.state, job.error, job.queued_at = QUEUED, "", time.time()
            self.queue.append(job_id)
            self._start_worker()
            self.wake.notify_all()
            return job.status()

    def get(self, job_id: str | None) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id or "")

    def latest(self) -> Job | None:
        """The job a page opened now shows: the running one, else the last queued or ended."""
        with self.lock:
            running = [j for j in self.jobs.values() if j.state in (RUNNING, STOPPING)]
            return running[0] if running else (list(self.jobs.values())[-1] if self.jobs else None)

    def wait(self, job_id: str, states=(DONE, FAILED, STOPPED, CANCELLED), timeout: float = 600) -> Job:
        """Block until the job is in one of `states` (tests, scripts)."""
        end = time.monotonic() + timeout
        with self.lock:
            while self.jobs[job_id].state not in states:
                if not self.wake.wait(timeout=max(0.0, end - time.monotonic())):
                    raise TimeoutError(f"job {job_id} is {self.jobs[job_id].state} after {timeout}s")
            return self.jobs[job_id]

    # ---- the worker
    def _start_worker(self) -> None:
        if self.worker is None or not self.worker.is_alive():
            self.worker = threading.Thread(target=self._work, name="sdlora-jobs", daemon=True)
            self.worker.start()

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.closing:
                    self.wake.wait()
                if self.closing:
                    return
                job = self.jobs[self.queue.popleft()]
                resume = job.resumable
                job.state, job.started_at, job.ended_at, job.returncode = RUNNING, time.time(), None, None
                self.wake.notify_all()
            try:
                self._run(job, resume)
            except Exception as e:  # the app must outlive whatever happens to a job
                with self.lock:
                    job.state, job.error = FAILED, f"{type(e).__name__}: {e}"
            with self.lock:
                job.ended_at = time.time()
                job.runs.append((job.started_at, job.ended_at))
                self.wake.notify_all()

    def _env(self) -> dict:
        import sdlora

        here = str(Path(sdlora.__file__).resolve().parents[1])  # this sdlora, whatever the cwd
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        return env | {"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", "TQDM_MININTERVAL": "1"}

    def _run(self, job: Job, resume: bool) -> None:
        argv = job.argv(self.cache, resume)
        with open(job.log, "a", encoding="utf-8") as log:
            log.write(("\n" if log.tell() else "") + "$ sdlora " + " ".join(argv[3:]) + "\n")
            log.flush()
            with self.lock:
                if job.state == STOPPING:  # stopped between the queue and here
                    job.state = STOPPED
                    return
                job.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=job.folder, env=self._env())
            while job.proc.poll() is None:
                with self.lock:
                    job.read_progress()
                    self.wake.notify_all()
                time.sleep(self.poll)
        with self.lock:
            job.read_progress()
            rc = job.returncode = job.proc.returncode
            job.proc = None
            from sdlora.train import ckpt

            job.resumable = bool(ckpt.list_checkpoints(ckpt.checkpoint_root(job.out)))
            if rc == 0:
                job.saved = self._publish(job)
                job.state = DONE
            elif rc in INTERRUPTED:
                job.state = STOPPED
            else:
                job.state, job.error = FAILED, error_line(job.log, rc)

    def _publish(self, job: Job) -> Path:
        """Copy the job's adapter into --adapters under the first free name (`name`, `name-2`, ...), whole at once:
        a scan of the folder never sees half a file, and nothing there is replaced."""
        self.adapters.mkdir(parents=True, exist_ok=True)
        tmp = self.adapters / f".{job.name}.{job.id}.tmp"
        shutil.copyfile(job.out, tmp)
        try:
            for i in range(1, 10_000):
                dest = self.adapters / (f"{job.name}.safetensors" if i == 1 else f"{job.name}-{i}.safetensors")
                try:
                    os.link(tmp, dest)  # fails if dest exists: no file is replaced
                    return dest
                except FileExistsError:
                    continue
            raise SdloraError(f"no free name for {job.name} in --adapters")
        finally:
            tmp.unlink(missing_ok=True)

    def shutdown(self, timeout: float = 120) -> None:
        """The app is closing: a running job is stopped as Ctrl-C stops it (saving a resumable checkpoint)."""
        with self.lock:
            self.closing = True
            self.wake.notify_all()
            proc = next((j.proc for j in self.jobs.values() if j.proc is not None), None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
