"""The scoring pool: every reward component on every completion, in worker processes, with timeouts.

`ScoringPool(components, num_workers, timeout)` scores a batch of completions with the weighted sum of
its components. Each (completion, component) pair is one task sent by name (rewards are looked up in
the registry inside the worker). A task that raises, runs past `timeout` seconds or kills its worker
(os._exit, a segfault, the OOM killer) scores 0 and is counted in `reward/errors` or
`reward/timeouts`; a hung or dead worker is killed and replaced, and the batch goes on.

Workers are started from the "forkserver" context (the trainer has torch threads, so plain fork is
unsafe), preloading `r1mega.rewards` so that a replacement worker starts at once; they start on the
first `score` and stop on `close()` / leaving the `with` block.

`num_workers=0` scores in the calling process: exceptions are still caught and counted, but a hang
cannot be interrupted there (a timeout needs a process to kill), so `timeout` is not enforced; the
rewards' own limits (math-verify's alarms, the sandbox's wall clock) still apply.
Deliberately left out: batching several tasks per message, and retrying a failed task.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Mapping, Sequence

from r1mega.rewards.registry import ComponentsLike, compose, get_reward, runs_code
from r1mega.rewards.sandbox import isolation


@dataclass
class ScoreResult:
    rewards: list[float]                   # [N] weighted sum of the components
    components: dict[str, list[float]]     # name -> [N] unweighted scores
    reasons: dict[str, list[str | None]]   # name -> [N] why a score is not full marks (or the error)
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: Sequence["ScoreResult"]) -> "ScoreResult":
        """One result for batches scored apart at the same time (by data-parallel ranks), equal to scoring
        them as one batch: per-completion lists joined in order, counts summed, the time the longest."""
        names = list(parts[0].components)
        components = {n: [v for p in parts for v in p.components[n]] for n in names}
        reasons = {n: [r for p in parts for r in p.reasons[n]] for n in names}
        metrics = _metrics(components, errors=sum(p.metrics["reward/errors"] for p in parts),
                           timeouts=sum(p.metrics["reward/timeouts"] for p in parts),
                           seconds=max(p.metrics["reward/score_time_s"] for p in parts))
        return cls([r for p in parts for r in p.rewards], components, reasons, metrics)

    def select(self, index: Sequence[int]) -> "ScoreResult":
        """The completions `index` (e.g. those DAPO's dynamic sampling keeps): component means over them,
        the error and timeout counts and the time of everything scored."""
        components = {n: [v[i] for i in index] for n, v in self.components.items()}
        reasons = {n: [v[i] for i in index] for n, v in self.reasons.items()}
        metrics = _metrics(components, errors=self.metrics["reward/errors"], timeouts=self.metrics["reward/timeouts"],
                           seconds=self.metrics["reward/score_time_s"])
        return ScoreResult([self.rewards[i] for i in index], components, reasons, metrics)


def _metrics(components: Mapping[str, Sequence[float]], *, errors: float, timeouts: float,
             seconds: float) -> dict[str, float]:
    n = max(len(next(iter(components.values()), ())), 1)
    return {"reward/errors": float(errors), "reward/timeouts": float(timeouts), "reward/score_time_s": seconds,
            **{f"reward/{name}": sum(values) / n for name, values in components.items()}}


def _worker_main(conn: Connection, modules: Sequence[str]) -> None:
    import r1mega.rewards  # noqa: F401  (registers every reward in this process)

    for module in modules:
        importlib.import_module(module)

    while True:
        task = conn.recv()
        if task is None:
            return
        name, completion, sample = task
        try:
            out = get_reward(name)(completion, sample)
            conn.send(("ok", float(out.score), out.reason))
        except Exception as exc:
            conn.send(("error", 0.0, f"{type(exc).__name__}: {exc}"[:300]))


class _Worker:
    def __init__(self, ctx, modules: Sequence[str]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, modules), daemon=True)
        self.process.start()
        child.close()
        self.task: tuple[int, str] | None = None  # (sample index, component) in flight
        self.started = 0.0

    def send(self, task_id: tuple[int, str], message: tuple) -> None:
        self.task, self.started = task_id, time.monotonic()
        self.conn.send(message)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class ScoringPool:
    def __init__(self, components: ComponentsLike, num_workers: int = 0, timeout: float = 10.0,
                 modules: Sequence[str] = ()):
        """`modules`: modules a worker imports to register rewards defined outside r1mega.rewards."""
        self._workers: list[_Worker] = []
        self.modules = tuple(modules)
        for module in self.modules:
            importlib.import_module(module)
        self.specs = compose(components)
        if any(runs_code(spec.name) for spec in self.specs):
            # Before any work: a machine whose sandbox is weaker than allowed stops the run here, not as
            # a zero reward for every program.
            mode, python = isolation()
            print(f"code sandbox: {mode} isolation, programs run by {python}")
        self.num_workers, self.timeout = num_workers, timeout
        self._ctx = None

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()
        self._workers = []

    def __del__(self) -> None:
        self.close()

    def _start(self) -> None:
        if self._ctx is None:
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(["r1mega.rewards"])
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.modules))

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> ScoreResult:
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
        started = time.perf_counter()
        names = [s.name for s in self.specs]
        scores = {n: [0.0] * len(completions) for n in names}
        reasons: dict[str, list[str | None]] = {n: [None] * len(completions) for n in names}
        counts = {"errors": 0, "timeouts": 0}
        run = self._score_in_process if self.num_workers == 0 else self._score_in_workers
        run(completions, samples, scores, reasons, counts)
        rewards = [sum(s.weight * scores[s.name][i] for s in self.specs) for i in range(len(completions))]
        metrics = _metrics(scores, errors=counts["errors"], timeouts=counts["timeouts"],
                           seconds=time.perf_counter() - started)
        return ScoreResult(rewards, scores, reasons, metrics)

    def _score_in_process(self, completions, samples, scores, reasons, counts) -> None:
        for name in scores:
            fn = get_reward(name)
            for i, (completion, sample) in enumerate(zip(completions, samples)):
                try:
                    out = fn(completion, sample)
                    scores[name][i], reasons[name][i] = float(out.score), out.reason
                except Exception as exc:
                    counts["errors"] += 1
                    reasons[name][i] = f"error: {type(exc).__name__}: {exc}"[:300]

    def _score_in_workers(self, completions, samples, scores, reasons, counts) -> None:
        self._start()
        pending = [(i, name) for i in range(len(completions)) for name in scores]
        pending.reverse()  # pop() from the end hands out tasks in order
        busy: dict[Connection, _Worker] = {}

        def fail(worker: _Worker, kind: str, why: str) -> None:
            i, name = worker.task
            counts[kind] += 1
            reasons[name][i] = why
            worker.kill()
            self._workers.remove(worker)
            busy.pop(worker.conn, None)
            self._workers.append(_Worker(self._ctx, self.modules))

        while pending or busy:
            for worker in list(self._workers):
                if pending and worker.conn not in busy:
                    i, name = pending.pop()
                    busy[worker.conn] = worker
                    try:
                        worker.send((i, name), (name, completions[i], samples[i]))
                    except (BrokenPipeError, OSError):
                        fail(worker, "errors", "error: the worker died")
            if not busy:
                continue
            now = time.monotonic()
            wait_for = max(0.0, min(w.started + self.timeout for w in busy.values()) - now)
            ready = wait(list(busy) + [w.process.sentinel for w in busy.values()], timeout=wait_for)
            for worker in list(busy.values()):
                if worker.conn in ready or worker.conn.poll():
                    try:
                        status, value, why = worker.conn.recv()
                    except (EOFError, OSError):
                        fail(worker, "errors", "error: the worker died")
                        continue
                    i, name = worker.task
                    scores[name][i], reasons[name][i] = value, why
                    counts["errors"] += status == "error"
                    busy.pop(worker.conn)
                elif not worker.process.is_alive():
                    fail(worker, "errors", f"error: the worker died (exit code {worker.process.exitcode})")
                elif time.monotonic() - worker.started > self.timeout:
                    fail(worker, "timeouts", f"timeout after {self.timeout} s")
