"""Meta-training of the sb3 controller: surrogate envs fitted to run logs (``surrogate``) and PPO
on them or on the real envs (``train``).

    python -m benchmarks.meta_train --logs results
"""
