"""The model directories a recipe names, checked before anything starts: builtin names resolved (``teacher.model``,
``critic.model``; ``model.path`` goes through ``rl.prepare.resolve_builtins`` with its task), what vLLM would refuse
to serve, and whether a model reads the policy's token ids as the policy does."""

from __future__ import annotations

from pathlib import Path

from rl.config import BUILTIN_PREFIX, Recipe, RecipeError
from rl.placement import cuda_devices


def log(s: str) -> None:
    """A line of the run's own output, before its logger exists."""
    print(f"[rl] {s}", flush=True)


def resolve_model_path(value: str, field: str, log_fn=log) -> str:
    """The model directory a recipe field other than ``model.path`` names (``teacher.model``, ``critic.model``):
    a directory, or a builtin model built (or reused from cache) as for ``model.path``."""
    from rl.tasks.pretrained import PACKAGED, PretrainedBuildError, build_pretrained

    if value in PACKAGED:
        try:
            return str(build_pretrained(value, log=log_fn))
        except PretrainedBuildError as e:
            raise RecipeError(f"recipe field '{field}': {value}: {e}") from None
    if value == "builtin:tiny-arithmetic":
        from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

        return str(Path(build_tiny_model(TinyModelSpec(), log=log_fn)) / "model")
    if value.startswith(BUILTIN_PREFIX):
        raise RecipeError(f"recipe field '{field}': unknown builtin '{value}' (known: "
                          f"{sorted({'builtin:tiny-arithmetic', *PACKAGED})})")
    if not (Path(value) / "config.json").is_file():
        raise RecipeError(f"recipe field '{field}': not a model directory (no config.json): {value}")
    return value


def check_same_tokenizer(model_dir: str, policy_dir: str, field: str, trust_remote_code: bool = False) -> None:
    """A model that scores the policy's token ids (a distillation teacher) must read them as the policy does."""
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=trust_remote_code).get_vocab()
    theirs = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code).get_vocab()
    if mine == theirs:
        return
    differ = sorted(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
    example = differ[0]
    raise RecipeError(f"recipe field '{field}': {model_dir} has another tokenizer than the policy ({policy_dir}): "
                      f"{len(differ)} tokens differ, e.g. {example!r} is id {mine.get(example)} for the policy and "
                      f"{theirs.get(example)} for {field}; it would score other tokens than the ones sampled")


def check_engine_can_serve(model_dir: str, recipe: Recipe, builtin: bool = False) -> None:
    """What vLLM would refuse minutes later, inside an actor, refused here with the field to change: an
    architecture vLLM has no implementation of, a head size or KV block size the CPU engine lacks.
    (A builtin model is known to be servable: its run skips importing vLLM here.)"""
    block = recipe.rollout.kv_block_size
    if block and block % 32 and not cuda_devices():
        raise RecipeError(f"recipe field 'rollout.kv_block_size': the CPU engine needs a multiple of 32, got {block}")
    if builtin:
        return
    from transformers import AutoConfig
    from vllm.model_executor.models import ModelRegistry
    from vllm.platforms import current_platform

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not set(archs) & set(ModelRegistry.get_supported_archs()) and not recipe.model.trust_remote_code:
        raise RecipeError(f"recipe field 'model.path': vLLM cannot serve {archs} ({model_dir}/config.json 'architectures'); "
                          "see vLLM's list of supported models")
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        text = getattr(config, "text_config", None) or config
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head not in CPUAttentionBackend.get_supported_head_sizes():
            raise RecipeError(f"recipe field 'model.path': head size {head} of {model_dir} is not one vLLM's CPU engine "
                              f"supports ({CPUAttentionBackend.get_supported_head_sizes()}); it runs on a GPU machine")
