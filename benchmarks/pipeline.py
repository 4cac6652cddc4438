"""Wall time of each phase of a ``python -m lit_prune fit --config X`` run (capture -> prune -> LoRA -> export).

The run is the CLI's own: ``cli_main(["--config", X, ...], run=False)`` builds the model, datamodule and
Trainer exactly as ``python -m lit_prune fit`` does, then this script calls ``trainer.fit`` with timers:

* load: parsing the config and instantiating model, tokenizer, datamodule and Trainer,
* capture: ``ActivationCaptureCallback.capture`` (forward passes with hooks, statistics),
* select: ``make_plan`` (scores and top-k), slice: the rest of ``SelectivityPruneCallback.prune``,
* LoRA wrap: ``configure_model`` (peft adapters on the pruned model),
* LoRA train: ``on_train_start`` -> ``on_train_end`` minus the validation loops inside it,
* validation: every validation loop (sanity check included),
* export: ``on_fit_end`` (merge adapters, ``save_pretrained``, plan and model card),
* evaluate: ``trainer.test`` after the fit, when the module has a ``test_step`` and the datamodule has
  evaluation data (otherwise reported as absent),
* other: the rest of ``trainer.fit`` (datamodule setup, strategy and optimizer setup, teardown).

The run's outputs (``trainer.default_root_dir``, ``model.export_dir``, the evaluation folder, logger, plan and
statistics files, checkpoints) go to a temporary folder so the
benchmark never overwrites a real run. Arguments after ``--`` go to the CLI unchanged.

    python benchmarks/pipeline.py                                  # configs/tiny.yaml
    python benchmarks/pipeline.py --config configs/demo.yaml --repeats 1 -- --trainer.max_steps 20
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

NAME = "pipeline"
PHASES = ("load", "capture", "select", "slice", "lora_wrap", "lora_train", "validation", "export", "evaluate",
          "other")


class PhaseTimer:
    """Accumulates wall time per phase name; wraps bound methods or module functions with a timer."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._restore: list[Callable[[], None]] = []

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1

    def wrap(self, owner: object, attribute: str, name: str) -> None:
        """Replace ``owner.attribute`` by a timed version (undone by :meth:`restore`)."""
        original = getattr(owner, attribute)
        had_own = attribute in vars(owner)

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        self._restore.append(lambda: setattr(owner, attribute, original) if had_own else delattr(owner, attribute))

    def restore(self) -> None:
        while self._restore:
            self._restore.pop()()


def _timing_callback(timer: PhaseTimer):
    """A Lightning callback stamping the training and validation loops."""
    from lightning.pytorch.callbacks import Callback

    class PhaseTimingCallback(Callback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}

        def _start(self, key: str) -> None:
            self.marks[key] = time.perf_counter()

        def _stop(self, key: str, name: str) -> None:
            if key in self.marks:
                timer.seconds[name] += time.perf_counter() - self.marks.pop(key)
                timer.calls[name] += 1

        def on_train_start(self, trainer, pl_module) -> None:
            self._start("train")

        def on_train_end(self, trainer, pl_module) -> None:
            self._stop("train", "train_loop")

        def on_validation_start(self, trainer, pl_module) -> None:
            self._start("validation")

        def on_validation_end(self, trainer, pl_module) -> None:
            was_training = "train" in self.marks
            before = timer.seconds["validation"]
            self._stop("validation", "validation")
            if was_training:
                timer.seconds["validation_in_train"] += timer.seconds["validation"] - before

    return PhaseTimingCallback()


def _has_evaluation(cli) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("test_step", cli.model):
        return False
    datamodule = cli.datamodule
    sources = getattr(datamodule, "eval_sources", None)
    return bool(sources) and any(v is not None for v in sources.values())


def output_overrides(config: Path, workdir: Path) -> list[str]:
    """CLI overrides that send every output the config names into ``workdir`` (never over a real run)."""
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    overrides = ["--trainer.default_root_dir", str(workdir)]
    model = data.get("model") or {}
    model = model.get("init_args", model) if isinstance(model, dict) else {}
    if "export_dir" in model:
        overrides += ["--model.export_dir", str(workdir / "export")]
    evaluation = model.get("evaluation")
    if isinstance(evaluation, dict):
        overrides += ["--model.evaluation.output_dir", str(workdir / "eval")]
        if evaluation.get("reference_outputs"):
            overrides += ["--model.evaluation.reference_outputs", str(workdir / "reference_outputs.json")]
    logger = (data.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        overrides += ["--trainer.logger.init_args.save_dir", str(workdir / "logs")]
    return overrides


def _redirect_callbacks(trainer, workdir: Path) -> None:
    """Point file outputs of the pruning and checkpoint callbacks into ``workdir``.

    A capture callback whose ``stats_path`` exists would load statistics instead of capturing; the copy in
    ``workdir`` does not exist, so the capture phase is always measured.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback

    for callback in trainer.callbacks:
        if isinstance(callback, ActivationCaptureCallback) and callback.stats_path:
            callback.stats_path = str(workdir / "stats.pt")
        if isinstance(callback, SelectivityPruneCallback) and callback.plan_path:
            callback.plan_path = str(workdir / "prune_plan.json")
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = str(workdir / "checkpoints")


def run_once(config: Path, extra: list[str], workdir: Path, evaluate: str) -> dict:
    """One CLI run with phase timers; returns seconds per phase plus run facts."""
    timer = PhaseTimer()
    started = time.perf_counter()
    import lit_prune.callbacks.prune as prune_module
    from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback
    from lit_prune.cli import cli_main
    import_s = time.perf_counter() - started

    args = ["--config", str(config), *output_overrides(config, workdir), *extra]
    with timer.phase("load"):
        cli = cli_main(args, run=False)
    trainer, module = cli.trainer, cli.model
    _redirect_callbacks(trainer, workdir)
    for callback in trainer.callbacks:
        if isinstance(callback, ActivationCaptureCallback):
            timer.wrap(callback, "capture", "capture")
        if isinstance(callback, SelectivityPruneCallback):
            timer.wrap(callback, "prune", "prune")
    timer.wrap(prune_module, "make_plan", "select")
    timer.wrap(module, "add_lora_adapters", "lora_wrap")
    timer.wrap(module, "export", "export")
    trainer.callbacks.append(_timing_callback(timer))
    try:
        with timer.phase("fit"):
            trainer.fit(module, datamodule=cli.datamodule)
        evaluated = evaluate == "always" or (evaluate == "auto" and _has_evaluation(cli))
        if evaluated:
            with timer.phase("evaluate"):
                trainer.test(module, datamodule=cli.datamodule)
    finally:
        timer.restore()
    s = timer.seconds
    phases = {
        "load": s["load"],
        "capture": s["capture"],
        "select": s["select"],
        "slice": max(s["prune"] - s["select"], 0.0),
        "lora_wrap": s["lora_wrap"],
        "lora_train": max(s["train_loop"] - s["validation_in_train"], 0.0),
        "validation": s["validation"],
        "export": s["export"],
        "evaluate": s["evaluate"] if evaluated else None,
    }
    accounted = sum(s[k] for k in ("capture", "prune", "lora_wrap", "train_loop", "export"))
    accounted += s["validation"] - s["validation_in_train"]
    phases["other"] = max(s["fit"] - accounted, 0.0)
    plan = getattr(module, "prune_plan", None)
    return {
        "phases": phases,
        "import_s": import_s,
        "fit_s": s["fit"],
        "total_s": s["load"] + s["fit"] + (s["evaluate"] if evaluated else 0.0),
        "global_step": trainer.global_step,
        "plan": {"mode": plan.mode, "ratio": plan.ratio, "original_width": plan.original_width,
                 "kept_width": plan.kept_width, "num_layers": plan.num_layers} if plan is not None else None,
        "exported": (workdir / "export").is_dir(),
        "evaluated": evaluated,
    }


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=common.REPO_ROOT / "configs" / "tiny.yaml",
                        help="LightningCLI config to run (default: configs/tiny.yaml)")
    parser.add_argument("--repeats", type=common.positive, default=1, help="runs (each loads the model again)")
    parser.add_argument("--evaluate", choices=["auto", "always", "never"], default="auto",
                        help="run trainer.test after the fit (auto: when the config has evaluation data)")
    args = parser.parse_args(argv)
    config = args.config.resolve()
    out = args.out.resolve()
    if not config.is_file():
        parser.error(f"--config {str(args.config)!r} does not exist")
    threads = common.set_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous_dir = Path.cwd()
    os.chdir(common.REPO_ROOT)  # configs name their files relative to the project root
    runs = []
    try:
        for index in range(args.repeats):
            common.console.print(f"run {index + 1}/{args.repeats}: {config.name} {' '.join(extra)}")
            with tempfile.TemporaryDirectory(prefix="lit_prune_pipeline_") as workdir:
                runs.append(run_once(config, extra, Path(workdir), args.evaluate))
    finally:
        os.chdir(previous_dir)
    phases = {}
    for name in PHASES:
        values = [r["phases"][name] for r in runs if r["phases"].get(name) is not None]
        phases[name] = common.median(values) if values else None
    total = common.median([r["total_s"] for r in runs])
    info = common.machine_info()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {"config": str(config.relative_to(common.REPO_ROOT)) if config.is_relative_to(common.REPO_ROOT)
                     else str(config), "cli_overrides": extra, "repeats": args.repeats, "threads": threads},
        "phases_s": phases,
        "total_s": total,
        "runs": runs,
    }
    first = runs[0]["phases"]
    rows = []
    for name in PHASES:
        value = phases[name]
        rows.append((name, "absent" if first.get(name) is None else f"{first[name]:.2f}",
                     "absent" if value is None else f"{value:.2f}", "" if value is None else f"{value / total:.1%}"))
    rows.append(("total (load + fit + evaluate)", f"{runs[0]['total_s']:.2f}", f"{total:.2f}", "100%"))
    plan = runs[-1]["plan"]
    common.print_table(
        f"Pipeline phases: {payload['settings']['config']}",
        ["phase", "first run s (cold)", f"median s ({args.repeats} runs)", "share of median"], rows,
        caption=(f"{runs[-1]['global_step']} optimizer steps; the first run pays one-time imports and loads (peft, "
                 "evaluation models); "
                 + (f"plan {plan['mode']} {plan['ratio']:.0%}: d_ff {plan['original_width']} -> {plan['kept_width']} "
                    f"in {plan['num_layers']} layers; " if plan else "no plan; ")
                 + f"import of lit_prune.cli {runs[0]['import_s']:.2f} s (not in total)\n" + common.machine_line(info)),
    )
    common.write_json(out, payload)
    return payload


if __name__ == "__main__":
    main()
