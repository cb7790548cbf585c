"""Before any process group: the typed config, every check of inputs against each other, and the frozen RunPlan."""
