"""Bad recipes stop before anything starts, with one message naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import Recipe, RecipeError, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def _err(overrides, path=None, check_paths=False) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides, check_paths=check_paths)
    return str(e.value)


def test_defaults_validate_and_derive_sizes():
    r = load_recipe(None, ["data.prompts_per_step=32", "algorithm.group_size=16"], check_paths=False)
    assert r.rollouts_per_step == 512
    assert isinstance(r, Recipe)


def test_unknown_key_names_field_and_closest_match():
    msg = _err(["trainer.lrr=1e-4"])
    assert "trainer.lrr" in msg and "did you mean 'trainer.lr'" in msg


def test_unknown_top_level_section():
    msg = _err(["algoritm.group_size=4"])
    assert "'algoritm'" in msg and "did you mean 'algorithm'" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rollout:\n  max_new_tokenz: 8\n")
    msg = _err([], path=p)
    assert "rollout.max_new_tokenz" in msg and "rollout.max_new_tokens" in msg


def test_wrong_type_names_field():
    msg = _err(["trainer.lr=fast"])
    assert "trainer.lr" in msg and "fast" in msg


@pytest.mark.parametrize("override,field", [
    ("algorithm.group_size=1", "group_size"),
    ("algorithm.clip_low=-0.1", "algorithm.clip_low"),
    ("algorithm.clip_high=-1", "algorithm.clip_high"),
    ("algorithm.kl_coef=-0.5", "algorithm.kl_coef"),
    ("trainer.zero_stage=4", "trainer.zero_stage"),
    ("steps=0", "steps"),
])
def test_out_of_range_names_field(override, field):
    assert field in _err([override])


def test_kl_penalty_and_importance_sampling_level_are_checked():
    msg = _err(["algorithm.kl_penalty=reward"])  # kl_coef defaults to 0
    assert "algorithm.kl_penalty=reward" in msg and "algorithm.kl_coef" in msg
    msg = _err(["algorithm.kl_penalty=reward", "algorithm.kl_coef=0.01"])  # kl_estimator defaults to k3
    assert "algorithm.kl_estimator=k1" in msg
    assert "kl_penalty=loss" in _err(["algorithm.name=online_dpo", "algorithm.group_size=2", "algorithm.kl_coef=0.01",
                                      "algorithm.kl_penalty=reward", "algorithm.kl_estimator=k1"])
    assert "algorithm.kl_penalty" in _err(["algorithm.kl_penalty=rewards"])
    assert "algorithm.importance_sampling_level" in _err(["algorithm.importance_sampling_level=seq"])
    assert "does not use it" in _err(["algorithm.name=online_dpo", "algorithm.group_size=2",
                                      "algorithm.importance_sampling_level=sequence"])
    r = load_recipe(None, ["algorithm.kl_penalty=reward", "algorithm.kl_coef=0.01", "algorithm.kl_estimator=k1",
                           "algorithm.importance_sampling_level=sequence"], check_paths=False)
    assert r.algorithm.kl_penalty == "reward" and r.algorithm.importance_sampling_level == "sequence"
    default = load_recipe(None, [], check_paths=False).algorithm
    assert default.kl_penalty == "loss" and default.importance_sampling_level == "token"


def test_missing_model_path_names_field(tmp_path):
    msg = _err([f"model.path={tmp_path / 'nope'}"], check_paths=True)
    assert "model.path" in msg and "does not exist" in msg


def test_model_dir_without_config_json(tmp_path):
    msg = _err([f"model.path={tmp_path}"], check_paths=True)
    assert "model.path" in msg and "config.json" in msg


def test_missing_data_path_names_field(tmp_path):
    msg = _err([f"data.train={tmp_path / 'missing.jsonl'}"], check_paths=True)
    assert "data.train" in msg


def test_accuracy_reward_must_be_listed():
    msg = _err(["rewards.accuracy=nope"], check_paths=True)
    assert "rewards.accuracy" in msg


def test_override_syntax():
    assert parse_overrides(["a.b=1", "c=x", "d=[1, 2]", "e="]) == [("a.b", 1), ("c", "x"), ("d", [1, 2]), ("e", "")]
    with pytest.raises(RecipeError):
        parse_overrides(["novalue"])


def test_every_recipe_in_repo_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes, "no recipes found"
    for p in recipes:
        load_recipe(p, check_paths=False)


def test_cli_rejects_bad_recipe_before_starting_anything():
    # Exits 2 with the field named; no Ray, no engine (it returns in seconds).
    proc = subprocess.run(
        [sys.executable, "-m", "rl.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"), "trainer.lrr=1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "trainer.lrr" in proc.stderr and "trainer.lr" in proc.stderr
    assert "ray" not in proc.stderr.lower()


def _model_dir(tmp_path, config: dict, tokenizer: bool = True):
    import json

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


def test_model_dir_without_tokenizer(tmp_path):
    d = _model_dir(tmp_path, {"model_type": "llama"}, tokenizer=False)
    msg = _err([f"model.path={d}"], check_paths=True)
    assert "model.path" in msg and "no tokenizer" in msg


def test_model_dir_with_unsupported_architecture(tmp_path):
    d = _model_dir(tmp_path, {"model_type": "vit"})  # an image model
    msg = _err([f"model.path={d}"], check_paths=True)
    assert "model.path" in msg and "vit" in msg


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    from rl.data import load_rows

    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": broken\n[1, 2]\n')
    with pytest.raises(RecipeError, match=r"d\.jsonl:2: malformed JSON line"):
        load_rows(str(p))
    rows = load_rows(str(p), skip_bad_lines=True)  # lines 2 and 3 skipped, counted in the log
    assert rows.num_rows == 1 and rows[0]["answer"] == "2"


def test_adapter_kind_and_source_are_checked_before_anything_starts():
    assert "at least two experts" in _err(["adapter.kind=arrow", "adapter.library=lib", "adapter.experts=[a]"])
    assert "adapter.library is required" in _err(["adapter.kind=arrow", "adapter.experts=[a, b]"])
    assert "zero_stage <= 2" in _err(["adapter.kind=sparse", "trainer.zero_stage=3"])
    assert "keep_ratio" in _err(["adapter.kind=sparse", "adapter.keep_ratio=0"])
    msg = _err(["adapter.kind=arow"])
    assert "adapter.kind" in msg and "arrow" in msg
    assert "must be `new`" in _err(["adapter.kind=arrow", "adapter.source=merge", "adapter.library=lib", "adapter.experts=[a, b]"])
    assert "exactly one expert" in _err(["adapter.kind=lora", "adapter.source=continue", "adapter.library=lib", "adapter.experts=[a, b]"])
    assert "need an adapter.kind" in _err(["adapter.source=merge"])
    # The old single field names its replacement.
    msg = _err(["adapter.mode=merge"])
    assert "adapter.kind" in msg and "adapter.source" in msg
    r = load_recipe(str(ROOT / "recipes" / "arrow-arithmetic.yaml"), [], check_paths=False)
    assert r.adapter.kind == "arrow" and r.algorithm.tis_cap == 2.0
    r = load_recipe(str(ROOT / "recipes" / "sparse-arithmetic.yaml"), [], check_paths=False)
    assert r.adapter.kind == "sparse" and r.adapter.keep_ratio == 0.05


def test_gpu_counts_left_unset_follow_the_machine():
    from rl.placement import machine_defaults

    r = machine_defaults(load_recipe(None, ["rollout.tensor_parallel_size=2", "use_ray=false"], check_paths=False), cuda_devices=2)
    assert (r.rollout.num_gpus_per_actor, r.trainer.num_gpus_per_rank) == (2.0, 1.0)
    r = machine_defaults(load_recipe(None, ["trainer.num_gpus_per_rank=0"], check_paths=False), cuda_devices=1)
    assert (r.rollout.num_gpus_per_actor, r.trainer.num_gpus_per_rank) == (1.0, 0.0)  # what the recipe set is kept
    r = machine_defaults(load_recipe(None, [], check_paths=False), cuda_devices=0)
    assert (r.rollout.num_gpus_per_actor, r.trainer.num_gpus_per_rank, r.rollout.enforce_eager) == (0.0, 0.0, True)
    # CUDA graphs on a GPU, unless the recipe asks for eager decoding
    assert machine_defaults(load_recipe(None, [], check_paths=False), cuda_devices=1).rollout.enforce_eager is False
    r = machine_defaults(load_recipe(None, ["rollout.enforce_eager=true"], check_paths=False), cuda_devices=1)
    assert r.rollout.enforce_eager is True
    # unseeded training samples on a GPU (vLLM's batched sampler), unless the recipe asks for seeds; evaluation stays seeded
    from rl.prepare import sampling

    r = machine_defaults(load_recipe(None, [], check_paths=False), cuda_devices=1)
    assert r.rollout.seed_per_prompt is False and sampling(r, 3, 4).seed is None
    assert sampling(r, 3, 1, greedy=True).seed is not None
    r = machine_defaults(load_recipe(None, ["rollout.seed_per_prompt=true"], check_paths=False), cuda_devices=1)
    assert sampling(r, 3, 4).seed == sampling(load_recipe(None, [], check_paths=False), 3, 4).seed  # the CPU's seeds
        # bfloat16 on a GPU, unless the recipe names a dtype
    assert machine_defaults(load_recipe(None, [], check_paths=False), cuda_devices=1).model.dtype == "bfloat16"
    r = machine_defaults(load_recipe(None, ["model.dtype=float32"], check_paths=False), cuda_devices=1)
    assert r.model.dtype == "float32"


def test_a_rank_asked_for_a_gpu_without_cuda_stops_instead_of_training_on_the_cpu():
    import torch

    from trainer.config import AlgorithmConfig, TrainerConfig
    from trainer.policies import PolicySpec
    from trainer.policy_trainer import PolicyTrainer
    from trainer.setup import TrainerSetup

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    setup = TrainerSetup(policy=PolicySpec(kind="full", base_model="unused"), dtype="float32", algorithm=AlgorithmConfig(),
                         max_response_len=4, trainer=TrainerConfig(num_gpus_per_rank=1))
    with pytest.raises(RuntimeError, match="num_gpus_per_rank=1, but CUDA is not usable"):
        PolicyTrainer(setup)


def test_a_tensor_parallel_engine_under_ray_needs_its_gpus_before_anything_starts():
    with pytest.raises(RecipeError, match=r"tensor_parallel_size=2 under Ray needs GPUs.*num_gpus_per_actor is 0"):
        load_recipe(None, ["rollout.tensor_parallel_size=2"], check_paths=False)
    load_recipe(None, ["rollout.tensor_parallel_size=2", "use_ray=false"], check_paths=False)  # vLLM's own executor
    r = load_recipe(None, ["rollout.tensor_parallel_size=2", "rollout.num_gpus_per_actor=2"], check_paths=False)
    assert r.rollout.tensor_parallel_size == 2
    with pytest.raises(RecipeError, match="collective needs rollout.tensor_parallel_size=1"):
        load_recipe(None, ["rollout.tensor_parallel_size=2", "rollout.num_gpus_per_actor=2",
                           "cluster.weight_transport=collective"], check_paths=False)


def _on_a_gpu_machine(*overrides: str) -> Recipe:
    """The recipe as load_recipe makes it on a machine with one GPU (before check_gpu_layout)."""
    from rl.overrides import set_dotted
    from rl.placement import machine_defaults

    tree: dict = {}
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    return machine_defaults(Recipe.model_validate(tree), cuda_devices=1)


def test_colocation_pairs_an_engine_and_a_rank_on_one_gpu_and_is_refused_where_it_cannot_run():
    from rl.placement import check_gpu_layout

    with pytest.raises(RecipeError, match="colocate=true pairs each engine.*sleep mode is CUDA-only"):
        load_recipe(None, ["rollout.colocate=true"], check_paths=False)  # this machine has no GPU
    r = _on_a_gpu_machine("rollout.colocate=true")
    assert (r.rollout.num_gpus_per_actor, r.trainer.num_gpus_per_rank) == (0.5, 0.5)  # one GPU shared
    check_gpu_layout(r)
    for overrides, match in [
        (["rollout.max_staleness=1"], "max_staleness=0"),
        (["rollout.num_actors=2"], r"num_actors = trainer.num_ranks \(are 2, 1\)"),
        (["rollout.num_gpus_per_actor=1"], r"together at most 1 \(are 1, 0.5"),
        (["cluster.weight_transport=collective"], "NCCL cannot join two ranks on one GPU"),
    ]:
        with pytest.raises(RecipeError, match=match):
            check_gpu_layout(_on_a_gpu_machine("rollout.colocate=true", *overrides))


def test_ipc_weights_on_gpus_need_the_engine_on_trainer_rank_0s_gpu():
    from rl.placement import check_gpu_layout

    check_gpu_layout(_on_a_gpu_machine("rollout.colocate=true", "cluster.weight_transport=ipc"))
    check_gpu_layout(load_recipe(None, ["cluster.weight_transport=ipc"], check_paths=False))  # a CPU: shared memory
    for overrides in (["cluster.weight_transport=ipc"],
                      ["rollout.colocate=true", "rollout.num_actors=2", "trainer.num_ranks=2", "cluster.weight_transport=ipc"]):
        with pytest.raises(RecipeError, match="ipc on GPUs needs rollout.colocate=true with one engine"):
            check_gpu_layout(_on_a_gpu_machine(*overrides))


def test_where_actors_run_may_change_on_resume_what_they_train_may_not():
    from rl.checkpoint import recipe_fingerprint

    base = recipe_fingerprint(load_recipe(None, ["trainer.lr=1e-3"]))
    # A run that lost its engine's node resumes with the engine elsewhere: the same training, the same fingerprint.
    moved = ["rollout.resources={}", "trainer.resources={head: 1}", "cluster.weight_transport=shared_file",
             "cluster.placement=strict_pack", "rollout.num_cpus_per_actor=2", "trainer.torch_threads=1",
             "rollout.max_restarts=0", "rollout.cpu_threads=1", "trainer.host_mmap_threshold_mib=1"]
    assert recipe_fingerprint(load_recipe(None, ["trainer.lr=1e-3", *moved])) == base
    for changed in ("trainer.lr=2e-3", "trainer.num_ranks=2", "rollout.num_actors=2", "algorithm.group_size=4", "seed=1"):
        assert recipe_fingerprint(load_recipe(None, ["trainer.lr=1e-3", changed])) != base, changed
