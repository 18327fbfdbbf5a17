r"""verl's GKD recipe as a GOLD config: forward KL(teacher||student), always on-policy.

    python -m gold_jax.train --config configs/gkd.py

beta=0 is exactly KL(P_teacher || Q_student) in our (GKD paper / TRL) convention;
verl's recipe text names the ends the other way round (see DESIGN.md).
"""
from configs import gold


def get_config(arg: str | None = None):
    c = gold.get_config(arg)
    c.run_dir = "runs/gkd"
    c.gold.beta = 0.0
    c.gold.lmbda = 1.0
    return c
