"""Per-GPU memory: the model of each term (model.py), the layout planner behind `plan` and `sbatch` (plan.py), and
the start-up prediction checked against the measured peak (check.py)."""
