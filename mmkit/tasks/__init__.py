"""Builtin tasks, registered as the plugin ``mmkit.tasks``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    from mmkit.tasks.classification import Classification
    from mmkit.tasks.clip_retrieval import ClipRetrieval

    register("clip_retrieval", ClipRetrieval)
    register("classification", Classification)
