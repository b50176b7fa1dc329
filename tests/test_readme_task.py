"""The README's own-task example, copied out into a fresh directory, runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_block(title_part: str) -> str:
    """The one python block of the README section whose title contains `title_part`."""
    parts = re.split(r"^(#+ .*)$", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        if title_part in title:
            blocks = re.findall(r"^```python\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)
            assert len(blocks) == 1, f"{title!r} has {len(blocks)} python blocks"
            return blocks[0]
    raise AssertionError(f"no README section title contains {title_part!r}")


def test_the_own_task_block_registers_makes_and_trains_its_env(tmp_path):
    script = tmp_path / "own_task.py"
    script.write_text(python_block("Your own task"))
    # The checkout under test first on the path (as the editable install of a fresh clone is);
    # a private data cache, so that the toy task leaves nothing in the user's.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMZERO_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    base = re.search(r"^base model: dev score (\d\.\d{3})$", run.stdout, re.MULTILINE)
    after = re.search(r"^after one stage: dev score (\d\.\d{3}), reward ([-+]\d\.\d{3})$",
                      run.stdout, re.MULTILINE)
    assert base and after, run.stdout
    assert abs(float(after[1]) - float(base[1]) - float(after[2])) < 2e-3  # reward = dev gain
    trained = re.search(r"^training: mean reward (\d\.\d{3}), completions cut at the length "
                        r"limit (\d+)%$", run.stdout, re.MULTILINE)
    assert trained and 0 <= float(trained[1]) <= 1 and 0 <= int(trained[2]) <= 100, run.stdout
    assert "a dev completion: '" in run.stdout
    assert "Loading weights" not in run.stderr  # the shipped model loads without a progress bar


def test_the_own_controller_block_registers_and_walks_the_learning_rate_down():
    import gymnasium as gym

    import controllers
    import metaenv  # noqa: F401  (registers the env ids)

    class Recorded(gym.Wrapper):
        """Keeps the hyperparameter values of every stage the controller trains."""

        def __init__(self, env):
            super().__init__(env)
            self.stages = []

        def step(self, action):  # a dict of values (a controller's) or indices (a policy's)
            out = super().step(action)
            self.stages.append(out[-1]["hparams"])  # the stage's every value, as trained
            return out

    namespace = {}
    exec(python_block("Your own controller"), namespace)
    try:
        env = Recorded(gym.make("LLMZero-GSM8K-v0", stages=2, steps_per_stage=1, dev_size=8))
        result = controllers.make("lr-decay").run(env, budget=2, seed=0)
    finally:
        controllers.REGISTRY.pop("lr-decay", None)  # later tests run every registered controller
    defaults = env.unwrapped.hparams.defaults
    assert result.name == "lr-decay" and result.cost["stages"] == 2
    assert [s["learning_rate"] for s in env.stages] == [1e-4, 3e-5]  # one grid step down
    assert all(s[k] == defaults[k] for s in env.stages for k in defaults if k != "learning_rate")
