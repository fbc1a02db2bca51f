"""Course tools: the toy task and its training loop (lessons 01, 05, 06), the exercises (`exercises`) and their
checker (`checker`: check, hint, solution, and `python -m lessons_lib.course.checker grade NOTEBOOK`)."""
