"""One prediction pass: the inputs not done yet, through the model (in this process, or on Ray), into the rows,
the features file and the attention figures, with progress a person can follow."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TextIO

from pipeline.models.registry import scheme_of
from pipeline.predict.model import LoadedModel, PredictError, Predictor, Protocol, Result, describe_error
from pipeline.predict.outputs import FeatureStore, RowWriter, check_record, read_done, result_row

log = logging.getLogger("pipeline.predict")


@dataclass
class Summary:
    inputs: int = 0
    skipped: int = 0  # done by an earlier run (in --out / --features)
    retried: int = 0  # error rows of an earlier run, tried again
    predicted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, error)
    explained: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0  # summed per-input time (decode + model) of the inputs done here

    def describe(self, out: Path | None = None) -> str:
        done = self.predicted + len(self.failed)
        line = f"{self.inputs} inputs: {self.predicted} predicted, {len(self.failed)} failed"
        if self.skipped:
            line += f", {self.skipped} skipped (already in {out or 'the outputs'})"
        if self.retried:
            line += f" ({self.retried} that had failed before were tried again)"
        if done:
            line += f"; {self.seconds:.1f}s, {self.seconds / done:.2f}s per input"
        return line


def local_results(predictor: Predictor, inputs: list[str], workers: int = 1) -> Iterator[Result]:
    """Results in input order, the next ``workers`` inputs decoded by threads while the model runs."""
    if workers <= 0:
        for x in inputs:
            yield predictor.predict(x)
        return

    def load(x: str):
        try:
            return predictor.load(x)
        except Exception as e:  # noqa: BLE001 -- reported as this input's error by predict()
            return e

    it = iter(inputs)
    with ThreadPoolExecutor(workers, thread_name_prefix="predict-decode") as pool:
        pending = deque((x, pool.submit(load, x)) for x in islice(it, workers + 1))
        while pending:
            x, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield predictor.predict(x, future.result())


def run_predictions(loaded: LoadedModel, inputs: list[str], *, protocol: Protocol | None = None,
                    out: Path | None = None, features: Path | None = None, explain_dir: Path | None = None,
                    topk: int = 5, threshold: float = 0.5, overwrite: bool = False, ray: str | None = None,
                    actors: int | None = None, batch_size: int = 8, device=None, workers: int = 1,
                    progress: bool | None = None, stream: TextIO | None = None,
                    predictor: Predictor | None = None) -> Summary:
    """Predict ``inputs`` with ``loaded`` and write what was asked; returns what happened. Inputs already in
    ``out`` (and in ``features``, when both are asked) are skipped unless ``overwrite``."""
    t0 = time.perf_counter()
    protocol = protocol or loaded.protocol
    record = {"model": loaded.description, "weights": loaded.weights, "protocol": protocol.describe()}
    summary = Summary(inputs=len(inputs))
    done_rows: set[str] = set()
    keep: list[str] = []
    if out is not None:
        if out.exists() and not overwrite:
            done_rows, summary.retried, keep = read_done(out)
        check_record(out, record, overwrite)
    store = None
    if features is not None:
        store = FeatureStore(features, {**record, "feature": "final-norm CLS token (the classifier's input), "
                                                             "averaged over the views"}, resume=not overwrite)
    resumable = out is not None or store is not None

    def is_done(x: str) -> bool:
        return resumable and (out is None or x in done_rows) and (store is None or x in store)

    todo = [x for x in inputs if not is_done(x)]
    summary.skipped = len(inputs) - len(todo)
    if summary.skipped:
        log.info("%d of %d inputs already done: skipped", summary.skipped, len(inputs))
    interactive = sys.stderr.isatty() if progress is None else progress
    bar = lines = None
    if interactive:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="video", desc="predict", file=sys.stderr)
    else:
        from pipeline.progress import ProgressLines

        lines = ProgressLines(log, "predict", len(todo), "videos")
    show = None
    if bar is not None and out is None:
        from tqdm import tqdm

        def show(line: str) -> None:
            tqdm.write(line, file=stream or sys.stdout)
    writer = RowWriter(out, resume_lines=keep, stream=stream, show=show)
    explainer = None
    finished = False
    try:
        if ray is not None:
            from pipeline.predict.scale import ray_results

            results = ray_results(loaded.model, protocol, todo, address=ray, actors=actors, batch_size=batch_size)
        else:
            predictor = predictor or Predictor(loaded.model, protocol, device=device, batch_size=batch_size)
            results = local_results(predictor, todo, workers)
        for result in results:
            if result.input not in done_rows:
                writer.write(result_row(result, loaded.classes, topk, loaded.multi_label, threshold))
            if result.error is not None:
                summary.failed.append((result.input, result.error))
            else:
                summary.predicted += 1
                if store is not None and result.input not in store:
                    store.add(result.input, result.feature)
                if explain_dir is not None:
                    explainer = explainer or _explainer(loaded, protocol, device)
                    try:
                        summary.explained.append(explainer(result.input, explain_dir))
                    except Exception as e:  # noqa: BLE001 -- the prediction stands; the figure is reported
                        summary.failed.append((result.input, f"--explain: {describe_error(e, result.input)}"))
            summary.model_seconds += result.seconds
            if bar is not None:
                bar.update(1)
            else:
                lines.update(1, f"{len(summary.failed)} failed" if summary.failed else "")
        finished = True
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        if store is not None:
            if finished:
                store.close()  # the parts merged into the one features file
            else:  # interrupted: what was predicted is kept as a part, merged by the rerun
                try:
                    store.flush()
                except PredictError as e:  # the interruption is the error to report; this one is logged
                    log.error("%s", e)
    summary.seconds = time.perf_counter() - t0
    return summary


def _explainer(loaded: LoadedModel, protocol: Protocol, device):
    """The attention figures run in this process, in fp32 (with Ray too: they are for looking at a few videos)."""
    import copy

    import torch

    from pipeline.predict.explain import SUPPORTED, explain
    from pipeline.predict.inputs import read_source
    from pipeline.predict.model import PredictError, default_device

    if getattr(loaded.model.cfg, "attention_type", None) not in SUPPORTED:
        raise PredictError(f"--explain supports {', '.join(SUPPORTED)} attention; this model uses "
                           f"{scheme_of(loaded.model.cfg)}")
    # a copy: the predictor's model may be in bf16 on a GPU, and stays so
    model = copy.deepcopy(loaded.model).to(device or default_device(), torch.float32).eval()

    def run(input_id: str, out_dir: Path) -> Path:
        return explain(model, input_id, read_source(input_id), protocol, out_dir)
    return run
