"""`python -m gold_jax.teacher`: the teacher server (see gold_jax/teacher/cli.py for the flags)."""
from gold_jax.teacher.cli import main

if __name__ == "__main__":
    main()
