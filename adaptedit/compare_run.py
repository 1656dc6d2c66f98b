"""One comparison run, start to record: init → train → evaluate → geometry (``adaptedit compare``).

:class:`Runner` holds what the runs share (the base model loaded once, its tokenizer, the base
retain loss, the shared SVD of W₀) and turns a :class:`adaptedit.compare.RunSpec` into its
results.jsonl record. A run is created by the library path of ``adaptedit init`` and trained by
that of ``adaptedit train``; an interrupted run (a checkpoint, no record) continues from its last
checkpoint exactly as ``adaptedit train --resume``.

``--jobs N`` (N GPUs): N worker processes, each seeing one GPU (``CUDA_VISIBLE_DEVICES``), each
with its own Runner; the parent appends their records to results.jsonl as they finish.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from adaptedit import compare
from adaptedit.atomic import replace_file
from adaptedit.errors import AdapteditError


class _Steps:
    """train's reporter interface, forwarding each step to the comparison's progress callback."""

    def __init__(self, tell, run_id):
        self.tell, self.run_id = tell, run_id

    def start(self, header, run):
        self.tell("train_start", {"run": self.run_id, "steps": run.total_steps,
                                  "start": run.start_step})

    def step(self, rec, total):
        self.tell("step", {"run": self.run_id, "step": rec["step"], "total": total,
                           "loss": rec["loss"], "step_s": rec["step_s"]})

    def eval(self, step, loss): ...
    def saved(self, step, path): ...
    def end(self, summary): ...


class Runner:
    def __init__(self, opts, source, out: Path, tell):
        from adaptedit.devices import Dist, pick_device, pick_dtype

        self.opts, self.source, self.out, self.tell = opts, source, Path(out), tell
        self.device = pick_device(opts.device, Dist())
        self.dtype = pick_dtype(opts.dtype, self.device)
        self.tokenizer = compare.run_tokenizer(opts, source)
        self.model = None
        self._base_retain = None

    def load(self):
        if self.model is None:
            self.model = self.source.load(dtype=self.dtype, device=self.device)
        return self.model

    # ---------------------------------------------------------------------------------- all runs

    def run_all(self, todo: list, done: dict) -> None:
        from adaptedit.linalg import shared_svd

        if self.opts.jobs > 1:
            return self._run_parallel(todo, done)
        with shared_svd():
            for i, spec in enumerate(todo):
                self.tell("run_start", {"run": spec.id, "index": i, "todo": len(todo)})
                rec = self.run(spec)
                append_result(self.out, rec)
                done[spec.id] = rec
                self.tell("run_end", {"run": spec.id, "record": rec})

    def _run_parallel(self, todo: list, done: dict) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        jobs, results = ctx.Queue(), ctx.Queue()
        for spec in todo:
            jobs.put(spec)
        n = min(self.opts.jobs, len(todo))
        for _ in range(n):
            jobs.put(None)
        procs = [ctx.Process(target=_worker, args=(g, self.opts, self.source.ref, str(self.out),
                                                   jobs, results), daemon=True) for g in range(n)]
        for p in procs:
            p.start()
        left, running = len(todo), 0
        while left:
            kind, payload = results.get()
            if kind == "error":
                for p in procs:
                    p.terminate()
                raise AdapteditError(payload)
            if kind == "start":
                running += 1
                self.tell("run_start", {"run": payload, "index": len(todo) - left,
                                        "todo": len(todo)})
                continue
            append_result(self.out, payload)
            done[payload["run"]] = payload
            left -= 1
            self.tell("run_end", {"run": payload["run"], "record": payload})
        for p in procs:
            p.join()

    # ----------------------------------------------------------------------------------- one run

    def run(self, spec) -> dict:
        from adaptedit import train as training
        from adaptedit.adapter import save_adapter
        from adaptedit.checkpoints import METRICS, checkpoint_dirs, read_state
        from adaptedit.formats import load_adapter
        from adaptedit.init import InitOptions, build, parameter_counts
        from adaptedit.layer import attach, detach
        from adaptedit.train_config import make_config

        folder = self.out / compare.RUNS / spec.id
        t0 = time.perf_counter()
        model = self.load()
        resume = bool(checkpoint_dirs(folder, with_state=True))
        if folder.exists() and not resume:
            clear_run(folder)  # killed before its first checkpoint: start it again
        # train on the device the base was loaded on (--device may change on --resume)
        cfg, given = make_config({**spec.train, "device": self.opts.device}, resume=resume)
        finished = False
        if resume:
            state = read_state(checkpoint_dirs(folder, with_state=True)[-1])
            finished = state["step"] >= state["total_steps"]
        else:
            adapter = build(self.source, InitOptions(**spec.init))
            save_adapter(adapter, folder, force=False)  # exactly `adaptedit init -o FOLDER`
        diverged = None
        if not finished:
            run = training.prepare(folder, cfg, given=given, resume=resume, tokenizer=self.tokenizer)
            try:
                training.train(run, _Steps(self.tell, spec.id), model=model)
            except training.Diverged as e:  # a result of the grid, not a failure of the compare
                diverged = str(e).split(";")[0]
            finally:
                detach(model)
        adapter = load_adapter(folder)
        params, _ = parameter_counts(self.source, adapter)
        metrics = [json.loads(x) for x in (folder / METRICS).read_text().splitlines() if x]
        if diverged is not None:
            return self._diverged(spec, folder, diverged, metrics, params, adapter, t0)
        attach(model, adapter)
        try:
            model.eval()
            test, retain = self._evaluate(model, folder)
        finally:
            detach(model)
        train_loss = [[m["step"], m["loss"]] for m in metrics if "loss" in m]
        eval_loss = [[m["step"], m["eval_loss"]] for m in metrics if "eval_loss" in m]
        step_s = [m["step_s"] for m in metrics if "step_s" in m]
        tok_s = [m["tok_s"] for m in metrics if "tok_s" in m]
        rec = {"run": spec.id, "method": spec.method, "seed": spec.seed, "lr": spec.lr,
               "rank": spec.init["rank"], "alpha": adapter.config.alpha, "params": params,
               "path": str(folder), "steps": len(train_loss),
               "train_loss": train_loss, "eval_loss": eval_loss,
               "final_eval_loss": eval_loss[-1][1] if eval_loss else None,
               "test": test, "retain_loss": retain,
               "forgetting": (retain - self.base_retain()) if retain is not None else None,
               "geometry": self.geometry(folder),
               "seconds": round(time.perf_counter() - t0, 3),
               "s_per_step": sum(step_s) / len(step_s) if step_s else None,
               "tok_s": sum(tok_s) / len(tok_s) if tok_s else None,
               "peak_mem_mb": max((m.get("peak_mem_mb", 0) for m in metrics), default=None),
               "commands": spec.commands(self.source.ref, folder)}
        if rec["final_eval_loss"] is None:
            raise AdapteditError(f"run {spec.id}: no eval loss; see {folder / METRICS}")
        if not math.isfinite(rec["final_eval_loss"]):
            return self._diverged(spec, folder, f"eval loss is {rec['final_eval_loss']}", metrics,
                                  params, adapter, t0)
        return rec

    def _diverged(self, spec, folder: Path, why: str, metrics: list, params: int, adapter,
                  t0: float) -> dict:
        """The record of a run whose loss became non-finite: kept in results.jsonl (so --resume
        does not redo it) and left out of the best-lr choice and the statistics."""
        return {"run": spec.id, "method": spec.method, "seed": spec.seed, "lr": spec.lr,
                "rank": spec.init["rank"], "alpha": adapter.config.alpha, "params": params,
                "path": str(folder), "diverged": why,
                "train_loss": [[m["step"], m["loss"]] for m in metrics
                               if isinstance(m.get("loss"), (int, float)) and math.isfinite(m["loss"])],
                "eval_loss": [[m["step"], m["eval_loss"]] for m in metrics if "eval_loss" in m],
                "final_eval_loss": None, "test": None, "retain_loss": None, "forgetting": None,
                "geometry": None, "seconds": round(time.perf_counter() - t0, 3),
                "commands": spec.commands(self.source.ref, folder)}

    def _evaluate(self, model, folder: Path):
        from adaptedit.evaluate import EvalOptions, evaluate_model

        o = self.opts
        test = None
        if o.test_data:
            res = evaluate_model(model, self.tokenizer, Path(o.test_data),
                                 EvalOptions(max_new_tokens=o.max_new_tokens,
                                             batch_size=o.batch_size, limit=o.test_limit,
                                             max_length=o.max_length))
            gens = res.pop("generations")
            replace_file(folder, "test_generations.jsonl",
                         lambda p: p.write_text("".join(json.dumps(g) + "\n" for g in gens)))
            test = res
        retain = self._retain_loss(model) if o.retain_data else None
        return test, retain

    def _retain_loss(self, model) -> float:
        from adaptedit.data import load as load_data
        from adaptedit.evaluate import loss_totals

        d = load_data(Path(self.opts.retain_data), self.tokenizer, max_length=self.opts.max_length)
        s, n = loss_totals(model, d, self.opts.batch_size, self.device, self.dtype)
        return s / n

    def base_retain(self) -> float:
        """The base model's retain loss, computed once (then read from compare.json's sidecar)."""
        if self._base_retain is None:
            path = self.out / "base_retain.json"
            if path.exists():
                self._base_retain = json.loads(path.read_text())["retain_loss"]
            else:
                self._base_retain = self._retain_loss(self.load())
                text = json.dumps({"retain_loss": self._base_retain}) + "\n"
                replace_file(self.out, path.name, lambda p: p.write_text(text))
        return self._base_retain

    def geometry(self, folder: Path) -> dict:
        """inspect's summary of the final update, corr(ΔD, ΔM) over the saved checkpoints."""
        from adaptedit.analysis import Options, inspect_adapters

        rep = inspect_adapters([folder], opts=Options(), trajectory=True)
        m = rep["model"]
        corr = rep["md"]["correlation"]
        last = [p for p in rep["md"]["points"] if p["label"] == rep["md"]["points"][-1]["label"]]
        g = {k: m.get(k) for k in ("e_top", "e_bottom", "e_random", "effective_rank",
                                   "intruders", "fro", "rel", "delta_m", "delta_d")}
        g.update(corr_md=corr["pooled"], corr_md_mean=corr["mean"], verdict=rep["verdict"],
                 md_points=[[p["delta_d"], p["delta_m"]] for p in last])
        replace_file(folder, "inspect.json", lambda p: p.write_text(json.dumps(rep) + "\n"))
        return g


def _worker(gpu: int, opts, model_ref: str, out: str, jobs, results) -> None:
    """One --jobs process: sees only GPU ``gpu``; runs specs from ``jobs`` until None."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from adaptedit.linalg import shared_svd
    from adaptedit.models import resolve

    try:
        runner = Runner(opts, resolve(model_ref), Path(out), lambda e, i: None)
        with shared_svd():
            while (spec := jobs.get()) is not None:
                results.put(("start", spec.id))
                results.put(("done", runner.run(spec)))
    except Exception as e:  # reported by the parent as one line
        results.put(("error", f"--jobs worker {gpu}: {type(e).__name__}: {e}"))


# ------------------------------------------------------------------ the results file


def read_results(folder: Path) -> list:
    """The finished runs of results.jsonl; a line cut by a kill is dropped (the file rewritten)."""
    path = folder / compare.RESULTS
    if not path.exists():
        return []
    good, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if len(good) != len([ln for ln in lines if ln.strip()]):
        replace_file(folder, compare.RESULTS,
                     lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in good)))
    return good


def append_result(out: Path, rec: dict) -> None:
    with open(out / compare.RESULTS, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def clear_run(folder: Path) -> None:
    """A run folder without a checkpoint (killed during init or before its first save): redone."""
    shutil.rmtree(folder, ignore_errors=True)
