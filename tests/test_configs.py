"""Every config in ``configs/`` is instantiated through the CLI, stacked as its header's command stacks it.

One test per config. The command is read from the config's header comment (the first ``python -m lit_prune``
line naming this config); the CLI parses it as a user's command line would, with required arguments enforced,
and builds the model, the datamodule, the trainer and its callbacks. Only the subcommand itself is not run. The
model is the tiny test model (the configs name hub models, the packaged SmolLM2 or the toy checkpoint, which are
loaded by other tests), so each instantiation takes a second.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from lit_prune.cli import LitPruneCLI, cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class _InstantiateOnly(LitPruneCLI):
    """Parse and instantiate as ``python -m lit_prune`` does, without running the subcommand."""

    def _run_subcommand(self, subcommand: str) -> None:
        self.ran = subcommand


def _header_command(config: Path) -> list[str]:
    """The arguments after ``python -m lit_prune`` of the header line that runs ``config``."""
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "python -m lit_prune " in line and f"configs/{config.name}" in line:
            words = shlex.split(line.split("python -m lit_prune ", 1)[1].split("(")[0].rstrip("\\ "))
            return [str(ROOT / w) if w.startswith("configs/") else w for w in words]
    raise AssertionError(f"{config.name}: no header line `python -m lit_prune <subcommand> ... --config "
                         f"configs/{config.name}`")


def test_every_config_is_covered():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_instantiates_through_the_cli(config, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' relative paths (../shared/data, checkpoints/) are from the checkout
    command = _header_command(config)
    subcommand = command[0]
    overrides = [f"--model.model_name_or_path={tiny_dir}", "--model.gguf_file=null",
                 f"--trainer.default_root_dir={tmp_path / 'run'}", f"--model.export_dir={tmp_path / 'export'}"]
    if "toy-train" in config.name:  # its data is what `python -m lit_prune.toy all` writes first
        pytest.importorskip("lit_prune.toy")
        if not (ROOT / "checkpoints" / "runs" / "toy-math" / "data").is_dir():
            overrides += [f"--data.target={ROOT / 'checkpoints' / 'toy-math' / 'data' / 'math_capture.jsonl'}",
                          f"--data.distractors=[{ROOT / 'checkpoints' / 'toy-math' / 'data' / 'qna_capture.jsonl'}]",
                          f"--data.finetune={ROOT / 'checkpoints' / 'toy-math' / 'data' / 'math_finetune.jsonl'}"]
    cli = cli_main([*command, *overrides], cli_class=_InstantiateOnly)
    assert cli.ran == subcommand
    assert cli.model.model is not None and cli.datamodule is not None and cli.trainer is not None
    assert cli.config[subcommand]  # the subcommand's own arguments (a sweep's ratios) parsed too
    if subcommand in ("demo", "sweep"):
        assert any(type(c).__name__ == "SelectivityPruneCallback" for c in cli.trainer.callbacks)


def test_a_config_missing_a_required_argument_fails(tmp_path, capsys):
    """The check above is not vacuous: a config that omits ``model.model_name_or_path`` (required) is refused."""
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.strip().startswith("model_name_or_path:")]
    assert len(lines) < len(text.splitlines())  # tiny.yaml names its model
    config = tmp_path / "no-model.yaml"
    config.write_text("\n".join(lines))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config)], cli_class=_InstantiateOnly)
    assert "model_name_or_path" in capsys.readouterr().err
