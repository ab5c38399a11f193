"""lmms-eval integration: the `gripbench` model plugin and the embedded tasks as lmms-eval tasks."""
