"""A complete environment class for multi-turn rollouts: name it in a recipe as

    environment:
      name: docs/guide/examples/second_chance.py:SecondChance   # path (from where you run `rl`) : class
      max_turns: 2                                              # policy turns per episode at most
      options: {tries: 2}                                       # keyword arguments of the constructor

(or ``my_package.my_module:SecondChance`` once it is importable). The framework makes one instance
per episode with ``SecondChance(**options)``, calls ``reset(row)`` with the prompt's data row (every
column), then ``step(turn)`` after each policy turn. ``step`` returns an ``EnvStep``: while ``done``
is false, ``observation`` is appended to the context (its tokens are masked out of the loss) and the
policy speaks again. ``reward`` is added to the episode's reward, on top of the recipe's reward
functions, which score the policy's last turn.

What this one does: a wrong first answer is answered by repeating the question, so the policy gets
a second try. The observation uses only characters the embedded tiny model's tokenizer has
(digits, ``+ - * =`` and space).

>>> env = SecondChance(tries=2)
>>> env.reset({"prompt": "12+34=", "answer": "46"})
>>> env.step("44")
EnvStep(observation=' 12+34=', done=False, reward=0.0)
>>> env.step("46")
EnvStep(observation='', done=True, reward=0.0)
"""

from __future__ import annotations

from typing import Any

from rewards.environments import EnvStep


class SecondChance:
    def __init__(self, tries: int = 2, retry_reward: float = 0.0):
        if tries < 1:
            raise ValueError(f"tries must be >= 1 (got {tries})")
        self.tries, self.retry_reward = tries, retry_reward
        self.question, self.answer, self.left = "", "", tries

    def reset(self, row: dict[str, Any]) -> None:
        self.question, self.answer, self.left = str(row["prompt"]), str(row["answer"]).strip(), self.tries

    def step(self, turn: str) -> EnvStep:
        self.left -= 1
        said = turn.strip().split("\n", 1)[0].strip()
        if said == self.answer or self.left <= 0:
            return EnvStep(done=True)  # the recipe's reward functions score this last turn
        return EnvStep(observation=" " + self.question, done=False, reward=self.retry_reward)
