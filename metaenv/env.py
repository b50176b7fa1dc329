"""LLMZeroEnv: one episode = one GRPO post-training run; one step = one stage of it.

Its arguments are one EnvConfig (metaenv.config). The action picks each controlled hyperparameter
from its grid (metaenv.hparams); the observation summarises the last stage (metaenv.observation);
the reward is the stage's change in dev score, so an episode's return is final dev score - base dev
score. `info` is a deterministic function of the seed and the actions (gymnasium's checker compares
it across runs): wall-clock time is counted in `budget.seconds` and `last_stage_seconds`, not in
`info`.
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from inner.config import GRPOConfig
from inner.models import bf16_pays
from inner.prompts import PromptFormat
from inner.state import TrainState
from inner.tasks import SplitSizeError, get_task, task_class
from inner.trainer import EvalResult, Failure, StageResult, Trainer
from metaenv import observation as obs_layout
from metaenv.config import DEFAULT_CAP, RENDER_MODES, EnvConfig
from metaenv.hparams import DIFFICULTY, HParamSpace, build_hparam_space
from metaenv.pathologies import DIVERGENCE, OUT_OF_MEMORY, detect_pathologies
from metaenv.render import training_curves_png, training_curves_rgb
from metaenv.stage_cache import (
    CacheStats,
    StageCache,
    code_fingerprint,
    model_fingerprint,
    stage_group,
    stage_key,
)
from metaenv.store import StateStore

NUM_SAMPLES = 4  # dev samples shown in info (and to the LLM agent)
# The default episode token cap over the default schedule's expected tokens (see
# LLMZeroEnv.default_episode_tokens): its episodes run their `stages` unless their completions
# average ~25% above the worked solutions' length.
CAP_MARGIN = 1.1
# Seeds whose trainer and initial state are kept, so that resets alternating between seeds (as
# gymnasium's checker and multi-seed controllers do) restore instead of rebuilding. Paper scale
# keeps one: a second trainer would hold a second copy of a large model on the accelerator.
SEED_CACHE = {"embedded": 4, "paper": 1}
# Why an episode ended that makes it terminated, a whole schedule (a failure truncates it).
ENDED = ("stages", "token_cap")
# The one place where a failed stage becomes a pathology; every failure truncates the episode.
FAILURE_PATHOLOGY = {
    Failure.OUT_OF_MEMORY: OUT_OF_MEMORY,
    Failure.NON_FINITE_LOSS: DIVERGENCE,
    Failure.NON_FINITE_GRADIENTS: DIVERGENCE,
    Failure.NON_FINITE_WEIGHTS: DIVERGENCE,
}


class BudgetExhausted(RuntimeError):
    """step() was called after the env's `max_stages` or `max_tokens` budget was spent."""


@dataclass
class Budget:
    """Cumulative cost of everything this env has trained; never rewound by reset or load_state."""

    stages: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training + dev evaluation wall time
    test_evals: int = 0  # evaluate_test() calls, counted apart from the search's cost
    test_seconds: float = 0.0
    max_stages: int | None = None
    max_tokens: int | None = None  # prompt + completion tokens sampled, as counted in `tokens`
    # The env's stage cache counts into this one object (a hit is charged in `stages`, `tokens`
    # and `seconds` as trained).
    cache: CacheStats = field(default_factory=CacheStats)

    @property
    def cache_hits(self) -> int:
        """Stages loaded from the stage cache."""
        return self.cache.hits

    @property
    def cache_misses(self) -> int:
        """Stages trained because the stage cache did not hold them."""
        return self.cache.misses

    @property
    def seconds_saved(self) -> float:
        """Wall seconds the stage cache's loads saved."""
        return self.cache.seconds_saved

    @property
    def remaining_stages(self) -> float:
        return math.inf if self.max_stages is None else self.max_stages - self.stages

    @property
    def remaining_tokens(self) -> float:
        return math.inf if self.max_tokens is None else self.max_tokens - self.tokens

    def refusal(self) -> str | None:
        """Why the next stage may not start, or None. A stage is refused once the budget is spent
        (its cost is known only afterwards, so the last stage may overshoot `max_tokens`)."""
        if self.remaining_stages < 1:
            return f"the budget of {self.max_stages} stages is spent"
        if self.remaining_tokens <= 0:
            return f"the budget of {self.max_tokens} tokens is spent ({self.tokens} used)"
        return None


@dataclass(frozen=True, eq=False)
class EnvState:
    """Handle returned by save_state: a key into the env's state store plus the env's own fields.

    Immutable and cheap to keep; the weights and optimizer live in the store (memory, or disk when
    over `max_states_in_memory`) and are freed when the last reference to the handle goes away.
    """

    key: int
    seed: int
    stage: int
    done: bool  # terminated or truncated: step() needs a reset or another load_state
    hparams: dict[str, Any]  # controlled values of the last stage (defaults before any)
    dev_score: float
    dev_scores: tuple[float, ...]  # base, then one per stage of this path
    stage_ends: tuple[int, ...]  # trainer step count at the end of each stage
    path_cost: dict[str, int]  # stages and tokens trained on this path since the base model
    path: tuple[dict[str, Any], ...]  # every hyperparameter of each stage since the base model
    episode_end: str | None  # why the episode ended: "stages", "token_cap", "failure", or None
    observation: np.ndarray
    last: dict[str, Any]  # metrics, samples, pathologies, hparams, failure of the last stage
    store: StateStore = field(repr=False)

    def __copy__(self) -> EnvState:
        return self  # immutable: a copy may share the store entry

    def __deepcopy__(self, memo: dict) -> EnvState:
        return self

    def __reduce__(self):
        raise TypeError("an EnvState is a handle into one env's store and cannot be pickled")


def _deterministic(metrics: dict[str, float]) -> dict[str, float]:
    # Wall-clock entries differ between identical runs; they are counted in the budget instead.
    return {k: v for k, v in metrics.items() if not k.endswith("_time")}


def _full_hparams(config: GRPOConfig, difficulty: int) -> dict[str, Any]:
    """A stage's every hyperparameter, as `info["hparams"]` reports them."""
    return config.to_dict() | {DIFFICULTY: difficulty}


class LLMZeroEnv(gym.Env):
    """GRPO post-training of a causal language model as a Gymnasium env.

    ## Description

    One episode is one RL post-training run of a causal LM with GRPO (`inner/`, TRL's names and
    semantics); one step trains one *stage* of `steps_per_stage` GRPO steps with the action's
    hyperparameters, then scores the model on the task's dev split. A controller's job is the
    schedule: which hyperparameters each stage trains with. `save_state()` / `load_state()` fork
    and restore the whole training state (weights, AdamW moments, RNGs, data cursor), so a search
    can branch from any checkpoint; `evaluate_test()` scores the current state on the held-out
    test split (for the harness, counted apart from the search's cost).

    ## Action Space

    `MultiDiscrete(nvec)`: one index per controlled hyperparameter into its grid of absolute
    values (`self.hparams`: names, grids and defaults, `metaenv.hparams`), so an SB3 policy works
    unchanged. A controller passes the values themselves: `step({"learning_rate": 3e-5,
    "beta": 0.01})`, where the names it leaves out keep the last stage's values. Either form is
    checked once on the grids; an action off them raises `InvalidAction` (a ValueError naming the
    parameter and its allowed values) and costs nothing.

    ## Observation Space

    A `Box` of float32 in bounds, never NaN (`metaenv.observation`, `self.observation_names`): the
    last stage's diagnostics (stage means of reward, KL, entropy, clip and length ratios, gradient
    norm), the dev score and its change, each hyperparameter's position on its grid, and progress.
    `info` holds the full record: per-step metrics and their history, dev samples, detected
    pathologies, the stage's every hyperparameter, the failure if any, and the path's cost.

    ## Rewards

    The stage's change in dev score (`dev_metric`), so an episode's return is final dev score -
    base dev score. A failed stage loses its model and scores 0.

    ## Starting State

    `reset(seed)` restores the base model (loaded once, then copied or cached per seed) and its
    dev score; the seed fixes the data order and sampling, so the same seed and actions give the
    same numbers.

    ## Episode End

    Terminated after `stages` stages, or, with an episode token cap (`episode_token_cap="default"`:
    the default schedule's expected episode tokens + 10%; off by default), earlier at the stage
    whose tokens reach it: compute has a price, so a larger group or a longer completion buys
    fewer stages. `info["episode_end"]` says which ("stages" or "token_cap"). Truncated when a
    stage fails: divergence (a non-finite loss, gradient or weight) or running out of memory,
    named in `info["failure"]` and `info["pathologies"]` (`episode_end` "failure"). Past the
    env's budget (`max_stages`, `max_tokens`, counted over every stage it trains) `step` raises
    `BudgetExhausted`.

    ## Arguments

    `gym.make(env_id, **kwargs)` passes keyword arguments that become one `EnvConfig`
    (`metaenv.config`, where each is described); each is checked as it enters, before any model
    loads: task, scale, model, device, stages, steps_per_stage, hparam_grid, fixed_hparams,
    difficulty, dev_size, test_size, dev_metric, eval_max_new_tokens, seed, max_stages,
    max_tokens, max_states_in_memory, state_dir, render_mode, shuffle_rewards, data_path,
    enable_thinking, episode_token_cap, dtype, stage_cache. `LLMZeroEnv(config=EnvConfig(...))`
    takes a built one.
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 1}

    def __init__(self, config: EnvConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise TypeError("pass either config=EnvConfig(...) or keyword arguments, not both")
        unknown = sorted(set(kwargs) - set(EnvConfig.names()))
        if unknown:
            raise TypeError(f"unknown argument(s) {unknown}; the env takes "
                            f"{list(EnvConfig.names())}")
        self.config = cfg = config if config is not None else EnvConfig(**kwargs)
        self.task_name, self.scale, self.device = cfg.task, cfg.scale, cfg.device
        self.model_name = cfg.model
        self.stages, self.steps_per_stage = cfg.stages, cfg.steps_per_stage
        self.dev_size, self.test_size = cfg.dev_size, cfg.test_size
        self.dev_metric, self.render_mode = cfg.dev_metric, cfg.render_mode
        self._build_task()
        self._build_spaces()
        self.budget = Budget(max_stages=cfg.max_stages, max_tokens=cfg.max_tokens)
        self._store = StateStore(
            cfg.max_states_in_memory,
            save=lambda state, path: state.save(path),
            load=lambda path: TrainState.load(path, device=cfg.device),
            directory=cfg.state_dir,
        )
        self._stage_cache = (None if cfg.stage_cache is None
                             else StageCache(cfg.stage_cache, self.budget.cache))
        self._cache_fingerprint: dict[str, Any] | None = None
        self._episode_token_cap: int | None = None  # resolved at the first reset
        self._base_model: torch.nn.Module | None = None  # pristine base weights (never trained)
        self._num_parameters = 0
        self._tokenizer: Any = None
        self._base_eval: EvalResult | None = None  # greedy dev eval: the same for every seed
        # seed -> [trainer, initial state or None if it was built by load_state]; LRU order
        self._seeds: OrderedDict[int, list] = OrderedDict()
        self.trainer: Trainer | None = None
        self._trainer_seed: int | None = None
        self.last_test_correct: tuple[bool, ...] = ()  # per test item, set by evaluate_test()
        self.last_test_by_level: dict[int, float] = {}  # its accuracy per level, likewise
        self._reset_episode_fields()

    # ------------------------------------------------------------------ construction helpers
    def _build_task(self) -> None:
        """The task, with dev and test splits that hold `dev_size` and `test_size` problems.

        Dev/test are built at the task's default difficulty whatever the training level, and only
        resized when asked for more than the task's default (resizing dev changes test).
        """
        cfg = self.config
        defaults = task_class(cfg.task).sizes[cfg.scale]
        sizes = {f"{split}_size": n for split, n in (("dev", cfg.dev_size), ("test", cfg.test_size))
                 if defaults[split] is not None and n > defaults[split]}
        self.task = get_task(cfg.task, cfg.scale, data_path=cfg.data_path, **sizes)
        for split, asked in (("dev", cfg.dev_size), ("test", cfg.test_size)):
            try:  # the task refuses a split short of a size it was given ...
                held = len(self.task.examples(split))
            except SplitSizeError as err:
                raise SplitSizeError(f"{split}_size={asked}: {err}") from err
            if held < asked:  # ... and the env one short of its own (a paper-scale default)
                raise SplitSizeError(
                    f"{split}_size={asked} is more than task {cfg.task!r} holds at scale "
                    f"{cfg.scale!r}: {held} distinct {split} problems"
                    + (f" with dev_size={cfg.dev_size}" if split == "test" else "")
                    + f"; pass {split}_size={held} or less")
        self.difficulty = (cfg.difficulty if cfg.difficulty is not None
                           else self.task.default_difficulty)

    def _build_spaces(self) -> None:
        cfg = self.config
        self.hparams: HParamSpace
        self.hparams, self.fixed_hparams = build_hparam_space(
            cfg.task, cfg.scale, cfg.hparam_grid, cfg.fixed_hparams,
            tuple(self.task.difficulty_levels), self.difficulty
        )
        # Building every GRPOConfig now turns a bad grid value into an error at construction.
        for name, grid in self.hparams.grids.items():
            for value in grid:
                self._config({**self.hparams.defaults, name: value})
        self.action_space = self.hparams.space()
        self.observation_space = obs_layout.observation_space(len(self.hparams.names))
        self.observation_names = obs_layout.observation_names(self.hparams.names)

    def _config(self, values: dict[str, Any]) -> tuple[GRPOConfig, int]:
        """GRPOConfig and training difficulty for controlled `values` plus the fixed ones."""
        merged = {**self.fixed_hparams, **values}
        difficulty = merged.pop(DIFFICULTY, self.difficulty)
        try:
            return GRPOConfig(**merged), difficulty
        except ValueError as err:
            raise ValueError(f"invalid hyperparameters {merged}: {err}") from err

    def _reset_episode_fields(self) -> None:
        self.stage = 0
        self.done = False
        self.dev_score = math.nan
        self.base_dev_score = math.nan
        self.dev_scores: list[float] = []
        self.stage_ends: list[int] = []
        self.path_cost = {"stages": 0, "tokens": 0}
        self.path: list[dict[str, Any]] = []  # every hyperparameter of each stage of the path
        self.episode_end: str | None = None
        self.current_hparams = dict(self.hparams.defaults)  # controlled values of the last stage
        self.last_stage_seconds = 0.0
        self._obs = np.zeros(self.observation_space.shape, np.float32)
        self._last: dict[str, Any] = {}

    def _load_base(self) -> None:
        """Load the base model from disk once; later seeds copy these pristine weights."""
        if self.model_name is None:
            from inner.base_model import load_base_model

            model, tokenizer = load_base_model(device=self.device)
        else:
            from inner.models import load_model

            model, tokenizer = load_model(self.model_name, device=self.device)
        self._base_model, self._tokenizer = model, tokenizer
        self._num_parameters = sum(p.numel() for p in model.parameters())

    def _make_trainer(self, seed: int) -> Trainer:
        if self._base_model is None:
            self._load_base()
        # Paper scale: hand over the loaded model itself and reload from disk for another seed,
        # rather than keep a second full copy of a large model.
        if self.scale == "paper":
            model, self._base_model = self._base_model, None
        else:
            model = copy.deepcopy(self._base_model)
        cfg, kwargs = self.config, {}
        if cfg.eval_max_new_tokens is not None:
            kwargs["eval_max_new_tokens"] = cfg.eval_max_new_tokens
        return Trainer(model, self._tokenizer, self.task, seed=seed, device=self.device,
                       difficulty=self.difficulty, dev_size=self.dev_size,
                       shuffle_rewards=cfg.shuffle_rewards, bf16=self.bf16,
                       prompt_format=PromptFormat(self._tokenizer, cfg.enable_thinking), **kwargs)

    @property
    def bf16(self) -> bool:
        """Whether forward passes run under bf16 autocast (`dtype`; "auto":
        `inner.models.bf16_pays`, the Trainer's default too)."""
        if self.config.dtype != "auto":
            return self.config.dtype == "bf16"
        if self._base_model is None and self._tokenizer is None:
            self._load_base()
        return bf16_pays(torch.device(self.device), self._num_parameters)

    @property
    def episode_token_cap(self) -> int | None:
        """Tokens one episode may sample (None: no cap); known once the tokenizer is loaded."""
        cap = self.config.episode_token_cap
        if cap != DEFAULT_CAP:
            return cap
        if self._episode_token_cap is None:
            if self._tokenizer is None:
                self._load_base()
            self._episode_token_cap = self.default_episode_tokens()
        return self._episode_token_cap

    def default_episode_tokens(self) -> int:
        """The default schedule's episode tokens, expected from the data, plus a margin:
        stages x steps x prompts x generations x (mean prompt + mean completion tokens) x
        `CAP_MARGIN`, a completion taken as long as the task's worked solution (+ EOS, at most
        `max_completion_length`), over the first 512 train examples at the default level. The
        margin lets the default schedule finish its `stages` when its completions run a little
        longer than the solutions."""
        config, difficulty = self._config(self.hparams.defaults)
        examples = self.task.examples("train", difficulty)[:512]
        fmt = PromptFormat(self._tokenizer, self.config.enable_thinking)
        _, prompt_mask = fmt.encode([e.prompt for e in examples], "cpu")
        solutions = self._tokenizer([e.solution for e in examples], add_special_tokens=False)
        completion = [min(len(ids) + 1, config.max_completion_length)
                      for ids in solutions["input_ids"]]
        per_sequence = (float(prompt_mask.sum()) + sum(completion)) / max(len(examples), 1)
        sequences = self.stages * self.steps_per_stage * config.prompts_per_step
        return math.ceil(CAP_MARGIN * sequences * config.num_generations * per_sequence)

    def _use_trainer(self, seed: int, need_base: bool = False) -> EnvState | None:
        """Make the trainer of `seed` current (building it if needed); return its initial state.

        With `need_base`, a cached trainer without an initial state (built by load_state, so its
        weights are not the base model's any more) is rebuilt from the base weights.
        """
        entry = self._seeds.get(seed)
        if entry is not None and need_base and entry[1] is None:
            del self._seeds[seed]
            entry = None
        if entry is None:
            self.trainer = None  # free the current trainer first if it is about to be evicted
            while len(self._seeds) >= SEED_CACHE[self.scale]:
                self._seeds.popitem(last=False)
            entry = self._seeds[seed] = [self._make_trainer(seed), None]
        self._seeds.move_to_end(seed)
        self.trainer, self._trainer_seed = entry[0], seed
        return entry[1]

    def _score(self, result: EvalResult) -> float:
        return float(getattr(result, self.dev_metric))

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Restore the base model (cached after the first time) and its dev score."""
        if seed is None and self._np_random is None and self.config.seed is not None:
            seed = self.config.seed
        super().reset(seed=seed)
        # An unseeded reset draws the next training seed from the env's RNG, as gymnasium expects.
        inner_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
        t0 = time.perf_counter()
        base = self._use_trainer(inner_seed, need_base=True)
        self._reset_episode_fields()
        if base is not None:
            self._restore(base)
        else:
            if self._base_eval is None:
                self._base_eval = self.trainer.evaluate("dev", n=self.dev_size)
            score = self._score(self._base_eval)
            self.dev_score = self.base_dev_score = score
            self.dev_scores = [score]
            self._last = {
                "metrics": [], "pathologies": [], "failure": None,
                "samples": copy.deepcopy(self._base_eval.samples[:NUM_SAMPLES]),
                "dev_by_level": dict(self._base_eval.by_level),
                "hparams": _full_hparams(*self._config(self.hparams.defaults)),
            }
            self._obs = obs_layout.build_observation(
                None, score, self.hparams.positions(self.hparams.defaults), 0.0
            )
            self._seeds[inner_seed][1] = self.save_state()
        self.budget.seconds += time.perf_counter() - t0
        return self._obs.copy(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Train one stage with the action's hyperparameters, then evaluate on dev.

        `action`: a MultiDiscrete index array (a policy's), or a dict of hyperparameter values
        (a controller's), whose missing names keep the last stage's values.
        """
        if self.trainer is None:
            raise RuntimeError("call reset() before step()")
        values = self._stage_values(action)  # raises InvalidAction naming the parameter
        if self.done:
            raise RuntimeError(
                "the episode is over (last stage reached, or truncated by divergence/OOM); "
                "call reset() or load_state()"
            )
        refusal = self.budget.refusal()
        if refusal is not None:
            raise BudgetExhausted(f"{refusal}; evaluate_test() and load_state() still work")
        config, difficulty = self._config(values)
        full = _full_hparams(config, difficulty)
        dev_before = self.dev_score
        result = self._train_stage(config, difficulty, full)
        self._pay(result)
        self.stage += 1
        self.current_hparams = dict(values)
        self.path.append(full)
        # A failed stage loses the model: it scores 0, so the episode's return is -base score.
        evaluation = result.evaluation
        self.dev_score = self._score(evaluation) if evaluation is not None else 0.0
        self.dev_scores.append(self.dev_score)
        self.stage_ends.append(self.trainer.step)
        self.episode_end = self._episode_end(result)
        truncated = self.episode_end == "failure"
        terminated = self.episode_end in ENDED
        self.done = terminated or truncated
        self._last = {
            "metrics": [_deterministic(m) for m in result.metrics],
            "pathologies": self._pathologies(result),
            "failure": None if result.failure is None else str(result.failure),
            "samples": copy.deepcopy(evaluation.samples[:NUM_SAMPLES]) if evaluation else [],
            "dev_by_level": dict(evaluation.by_level) if evaluation else {},
            "hparams": full,
        }
        self._obs = self._stage_observation(result, config, values, dev_before)
        reward = float(self.dev_score - dev_before)
        return self._obs.copy(), reward, terminated, truncated, self._info()

    def _stage_values(self, action: Any) -> dict[str, Any]:
        """The stage's controlled values, checked once: a dict of values is checked on the grids
        and completed from the last stage's values; a policy's index array is decoded."""
        if isinstance(action, Mapping):
            values = self.hparams.complete(action, base=self.current_hparams)
        else:
            values = self.hparams.decode(action)
        return values

    def _episode_end(self, result: StageResult) -> str | None:
        """Why the episode is over after this stage, or None while it goes on."""
        if result.failure is not None:
            return "failure"
        cap = self.episode_token_cap
        if cap is not None and self.path_cost["tokens"] >= cap:
            return "token_cap"
        return "stages" if self.stage >= self.stages else None

    def _train_stage(self, config: GRPOConfig, difficulty: int,
                     full: dict[str, Any]) -> StageResult:
        """Train the current state by one stage of `config` and evaluate it on dev, or load that
        stage from the stage cache when its path from the base model was trained before."""
        cache = self._stage_cache
        key, group = None, ""
        if cache is not None:
            key = stage_key(self._fingerprint(), self._trainer_seed, [*self.path, full])
            group = stage_group(self.config.task, self._trainer_seed)
            hit = cache.get(key, group, device=self.device)
            if hit is not None:
                state, result = hit
                self.trainer.load_state(state)
                return result
        result = self.trainer.train_stage(
            config, self.steps_per_stage, difficulty=difficulty, dev_n=self.dev_size
        )
        if key is not None and result.failure is None:  # a failed stage's model is lost anyway
            cache.put(key, group, self.trainer.save_state(), result)
        return result

    def _fingerprint(self) -> dict[str, Any]:
        """What besides the seed and the path decides a stage's outcome: the base model, the
        training code, the data and the evaluation (the cache key's `env` part)."""
        if self._cache_fingerprint is None:
            cfg = self.config
            self._cache_fingerprint = {
                "task": cfg.task, "scale": cfg.scale, "data_path": cfg.data_path,
                "model": model_fingerprint(self.model_name), "code": code_fingerprint(),
                "steps_per_stage": self.steps_per_stage, "dev_size": self.dev_size,
                "eval_max_new_tokens": cfg.eval_max_new_tokens, "bf16": self.bf16,
                "shuffle_rewards": cfg.shuffle_rewards, "enable_thinking": cfg.enable_thinking,
                "device": str(torch.device(self.device)),
            }
        return self._cache_fingerprint

    def _pay(self, result: StageResult) -> None:
        """Count the stage's cost, whatever happened in it; costs are never rewound."""
        self.last_stage_seconds = result.seconds
        self.budget.stages += 1
        self.budget.tokens += result.num_tokens
        self.budget.seconds += result.seconds
        self.path_cost = {"stages": self.path_cost["stages"] + 1,
                          "tokens": self.path_cost["tokens"] + result.num_tokens}

    def _pathologies(self, result: StageResult) -> list[str]:
        """The detectors' findings, and the failure's pathology when the stage failed."""
        found = detect_pathologies(result.metrics, self.trainer.history, self.dev_scores,
                                   self.dev_size)
        if result.failure is not None and FAILURE_PATHOLOGY[result.failure] not in found:
            found.append(FAILURE_PATHOLOGY[result.failure])
        return found

    def _stage_observation(self, result: StageResult, config: GRPOConfig,
                           values: dict[str, Any], dev_before: float) -> np.ndarray:
        diagnostics = obs_layout.stage_diagnostics(
            result.metrics, config.max_completion_length, self.dev_score, dev_before
        )
        if result.failure is not None:  # nothing was measured on the lost model
            diagnostics = obs_layout.failed(diagnostics)
        return obs_layout.build_observation(
            diagnostics, self.dev_score, self.hparams.positions(values), self._progress()
        )

    def _progress(self) -> float:
        """How far the episode is, in stages or in capped tokens, whichever is further."""
        cap = self.episode_token_cap
        tokens = 0.0 if cap is None else self.path_cost["tokens"] / cap
        return min(1.0, max(self.stage / self.stages, tokens))

    def _info(self) -> dict[str, Any]:
        # Fresh objects on every call: callers keep infos, and gymnasium checks none are shared.
        history = self.trainer.history if self.trainer is not None else []
        return {
            "dev_score": float(self.dev_score),
            "base_dev_score": float(self.base_dev_score),
            "stage": self.stage,
            "metrics": [dict(m) for m in self._last.get("metrics", [])],
            "history": [_deterministic(m) for m in history],
            "dev_scores": list(self.dev_scores),
            "samples": copy.deepcopy(self._last.get("samples", [])),
            "pathologies": list(self._last.get("pathologies", [])),
            "failure": self._last.get("failure"),
            "dev_size": self.dev_size,
            "dev_by_level": dict(self._last.get("dev_by_level", {})),
            "cost": dict(self.path_cost),
            "episode_token_cap": self.episode_token_cap,
            "episode_end": self.episode_end,
            "hparams": dict(self._last.get("hparams", {})),
        }

    def render(self) -> np.ndarray | None:
        """HxWx3 uint8 training curves of the current path (render_mode "rgb_array")."""
        if self.render_mode != "rgb_array":
            return None
        return training_curves_rgb(*self._curves())

    def render_png(self) -> bytes:
        """The same picture as render(), as PNG bytes (for an LLM agent), whatever render_mode."""
        return training_curves_png(*self._curves())

    def _curves(self) -> tuple[list[dict], list[int], list[float], str]:
        history = self.trainer.history if self.trainer is not None else []
        title = f"LLMZero {self.task_name} ({self.scale}): stage {self.stage}/{self.stages}"
        return history, list(self.stage_ends), list(self.dev_scores), title

    def close(self) -> None:
        self.trainer = None
        self._base_model = None
        self._seeds.clear()
        self._store.close()

    # ------------------------------------------------------------------ fork / restore
    def save_state(self) -> EnvState:
        """Snapshot of the whole state (training + the env's episode fields); cheap to keep."""
        if self.trainer is None:
            raise RuntimeError("call reset() before save_state()")
        key = self._store.put(self.trainer.save_state())
        handle = EnvState(
            key=key,
            seed=self._trainer_seed,
            stage=self.stage,
            done=self.done,
            hparams=dict(self.current_hparams),
            dev_score=self.dev_score,
            dev_scores=tuple(self.dev_scores),
            stage_ends=tuple(self.stage_ends),
            path_cost=dict(self.path_cost),
            path=tuple(dict(p) for p in self.path),
            episode_end=self.episode_end,
            observation=self._obs.copy(),
            last=copy.deepcopy(self._last),
            store=self._store,
        )
        # Free the stored weights once nobody holds the handle any more.
        weakref.finalize(handle, self._store.drop, key)
        return handle

    def load_state(self, state: EnvState) -> tuple[np.ndarray, dict[str, Any]]:
        """Restore a saved state; the budget is not rewound. Returns (observation, info)."""
        if not isinstance(state, EnvState):
            raise TypeError(f"load_state expects an EnvState from save_state(), got {type(state)}")
        if state.store is not self._store:
            raise ValueError("this state was saved by another env; load it there")
        # The data order is a function of the trainer's seed: use (or build) that seed's trainer.
        self._use_trainer(state.seed)
        self._restore(state)
        return self._obs.copy(), self._info()

    def _restore(self, state: EnvState) -> None:
        self.trainer.load_state(self._store.get(state.key))
        self.stage, self.done = state.stage, state.done
        self.current_hparams = dict(state.hparams)
        self.dev_score = state.dev_score
        self.dev_scores = list(state.dev_scores)
        self.base_dev_score = state.dev_scores[0]
        self.stage_ends = list(state.stage_ends)
        self.path_cost = dict(state.path_cost)
        self.path = [dict(p) for p in state.path]
        self.episode_end = state.episode_end
        self._obs = state.observation.copy()
        self._last = copy.deepcopy(state.last)

    # ------------------------------------------------------------------ harness
    def evaluate_test(self) -> float:
        """Score of the current state on the held-out test split (harness only; counted apart).

        Also sets `last_test_correct`: each test item's correctness, in test-item order, which
        the same items under every seed make comparable item by item across runs; and
        `last_test_by_level`: the accuracy at each difficulty level of the (mixed) test split.
        """
        if self.trainer is None:
            raise RuntimeError("call reset() or load_state() before evaluate_test()")
        t0 = time.perf_counter()
        if self._last.get("failure") is not None:
            score = 0.0  # the model of a failed stage is lost, as on dev
            items = self.task.examples("test")[: self.test_size]
            self.last_test_correct = (False,) * len(items)
            self.last_test_by_level = dict.fromkeys(
                sorted({e.meta["difficulty"] for e in items if "difficulty" in e.meta}), 0.0)
        else:
            result = self.trainer.evaluate("test", n=self.test_size)
            score = self._score(result)
            self.last_test_correct = tuple(bool(s["correct"]) for s in result.samples)
            self.last_test_by_level = dict(result.by_level)
        self.budget.test_evals += 1
        self.budget.test_seconds += time.perf_counter() - t0
        return score
